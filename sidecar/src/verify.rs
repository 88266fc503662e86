//! `slim-identity-agent verify`: checks a token as a receiving server would: a JWT-SVID, or a
//! Kubernetes service-account token against the cluster's JWKS.

use std::path::Path;

use crate::svid::jwt::{self, JwtError};
use crate::svid::kubernetes::{self, BUNDLE_KEY, Expected};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(#[from] JwtError),
}

/// Who the token says it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The SPIFFE ID, or `system:serviceaccount:<namespace>:<name>`.
    pub subject: String,
    /// More about a service-account token (its pod, its issuer); empty for a JWT-SVID.
    pub details: String,
}

/// Verifies `token_file` for `audiences`. `bundle` may be spiffe-helper's map or a plain JWKS
/// (used for the token's own trust domain, or, for a service-account token, as the cluster's keys).
pub fn verify(bundle: &Path, audiences: &[String], token_file: &Path, now: i64) -> Result<Verified, VerifyError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| VerifyError::Read { path: path.display().to_string(), source })
    };
    let token = String::from_utf8_lossy(&read(token_file)?).trim().to_owned();
    // A receiving server allows a little clock skew (go-jose's default is a minute).
    let leeway = 60;
    if kubernetes::is_service_account_token(&token) {
        let bundles = jwt::read_bundle_file(&read(bundle)?, BUNDLE_KEY)?;
        let jwks = bundles.get(BUNDLE_KEY).ok_or_else(|| {
            JwtError::Bundle("a service-account token is checked against a plain JWKS (the cluster's keys)".into())
        })?;
        let expected = Expected { audiences: audiences.to_vec(), ..Expected::default() };
        let valid = kubernetes::validate(&token, jwks, &expected, now, leeway)?;
        return Ok(Verified { details: valid.describe(), subject: valid.subject });
    }
    let domain = jwt::token_trust_domain(&token).unwrap_or_default();
    let bundles = jwt::read_bundle_file(&read(bundle)?, &domain)?;
    let valid = jwt::validate(&token, &bundles, audiences, now, leeway)?;
    Ok(Verified { subject: valid.spiffe_id, details: String::new() })
}
