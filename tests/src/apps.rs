//! SLIM applications (`harness/*.py`) connected to the harness's nodes.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::processes::SlimNode;
use crate::tools::{harness_dir, python};

/// A SLIM application process (see `harness/slim_app.py`). Killed on drop.
pub struct SlimApp {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// The app's instance id (a UUID), as printed once connected.
    pub instance: String,
}

impl SlimApp {
    /// An app that accepts sessions and echoes messages.
    pub fn listen(node: &SlimNode, name: &str) -> Result<Self, HarnessError> {
        Self::spawn(&["listen", &node.data_endpoint(), name])
    }

    /// A group member (`harness/slim_member.py`): joins channels it is invited to, prints what
    /// it receives, publishes on [`SlimApp::publish`].
    pub fn member(node: &SlimNode, name: &str) -> Result<Self, HarnessError> {
        Self::spawn_script("slim_member.py", &[&node.data_endpoint(), name])
    }

    /// An app whose identity is the agent's files in `svids` (`harness/slim_identity_app.py`):
    /// SLIM's static-JWT provider over `jwt_svid.token`, SLIM's JWKS verifier over `key.jwt`; it
    /// echoes.
    pub fn jwt_listener(node: &SlimNode, name: &str, svids: &Path) -> Result<Self, HarnessError> {
        Self::identity_listener(node, name, &svids.display().to_string())
    }

    /// The same identity, opening a new session to `remote` about once a second for `seconds`.
    pub fn jwt_sender(
        node: &SlimNode,
        name: &str,
        svids: &Path,
        remote: &str,
        seconds: u32,
    ) -> Result<Self, HarnessError> {
        Self::identity_sender(node, name, &svids.display().to_string(), remote, seconds)
    }

    /// An app with `identity` ([`spire_identity`], or a files directory) that accepts sessions
    /// (point-to-point and group) and echoes every message.
    pub fn identity_listener(node: &SlimNode, name: &str, identity: &str) -> Result<Self, HarnessError> {
        Self::spawn_script("slim_identity_app.py", &["listen", &node.data_endpoint(), name, identity])
    }

    /// An app with `identity` opening a new point-to-point session to `remote` about once a second
    /// for `seconds` (`reply <n> …` / `error <n> …` lines, then `done <n>`).
    pub fn identity_sender(
        node: &SlimNode,
        name: &str,
        identity: &str,
        remote: &str,
        seconds: u32,
    ) -> Result<Self, HarnessError> {
        let seconds = seconds.to_string();
        Self::spawn_script("slim_identity_app.py", &["send", &node.data_endpoint(), name, identity, remote, &seconds])
    }

    /// An app with `identity` moderating group sessions named `channel…` with `members`:
    /// `Groups::New` opens a new one every 2 s (`group <n> ok|error …`), `Groups::One` keeps one
    /// and publishes every second (`message <n> echoes <k>`); `done <n>` at the end.
    pub fn identity_moderator(
        node: &SlimNode,
        name: &str,
        identity: &str,
        groups: Groups,
        members: &[&str],
        seconds: u32,
    ) -> Result<Self, HarnessError> {
        let (mode, channel, mls) = match groups {
            Groups::New { channel, mls } => ("groups", channel, mls),
            Groups::One { channel, mls } => ("channel", channel, mls),
        };
        let members = members.join(",");
        let seconds = seconds.to_string();
        let mls = if mls { "mls" } else { "plain" };
        let args = [mode, &node.data_endpoint(), name, identity, channel, &members, &seconds, mls];
        Self::spawn_script("slim_identity_app.py", &args)
    }

    /// Publishes `text` on the channel a member joined.
    pub fn publish(&mut self, text: &str) -> Result<(), HarnessError> {
        if let Some(stdin) = self.stdin.as_mut() {
            stdin.write_all(format!("publish {text}\n").as_bytes())?;
            stdin.flush()?;
        }
        Ok(())
    }

    /// An app that, on [`SlimApp::go`], opens a session to `remote` and sends `message`.
    pub fn sender(node: &SlimNode, name: &str, remote: &str, message: &str) -> Result<Self, HarnessError> {
        Self::spawn(&["send", &node.data_endpoint(), name, remote, message])
    }

    /// [`SlimApp::listen`], authenticating to the node with `token_file` (SLIM's static-JWT
    /// client auth, which follows the file). A refused connection is an `Exited` error whose
    /// output starts with `refused`.
    pub fn listen_with_token(node: &SlimNode, name: &str, token_file: &Path) -> Result<Self, HarnessError> {
        Self::spawn_script_env(
            "slim_app.py",
            &["listen", &node.data_endpoint(), name],
            &[("SLIM_APP_TOKEN_FILE", token_file.as_os_str())],
        )
    }

    /// An app expected to be refused by a node that authenticates apps: it presents `token_file`
    /// and gives up after a few tries (`Err` with `refused …` in its output when refused).
    pub fn refused_with_token(node: &SlimNode, name: &str, token_file: &Path) -> Result<Self, HarnessError> {
        let args = ["listen", &node.data_endpoint(), name];
        Self::spawn_script_env(
            "slim_app.py",
            &args,
            &[("SLIM_APP_TOKEN_FILE", token_file.as_os_str()), ("SLIM_APP_CONNECT_ATTEMPTS", "4".as_ref())],
        )
    }

    /// [`SlimApp::sender`], authenticating to the node with `token_file`.
    pub fn sender_with_token(
        node: &SlimNode,
        name: &str,
        token_file: &Path,
        remote: &str,
        message: &str,
    ) -> Result<Self, HarnessError> {
        let args = ["send", &node.data_endpoint(), name, remote, message];
        Self::spawn_script_env("slim_app.py", &args, &[("SLIM_APP_TOKEN_FILE", token_file.as_os_str())])
    }

    fn spawn(args: &[&str]) -> Result<Self, HarnessError> {
        Self::spawn_script("slim_app.py", args)
    }

    fn spawn_script(script: &str, args: &[&str]) -> Result<Self, HarnessError> {
        Self::spawn_script_env(script, args, &[])
    }

    fn spawn_script_env(script: &str, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Result<Self, HarnessError> {
        let mut child = Command::new(python()?)
            .envs(env.iter().copied())
            .arg(harness_dir().join(script))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| HarnessError::Spawn { what: format!("SLIM app {args:?}"), source })?;
        let (tx, lines) = mpsc::channel();
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        // Only the readers hold senders now: their end (the app exited) is seen as such.
        drop(tx);
        let stdin = child.stdin.take();
        let mut app = Self { child, stdin, lines, seen: Vec::new(), instance: String::new() };
        let line = app.wait_for("instance ", Duration::from_secs(30))?;
        app.instance = line.trim_start_matches("instance ").trim().to_owned();
        Ok(app)
    }

    /// Kills the app (SIGKILL: a crash) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for an output line starting with `prefix`.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> Result<String, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return Ok(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(HarnessError::NotReady {
                        what: format!("output line {prefix:?}"),
                        timeout,
                        output: self.seen.join("\n"),
                    });
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(HarnessError::Exited { waiting_for: prefix.to_owned(), output: self.seen.join("\n") });
                }
            }
        }
    }

    /// Tells a sender to open its session and send.
    pub fn go(&mut self) -> Result<(), HarnessError> {
        if let Some(stdin) = self.stdin.as_mut() {
            stdin.write_all(b"go\n")?;
            stdin.flush()?;
        }
        Ok(())
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for SlimApp {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How [`SlimApp::identity_moderator`] runs its groups.
#[derive(Clone, Copy, Debug)]
pub enum Groups<'a> {
    /// A new group session every 2 s.
    New { channel: &'a str, mls: bool },
    /// One group session for the whole run.
    One { channel: &'a str, mls: bool },
}

/// The identity argument of `slim_identity_app.py` for SLIM's `spire` provider and verifier on a
/// Workload API socket.
pub fn spire_identity(socket: &Path) -> String {
    format!("spire:{}", socket.display())
}
