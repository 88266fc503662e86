//! Benchmark of the agent binary (release build) against the fake Workload API:
//!
//!   cargo bench -p slim-identity-agent --bench agent [-- --rotations 300]
//!
//! Prints the latency from a Workload API push to the swapped files (p50/p99), resident memory
//! after the rotations, CPU while idle, and the binary's size.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use slim_identity_agent::output::DATA_LINK;
use slim_identity_agent::workload::fake::{AgentState, FakeAgent};

const BIN: &str = env!("CARGO_BIN_EXE_slim-identity-agent");

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After "pid (comm)": state is field 0, utime is 11, stime is 12.
    fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn current_version(dir: &Path) -> Option<std::path::PathBuf> {
    std::fs::read_link(dir.join(DATA_LINK)).ok()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rotations = arg("--rotations", 300);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("svids");
    std::fs::create_dir(&out).expect("dir");
    let mut state = AgentState::new("example.org");
    state.jwt_ttl = Duration::from_secs(600);
    state.issue("spiffe://example.org/app", "");
    let agent = FakeAgent::start(&dir.path().join("agent.sock"), state).await.expect("fake agent");
    let config = format!(
        "agent_address: {}\ncert_dir: {}\nsvid_file_name: tls.crt\nsvid_key_file_name: tls.key\nsvid_bundle_file_name: bundle.pem\n\
         jwt_bundle_file_name: key.jwt\njwt_bundle_format: jwks\njwt_svids: [{{jwt_audience: slim, jwt_svid_file_name: jwt.token}}]\n",
        agent.socket.display(),
        out.display()
    );
    let mut child = Command::new(BIN)
        .args(["-config-env", "AGENT_CONFIG"])
        .env("AGENT_CONFIG", config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("agent binary");
    let pid = child.id();
    let start = Instant::now();
    while !out.join("jwt.token").exists() || !out.join("tls.crt").exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "agent never wrote its files");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("agent ready in {:.0} ms; rss at start {} KiB", start.elapsed().as_secs_f64() * 1e3, rss_kib(pid));

    let mut latencies = Vec::with_capacity(rotations);
    for _ in 0..rotations {
        let before = current_version(&out);
        let pushed = Instant::now();
        agent.update(|state| state.rotate());
        loop {
            if current_version(&out) != before && std::fs::read(out.join("tls.crt")).is_ok() {
                break;
            }
            assert!(pushed.elapsed() < Duration::from_secs(5), "rotation not written");
            std::thread::sleep(Duration::from_micros(100));
        }
        latencies.push(pushed.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "push -> files swapped over {rotations} X.509 rotations: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    println!(
        "resident memory after {rotations} rotations (SPIRE's defaults rotate ~2 X.509 and ~24 JWT an hour): {} KiB",
        rss_kib(pid)
    );

    // Let the last rotation's follow-up (the watcher's debounced re-check) finish first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = Duration::from_secs(10);
    let before = cpu_ticks(pid);
    tokio::time::sleep(idle).await;
    let ticks = cpu_ticks(pid) - before;
    let hz = 100.0; // Linux USER_HZ
    println!(
        "CPU while idle for {:?}: {} ticks = {:.3} % of one core",
        idle,
        ticks,
        ticks as f64 / hz / idle.as_secs_f64() * 100.0
    );
    println!(
        "binary size (release): {:.1} MiB",
        std::fs::metadata(BIN).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().expect("exit");
    println!("exit on SIGTERM: {status}");
}
