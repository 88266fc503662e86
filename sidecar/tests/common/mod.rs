//! Helpers shared by the agent's integration tests.

use std::time::Duration;

/// Polls `check` every 20 ms for up to 10 s.
pub async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}
