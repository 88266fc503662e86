//! Test harness: real SLIM nodes and apps on 127.0.0.1, started from the PyPI `slim-bindings`
//! package (a full node, controller API included, in one Python process).
//!
//! The Python interpreter comes from `SLIM_PYTHON`, else `$SLIM_CACHE/venv/bin/python`
//! (`SLIM_CACHE` defaults to `~/.cache/slim-k8s`); `scripts/test.sh` installs it there.

pub mod chart_install;
pub mod control_plane;
pub mod identity;
pub mod issuer;
pub mod node;
pub mod operator;
pub mod pki;
pub mod soak;
pub mod webhook;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("no Python with slim-bindings at {0}: run scripts/test.sh once (it creates the venv), or set SLIM_PYTHON")]
    NoPython(PathBuf),
    #[error("no SLIM channel manager at {0}: run scripts/test.sh once (it builds it), or set SLIM_CHANNEL_MANAGER")]
    NoChannelManager(PathBuf),
    #[error("starting {what}: {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("{what} did not come up within {timeout:?}; its output: {output}")]
    NotReady { what: String, timeout: Duration, output: String },
    #[error("no {name} binary at {path}: build the workspace (cargo build --workspace), or set {env}")]
    NoBinary { name: &'static str, env: &'static str, path: PathBuf },
    #[error("no {tool} at {path}: run scripts/test.sh once (it installs it), or set {env}")]
    NoTool { tool: &'static str, env: &'static str, path: PathBuf },
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("the app exited while we waited for its line {waiting_for:?}; its output: {output}")]
    Exited { waiting_for: String, output: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Setup(String),
}

/// A binary of this workspace: `$ENV`, else the one cargo built beside the running program (test
/// binaries live in `target/<profile>/deps/`, the workspace's binaries in `target/<profile>/`).
pub fn workspace_binary(name: &'static str, env: &'static str) -> Result<PathBuf, HarnessError> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let mut profile_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if profile_dir.ends_with("deps") {
        profile_dir.pop();
    }
    let path = profile_dir.join(name);
    if path.is_file() { Ok(path) } else { Err(HarnessError::NoBinary { name, env, path }) }
}

/// A binary the test script installs into `$SLIM_CACHE/bin` (`helm`, `kubectl`), or `$ENV`.
fn cached_tool(tool: &'static str, env: &'static str) -> Result<PathBuf, HarnessError> {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| cache_dir().join("bin").join(tool));
    if path.exists() { Ok(path) } else { Err(HarnessError::NoTool { tool, env, path }) }
}

/// Runs `helm` (from `HELM`, else `$SLIM_CACHE/bin/helm`) with `env`; returns its stdout.
pub fn helm(args: &[&str], env: &[(&str, &Path)]) -> Result<String, HarnessError> {
    run_tool(cached_tool("helm", "HELM")?, args, env)
}

/// Runs `kubectl` (from `KUBECTL`, else `$SLIM_CACHE/bin/kubectl`) with `env`; returns its stdout.
pub fn kubectl(args: &[&str], env: &[(&str, &Path)]) -> Result<String, HarnessError> {
    run_tool(cached_tool("kubectl", "KUBECTL")?, args, env)
}

fn run_tool(binary: PathBuf, args: &[&str], env: &[(&str, &Path)]) -> Result<String, HarnessError> {
    let output = Command::new(&binary)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .map_err(|source| HarnessError::Spawn { what: binary.display().to_string(), source })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(HarnessError::Command {
            command: format!("{} {}", binary.display(), args.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

fn harness_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("harness")
}

/// The cache folder the test script installs into.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SLIM_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("slim-k8s")
}

/// The Python interpreter that has `slim-bindings`.
pub fn python() -> Result<PathBuf, HarnessError> {
    let path = std::env::var_os("SLIM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("venv").join("bin").join("python"));
    if path.exists() { Ok(path) } else { Err(HarnessError::NoPython(path)) }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16, HarnessError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    wait_for_port_while(port, timeout, || true)
}

/// Like [`wait_for_port`], giving up early once `alive` turns false (the server process died).
fn wait_for_port_while(port: u16, timeout: Duration, mut alive: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && alive() {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The TCP ports process `pid` listens on: its socket inodes among the LISTEN sockets of
/// `/proc/<pid>/net/tcp`.
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    let mut ports: Vec<u16> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the inode.
            let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            (*state == "0A" && inodes.contains(*inode)).then_some(())?;
            u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Whether 127.0.0.1:`port` serves SLIM's controller API (it answers a route listing).
fn is_controller(port: u16) -> bool {
    use slim_operator::slim::{NodeClientConfig, NodePool};
    let probe = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return false };
        runtime.block_on(async {
            let config = NodeClientConfig { list_timeout: Duration::from_secs(3), ..Default::default() };
            let client = NodePool::new(config).node(&format!("http://127.0.0.1:{port}"));
            matches!(tokio::time::timeout(Duration::from_secs(5), client.snapshot(Duration::ZERO)).await, Ok(Ok(_)))
        })
    });
    probe.join().unwrap_or(false)
}

/// Whether `port` answers a TLS ClientHello with TLS (a handshake, or a TLS alert): how a node's
/// TLS controller port is told from its plain data port.
fn speaks_tls(port: u16) -> bool {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    #[derive(Debug)]
    struct AnyServer(Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(builder) =
        rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()
    else {
        return false;
    };
    let config =
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyServer(provider))).with_no_client_auth();
    let Ok(name) = rustls::pki_types::ServerName::try_from("localhost") else { return false };
    let Ok(mut tls) = rustls::ClientConnection::new(Arc::new(config), name) else { return false };
    let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(3)));
    match tls.complete_io(&mut tcp) {
        Ok(_) => true,
        Err(error) => error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .is_some_and(|e| matches!(e, rustls::Error::AlertReceived(_) | rustls::Error::InvalidCertificate(_))),
    }
}

/// A real SLIM node process. Killed on drop.
pub struct SlimNode {
    pub node_id: String,
    pub data_port: u16,
    pub controller_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// The data-plane server's `auth` (a YAML flow mapping), or empty: none.
    data_auth: String,
    /// The controller server's `tls` (a YAML flow mapping), or empty: plain text.
    controller_tls: String,
    _dir: tempfile::TempDir,
}

impl SlimNode {
    /// Starts a node that binds ports of its own choosing (port 0) and reads them back from the
    /// process: no port is chosen here and released for another process to take.
    pub fn start(node_id: &str) -> Result<Self, HarnessError> {
        Self::start_with_data_auth(node_id, "")
    }

    /// A node whose data-plane server authenticates every app connection with `auth` (SLIM's
    /// server `auth` config as a YAML flow mapping, e.g. `{type: jwt, ...}`).
    pub fn start_with_data_auth(node_id: &str, auth: &str) -> Result<Self, HarnessError> {
        Self::start_with(node_id, auth, "")
    }

    /// A node whose controller API is served with `tls` (SLIM's server `tls` config as a YAML flow
    /// mapping, e.g. `{source: {type: file, cert: ..., key: ...}, client_ca: {...}}`); its
    /// [`SlimNode::controller_endpoint`] is then `https://`.
    pub fn start_with_controller_tls(node_id: &str, tls: &str) -> Result<Self, HarnessError> {
        Self::start_with(node_id, "", tls)
    }

    fn start_with(node_id: &str, data_auth: &str, controller_tls: &str) -> Result<Self, HarnessError> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("node.yaml");
        let log = dir.path().join("node.log");
        let mut node = Self {
            node_id: node_id.to_owned(),
            data_port: 0,
            controller_port: 0,
            config,
            log,
            child: None,
            data_auth: data_auth.to_owned(),
            controller_tls: controller_tls.to_owned(),
            _dir: dir,
        };
        node.write_config()?;
        node.launch()?;
        Ok(node)
    }

    /// Changes the controller server's `tls`; the next [`SlimNode::restart`] uses it.
    pub fn set_controller_tls(&mut self, tls: &str) -> Result<(), HarnessError> {
        self.controller_tls = tls.to_owned();
        self.write_config()
    }

    /// Changes the data-plane server's `auth`; the next [`SlimNode::restart`] uses it.
    pub fn set_data_auth(&mut self, auth: &str) -> Result<(), HarnessError> {
        self.data_auth = auth.to_owned();
        self.write_config()
    }

    /// The node's config with its current ports (0: the node picks one).
    fn write_config(&self) -> Result<(), HarnessError> {
        let (node_id, data_port, controller_port) = (&self.node_id, self.data_port, self.controller_port);
        let auth = if self.data_auth.is_empty() { String::new() } else { format!(", auth: {}", self.data_auth) };
        let controller_tls =
            if self.controller_tls.is_empty() { "{insecure: true}".to_owned() } else { self.controller_tls.clone() };
        std::fs::write(
            &self.config,
            format!(
                "runtime: {{n_cores: 1, drain_timeout: 1s}}\n\
                 tracing: {{log_level: warn}}\n\
                 services:\n  slim/0:\n    node_id: {node_id}\n    \
                 dataplane: {{servers: [{{endpoint: \"127.0.0.1:{data_port}\", tls: {{insecure: true}}{auth}}}], clients: []}}\n    \
                 controller: {{servers: [{{endpoint: \"127.0.0.1:{controller_port}\", tls: {controller_tls}}}]}}\n"
            ),
        )?;
        Ok(())
    }

    fn launch(&mut self) -> Result<(), HarnessError> {
        let log = std::fs::File::create(&self.log)?;
        let child = Command::new(python()?)
            .arg(harness_dir().join("slim_node.py"))
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|source| HarnessError::Spawn { what: format!("SLIM node {}", self.node_id), source })?;
        let pid = child.id();
        self.child = Some(child);
        let timeout = Duration::from_secs(30);
        let not_ready = |node: &Self| HarnessError::NotReady {
            what: format!("SLIM node {}", node.node_id),
            timeout,
            output: std::fs::read_to_string(&node.log).unwrap_or_default(),
        };
        if self.data_port != 0 {
            // A restart on the ports it had.
            let mut up = |port| {
                wait_for_port_while(port, timeout, || {
                    self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
                })
            };
            return if up(self.data_port) && up(self.controller_port) { Ok(()) } else { Err(not_ready(self)) };
        }
        let deadline = Instant::now() + timeout;
        let ports = loop {
            let ports = listening_ports(pid);
            if ports.len() >= 2 {
                break ports;
            }
            let alive = self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)));
            if !alive || Instant::now() > deadline {
                return Err(not_ready(self));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Which is which: only the controller port answers the controller API (with TLS: only it
        // speaks TLS).
        let tls = !self.controller_tls.is_empty();
        let Some(&controller) = ports.iter().find(|port| if tls { speaks_tls(**port) } else { is_controller(**port) })
        else {
            return Err(not_ready(self));
        };
        self.controller_port = controller;
        self.data_port = ports.into_iter().find(|p| *p != controller).unwrap_or_default();
        // A restart binds the same ports again.
        self.write_config()
    }

    /// `http://127.0.0.1:<port>` of the controller API (`https://` when it is served with TLS).
    pub fn controller_endpoint(&self) -> String {
        let scheme = if self.controller_tls.is_empty() { "http" } else { "https" };
        format!("{scheme}://127.0.0.1:{}", self.controller_port)
    }

    /// `http://127.0.0.1:<port>` of the data plane (what links and apps dial).
    pub fn data_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.data_port)
    }

    /// Kills the node (it loses every route and connection).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills and starts the node again on the same ports: a node restart.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop();
        self.launch()
    }

    /// What the node printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SlimNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The SLIM channel manager binary: `SLIM_CHANNEL_MANAGER`, else `$SLIM_CACHE/cm/bin/channel-manager`.
pub fn channel_manager_binary() -> Result<PathBuf, HarnessError> {
    let path = std::env::var_os("SLIM_CHANNEL_MANAGER")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("cm").join("bin").join("channel-manager"));
    if path.exists() { Ok(path) } else { Err(HarnessError::NoChannelManager(path)) }
}

/// The shared secret of the harness's SLIM apps (the channel manager must use the same one).
pub const APP_SECRET: &str = "slim-operator-e2e-shared-secret-0123456789abcdef";

/// A real SLIM channel manager connected to `node`, serving its API on 127.0.0.1. Killed on drop.
pub struct ChannelManager {
    pub port: u16,
    pub local_name: String,
    /// Whether its API is served with TLS.
    tls: bool,
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChannelManager {
    /// Starts a manager whose API binds a port of its own choosing, read back from the process
    /// (as for nodes: no port is chosen here and released for another process to take).
    pub fn start(node: &SlimNode) -> Result<Self, HarnessError> {
        Self::start_with_api_tls(node, "")
    }

    /// A manager whose API server has `tls` (SLIM's server `tls` config as a YAML flow mapping,
    /// as a node's controller takes it); its [`ChannelManager::endpoint`] is then `https://`.
    pub fn start_with_api_tls(node: &SlimNode, tls: &str) -> Result<Self, HarnessError> {
        Self::start_with(node, tls, &format!("{{type: shared_secret, secret: \"{APP_SECRET}\"}}"))
    }

    /// A manager whose own SLIM identity is `auth` (its `auth` config as a YAML flow mapping,
    /// e.g. `{type: spire, socket_path: …}`).
    pub fn start_with_auth(node: &SlimNode, auth: &str) -> Result<Self, HarnessError> {
        Self::start_with(node, "", auth)
    }

    fn start_with(node: &SlimNode, tls: &str, auth: &str) -> Result<Self, HarnessError> {
        let api_tls = if tls.is_empty() { "{insecure: true}" } else { tls };
        let dir = tempfile::tempdir()?;
        let local_name = "org/ns/channel-manager".to_owned();
        let config = dir.path().join("cm.yaml");
        let state = dir.path().join("state");
        std::fs::write(
            &config,
            format!(
                "channel-manager:\n  slim-connection:\n    endpoint: \"{}\"\n    tls: {{insecure: true}}\n  \
                 api-server:\n    endpoint: \"127.0.0.1:0\"\n    tls: {api_tls}\n  \
                 local-name: \"{local_name}\"\n  auth: {auth}\n  \
                 channels: []\n  persistence:\n    path: {}\n    insecure: true\n    delete-sessions-on-shutdown: false\n",
                node.data_endpoint(),
                state.display()
            ),
        )?;
        let log = dir.path().join("cm.log");
        let mut manager = Self { port: 0, local_name, tls: !tls.is_empty(), child: None, config, log, _dir: dir };
        manager.launch()?;
        Ok(manager)
    }

    /// Runs the manager; waits until its API listens (on the port it had, after a restart).
    fn launch(&mut self) -> Result<(), HarnessError> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(channel_manager_binary()?)
            .arg("--config-file")
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|source| HarnessError::Spawn { what: "channel manager".into(), source })?;
        let pid = child.id();
        self.child = Some(child);
        let timeout = Duration::from_secs(30);
        let deadline = Instant::now() + timeout;
        let wanted = self.port;
        // Its API server is the only thing it listens on.
        loop {
            let port = listening_ports(pid).first().copied().unwrap_or(0);
            if port != 0 && (wanted == 0 || port == wanted) {
                self.port = port;
                return Ok(());
            }
            let alive = self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)));
            if !alive || Instant::now() > deadline {
                return Err(HarnessError::NotReady { what: "channel manager".into(), timeout, output: self.log() });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the manager and starts it again on the same API port, with its state (what a
    /// Deployment does once its Pod is deleted, with a persistent volume).
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let config = std::fs::read_to_string(&self.config)?
            .replace("endpoint: \"127.0.0.1:0\"", &format!("endpoint: \"127.0.0.1:{}\"", self.port));
        std::fs::write(&self.config, config)?;
        self.launch()
    }

    /// `http://127.0.0.1:<port>` of its gRPC API (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChannelManager {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Serves `port` with a gRPC server that answers every call `Unimplemented` (as a SLIM node does
/// for a moment while it starts), until the task is aborted. A channel manager re-dialing its
/// node meets it and, in SLIM 3.4.6, never dials again: it has lost its node.
pub async fn unimplemented_grpc_on(port: u16) -> Result<tokio::task::JoinHandle<()>, HarnessError> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_: hyper::Request<hyper::body::Incoming>| async {
                    hyper::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "12")
                        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                });
                let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
            });
        }
    }))
}

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
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// A child process killed when this is dropped (also when a test panics).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Logs for tests (`RUST_LOG` applies); safe to call many times.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 250 ms until it gives a value; panics naming `what` after `timeout`.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The manifests in `examples/`, in the order a user applies them.
pub fn example_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_path("examples"))
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|x| x == "yaml"));
    files.sort();
    files
}

/// The path of a file in the repository.
pub fn repo_path(relative: impl AsRef<Path>) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

/// A minimal HTTPS/1.1 client connection that trusts one CA (for webhook tests and benchmarks).
pub struct HttpsConnection {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<hyper::body::Bytes>>,
    host: String,
}

impl HttpsConnection {
    pub async fn connect(addr: std::net::SocketAddr, server_name: &str, ca_pem: &str) -> Result<Self, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        }
        let config =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
        let tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
        let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Ok(Self { sender, host: server_name.to_owned() })
    }

    /// POSTs JSON to `path` and returns the status and body.
    pub async fn post(&mut self, path: &str, body: Vec<u8>) -> Result<(u16, Vec<u8>), String> {
        use http_body_util::BodyExt;
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let request = http::Request::post(path)
            .header("host", &self.host)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = self.sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, bytes.to_vec()))
    }
}
