//! JWT-SVID refresh timing, on tokio's paused clock (no real waiting, no sleeps to tune).

use std::time::Duration;

use slim_identity_agent::agent::run_daemon;
use slim_identity_agent::config::Config;
use slim_identity_agent::workload::fake::{AgentState, FakeAgent};

async fn intervals(percent: u8, ttl: Duration) -> Vec<Duration> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("svids");
    std::fs::create_dir(&out).expect("dir");
    let mut state = AgentState::new("example.org");
    state.jwt_ttl = ttl;
    state.issue("spiffe://example.org/app", "");
    let agent = FakeAgent::start(&dir.path().join("agent.sock"), state).await.expect("fake");
    let config = Config::from_yaml(&format!(
        "agent_address: {}\ncert_dir: {}\njwt_svid_refresh_percent: {percent}\n\
         jwt_svids: [{{jwt_audience: slim, jwt_svid_file_name: t}}]\n",
        agent.socket.display(),
        out.display()
    ))
    .expect("config");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(run_daemon(config, async {
        let _ = stopped.await;
    }));
    while agent.read(|s| s.jwt_fetched_at.len()) < 4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = stop.send(());
    let _ = daemon.await;
    agent.read(|s| s.jwt_fetched_at.windows(2).map(|w| w[1] - w[0]).collect())
}

fn near(actual: Duration, expected: Duration) -> bool {
    actual.abs_diff(expected) <= Duration::from_secs(2)
}

#[tokio::test(start_paused = true)]
async fn refresh_happens_at_half_the_remaining_life() {
    // A 10-minute token is refreshed ~301 s after each fetch: spiffe-helper's remaining/2 + 1 s.
    for gap in intervals(50, Duration::from_secs(600)).await.into_iter().take(3) {
        assert!(near(gap, Duration::from_secs(301)), "refreshed after {gap:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn refresh_can_be_earlier_but_never_later() {
    for gap in intervals(10, Duration::from_secs(600)).await.into_iter().take(3) {
        assert!(near(gap, Duration::from_secs(61)), "refreshed after {gap:?}");
    }
}
