//! Benchmark: the operator's SPIFFE issuer when 500 pods start at once.
//!
//!   cargo bench -p slim-e2e --bench issuer [-- --pods N]
//!
//! The `slim-operator` binary (as the chart's ServiceAccount, `identityIssuer.enabled`) on the
//! real API server; N injected Pod objects, each with a TokenRequest token bound to it for the
//! issuer's audience. Then every pod at once does what its agent does at start: an X.509-SVID
//! from a fresh CSR, then a JWT-SVID. Prints the latency of each request (p50/p99), the
//! throughput, the share of it the API server's TokenReview and pod read took (from the
//! operator's own histogram), and the operator's CPU time and resident memory.

use std::time::{Duration, Instant};

use futures::StreamExt;
use slim_e2e::identity::{mint, workload_with};
use slim_e2e::issuer::Issuer;
use slim_operator::webhook::inject::{INJECTED, INJECTED_SOURCE};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// (CPU seconds, RSS MiB, peak RSS MiB) of a process.
fn usage(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    };
    (ticks / 100.0, kib("VmRSS:").unwrap_or(0) / 1024, kib("VmHWM:").unwrap_or(0) / 1024)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// `<name>_sum` and `<name>_count` of a histogram in the metrics text.
fn histogram(metrics: &str, name: &str) -> (f64, f64) {
    let value = |suffix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}_{suffix}")))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0.0)
    };
    (value("sum"), value("count"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let pods = arg("--pods", 500);
    let issuer = Issuer::start(&[]).await;
    let (client, apps) = (issuer.admin.clone(), issuer.apps().to_owned());
    let marks = [(INJECTED, "0.1.0"), (INJECTED_SOURCE, "kubernetes")];
    let prepared = Instant::now();
    let clients: Vec<_> = futures::stream::iter(0..pods)
        .map(|i| {
            let (client, apps, issuer) = (client.clone(), apps.clone(), &issuer);
            async move {
                let name = format!("app-{i:04}");
                let pod = workload_with(&client, &apps, &name, &marks).await;
                let token = mint(&client, &apps, &name, &["slim-operator"], Some(&pod)).await;
                let spiffe_id = format!("spiffe://cluster.local/ns/{apps}/sa/{name}");
                (issuer.client(&token, &name).await, spiffe_id)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    println!("{pods} injected Pods, ServiceAccounts and tokens created in {:.1} s", prepared.elapsed().as_secs_f64());
    let pid = issuer.operator.pid();
    let (cpu_before, rss_before, _) = usage(pid);
    let reviews_before = histogram(&issuer.metrics(), "slim_operator_issuer_token_review_duration_seconds");

    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(client, spiffe_id)| {
            tokio::spawn(async move {
                let (_key, csr) = slim_identity_agent::issuer::key_and_csr(&spiffe_id).expect("csr");
                let t = Instant::now();
                let x509 = client.x509_svid(&csr).await.map(|_| t.elapsed());
                let t = Instant::now();
                let jwt = client.jwt_svid(vec!["slim".into()]).await.map(|_| t.elapsed());
                (x509, jwt)
            })
        })
        .collect();
    let mut x509 = Vec::new();
    let mut jwt = Vec::new();
    let mut failures = Vec::new();
    for task in tasks {
        let (a, b) = task.await.expect("task");
        for (result, into) in [(a, &mut x509), (b, &mut jwt)] {
            match result {
                Ok(elapsed) => into.push(elapsed),
                Err(error) => failures.push(error.to_string()),
            }
        }
    }
    let wall = start.elapsed();
    let (cpu_after, rss_after, hwm) = usage(pid);
    let reviews_after = histogram(&issuer.metrics(), "slim_operator_issuer_token_review_duration_seconds");
    x509.sort();
    jwt.sort();
    let issued = x509.len() + jwt.len();
    println!(
        "X.509-SVID (CSR signed): p50 {:.1} ms, p99 {:.1} ms; JWT-SVID: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&x509, 0.5),
        percentile(&x509, 0.99),
        percentile(&jwt, 0.5),
        percentile(&jwt, 0.99)
    );
    let reviews = reviews_after.1 - reviews_before.1;
    let review_mean = (reviews_after.0 - reviews_before.0) / reviews.max(1.0) * 1000.0;
    println!(
        "{issued} SVIDs for {pods} pods in {:.2} s: {:.0} SVIDs/s; {} failed{}",
        wall.as_secs_f64(),
        issued as f64 / wall.as_secs_f64(),
        failures.len(),
        failures.first().map(|f| format!(" (first: {f})")).unwrap_or_default()
    );
    println!("TokenReview + pod read: {reviews} calls, mean {review_mean:.1} ms each (counted in every request above)");
    println!(
        "operator: {:.2} CPU s for the burst ({:.2} ms per SVID), RSS {rss_before} -> {rss_after} MiB (peak {hwm} MiB)",
        cpu_after - cpu_before,
        (cpu_after - cpu_before) * 1000.0 / issued.max(1) as f64
    );
}
