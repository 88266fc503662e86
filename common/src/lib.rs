//! What `slim-operator` and `slim-identity-agent` share, so that both behave alike under failure:
//! - [`backoff`]: one exponential backoff with jitter (a fleet of sidecars that lost their SPIRE
//!   agent, or an operator's retries, must not come back in lockstep);
//! - [`supervise`]: long-lived tasks whose unexpected end is an error, never a silent stop;
//! - [`error_chain`]: an error and its causes in one line, each said once.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod supervise;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// `a: b: c` from an error and its sources (tonic's top-level message alone says little).
///
/// An error and its causes, each said once: a cause whose text the message already shows (an
/// error that prints its source and also returns it from `source()`, as kube's and tonic's do) is
/// not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        let cause = next.to_string();
        if !cause.is_empty() && !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = next.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_says_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("inner cause")]
        struct Inner;
        // Prints its cause and returns it from source(), as kube's and tonic's errors do.
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Both(#[source] Inner);
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct SourceOnly(#[source] Inner);
        assert_eq!(error_chain(&Both(Inner)), "outer: inner cause");
        assert_eq!(error_chain(&SourceOnly(Inner)), "outer: inner cause");
    }
}
