//! `slim-operator run` as a separate process (the real binary, configured as the Helm chart
//! configures it), and a plain HTTP probe of its admin server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;

use crate::HarnessError;

/// The `slim-operator` binary: `SLIM_OPERATOR_BIN`, else the one cargo built beside this test.
pub fn operator_binary() -> Result<PathBuf, HarnessError> {
    crate::workspace_binary("slim-operator", "SLIM_OPERATOR_BIN")
}

/// The environment the chart's Deployment gives the operator container: literal values as they
/// are, downward-API values (`POD_NAME`, `POD_NAMESPACE`) left for the caller.
pub fn chart_environment(deployment: &Deployment) -> Vec<(String, String)> {
    let containers = deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).map(|s| s.containers.as_slice());
    containers
        .and_then(|c| c.iter().find(|c| c.name == "operator"))
        .and_then(|c| c.env.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect()
}

/// The environment of a replica that takes part in leader election in `namespace`, with short
/// Lease timings (6 s lease, 4 s renew deadline, 1 s retry) so tests see takeovers quickly, and
/// no webhook (every replica serves it and may write its certificate: not what these are about).
pub fn fast_election_env(namespace: &str) -> Vec<(String, String)> {
    [
        ("POD_NAMESPACE", namespace),
        ("SLIM_OPERATOR_LEADER_ELECTION", "true"),
        ("SLIM_OPERATOR_LEASE_DURATION", "6s"),
        ("SLIM_OPERATOR_LEASE_RENEW_DEADLINE", "4s"),
        ("SLIM_OPERATOR_LEASE_RETRY_PERIOD", "1s"),
        ("SLIM_OPERATOR_DISABLE_WEBHOOK", "true"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .to_vec()
}

/// A running `slim-operator run`. Killed on drop.
pub struct OperatorProcess {
    child: Option<Child>,
    log: PathBuf,
    /// Where its admin server listens (`/readyz`, `/metrics`).
    pub admin: SocketAddr,
    /// Where its webhook listens.
    pub webhook: SocketAddr,
    _dir: tempfile::TempDir,
}

impl OperatorProcess {
    /// Starts the binary with `kubeconfig`, the given environment (e.g. [`chart_environment`]),
    /// and admin and webhook servers on free loopback ports.
    pub fn start(kubeconfig: &Path, env: &[(String, String)]) -> Result<Self, HarnessError> {
        let dir = tempfile::tempdir()?;
        let [admin, webhook] = {
            let listeners = [std::net::TcpListener::bind("127.0.0.1:0")?, std::net::TcpListener::bind("127.0.0.1:0")?];
            [listeners[0].local_addr()?, listeners[1].local_addr()?]
        };
        let log = dir.path().join("operator.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(operator_binary()?)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("KUBECONFIG", kubeconfig)
            .env("SLIM_OPERATOR_ADMIN_ADDR", admin.to_string())
            .env("SLIM_OPERATOR_WEBHOOK_ADDR", webhook.to_string())
            .env("SLIM_OPERATOR_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|source| HarnessError::Spawn { what: "slim-operator".into(), source })?;
        Ok(Self { child: Some(child), log, admin, webhook, _dir: dir })
    }

    /// The process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `GET path` on the admin server: status code and body.
    pub fn get(&self, path: &str) -> Result<(u16, String), HarnessError> {
        http_get(self.admin, path)
    }

    /// Waits until `GET /readyz` answers `want`, returning the last body.
    pub fn wait_readyz(&self, want: u16, timeout: Duration) -> Result<String, HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok((status, body)) = self.get("/readyz") {
                if status == want {
                    return Ok(body);
                }
                last = format!("{status} {body}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(HarnessError::NotReady {
            what: format!("/readyz {want} (last answer: {last})"),
            timeout,
            output: self.log(),
        })
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status (killed after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A minimal HTTP/1.1 GET (admin endpoints are plain HTTP).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), HarnessError> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// Handle of controllers running in this process: send (or drop) to stop them.
pub type InProcess = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), slim_operator::controller::ControllerFailure>>,
);

/// The operator's controllers in this process, as `slim-operator run` starts them once it leads
/// (plain control connections, no SPIFFE), reporting events as `instance`.
pub fn run_in_process(
    client: &kube::Client,
    nodes: slim_operator::slim::NodePool,
    channel_managers: slim_operator::slim::ChannelManagerPool,
    config: slim_operator::controller::ControllerConfig,
    instance: &str,
) -> InProcess {
    use slim_operator::controller::{Runtime, run, sole_leader};
    use slim_operator::tls::ControlTlsRegistry;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = Runtime {
        client: client.clone(),
        reporter: kube::runtime::events::Reporter {
            controller: "slim-operator".into(),
            instance: Some(instance.to_owned()),
        },
        metrics: std::sync::Arc::new(slim_operator::metrics::Metrics::new()),
        nodes,
        channel_managers,
        config,
        caches: Default::default(),
        leadership: sole_leader(),
        control_tls: std::sync::Arc::new(ControlTlsRegistry::new(client.clone(), Default::default(), None)),
    };
    let controllers = tokio::spawn(run(runtime, async move {
        let _ = stopped.await;
    }));
    (stop, controllers)
}
