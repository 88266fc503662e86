//! Renewal hooks as spiffe-helper runs them: `cmd` starts on the first X.509 write and gets
//! `renew_signal` on later ones; the process named in `pid_file_name` gets `renew_signal`.

mod common;

use common::wait_until;

use std::process::{Command, Stdio};

use slim_identity_agent::agent::run_daemon;
use slim_identity_agent::config::Config;
use slim_identity_agent::workload::fake::{AgentState, FakeAgent};

#[tokio::test]
async fn cmd_starts_then_is_signalled_and_the_pid_file_process_is_signalled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("svids");
    std::fs::create_dir(&out).expect("dir");
    let mut state = AgentState::new("example.org");
    state.issue("spiffe://example.org/app", "");
    let agent = FakeAgent::start(&dir.path().join("agent.sock"), state).await.expect("fake");

    // cmd: a shell that records its start and each SIGUSR1 it receives.
    let log = dir.path().join("cmd.log");
    let script =
        format!("trap 'echo renewed >> {0}' USR1; echo started >> {0}; while true; do sleep 0.05; done", log.display());
    let script_file = dir.path().join("cmd.sh");
    std::fs::write(&script_file, script).expect("script");
    // A separate process, found through a PID file: SIGHUP's default action ends it.
    let mut other = Command::new("sleep");
    other.arg("300").stdout(Stdio::null());
    // SIGHUP's default action, even when this test runs under `nohup` (which ignores it, and an
    // ignored signal stays ignored across exec).
    // SAFETY: only an async-signal-safe call between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut other, || {
            use nix::sys::signal::{SigHandler, Signal, signal};
            signal(Signal::SIGHUP, SigHandler::SigDfl).map(|_| ()).map_err(std::io::Error::from)
        });
    }
    let mut other = other.spawn().expect("sleep");
    let pid_file = dir.path().join("app.pid");
    std::fs::write(&pid_file, format!("{}\n", other.id())).expect("pid file");

    let config = Config::from_hcl(&format!(
        "agent_address = \"{}\"\ncert_dir = \"{}\"\nsvid_file_name = \"tls.crt\"\nsvid_key_file_name = \"tls.key\"\n\
         svid_bundle_file_name = \"bundle.pem\"\ncmd = \"/bin/sh\"\ncmd_args = \"{}\"\nrenew_signal = \"SIGUSR1\"\n",
        agent.socket.display(),
        out.display(),
        script_file.display()
    ))
    .expect("config");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(run_daemon(config, async {
        let _ = stopped.await;
    }));
    let log_has = |line: &str| std::fs::read_to_string(&log).unwrap_or_default().lines().filter(|l| *l == line).count();
    // "started" is written after the trap is installed: the renewal below finds it.
    wait_until("cmd started after the first write", || log_has("started") == 1).await;
    agent.update(|s| s.rotate());
    wait_until("cmd signalled on renewal", || log_has("renewed") == 1).await;
    assert_eq!(log_has("started"), 1, "a running cmd is signalled, not started again");
    let _ = stop.send(());
    let _ = daemon.await;
    // The agent stopped its cmd on shutdown: the log no longer grows, and no shell is left.
    let cmd_alive = Command::new("pgrep").args(["-f", &script_file.display().to_string()]).output().expect("pgrep");
    assert!(!cmd_alive.status.success(), "cmd outlived the agent");

    // pid_file_name with renew_signal = SIGHUP.
    let config = Config::from_hcl(&format!(
        "agent_address = \"{}\"\ncert_dir = \"{}\"\njwt_bundle_file_name = \"key.jwt\"\nsvid_file_name = \"tls.crt\"\n\
         svid_key_file_name = \"tls.key\"\nsvid_bundle_file_name = \"bundle.pem\"\npid_file_name = \"{}\"\nrenew_signal = \"SIGHUP\"\n",
        agent.socket.display(),
        out.display(),
        pid_file.display()
    ))
    .expect("config");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(run_daemon(config, async {
        let _ = stopped.await;
    }));
    // The renewal must come after the daemon's first write (only renewals signal): wait for
    // the file only this daemon writes.
    wait_until("the second daemon's first write", || out.join("key.jwt").exists()).await;
    agent.update(|s| s.rotate());
    let mut status = None;
    wait_until("the pid file's process got SIGHUP", || {
        status = other.try_wait().expect("wait");
        status.is_some()
    })
    .await;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.and_then(|s| s.signal()), Some(libc_sighup()), "{status:?}");
    let _ = stop.send(());
    let _ = daemon.await;
}

fn libc_sighup() -> i32 {
    nix::sys::signal::Signal::SIGHUP as i32
}
