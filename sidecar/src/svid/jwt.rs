//! JWT-SVIDs: validation against the JWT bundles (as a receiving server would), and the bundle
//! file in spiffe-helper's map format or as a plain JWKS. Pure.

use std::collections::BTreeMap;

use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::x509::trust_domain_of;

/// JWKS documents by trust domain name (`example.org`), as the Workload API sent them.
pub type JwtBundles = BTreeMap<String, Vec<u8>>;

/// Algorithms the JWT-SVID specification allows, less ES512 (P-521), which `jsonwebtoken` cannot
/// verify and SPIRE never issues: such a token is refused with a clear reason.
pub const ALLOWED: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// A token that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidJwt {
    pub spiffe_id: String,
    pub audiences: Vec<String>,
    /// `exp` (Unix seconds).
    pub expiry: i64,
    /// `iss`, when the token has one (SPIRE sets it only with the server's `jwt_issuer`).
    pub issuer: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0} is not accepted (JWT-SVIDs use RS256/384/512, ES256/384, PS256/384/512)")]
    Algorithm(String),
    #[error("the token has no kid; JWT-SVID validators require one")]
    NoKid,
    #[error("typ {0:?} is not JWT or JOSE")]
    Typ(String),
    #[error("sub {0:?} is not a SPIFFE ID")]
    Subject(String),
    #[error("no JWT bundle for trust domain {0:?}")]
    NoBundle(String),
    /// `bundle`: the trust domain, or the service-account issuer, whose keys were searched.
    #[error("kid {kid:?} is not in the JWT bundle of {bundle:?}")]
    UnknownKid { kid: String, bundle: String },
    #[error("the token's audiences {token:?} include none of the expected {expected:?}")]
    Audience { expected: Vec<String>, token: Vec<String> },
    #[error("the token expired at {0} (Unix time)")]
    Expired(i64),
    #[error("the token is not valid before {0} (Unix time)")]
    NotYetValid(i64),
    #[error("the signature does not verify: {0}")]
    Signature(String),
    #[error("bundle: {0}")]
    Bundle(String),
    #[error("issuer {token:?} is not the cluster's ({expected:?})")]
    Issuer { expected: String, token: Option<String> },
    #[error("sub {0:?} is not a service account (system:serviceaccount:<namespace>:<name>)")]
    NotServiceAccount(String),
    #[error("the token is bound to {token}, not to this pod ({expected})")]
    PodBinding { expected: String, token: String },
}

/// The registered claims every token kind here is checked on.
#[derive(Deserialize)]
pub(crate) struct Claims {
    pub(crate) sub: Option<String>,
    pub(crate) iss: Option<String>,
    #[serde(default)]
    pub(crate) aud: Audience,
    pub(crate) exp: Option<i64>,
    pub(crate) nbf: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
pub(crate) enum Audience {
    One(String),
    Many(Vec<String>),
    #[default]
    None,
}

impl Audience {
    pub(crate) fn list(self) -> Vec<String> {
        match self {
            Audience::One(a) => vec![a],
            Audience::Many(list) => list,
            Audience::None => Vec::new(),
        }
    }
}

/// Validates `token` for `expected` audiences (at least one must be in `aud`) at `now`, allowing
/// `leeway` seconds of clock skew, with the bundle of the subject's trust domain.
pub fn validate(
    token: &str,
    bundles: &JwtBundles,
    expected: &[String],
    now: i64,
    leeway: u64,
) -> Result<ValidJwt, JwtError> {
    let token = token.trim();
    let (header, kid) = checked_header(token)?;
    let claims: Claims = unverified_claims(token)?;
    let subject = claims.sub.clone().unwrap_or_default();
    let trust_domain = trust_domain_of(&subject)
        .filter(|_| subject.len() > "spiffe://".len())
        .ok_or(JwtError::Subject(subject.clone()))?;
    let jwks = bundles.get(trust_domain).ok_or_else(|| JwtError::NoBundle(trust_domain.to_owned()))?;
    let key = decoding_key(jwks, &kid, trust_domain)?;
    let audiences = claims.aud.list();
    let expiry = check_audience_and_time(&audiences, claims.exp, claims.nbf, expected, now, leeway)?;
    check_signature(token, &header, &key)?;
    Ok(ValidJwt { spiffe_id: subject, audiences, expiry, issuer: claims.iss })
}

/// The header, once its algorithm is one JWT-SVIDs (and service-account tokens) use, it names a
/// key and its `typ` is a JWT's. The algorithm is checked on the raw header first, so `none` or
/// `HS256` get a clear refusal.
pub(crate) fn checked_header(token: &str) -> Result<(jsonwebtoken::Header, String), JwtError> {
    let raw_alg = raw_header(token)?.get("alg").and_then(|a| a.as_str()).unwrap_or_default().to_owned();
    if !ALLOWED.iter().any(|a| format!("{a:?}") == raw_alg) {
        return Err(JwtError::Algorithm(raw_alg));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
    let kid = header.kid.clone().ok_or(JwtError::NoKid)?;
    if let Some(typ) = header.typ.as_deref().filter(|t| !matches!(*t, "JWT" | "JOSE")) {
        return Err(JwtError::Typ(typ.to_owned()));
    }
    Ok((header, kid))
}

/// The key `kid` of the JWKS `jwks` (of `owner`: a trust domain, or an issuer).
pub(crate) fn decoding_key(jwks: &[u8], kid: &str, owner: &str) -> Result<DecodingKey, JwtError> {
    let set: JwkSet = serde_json::from_slice(jwks).map_err(|e| JwtError::Bundle(format!("{owner}: {e}")))?;
    let jwk = set
        .keys
        .iter()
        .find(|k| k.common.key_id.as_deref() == Some(kid))
        .ok_or_else(|| JwtError::UnknownKid { kid: kid.to_owned(), bundle: owner.to_owned() })?;
    check_rsa_size(jwk)?;
    DecodingKey::from_jwk(jwk).map_err(|e| JwtError::Bundle(format!("kid {kid}: {e}")))
}

/// `aud` holds one of `expected`, and `now` is inside `[nbf, exp)` give or take `leeway`; returns `exp`.
pub(crate) fn check_audience_and_time(
    audiences: &[String],
    exp: Option<i64>,
    nbf: Option<i64>,
    expected: &[String],
    now: i64,
    leeway: u64,
) -> Result<i64, JwtError> {
    if !audiences.iter().any(|a| expected.contains(a)) {
        return Err(JwtError::Audience { expected: expected.to_vec(), token: audiences.to_vec() });
    }
    let expiry = exp.ok_or_else(|| JwtError::Malformed("no exp claim".into()))?;
    if expiry + leeway as i64 <= now {
        return Err(JwtError::Expired(expiry));
    }
    if let Some(nbf) = nbf.filter(|nbf| *nbf > now + leeway as i64) {
        return Err(JwtError::NotYetValid(nbf));
    }
    Ok(expiry)
}

/// The signature (and the key type against the algorithm, EC curves included). Times and
/// audiences are checked by [`check_audience_and_time`] against our own clock.
pub(crate) fn check_signature(token: &str, header: &jsonwebtoken::Header, key: &DecodingKey) -> Result<(), JwtError> {
    let mut validation = Validation::new(header.alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    jsonwebtoken::decode::<serde_json::Value>(token, key, &validation)
        .map(drop)
        .map_err(|e| JwtError::Signature(e.to_string()))
}

fn raw_header(token: &str) -> Result<serde_json::Value, JwtError> {
    let header = token.split('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|e| JwtError::Malformed(format!("header: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| JwtError::Malformed(format!("header: {e}")))
}

/// The claims, read without verifying (to pick the key; verification follows).
pub(crate) fn unverified_claims<T: serde::de::DeserializeOwned>(token: &str) -> Result<T, JwtError> {
    let payload = token.split('.').nth(1).ok_or_else(|| JwtError::Malformed("not a compact JWS".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| JwtError::Malformed(format!("payload: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| JwtError::Malformed(format!("claims: {e}")))
}

/// RSA keys under 2048 bits are refused, as the SPIFFE validators do.
fn check_rsa_size(jwk: &Jwk) -> Result<(), JwtError> {
    if let jsonwebtoken::jwk::AlgorithmParameters::RSA(rsa) = &jwk.algorithm {
        let n =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(rsa.n.trim_end_matches('=')).unwrap_or_default();
        let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
        if bits < 2048 {
            return Err(JwtError::Bundle(format!("RSA key of {bits} bits; at least 2048 are required")));
        }
    }
    Ok(())
}

/// spiffe-helper's JWT bundle file: `{"<trust domain>": "<standard base64 of the JWKS>"}` for every
/// trust domain, federated ones included.
pub fn spiffe_helper_bundle(bundles: &JwtBundles) -> Vec<u8> {
    let map: BTreeMap<&String, String> =
        bundles.iter().map(|(td, jwks)| (td, base64::engine::general_purpose::STANDARD.encode(jwks))).collect();
    serde_json::to_vec(&map).unwrap_or_default()
}

/// A plain JWKS (`{"keys": [...]}`) of `trust_domain`, as SLIM's static JWKS verifier loads it.
///
/// SLIM uses only keys that carry `alg` (anything else is `JwksNoSuitableKey`), and the Workload
/// API sends none (go-spiffe's `jwtbundle.Marshal` writes `kty`, `kid` and the key parameters), so
/// every key gets the `alg` it signs with ([`signing_alg`]); an `alg` already there is kept.
pub fn jwks_bundle(bundles: &JwtBundles, trust_domain: &str) -> Result<Vec<u8>, JwtError> {
    let jwks = bundles.get(trust_domain).ok_or_else(|| JwtError::NoBundle(trust_domain.to_owned()))?;
    let value: serde_json::Value =
        serde_json::from_slice(jwks).map_err(|e| JwtError::Bundle(format!("{trust_domain}: {e}")))?;
    let mut keys = match value.get("keys") {
        Some(serde_json::Value::Array(keys)) => keys.clone(),
        Some(_) => return Err(JwtError::Bundle(format!("{trust_domain}: \"keys\" is not a list"))),
        None => Vec::new(),
    };
    for key in &mut keys {
        if let Some(object) = key.as_object_mut()
            && !object.contains_key("alg")
            && let Some(alg) = signing_alg(object)
        {
            object.insert("alg".to_owned(), serde_json::Value::String(alg.to_owned()));
        }
    }
    serde_json::to_vec_pretty(&serde_json::json!({ "keys": keys })).map_err(|e| JwtError::Bundle(e.to_string()))
}

/// The JWS algorithm a JWK signs with, as SPIRE signs JWT-SVIDs: EC P-256 → ES256, P-384 →
/// ES384, P-521 → ES512, RSA → RS256. `None` for a key type it cannot tell (left as it came; SLIM
/// will not use it, which is right for a key nobody can say how to verify with).
pub fn signing_alg(jwk: &serde_json::Map<String, serde_json::Value>) -> Option<&'static str> {
    match (jwk.get("kty")?.as_str()?, jwk.get("crv").and_then(|c| c.as_str())) {
        ("EC", Some("P-256")) => Some("ES256"),
        ("EC", Some("P-384")) => Some("ES384"),
        ("EC", Some("P-521")) => Some("ES512"),
        ("RSA", _) => Some("RS256"),
        ("OKP", Some("Ed25519")) => Some("EdDSA"),
        _ => None,
    }
}

/// Reads a bundle file in either format into bundles by trust domain. A plain JWKS has no
/// trust domain of its own: it is used for `default_domain` (the token's, when verifying).
pub fn read_bundle_file(bytes: &[u8], default_domain: &str) -> Result<JwtBundles, JwtError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| JwtError::Bundle(format!("not JSON: {e}")))?;
    let object = value.as_object().ok_or_else(|| JwtError::Bundle("expected a JSON object".into()))?;
    if object.contains_key("keys") {
        return Ok(BTreeMap::from([(default_domain.to_owned(), bytes.to_vec())]));
    }
    object
        .iter()
        .map(|(domain, encoded)| {
            let encoded =
                encoded.as_str().ok_or_else(|| JwtError::Bundle(format!("{domain}: expected base64 text")))?;
            let jwks = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| JwtError::Bundle(format!("{domain}: {e}")))?;
            let domain = domain.strip_prefix("spiffe://").unwrap_or(domain).to_owned();
            Ok((domain, jwks))
        })
        .collect()
}

/// The trust domain a token claims (for verifying against a plain JWKS).
pub fn token_trust_domain(token: &str) -> Option<String> {
    let claims: Claims = unverified_claims(token.trim()).ok()?;
    trust_domain_of(&claims.sub?).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn written(keys: serde_json::Value) -> serde_json::Value {
        let bundles =
            BTreeMap::from([("example.org".to_owned(), serde_json::to_vec(&json!({"keys": keys})).expect("json"))]);
        serde_json::from_slice(&jwks_bundle(&bundles, "example.org").expect("jwks")).expect("json")
    }

    #[test]
    fn every_key_type_gets_the_alg_spire_signs_with() {
        let out = written(json!([
            {"kty": "EC", "crv": "P-256", "kid": "a", "x": "x", "y": "y"},
            {"kty": "EC", "crv": "P-384", "kid": "b", "x": "x", "y": "y"},
            {"kty": "EC", "crv": "P-521", "kid": "c", "x": "x", "y": "y"},
            {"kty": "RSA", "kid": "d", "n": "n", "e": "AQAB"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "e", "x": "x"},
        ]));
        let algs: Vec<&str> =
            out["keys"].as_array().expect("keys").iter().map(|k| k["alg"].as_str().unwrap_or("")).collect();
        assert_eq!(algs, ["ES256", "ES384", "ES512", "RS256", "EdDSA"]);
        // Nothing else changes.
        assert_eq!(out["keys"][3]["n"], "n");
        assert_eq!(out["keys"][0]["kid"], "a");
    }

    #[test]
    fn an_alg_already_there_is_kept_and_unknown_keys_are_left_alone() {
        let out = written(json!([
            {"kty": "RSA", "kid": "ps", "alg": "PS256", "n": "n", "e": "AQAB"},
            {"kty": "oct", "kid": "secret", "k": "k"},
            {"kty": "EC", "crv": "secp256k1", "kid": "k1"},
        ]));
        assert_eq!(out["keys"][0]["alg"], "PS256");
        assert!(out["keys"][1].get("alg").is_none());
        assert!(out["keys"][2].get("alg").is_none());
    }

    #[test]
    fn a_bundle_whose_keys_are_not_a_list_is_an_error() {
        let bundles = BTreeMap::from([("td".to_owned(), br#"{"keys": {}}"#.to_vec())]);
        assert!(matches!(jwks_bundle(&bundles, "td"), Err(JwtError::Bundle(_))));
    }
}
