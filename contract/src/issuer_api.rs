//! The contract between `slim-operator`'s SPIFFE issuer and the agent (`identity_source:
//! kubernetes` with an issuer): paths, JSON bodies, the SPIFFE ID a pod may have. Both sides
//! build on these types, so neither can drift from the other.
//!
//! Every call but the bundle carries `Authorization: Bearer <projected service-account token>`
//! (audience: the issuer's). Refusals come back as a Kubernetes `Status` object whose `reason`
//! names the cause (see `slim-operator`'s `issuer::Refusal`).

use serde::{Deserialize, Serialize};

/// `GET`: the trust domain's bundle ([`Bundle`]); no authentication (public keys only).
pub const BUNDLE_PATH: &str = "/v1/bundle";
/// `GET`: the same keys as a SPIFFE bundle document (a JWKS with `use: x509-svid` and
/// `use: jwt-svid` keys), for verifiers outside SLIM.
pub const SPIFFE_BUNDLE_PATH: &str = "/.well-known/spiffe-bundle";
/// `POST` [`X509SvidRequest`] → [`X509SvidResponse`].
pub const X509_SVID_PATH: &str = "/v1/x509svid";
/// `POST` [`JwtSvidRequest`] → [`JwtSvidResponse`].
pub const JWT_SVID_PATH: &str = "/v1/jwtsvid";

/// The downward-API variable with the pod's service account (its SPIFFE ID's last segment).
pub use crate::env::SERVICE_ACCOUNT_ENV;

/// The SPIFFE ID of a service account, as the issuer grants it (Istio's and csi-driver-spiffe's
/// shape).
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// The trust domain's public keys.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub trust_domain: String,
    /// CA certificates, DER in standard base64, newest last.
    pub x509_authorities: Vec<String>,
    /// The JWT signing keys as a JWKS (`kid`, `alg`, `kty`, `crv`, `x`, `y`).
    pub jwt_authorities: serde_json::Value,
    /// How often to fetch the bundle again, seconds.
    pub refresh_hint_seconds: u64,
    /// Increases with every change of the keys.
    pub sequence: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct X509SvidRequest {
    /// A PKCS#10 request, DER in standard base64, whose only SAN is the pod's SPIFFE ID.
    pub csr: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct X509SvidResponse {
    pub spiffe_id: String,
    /// The leaf first (DER, standard base64).
    pub chain: Vec<String>,
    /// Unix seconds.
    pub expires_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtSvidRequest {
    /// Passed through unchanged (SLIM's `slim-claims:` audience included).
    pub audiences: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtSvidResponse {
    pub spiffe_id: String,
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
}
