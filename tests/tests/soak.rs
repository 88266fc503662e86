//! Two minutes of the fault-injection soak (`slim_e2e::soak`; the long run is
//! `cargo bench -p slim-e2e --bench soak -- --minutes 30`): every invariant holds under node,
//! channel manager, leader, API server and member faults while objects change. `SOAK_SEED`
//! replays a run; `SOAK_MINUTES` makes it longer.

use std::time::Duration;

use slim_e2e::soak::{SoakConfig, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_invariant_breaks_under_faults_and_changes() {
    slim_e2e::init_logging();
    let mut config = SoakConfig { duration: Duration::from_secs(120), ..Default::default() };
    if let Some(seed) = std::env::var("SOAK_SEED").ok().and_then(|s| s.parse().ok()) {
        config.seed = seed;
    }
    if let Some(minutes) = std::env::var("SOAK_MINUTES").ok().and_then(|s| s.parse::<f64>().ok()) {
        config.duration = Duration::from_secs_f64(minutes * 60.0);
    }
    println!("soak: seed {} (SOAK_SEED={} replays it)", config.seed, config.seed);
    let report = run(config).await.unwrap_or_else(|e| panic!("soak: {e}"));
    println!("{}", report.table());
    assert!(report.violations.is_empty(), "{}", report.table());
    assert!(report.final_convergence.is_some(), "{}", report.table());
}
