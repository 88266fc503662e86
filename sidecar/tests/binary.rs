//! The binary as Kubernetes and users run it: dev mode (no SPIRE), SIGTERM exits 0, `verify`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_slim-identity-agent");

fn wait_for(path: &std::path::Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dev_mode_writes_and_rotates_then_exits_zero_on_sigterm_and_verify_checks_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svids = dir.path().join("svids");
    let mut child = Command::new(BIN)
        .args(["dev", "--dir", &svids.display().to_string(), "--ttl", "4", "--health-port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the agent");
    for file in ["tls.crt", "tls.key", "svid_bundle.pem", "jwt_svid.token", "key.jwt"] {
        wait_for(&svids.join(file));
    }
    let first = std::fs::read(svids.join("tls.crt")).expect("cert");
    let start = Instant::now();
    while std::fs::read(svids.join("tls.crt")).expect("cert") == first {
        assert!(start.elapsed() < Duration::from_secs(10), "the X.509-SVID never rotated");
        std::thread::sleep(Duration::from_millis(100));
    }

    // verify: the token, as a receiving server would check it, with the JWKS the agent wrote.
    let token = svids.join("jwt_svid.token");
    let bundle = svids.join("key.jwt");
    let ok = Command::new(BIN)
        .args(["verify", "--bundle", &bundle.display().to_string(), "--audience", "slim", &token.display().to_string()])
        .output()
        .expect("verify");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "spiffe://example.org/dev");
    let wrong = Command::new(BIN)
        .args([
            "verify",
            "--bundle",
            &bundle.display().to_string(),
            "--audience",
            "gateway",
            &token.display().to_string(),
        ])
        .output()
        .expect("verify");
    assert_eq!(wrong.status.code(), Some(1));
    let message = String::from_utf8_lossy(&wrong.stderr);
    assert!(message.contains("[\"gateway\"]") && message.contains("[\"slim\"]"), "{message}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    let status = child.wait().expect("exit");
    assert_eq!(status.code(), Some(0), "a native sidecar must exit 0 when the pod stops");
}

#[test]
fn bad_flags_exit_two_and_bad_config_exits_one() {
    let flags = Command::new(BIN).arg("-nope").output().expect("run");
    assert_eq!(flags.status.code(), Some(2));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("helper.conf");
    std::fs::write(&config, "certDir = \"/svids\"\n").expect("write");
    let bad = Command::new(BIN).args(["-config", &config.display().to_string()]).output().expect("run");
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("line 1: unknown field `certDir`"));
    let version = Command::new(BIN).arg("-version").output().expect("run");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("slim-identity-agent "));
}
