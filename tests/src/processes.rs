//! Real SLIM processes on 127.0.0.1: nodes (from the PyPI `slim-bindings` package, a full node
//! with its controller API in one Python process) and the channel manager.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::tools::{cache_dir, harness_dir, listening_ports, python, wait_for_port_while};

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
