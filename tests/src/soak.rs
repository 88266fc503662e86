//! A soak with fault injection: the real API server, three real SLIM nodes, the real channel
//! manager, two `slim-operator` replicas with leader election and member apps, under a seeded
//! random schedule of faults and object changes, judged by invariants read from SLIM's own lists
//! and the API server's audit log. `cargo bench -p slim-e2e --bench soak -- --minutes N` runs it;
//! `tests/tests/soak.rs` runs two minutes of it in the test suite.

mod check;
mod world;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub use check::Violation;
use world::World;

use crate::HarnessError;

/// What a run does.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// How long faults and changes are injected.
    pub duration: Duration,
    /// The schedule's seed: the same seed gives the same faults and changes in the same order.
    pub seed: u64,
    /// Quiet time after the last fault before the final checks.
    pub settle: Duration,
    /// The operators' `--cleanup-timeout`; an object stuck longer (plus a margin) is a violation.
    pub cleanup_timeout: Duration,
    /// The pause between two injected events is drawn from this range.
    pub pause: (Duration, Duration),
}

impl Default for SoakConfig {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(120),
            seed: seed_from_clock(),
            settle: Duration::from_secs(90),
            cleanup_timeout: Duration::from_secs(30),
            pause: (Duration::from_secs(2), Duration::from_secs(5)),
        }
    }
}

/// A seed from the clock (printed, so the run can be replayed).
pub fn seed_from_clock() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
}

/// What a run found.
#[derive(Debug, Default)]
pub struct SoakReport {
    pub seed: u64,
    /// Per fault kind: how long the whole system took to converge after each one (`None`: it had
    /// not converged when the run ended).
    pub faults: BTreeMap<&'static str, Vec<Option<Duration>>>,
    /// Per change kind, how many were made.
    pub changes: BTreeMap<&'static str, usize>,
    /// What the world did as Kubernetes would (liveness restarts, a deleted Pod replaced).
    pub heals: BTreeMap<&'static str, usize>,
    pub violations: Vec<Violation>,
    /// From the end of the last fault to everything converged.
    pub final_convergence: Option<Duration>,
    /// Where the processes' logs were kept (after a violation).
    pub logs: Option<std::path::PathBuf>,
}

impl SoakReport {
    /// The per-kind table: count, convergence p50 / p95 / max.
    pub fn table(&self) -> String {
        let mut out = format!(
            "seed {}\n| fault | count | converged p50 | p95 | max | not converged |\n|---|---|---|---|---|---|\n",
            self.seed
        );
        for (kind, times) in &self.faults {
            let mut done: Vec<Duration> = times.iter().flatten().copied().collect();
            done.sort();
            let at = |q: f64| done.get(((done.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied();
            let secs = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()));
            out.push_str(&format!(
                "| {kind} | {} | {} | {} | {} | {} |\n",
                times.len(),
                secs(at(0.5)),
                secs(at(0.95)),
                secs(done.last().copied()),
                times.len() - done.len()
            ));
        }
        let changes: Vec<String> = self.changes.iter().map(|(k, n)| format!("{k} {n}")).collect();
        out.push_str(&format!("changes: {}\n", changes.join(", ")));
        let heals: Vec<String> = self.heals.iter().map(|(k, n)| format!("{k} {n}")).collect();
        out.push_str(&format!(
            "as Kubernetes would: {}\n",
            if heals.is_empty() { "nothing".to_owned() } else { heals.join(", ") }
        ));
        out.push_str(&format!(
            "final convergence: {}; invariant violations: {}\n",
            self.final_convergence.map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
            self.violations.len()
        ));
        for violation in &self.violations {
            out.push_str(&format!("VIOLATION (seed {}): {violation}\n", self.seed));
        }
        if let Some(dir) = &self.logs {
            out.push_str(&format!("logs: {}\n", dir.display()));
        }
        out
    }
}

/// Runs the soak.
pub async fn run(config: SoakConfig) -> Result<SoakReport, HarnessError> {
    let mut world = World::start(&config).await?;
    let mut rng = Rng(config.seed);
    let mut report = SoakReport { seed: config.seed, ..Default::default() };
    let mut checker = check::Checker::new(config.cleanup_timeout);
    let end = Instant::now() + config.duration;
    let mut next_event = Instant::now();
    // Faults waiting for the system to converge: kind and when injected.
    let mut pending: Vec<(&'static str, usize, Instant)> = Vec::new();
    while Instant::now() < end {
        if Instant::now() >= next_event {
            if rng.below(2) == 0 {
                let kind = world.fault(&mut rng).await?;
                let times = report.faults.entry(kind).or_default();
                times.push(None);
                pending.push((kind, times.len() - 1, Instant::now()));
            } else {
                let kind = world.change(&mut rng).await?;
                *report.changes.entry(kind).or_default() += 1;
            }
            let (low, high) = config.pause;
            next_event = Instant::now() + low + Duration::from_millis(rng.below((high - low).as_millis() as u64 + 1));
        }
        let state = world.observe().await;
        report.violations.extend(checker.check(&state, false));
        for heal in world.heal(&state).await? {
            *report.heals.entry(heal).or_default() += 1;
        }
        if state.converged() {
            // A fault's effect shows within a second (a killed app's connection, a node's list):
            // a look sooner than that says nothing about its convergence.
            let (done, waiting): (Vec<_>, Vec<_>) =
                pending.drain(..).partition(|(_, _, at)| at.elapsed() >= Duration::from_secs(1));
            pending.extend(waiting);
            for (kind, index, at) in done {
                report.faults.entry(kind).or_default()[index] = Some(at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report.final_convergence = settle(&mut world, &mut checker, &mut report, &mut pending, config.settle).await;
    report.violations.extend(world.two_writers()?);
    if !report.violations.is_empty() {
        let dir = std::env::temp_dir().join(format!("slim-soak-{}", config.seed));
        match world.keep_logs(&dir) {
            Ok(()) => report.logs = Some(dir),
            Err(error) => tracing::warn!(%error, "could not keep the soak's logs"),
        }
    }
    world.stop().await;
    Ok(report)
}

/// Injects nothing more; waits for convergence (at most `settle`), then checks exactly.
async fn settle(
    world: &mut World,
    checker: &mut check::Checker,
    report: &mut SoakReport,
    pending: &mut Vec<(&'static str, usize, Instant)>,
    settle: Duration,
) -> Option<Duration> {
    let quiet = Instant::now();
    loop {
        let state = world.observe().await;
        report.violations.extend(checker.check(&state, false));
        for heal in world.heal(&state).await.unwrap_or_default() {
            *report.heals.entry(heal).or_default() += 1;
        }
        if state.converged() {
            for (kind, index, at) in pending.drain(..) {
                report.faults.entry(kind).or_default()[index] = Some(at.elapsed());
            }
            report.violations.extend(checker.check(&state, true));
            return Some(quiet.elapsed());
        }
        if quiet.elapsed() > settle {
            report.violations.extend(checker.check(&state, true));
            return None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The schedule's random numbers (splitmix64: tiny, and the same everywhere for a seed).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// In `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() { None } else { items.get(self.below(items.len() as u64) as usize) }
    }
}
