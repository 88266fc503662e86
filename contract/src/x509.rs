//! X.509-SVID files in spiffe-helper's formats: the chain, the PKCS#8 key, the bundle. Pure.

use base64::Engine;

use crate::workload::pb::X509svidResponse;

/// Rendering options (spiffe-helper's keys of the same names).
#[derive(Clone, Copy, Debug, Default)]
pub struct X509Options {
    pub add_intermediates_to_bundle: bool,
    pub include_federated_domains: bool,
    pub omit_expired: bool,
}

/// The three files of one X.509-SVID.
#[derive(Clone, PartialEq, Eq)]
pub struct X509Files {
    pub spiffe_id: String,
    pub svid_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub bundle_pem: Vec<u8>,
    /// Leaf `notAfter` (Unix seconds).
    pub not_after: i64,
}

impl std::fmt::Debug for X509Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Files").field("spiffe_id", &self.spiffe_id).field("not_after", &self.not_after).finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum X509Error {
    #[error("the Workload API returned no X.509-SVID")]
    Empty,
    #[error("failed to find the hinted X.509-SVID {0:?}")]
    HintNotFound(String),
    #[error("X.509-SVID for {spiffe_id}: {reason}")]
    Bad { spiffe_id: String, reason: String },
    #[error("no bundles found for {0:?} trust domain")]
    NoBundle(String),
}

/// Selects the SVID (by `hint`, else the first one) and renders its files.
pub fn render(response: &X509svidResponse, hint: &str, options: X509Options, now: i64) -> Result<X509Files, X509Error> {
    let svid = if hint.is_empty() {
        response.svids.first().ok_or(X509Error::Empty)?
    } else {
        response.svids.iter().find(|s| s.hint == hint).ok_or_else(|| X509Error::HintNotFound(hint.to_owned()))?
    };
    let bad = |reason: String| X509Error::Bad { spiffe_id: svid.spiffe_id.clone(), reason };
    let trust_domain = trust_domain_of(&svid.spiffe_id).ok_or_else(|| bad("not a SPIFFE ID".into()))?;
    let chain = split_der(&svid.x509_svid).map_err(|e| bad(format!("certificate chain: {e}")))?;
    let (leaf, intermediates) = chain.split_first().ok_or_else(|| bad("empty certificate chain".into()))?;
    let leaf_not_after = not_after(leaf).ok_or_else(|| bad("unreadable leaf certificate".into()))?;
    check_key_matches(&svid.x509_svid_key, leaf).map_err(bad)?;
    let authorities = split_der(&svid.bundle).map_err(|e| bad(format!("bundle: {e}")))?;
    if authorities.is_empty() {
        return Err(X509Error::NoBundle(trust_domain.to_owned()));
    }

    let mut svid_certs: Vec<&[u8]> = vec![leaf];
    let mut bundle_certs: Vec<&[u8]> = authorities.clone();
    if options.add_intermediates_to_bundle {
        bundle_certs.extend(intermediates.iter().copied());
    } else {
        svid_certs.extend(intermediates.iter().copied());
    }
    let mut federated: Vec<(&String, Vec<&[u8]>)> = Vec::new();
    if options.include_federated_domains {
        for (domain, der) in &response.federated_bundles {
            if trust_domain_of(domain) != Some(trust_domain) {
                federated.push((domain, split_der(der).map_err(|e| bad(format!("federated bundle {domain}: {e}")))?));
            }
        }
        federated.sort_by(|a, b| a.0.cmp(b.0));
        bundle_certs.extend(federated.iter().flat_map(|(_, certs)| certs.iter().copied()));
    }
    if options.omit_expired {
        let fresh = |der: &&[u8]| not_after(der).is_none_or(|t| t >= now);
        svid_certs.retain(fresh);
        bundle_certs.retain(fresh);
    }
    Ok(X509Files {
        spiffe_id: svid.spiffe_id.clone(),
        svid_pem: pem_blocks("CERTIFICATE", &svid_certs),
        key_pem: pem_blocks("PRIVATE KEY", &[&svid.x509_svid_key]),
        bundle_pem: pem_blocks("CERTIFICATE", &bundle_certs),
        not_after: leaf_not_after,
    })
}

/// `example.org` of `spiffe://example.org/...` (or of a trust-domain ID `spiffe://example.org`).
pub fn trust_domain_of(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    let domain = rest.split('/').next()?;
    (!domain.is_empty()).then_some(domain)
}

/// Splits concatenated DER certificates.
pub fn split_der(mut der: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut certs = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let used = der.len() - rest.len();
        certs.push(&der[..used]);
        der = rest;
    }
    Ok(certs)
}

fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The private key must be the leaf's: a mismatched pair is never written.
fn check_key_matches(key_der: &[u8], leaf: &[u8]) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let certified = cert.tbs_certificate.subject_pki.subject_public_key.data.to_vec();
    let key = rcgen::KeyPair::try_from(key_der).map_err(|e| format!("private key: {e}"))?;
    if key.public_key_raw() == certified.as_slice() {
        Ok(())
    } else {
        Err("the private key does not match the certificate".into())
    }
}

/// PEM blocks, 64 columns, each ending in a newline.
pub fn pem_blocks(label: &str, ders: &[&[u8]]) -> Vec<u8> {
    let mut out = String::new();
    for der in ders {
        out.push_str(&format!("-----BEGIN {label}-----\n"));
        let encoded = base64::engine::general_purpose::STANDARD.encode(der);
        for line in encoded.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
    }
    out.into_bytes()
}
