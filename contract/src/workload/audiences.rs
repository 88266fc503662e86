//! Which audience lists a JWT-SVID may be asked for: the agent's Workload API and the operator's
//! issuer apply the same rule, so an app gets the same answer from either.

/// Audiences and their total size a FetchJWTSVID may ask for: SLIM asks for its own audiences
/// plus one `slim-claims:` audience of about 150 bytes.
pub const MAX_AUDIENCES: usize = 16;
pub const MAX_AUDIENCE_BYTES: usize = 8 * 1024;

/// Why an audience list is refused (they would be signed into a token no app needs).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AudienceError {
    #[error("audience must be specified")]
    Missing,
    #[error("at most {MAX_AUDIENCES} audiences")]
    TooMany,
    #[error("audiences over {MAX_AUDIENCE_BYTES} bytes")]
    TooLarge,
}

/// Refuses audience lists no app needs: none, empty ones, too many, too large.
pub fn check(audiences: &[String]) -> Result<(), AudienceError> {
    if audiences.is_empty() || audiences.iter().any(String::is_empty) {
        return Err(AudienceError::Missing);
    }
    if audiences.len() > MAX_AUDIENCES {
        return Err(AudienceError::TooMany);
    }
    if audiences.iter().map(String::len).sum::<usize>() > MAX_AUDIENCE_BYTES {
        return Err(AudienceError::TooLarge);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_no_app_needs_are_refused() {
        let many: Vec<String> = (0..=MAX_AUDIENCES).map(|i| format!("aud-{i}")).collect();
        assert_eq!(check(&many), Err(AudienceError::TooMany));
        assert_eq!(check(&["x".repeat(MAX_AUDIENCE_BYTES + 1)]), Err(AudienceError::TooLarge));
        assert_eq!(check(&[]), Err(AudienceError::Missing));
        assert_eq!(check(&[String::new()]), Err(AudienceError::Missing));
        assert_eq!(check(&["slim".into(), "slim-claims:x".into()]), Ok(()));
    }
}
