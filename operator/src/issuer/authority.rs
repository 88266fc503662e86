//! Signing with the issuer's keys: X.509-SVIDs from CSRs, JWT-SVIDs, the bundle. No IO.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};
use slim_identity_contract::issuer_api as api;

use super::keys::{self, Key, KeyMaker, KeySet, Policy};

/// Why an SVID was not signed (the caller's fault, each with the reason it is counted under).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("the CSR is not a valid PKCS#10 request: {0}")]
    BadCsr(String),
    #[error("the CSR asks for {asked:?}; this pod may only have {allowed}")]
    WrongSpiffeId { asked: Vec<String>, allowed: String },
    #[error("{0}")]
    BadAudiences(String),
    /// Our own keys are unusable (never the caller's fault).
    #[error("the issuer's keys: {0}")]
    Keys(String),
}

/// A key set ready to sign: parsed once per change of the Secret.
pub struct Authority {
    pub set: KeySet,
    pub policy: Policy,
    /// `iss` of the JWT-SVIDs.
    pub jwt_issuer: String,
}

impl Authority {
    /// An X.509-SVID for `spiffe_id` from `csr_der` (whose only SAN must be that ID), signed by
    /// the current CA: the chain (leaf, DER) and its expiry.
    pub fn sign_csr(&self, csr_der: &[u8], spiffe_id: &str, now: i64) -> Result<(Vec<Vec<u8>>, i64), SignError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| SignError::BadCsr(e.to_string()))?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [spiffe_id] {
            return Err(SignError::WrongSpiffeId { asked, allowed: spiffe_id.to_owned() });
        }
        let ca = keys::signing(&self.set.cas, now).ok_or_else(|| SignError::Keys("no CA".into()))?;
        let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|e| SignError::Keys(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, &ca_key).map_err(|e| SignError::Keys(e.to_string()))?;
        let ca_not_after = keys::ca_not_after(ca.published_at, &self.policy);
        let expires_at = (now + self.policy.x509_ttl).min(ca_not_after);
        let params = svid_params(spiffe_id, now - 10, expires_at).map_err(SignError::Keys)?;
        let leaf = params.signed_by(&csr.public_key, &issuer).map_err(|e| SignError::Keys(e.to_string()))?;
        Ok((vec![leaf.der().to_vec()], expires_at))
    }

    /// A JWT-SVID for `spiffe_id`, audiences passed through: the token and its expiry.
    pub fn mint_jwt(&self, spiffe_id: &str, audiences: &[String], now: i64) -> Result<(String, i64), SignError> {
        check_audiences(audiences)?;
        let key = keys::signing(&self.set.jwt_keys, now).ok_or_else(|| SignError::Keys("no JWT key".into()))?;
        let encoding = EncodingKey::from_ec_pem(key.key_pem.as_bytes()).map_err(|e| SignError::Keys(e.to_string()))?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.id.clone());
        header.typ = Some("JWT".into());
        let expires_at = now + self.policy.jwt_ttl;
        let claims = json!({
            "sub": spiffe_id, "aud": audiences, "iat": now, "exp": expires_at, "iss": self.jwt_issuer,
        });
        let token = jsonwebtoken::encode(&header, &claims, &encoding).map_err(|e| SignError::Keys(e.to_string()))?;
        Ok((token, expires_at))
    }

    /// The bundle the agents serve: every published CA and JWT key.
    pub fn bundle(&self, refresh_hint_seconds: u64) -> Result<api::Bundle, SignError> {
        let x509_authorities = self
            .set
            .cas
            .iter()
            .map(|ca| pem_der(&ca.cert_pem).map(|d| STANDARD.encode(d)))
            .collect::<Result<_, _>>()?;
        let keys = self.set.jwt_keys.iter().map(|k| jwk(k, "jwt-svid")).collect::<Result<Vec<_>, _>>()?;
        Ok(api::Bundle {
            trust_domain: self.set.trust_domain.clone(),
            x509_authorities,
            jwt_authorities: json!({ "keys": keys }),
            refresh_hint_seconds,
            sequence: self.set.sequence,
        })
    }

    /// The SPIFFE bundle document (one JWKS: `x509-svid` keys with `x5c`, `jwt-svid` keys).
    pub fn spiffe_bundle(&self, refresh_hint_seconds: u64) -> Result<Value, SignError> {
        let mut keys = Vec::new();
        for ca in &self.set.cas {
            let mut key = jwk(ca, "x509-svid")?;
            key["x5c"] = json!([STANDARD.encode(pem_der(&ca.cert_pem)?)]);
            if let Some(object) = key.as_object_mut() {
                object.remove("kid");
                object.remove("alg");
            }
            keys.push(key);
        }
        for key in &self.set.jwt_keys {
            keys.push(jwk(key, "jwt-svid")?);
        }
        Ok(json!({ "keys": keys, "spiffe_refresh_hint": refresh_hint_seconds, "spiffe_sequence": self.set.sequence }))
    }
}

/// Refuses audience lists no app needs: none, empty ones, too many, too large (the agent's own
/// rule, so an app gets the same answer from either).
pub fn check_audiences(audiences: &[String]) -> Result<(), SignError> {
    slim_identity_contract::workload::audiences::check(audiences).map_err(|e| SignError::BadAudiences(e.to_string()))
}

fn pem_der(pem: &str) -> Result<Vec<u8>, SignError> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map(|(_, p)| p.contents)
        .map_err(|e| SignError::Keys(format!("certificate PEM: {e}")))
}

/// The public half of a P-256 key as a JWK.
fn jwk(key: &Key, usage: &str) -> Result<Value, SignError> {
    let pair = KeyPair::from_pem(&key.key_pem).map_err(|e| SignError::Keys(e.to_string()))?;
    let point = pair.public_key_raw();
    if point.len() != 65 || point[0] != 4 {
        return Err(SignError::Keys(format!("key {} is not an uncompressed P-256 point", key.id)));
    }
    Ok(json!({
        "kty": "EC", "crv": "P-256", "use": usage, "kid": key.id, "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    }))
}

fn time_of(unix: i64) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::from_unix_timestamp(unix).map_err(|e| e.to_string())
}

/// An X.509-SVID's parameters, as the SPIFFE X.509-SVID specification asks (and SPIRE issues).
fn svid_params(spiffe_id: &str, not_before: i64, not_after: i64) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().map_err(|e: rcgen::Error| e.to_string())?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages =
        vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment, KeyUsagePurpose::KeyAgreement];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = time_of(not_before)?;
    params.not_after = time_of(not_after)?;
    Ok(params)
}

/// Makes real P-256 keys (and self-signed CA certificates).
pub struct RealKeys;

impl KeyMaker for RealKeys {
    fn ca(&mut self, trust_domain: &str, published_at: i64, not_after: i64) -> Result<Key, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let id = short_id();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::OrganizationName, "slim-operator");
        params.distinguished_name.push(DnType::CommonName, format!("{trust_domain} CA {id}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into().map_err(|e: rcgen::Error| e.to_string())?)];
        params.not_before = time_of(published_at - 60)?;
        params.not_after = time_of(not_after)?;
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        Ok(Key { id, key_pem: key.serialize_pem(), cert_pem: cert.pem(), published_at, signs_from: published_at })
    }

    fn jwt(&mut self, published_at: i64) -> Result<Key, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        Ok(Key {
            id: short_id(),
            key_pem: key.serialize_pem(),
            cert_pem: String::new(),
            published_at,
            signs_from: published_at,
        })
    }
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy { x509_ttl: 3600, jwt_ttl: 300, ca_rotation: 365 * 86400, jwt_rotation: 86400 };

    fn authority(now: i64) -> Authority {
        let set = keys::initial("cluster.local", &POLICY, now, &mut RealKeys).unwrap();
        Authority { set, policy: POLICY, jwt_issuer: "https://issuer".into() }
    }

    const ID: &str = "spiffe://cluster.local/ns/team/sa/alice";

    #[test]
    fn a_csr_for_the_pod_s_own_id_becomes_an_svid_signed_by_the_ca_in_the_bundle() {
        let now = slim_k8s_common::unix_now();
        let authority = authority(now);
        let (_key, csr) = slim_identity_agent::issuer::key_and_csr(ID).unwrap();
        let (chain, expires_at) = authority.sign_csr(&csr, ID, now).unwrap();
        assert_eq!(expires_at, now + 3600);
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let sans = leaf.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
        assert_eq!(format!("{sans:?}"), format!("[URI({ID:?})]"));
        assert!(!leaf.is_ca());
        let bundle = authority.bundle(30).unwrap();
        let ca_der = STANDARD.decode(&bundle.x509_authorities[0]).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        leaf.verify_signature(Some(ca.public_key())).expect("signed by the published CA");
    }

    #[test]
    fn a_csr_for_another_id_or_a_forged_one_is_refused() {
        let now = slim_k8s_common::unix_now();
        let authority = authority(now);
        let (_key, csr) = slim_identity_agent::issuer::key_and_csr("spiffe://cluster.local/ns/team/sa/bob").unwrap();
        assert!(matches!(authority.sign_csr(&csr, ID, now), Err(SignError::WrongSpiffeId { .. })));
        let mut forged = csr.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(matches!(authority.sign_csr(&forged, ID, now), Err(SignError::BadCsr(_))));
        assert!(matches!(authority.sign_csr(b"junk", ID, now), Err(SignError::BadCsr(_))));
    }

    #[test]
    fn jwt_svids_carry_the_audiences_unchanged_and_verify_against_the_published_jwks() {
        let now = slim_k8s_common::unix_now();
        let authority = authority(now);
        let audiences = vec!["slim".to_owned(), "slim-claims:eyJwdWJrZXkiOiJ4In0".to_owned()];
        let (token, exp) = authority.mint_jwt(ID, &audiences, now).unwrap();
        assert_eq!(exp, now + 300);
        let bundle = authority.bundle(30).unwrap();
        let bundles = [("cluster.local".to_owned(), serde_json::to_vec(&bundle.jwt_authorities).unwrap())].into();
        let valid = slim_identity_agent::svid::jwt::validate(&token, &bundles, &audiences[..1], now, 0).unwrap();
        assert_eq!(valid.spiffe_id, ID);
        assert_eq!(valid.issuer.as_deref(), Some("https://issuer"));
        let jwks = bundle.jwt_authorities["keys"][0].clone();
        assert_eq!((jwks["alg"].as_str(), jwks["kid"].as_str().map(str::len)), (Some("ES256"), Some(16)));
    }

    #[test]
    fn audience_lists_no_app_needs_are_refused() {
        let many: Vec<String> = (0..17).map(|i| format!("a{i}")).collect();
        assert!(check_audiences(&many).is_err());
        assert!(check_audiences(&["x".repeat(8 * 1024 + 1)]).is_err());
        assert!(check_audiences(&[]).is_err());
        assert!(check_audiences(&[String::new()]).is_err());
        assert!(check_audiences(&["slim".into()]).is_ok());
    }

    #[test]
    fn the_spiffe_bundle_document_has_both_uses() {
        let authority = authority(slim_k8s_common::unix_now());
        let doc = authority.spiffe_bundle(30).unwrap();
        let uses: Vec<&str> = doc["keys"].as_array().unwrap().iter().map(|k| k["use"].as_str().unwrap()).collect();
        assert_eq!(uses, ["x509-svid", "jwt-svid"]);
        assert!(doc["keys"][0]["x5c"][0].is_string());
    }
}
