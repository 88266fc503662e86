//! What runs after a renewal: spiffe-helper's `cmd` (started on the first renewal, signalled
//! with `renew_signal` while it runs, started again if it exited) and `pid_file_name` (the
//! process it names gets `renew_signal`).

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tracing::{info, warn};

/// `SIGHUP`, `HUP`, `sigusr1`… into a signal.
pub use slim_identity_contract::config::parse_signal;

/// spiffe-helper splits `cmd_args` like a CSV record with ' ' as the separator: double quotes
/// group words, `""` inside quotes is a quote, nothing else is special.
pub fn split_args(args: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = args.chars().peekable();
    if args.trim().is_empty() {
        return Ok(out);
    }
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err(format!("unterminated quote in cmd_args {args:?}")),
                }
            }
            match chars.next() {
                None => {
                    out.push(field);
                    return Ok(out);
                }
                Some(' ') => out.push(field),
                Some(c) => return Err(format!("unexpected {c:?} after a quoted field in cmd_args {args:?}")),
            }
        } else {
            loop {
                match chars.next() {
                    Some(' ') => break,
                    Some('"') => return Err(format!("bare quote in a field of cmd_args {args:?}")),
                    Some(c) => field.push(c),
                    None => {
                        out.push(field);
                        return Ok(out);
                    }
                }
            }
            out.push(field);
        }
    }
}

/// Renewal hooks of a running agent.
pub struct Hooks {
    cmd: String,
    args: String,
    signal: Option<Signal>,
    pid_file: Option<PathBuf>,
    child: Option<Child>,
}

impl Hooks {
    pub fn new(cmd: &str, args: &str, signal: &str, pid_file: &str) -> Self {
        Self {
            cmd: cmd.to_owned(),
            args: args.to_owned(),
            signal: parse_signal(signal),
            pid_file: (!pid_file.is_empty()).then(|| PathBuf::from(pid_file)),
            child: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cmd.is_empty() && self.pid_file.is_none()
    }

    /// Called after every write that renewed what the hooks are for.
    pub async fn renewed(&mut self) {
        if !self.cmd.is_empty() {
            self.run_or_signal_cmd();
        }
        if let (Some(pid_file), Some(signal)) = (self.pid_file.clone(), self.signal) {
            signal_pid_file(&pid_file, signal).await;
        }
    }

    /// On shutdown: the `cmd` we started gets SIGTERM (and is waited for, briefly), so it does not
    /// outlive the agent outside a container.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let (Ok(None), Some(pid)) = (child.try_wait(), child.id()) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }

    fn run_or_signal_cmd(&mut self) {
        if let Some(child) = self.child.as_mut() {
            match child.try_wait() {
                Ok(None) => {
                    if let (Some(signal), Some(pid)) = (self.signal, child.id()) {
                        match kill(Pid::from_raw(pid as i32), signal) {
                            Ok(()) => info!(pid, ?signal, "signalled cmd"),
                            Err(error) => warn!(pid, %error, "could not signal cmd"),
                        }
                    }
                    return;
                }
                Ok(Some(status)) => info!(%status, "cmd had exited; starting it again"),
                Err(error) => warn!(%error, "cmd state unknown; starting it again"),
            }
        }
        let args = match split_args(&self.args) {
            Ok(args) => args,
            Err(error) => {
                warn!(%error, "cmd_args cannot be parsed; cmd not started");
                return;
            }
        };
        match Command::new(&self.cmd).args(&args).kill_on_drop(false).spawn() {
            Ok(child) => {
                info!(cmd = %self.cmd, pid = child.id(), "cmd started");
                self.child = Some(child);
            }
            Err(error) => warn!(cmd = %self.cmd, %error, "cmd could not be started"),
        }
    }
}

/// Reads the PID (re-read every time) and signals it, retrying briefly like spiffe-helper.
async fn signal_pid_file(path: &std::path::Path, signal: Signal) {
    let mut delay = Duration::from_millis(100);
    for _ in 0..10 {
        let result = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| text.trim().parse::<i32>().map_err(|e| format!("{:?} is not a PID: {e}", text.trim())))
            .and_then(|pid| kill(Pid::from_raw(pid), signal).map(|()| pid).map_err(|e| e.to_string()));
        match result {
            Ok(pid) => {
                info!(pid, ?signal, file = %path.display(), "signalled process from pid file");
                return;
            }
            Err(error) => {
                warn!(file = %path.display(), %error, "signalling the pid file's process failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_split_like_spiffe_helper() {
        assert_eq!(split_args("").expect("ok"), Vec::<String>::new());
        assert_eq!(split_args("-c conf").expect("ok"), vec!["-c", "conf"]);
        assert_eq!(split_args(r#"-msg "hello world" x"#).expect("ok"), vec!["-msg", "hello world", "x"]);
        assert_eq!(split_args(r#""say ""hi""""#).expect("ok"), vec![r#"say "hi""#]);
        assert_eq!(split_args("'a b'").expect("ok"), vec!["'a", "b'"], "single quotes mean nothing");
        assert!(split_args(r#""open"#).is_err());
    }

    #[test]
    fn signals_parse_by_name() {
        assert_eq!(parse_signal("SIGHUP"), Some(Signal::SIGHUP));
        assert_eq!(parse_signal("usr1"), Some(Signal::SIGUSR1));
        assert_eq!(parse_signal("SIGNOPE"), None);
    }
}
