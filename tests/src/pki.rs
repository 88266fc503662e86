//! A throwaway PKI for TLS tests: a CA, leaves it signs (IPs, DNS names, SPIFFE IDs), and SLIM's
//! server `tls` config for a node's certificate.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use slim_operator::tls::control::ClientIdentity;

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

/// One trust domain as SPIRE would serve it to a SLIM node and to the operator: two fake
/// Workload APIs with one CA, and a node whose controller takes its X.509-SVID and its clients'
/// bundle from the first (SLIM's own `spire` TLS source). The operator's socket is the second.
pub struct SpiffeNode {
    pub node: crate::SlimNode,
    pub operator_socket: std::path::PathBuf,
    _agents: [slim_identity_agent::workload::fake::FakeAgent; 2],
}

impl SpiffeNode {
    /// Sockets under `dir`; the node's SVID is `node_id`, the operator's `operator_id` (both in
    /// trust domain `example.org`).
    pub async fn start(dir: &Path, name: &str, node_id: &str, operator_id: &str) -> Self {
        use slim_identity_agent::workload::fake::{AgentState, FakeAgent};
        let mut node_state = AgentState::new("example.org");
        let mut operator_state = AgentState::new("example.org");
        operator_state.authority = node_state.authority.clone();
        node_state.issue(node_id, "");
        operator_state.issue(operator_id, "");
        let (node_socket, operator_socket) = (dir.join(format!("{name}.sock")), dir.join("operator.sock"));
        let node_agent = FakeAgent::start(&node_socket, node_state).await.expect("the node's Workload API");
        let operator_agent =
            FakeAgent::start(&operator_socket, operator_state).await.expect("the operator's Workload API");
        let spire =
            format!("{{type: spire, socket_path: \"unix://{}\", trust_domains: [example.org]}}", node_socket.display());
        let tls = format!("{{insecure: false, source: {spire}, client_ca: {spire}}}");
        let node = crate::SlimNode::start_with_controller_tls(name, &tls).expect("a node with its SVID");
        Self { node, operator_socket, _agents: [node_agent, operator_agent] }
    }
}
