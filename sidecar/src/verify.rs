//! `slim-identity-agent verify`: checks a JWT-SVID as a receiving server would.

use std::path::Path;

use crate::svid::jwt::{self, JwtError};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(#[from] JwtError),
}

/// Returns the token's SPIFFE ID, or why it is not acceptable. `bundle` may be spiffe-helper's map
/// or a plain JWKS (used for the token's own trust domain).
pub fn verify(bundle: &Path, audiences: &[String], token_file: &Path, now: i64) -> Result<String, VerifyError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| VerifyError::Read { path: path.display().to_string(), source })
    };
    let token = String::from_utf8_lossy(&read(token_file)?).trim().to_owned();
    let domain = jwt::token_trust_domain(&token).unwrap_or_default();
    let bundles = jwt::read_bundle_file(&read(bundle)?, &domain)?;
    // A receiving server allows a little clock skew (go-jose's default is a minute).
    let valid = jwt::validate(&token, &bundles, audiences, now, 60)?;
    Ok(valid.spiffe_id)
}
