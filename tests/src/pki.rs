//! A throwaway PKI for TLS tests: a CA, leaves it signs (IPs, DNS names, SPIFFE IDs), and SLIM's
//! server `tls` config for a node's certificate.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use slim_operator::slim::tls::ClientIdentity;

/// A CA, and leaves it signs.
pub struct Ca {
    pub pem: String,
    pub der: rustls::pki_types::CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).expect("CA");
        let (pem, der) = (cert.pem(), cert.der().clone());
        Self { pem: pem.clone(), der, issuer: Issuer::from_ca_cert_pem(&pem, key).expect("issuer") }
    }

    /// `(cert PEM, key PEM)` of a leaf with `sans` (IPs, DNS names, `spiffe://` URIs) valid for `days`.
    pub fn leaf(&self, sans: &[&str], days: i64) -> (String, String) {
        self.leaf_for(sans, time::Duration::days(days))
    }

    /// The same, valid for `validity` from now (negative: expired).
    pub fn leaf_for(&self, sans: &[&str], validity: time::Duration) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, "leaf");
        for san in sans {
            params.subject_alt_names.push(if let Ok(ip) = san.parse() {
                SanType::IpAddress(ip)
            } else if san.starts_with("spiffe://") {
                SanType::URI((*san).try_into().expect("uri"))
            } else {
                SanType::DnsName((*san).try_into().expect("dns"))
            });
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(2);
        params.not_after = now + validity;
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }

    pub fn identity(&self, days: i64) -> Arc<ClientIdentity> {
        let (cert, key) = self.leaf(&["spiffe://example.org/slim-operator"], days);
        Arc::new(ClientIdentity::from_pem(cert.as_bytes(), key.as_bytes()).expect("identity"))
    }
}

/// SLIM's controller `tls`: the node's certificate, and (mTLS) the CA its clients need.
pub fn server_tls(dir: &Path, cert: &(String, String), client_ca: Option<&Ca>) -> String {
    std::fs::write(dir.join("node.crt"), &cert.0).expect("write");
    std::fs::write(dir.join("node.key"), &cert.1).expect("write");
    let source = format!(
        "source: {{type: file, cert: \"{}\", key: \"{}\"}}",
        dir.join("node.crt").display(),
        dir.join("node.key").display()
    );
    match client_ca {
        None => format!("{{insecure: false, {source}}}"),
        Some(ca) => {
            let path = dir.join(format!("client-ca-{:08x}.pem", rand::random::<u32>()));
            std::fs::write(&path, &ca.pem).expect("write");
            format!("{{insecure: false, {source}, client_ca: {{type: file, path: \"{}\"}}}}", path.display())
        }
    }
}
