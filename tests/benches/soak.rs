//! The fault-injection soak (see `slim_e2e::soak`): `cargo bench -p slim-e2e --bench soak --
//! --minutes 30 [--seed N] [--settle-seconds 90] [--cleanup-timeout-seconds 30]`. Prints the
//! per-fault table; exits 1 on any invariant violation.

use std::time::Duration;

use slim_e2e::soak::{SoakConfig, run};

fn arg(args: &[String], name: &str) -> Option<f64> {
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1).and_then(|v| v.parse().ok())
}

fn main() {
    slim_e2e::init_logging();
    let args: Vec<String> = std::env::args().collect();
    let mut config = SoakConfig::default();
    if let Some(minutes) = arg(&args, "--minutes") {
        config.duration = Duration::from_secs_f64(minutes * 60.0);
    }
    if let Some(seed) = arg(&args, "--seed") {
        config.seed = seed as u64;
    }
    if let Some(seconds) = arg(&args, "--settle-seconds") {
        config.settle = Duration::from_secs_f64(seconds);
    }
    if let Some(seconds) = arg(&args, "--cleanup-timeout-seconds") {
        config.cleanup_timeout = Duration::from_secs_f64(seconds);
    }
    println!("soak: {:.1} min, seed {}", config.duration.as_secs_f64() / 60.0, config.seed);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let report = match runtime.map(|r| r.block_on(run(config))) {
        Ok(Ok(report)) => report,
        Ok(Err(error)) => panic!("soak: {error}"),
        Err(error) => panic!("runtime: {error}"),
    };
    println!("{}", report.table());
    if !report.violations.is_empty() {
        std::process::exit(1);
    }
}
