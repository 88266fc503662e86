//! Tools the tests run and wait with: workspace binaries, helm and kubectl, the Python with
//! SLIM, ports, processes, logging, polling, repository paths, a minimal HTTPS client.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::HarnessError;

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

pub(crate) fn harness_dir() -> PathBuf {
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
pub(crate) fn wait_for_port_while(port: u16, timeout: Duration, mut alive: impl FnMut() -> bool) -> bool {
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
