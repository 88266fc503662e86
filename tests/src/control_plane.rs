//! A real Kubernetes control plane for the tests, in the envtest convention: `etcd` and
//! `kube-apiserver` (and optionally `kube-controller-manager`) from `KUBEBUILDER_ASSETS`, started on
//! 127.0.0.1 with free ports, a fresh data dir and a throwaway PKI made here with rcgen.
//!
//! One control plane per test binary ([`shared`]), shared by its tests; each test works in its own
//! namespace ([`ControlPlane::namespace`]). The processes are stopped and the data dir removed when
//! the test binary exits, whether its tests passed or not (an `atexit` hook), and killed by the
//! kernel if the binary itself dies (`PR_SET_PDEATHSIG`).
//!
//! Kube clients are bound to the tokio runtime that built them, and every `#[tokio::test]` has its
//! own, so the shared value holds only files and addresses: each test asks for its own [`Client`].

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

/// The issuer the API server puts in service-account tokens.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error(
        "KUBEBUILDER_ASSETS is not set: point it at a folder holding kube-apiserver and etcd \
         (scripts/test.sh sets it from ../shared/k8s; elsewhere `setup-envtest use 1.36 -p path` prints one)"
    )]
    NoAssets,
    #[error("{0} is missing: KUBEBUILDER_ASSETS must hold kube-apiserver and etcd")]
    MissingBinary(PathBuf),
    #[error("making the test PKI: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("starting {what}: {source}")]
    Spawn { what: &'static str, source: std::io::Error },
    #[error("{what} did not become ready within {timeout:?}; the end of its log:\n{log}")]
    NotReady { what: &'static str, timeout: Duration, log: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("watching {name}: {reason}")]
    Watch { name: String, reason: String },
}

/// PEM of a certificate and its key.
/// One request as the API server's audit log recorded it.
#[derive(Clone, Debug)]
pub struct AuditedWrite {
    pub user: String,
    pub verb: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// The HTTP status the server answered.
    pub code: u64,
    /// RFC 3339 with microseconds, UTC: compares as text.
    pub at: String,
    /// The Pod whose service-account token made the request (bound tokens name it), if any.
    pub pod: String,
    /// Where the request came from.
    pub source_ip: String,
}

#[derive(Clone)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A running control plane (see the module docs).
pub struct ControlPlane {
    /// `https://127.0.0.1:<port>` of the API server.
    pub server: String,
    /// The data dir: PKI, etcd data, logs, kubeconfigs.
    pub dir: PathBuf,
    /// PEM of the CA that signs the serving certificate and every client certificate.
    pub ca_pem: String,
    ca_key_pem: String,
    /// Admin kubeconfig (a client certificate in `system:masters`).
    pub admin_kubeconfig: PathBuf,
    /// Whether kube-controller-manager runs (namespace deletion, garbage collection).
    pub controller_manager: bool,
}

static PROCESSES: Mutex<Vec<Child>> = Mutex::new(Vec::new());
/// How each plane's API server was started (binary, arguments, log), and its process id, by the
/// plane's data dir: to restart it.
static API_SERVERS: Mutex<Vec<(PathBuf, ApiServerProcess)>> = Mutex::new(Vec::new());
type ApiServerProcess = (PathBuf, Vec<String>, PathBuf, u32);
static DATA_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// The test binary's control plane, started on first use.
pub fn shared() -> &'static ControlPlane {
    match SHARED.get_or_init(start_lasting) {
        Ok(plane) => plane,
        Err(error) => panic!("control plane: {error}"),
    }
}

/// A control plane of the caller's own, started now and stopped when the test binary exits: for a
/// test whose operator watches every namespace (it would reconcile the objects of the tests on
/// [`shared`], whose controllers each watch their own namespace).
pub fn dedicated() -> &'static ControlPlane {
    match start_lasting() {
        Ok(plane) => Box::leak(Box::new(plane)),
        Err(error) => panic!("control plane: {error}"),
    }
}

/// A plane with the default options, on a thread that lasts (its processes die with the thread
/// that forked them).
fn start_lasting() -> Result<ControlPlane, String> {
    start_on_lasting_thread("control-plane", || ControlPlane::start(&Options::default()).map_err(|e| e.to_string()))
}

fn record_api_server(dir: &Path, process: ApiServerProcess) {
    let mut servers = API_SERVERS.lock().unwrap_or_else(|p| p.into_inner());
    servers.retain(|(d, _)| d != dir);
    servers.push((dir.to_owned(), process));
}

/// Where the API server listens and what it tells others about itself.
#[derive(Clone, Debug)]
pub struct Options {
    /// The one address it binds (and clients use); 127.0.0.1 unless Pods must reach it.
    pub bind: std::net::Ipv4Addr,
    /// The address the `kubernetes` Service's endpoints name (only data without kube-proxy).
    pub advertise: std::net::Ipv4Addr,
    /// More flags for kube-apiserver.
    pub extra_flags: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bind: std::net::Ipv4Addr::LOCALHOST,
            advertise: std::net::Ipv4Addr::new(192, 0, 2, 100),
            extra_flags: Vec::new(),
        }
    }
}

/// The folder with the binaries (`KUBEBUILDER_ASSETS`).
pub fn assets() -> Result<PathBuf, ControlPlaneError> {
    let dir = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from).ok_or(ControlPlaneError::NoAssets)?;
    for binary in ["kube-apiserver", "etcd"] {
        if !dir.join(binary).is_file() {
            return Err(ControlPlaneError::MissingBinary(dir.join(binary)));
        }
    }
    Ok(dir)
}

extern "C" fn stop_everything() {
    stop_children(&mut PROCESSES.lock().unwrap_or_else(|p| p.into_inner()));
    let dirs = std::mem::take(&mut *DATA_DIRS.lock().unwrap_or_else(|p| p.into_inner()));
    if std::env::var_os("SLIM_KEEP_CONTROL_PLANE").is_none() {
        for dir in dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Stops `children` in reverse start order: SIGTERM to all, up to 5 s to exit, then SIGKILL.
pub(crate) fn stop_children(children: &mut Vec<Child>) {
    for child in children.iter_mut().rev() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for child in children.iter_mut().rev() {
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    children.clear();
}

/// Runs `start` on a thread that lives as long as the test binary and returns what it made: the
/// processes it forks die with the thread that forked them (PR_SET_PDEATHSIG).
pub(crate) fn start_on_lasting_thread<T: Send + 'static>(
    name: &str,
    start: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(start());
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| e.to_string())?;
    rx.recv().map_err(|e| e.to_string())?
}

pub(crate) fn free_ports<const N: usize>() -> Result<[u16; N], ControlPlaneError> {
    // Every listener is held until all are chosen, so the ports differ.
    let listeners: Vec<TcpListener> = (0..N).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

fn spawn(what: &'static str, binary: &Path, args: &[String], log: &Path) -> Result<(), ControlPlaneError> {
    let child = spawn_child(what, binary, args, log)?;
    PROCESSES.lock().unwrap_or_else(|p| p.into_inner()).push(child);
    Ok(())
}

/// Starts `binary` with its output in `log`, killed when the thread that started it ends.
pub(crate) fn spawn_child(
    what: &'static str,
    binary: &Path,
    args: &[String],
    log: &Path,
) -> Result<Child, ControlPlaneError> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log)?;
    let mut command = Command::new(binary);
    command.args(args).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which is
    // async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::SIGKILL).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    command.spawn().map_err(|source| ControlPlaneError::Spawn { what, source })
}

pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

impl ControlPlane {
    /// Starts etcd, the API server (and the controller manager when present) with `options`.
    /// Stopped when the test binary exits (like [`shared`]'s).
    pub(crate) fn start(options: &Options) -> Result<Self, ControlPlaneError> {
        let assets = assets()?;
        let dir = tempfile::Builder::new().prefix("slim-control-plane-").tempdir()?.keep();
        DATA_DIRS.lock().unwrap_or_else(|p| p.into_inner()).push(dir.clone());
        static AT_EXIT: std::sync::Once = std::sync::Once::new();
        // SAFETY: registers a plain `extern "C" fn` with no arguments, as atexit(3) expects; once,
        // however many planes start (it stops them all).
        AT_EXIT.call_once(|| unsafe {
            libc::atexit(stop_everything);
        });
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki)?;

        let (ca_pem, ca_key_pem) = make_ca()?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key_pem)?)?;
        let serving = serving_cert(&issuer, options.bind)?;
        let sa_key = KeyPair::generate()?;
        // How the API server authenticates to kubelets (logs, exec): an admin client certificate.
        let kubelet_client = client_cert(&ca_pem, &ca_key_pem, "kube-apiserver-kubelet-client", &["system:masters"])?;
        for (name, text) in [
            ("kubelet-client.crt", kubelet_client.cert_pem.as_str()),
            ("kubelet-client.key", kubelet_client.key_pem.as_str()),
            ("ca.crt", ca_pem.as_str()),
            ("apiserver.crt", serving.cert_pem.as_str()),
            ("apiserver.key", serving.key_pem.as_str()),
            ("sa.key", sa_key.serialize_pem().as_str()),
            ("sa.pub", sa_key.public_key_pem().as_str()),
        ] {
            std::fs::write(pki.join(name), text)?;
        }

        let [client_port, peer_port, metrics_port, api_port] = free_ports::<4>()?;
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_log = dir.join("etcd.log");
        spawn(
            "etcd",
            &assets.join("etcd"),
            &[
                "--name=t".into(),
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=t={peer_url}"),
                format!("--listen-metrics-urls=http://127.0.0.1:{metrics_port}"),
                "--log-level=warn".into(),
                "--unsafe-no-fsync=true".into(),
            ],
            &etcd_log,
        )?;

        let api_log = dir.join("kube-apiserver.log");
        // At Metadata level: every write (who changed what, and when), and every request of a
        // ServiceAccount (what an operator running as one costs the API server).
        let audit_policy = dir.join("audit-policy.yaml");
        std::fs::write(
            &audit_policy,
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
             - level: Metadata\n  verbs: [create, update, patch, delete]\n\
             - level: Metadata\n  userGroups: [\"system:serviceaccounts\"]\n- level: None\n",
        )?;
        let pki_file = |name: &str| pki.join(name).display().to_string();
        let api_args: Vec<String> = [
            format!("--bind-address={}", options.bind),
            format!("--secure-port={api_port}"),
            format!("--advertise-address={}", options.advertise),
            format!("--etcd-servers={etcd_url}"),
            format!("--cert-dir={}", dir.join("certs").display()),
            format!("--tls-cert-file={}", pki_file("apiserver.crt")),
            format!("--tls-private-key-file={}", pki_file("apiserver.key")),
            format!("--client-ca-file={}", pki_file("ca.crt")),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            format!("--service-account-key-file={}", pki_file("sa.pub")),
            format!("--service-account-signing-key-file={}", pki_file("sa.key")),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--authorization-mode=RBAC".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            format!("--audit-policy-file={}", audit_policy.display()),
            format!("--audit-log-path={}", dir.join("audit.log").display()),
            "--audit-log-maxbackup=1".into(),
            format!("--kubelet-client-certificate={}", pki_file("kubelet-client.crt")),
            format!("--kubelet-client-key={}", pki_file("kubelet-client.key")),
        ]
        .into_iter()
        .chain(options.extra_flags.iter().cloned())
        .collect();
        let binary = assets.join("kube-apiserver");
        let child = spawn_child("kube-apiserver", &binary, &api_args, &api_log)?;
        record_api_server(&dir, (binary, api_args, api_log.clone(), child.id()));
        PROCESSES.lock().unwrap_or_else(|p| p.into_inner()).push(child);

        let server = format!("https://{}:{api_port}", options.bind);
        let mut plane = Self {
            server,
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            ca_pem,
            ca_key_pem,
            controller_manager: false,
        };
        let admin = plane.client_cert("admin", &["system:masters"])?;
        plane.write_kubeconfig(&plane.admin_kubeconfig, "admin", &Credentials::Certificate(admin))?;
        plane.wait_ready(&api_log)?;
        plane.controller_manager = plane.start_controller_manager(&assets)?;
        Ok(plane)
    }

    /// Starts kube-controller-manager when `KUBEBUILDER_ASSETS` has it: namespace deletion and
    /// garbage collection then work as on a real cluster.
    fn start_controller_manager(&self, assets: &Path) -> Result<bool, ControlPlaneError> {
        let binary = assets.join("kube-controller-manager");
        if !binary.is_file() {
            return Ok(false);
        }
        let identity = self.client_cert("system:kube-controller-manager", &[])?;
        let kubeconfig = self.dir.join("controller-manager.kubeconfig");
        self.write_kubeconfig(&kubeconfig, "system:kube-controller-manager", &Credentials::Certificate(identity))?;
        let [port] = free_ports::<1>()?;
        let pki = self.dir.join("pki");
        spawn(
            "kube-controller-manager",
            &binary,
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--authentication-kubeconfig={}", kubeconfig.display()),
                format!("--authorization-kubeconfig={}", kubeconfig.display()),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", self.dir.join("cm-certs").display()),
                format!("--service-account-private-key-file={}", pki.join("sa.key").display()),
                format!("--root-ca-file={}", pki.join("ca.crt").display()),
                "--use-service-account-credentials=true".into(),
                "--leader-elect=false".into(),
                "--controllers=*,-node-ipam-controller,-node-lifecycle-controller,-cloud-node-lifecycle-controller,\
                 -service-lb-controller,-node-route-controller,-persistentvolume-attach-detach-controller,\
                 -taint-eviction-controller"
                    .into(),
            ],
            &self.dir.join("kube-controller-manager.log"),
        )?;
        Ok(true)
    }

    fn wait_ready(&self, log: &Path) -> Result<(), ControlPlaneError> {
        let timeout = Duration::from_secs(90);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let client = self.client().await?;
            let deadline = Instant::now() + timeout;
            loop {
                let request = http::Request::get("/readyz").body(Vec::new()).map_err(kube::Error::HttpError)?;
                if client.request_text(request).await.is_ok_and(|body| body.trim() == "ok") {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return Err(ControlPlaneError::NotReady { what: "kube-apiserver", timeout, log: tail(log) });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    }

    /// Stops the API server (SIGTERM, as a rolling restart does), keeps it down for `down`, and
    /// starts it again with the same flags on the same port and etcd; returns once it is ready.
    pub fn restart_api_server(&self, down: Duration) -> Result<(), ControlPlaneError> {
        let recorded =
            API_SERVERS.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|(d, _)| *d == self.dir).cloned();
        let (_, (binary, args, log, pid)) = recorded.ok_or(ControlPlaneError::NotReady {
            what: "kube-apiserver",
            timeout: down,
            log: "never started".into(),
        })?;
        let mut stopped: Vec<Child> = {
            let mut processes = PROCESSES.lock().unwrap_or_else(|p| p.into_inner());
            let (api, others): (Vec<Child>, Vec<Child>) = processes.drain(..).partition(|c| c.id() == pid);
            *processes = others;
            api
        };
        stop_children(&mut stopped);
        std::thread::sleep(down);
        // On a thread that lasts: the process dies with the thread that forked it.
        let (restart_binary, restart_args, restart_log) = (binary.clone(), args.clone(), log.clone());
        let child = start_on_lasting_thread("kube-apiserver", move || {
            spawn_child("kube-apiserver", &restart_binary, &restart_args, &restart_log).map_err(|e| e.to_string())
        })
        .map_err(|e| ControlPlaneError::NotReady { what: "kube-apiserver", timeout: down, log: e })?;
        record_api_server(&self.dir, (binary, args, log.clone(), child.id()));
        PROCESSES.lock().unwrap_or_else(|p| p.into_inner()).push(child);
        self.wait_ready(&log)
    }

    /// Every write, and every request of a ServiceAccount, the API server has answered so far (its
    /// audit log), oldest first.
    pub fn audited(&self) -> Result<Vec<AuditedWrite>, ControlPlaneError> {
        let text = std::fs::read_to_string(self.dir.join("audit.log"))?;
        Ok(text
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| event["stage"] == "ResponseComplete")
            .map(|event| {
                let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
                let object = &event["objectRef"];
                AuditedWrite {
                    user: text(&event["user"]["username"]),
                    verb: text(&event["verb"]),
                    resource: text(&object["resource"]),
                    subresource: text(&object["subresource"]),
                    namespace: text(&object["namespace"]),
                    name: text(&object["name"]),
                    code: event["responseStatus"]["code"].as_u64().unwrap_or_default(),
                    at: text(&event["stageTimestamp"]),
                    pod: text(&event["user"]["extra"]["authentication.kubernetes.io/pod-name"][0]),
                    source_ip: text(&event["sourceIPs"][0]),
                }
            })
            .collect())
    }

    /// A client certificate for `user` in `groups`, signed by the cluster CA.
    pub fn client_cert(&self, user: &str, groups: &[&str]) -> Result<CertKey, ControlPlaneError> {
        client_cert(&self.ca_pem, &self.ca_key_pem, user, groups)
    }

    /// Writes a kubeconfig for this cluster with `credentials`.
    pub fn write_kubeconfig(
        &self,
        path: &Path,
        user: &str,
        credentials: &Credentials,
    ) -> Result<(), ControlPlaneError> {
        std::fs::write(path, self.kubeconfig_yaml(user, credentials))?;
        Ok(())
    }

    /// A kubeconfig document for this cluster with `credentials`.
    pub fn kubeconfig_yaml(&self, user: &str, credentials: &Credentials) -> String {
        let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
        let user_fields = match credentials {
            Credentials::Certificate(pair) => format!(
                "    client-certificate-data: {}\n    client-key-data: {}\n",
                b64(&pair.cert_pem),
                b64(&pair.key_pem)
            ),
            Credentials::Token(token) => format!("    token: {token}\n"),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    \
             certificate-authority-data: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {user}\n\
             current-context: test\nusers:\n- name: {user}\n  user:\n{user_fields}",
            self.server,
            b64(&self.ca_pem)
        )
    }

    /// An admin client, bound to the calling tokio runtime.
    pub async fn client(&self) -> Result<Client, ControlPlaneError> {
        self.client_from(&self.admin_kubeconfig).await
    }

    /// A client from a kubeconfig file written by [`ControlPlane::write_kubeconfig`].
    pub async fn client_from(&self, kubeconfig: &Path) -> Result<Client, ControlPlaneError> {
        client_from_file(kubeconfig).await
    }

    /// A client authenticated as `user` in `groups` (no rights beyond what RBAC grants them).
    pub async fn user_client(&self, user: &str, groups: &[&str]) -> Result<Client, ControlPlaneError> {
        let path = self.dir.join(format!("user-{:08x}.kubeconfig", rand::random::<u32>()));
        self.write_kubeconfig(&path, user, &Credentials::Certificate(self.client_cert(user, groups)?))?;
        self.client_from(&path).await
    }

    /// A fresh namespace named `<prefix>-<random>`.
    pub async fn namespace(&self, client: &Client, prefix: &str) -> Result<String, ControlPlaneError> {
        let name = format!("{prefix}-{:08x}", rand::random::<u32>());
        self.create_namespace(client, &name).await?;
        Ok(name)
    }

    /// Creates the namespace `name` and waits for its `default` ServiceAccount.
    pub async fn create_namespace(&self, client: &Client, name: &str) -> Result<(), ControlPlaneError> {
        let name = name.to_owned();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: kube::api::ObjectMeta { name: Some(name.clone()), ..Default::default() },
            ..Default::default()
        };
        namespaces.create(&PostParams::default(), &ns).await?;
        if self.controller_manager {
            // Pods need the `default` ServiceAccount, which the controller manager adds.
            let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
            let timeout = Duration::from_secs(30);
            tokio::time::timeout(
                timeout,
                await_condition(accounts, "default", |sa: Option<&ServiceAccount>| sa.is_some()),
            )
            .await
            .map_err(|_| ControlPlaneError::NotReady {
                what: "the default ServiceAccount",
                timeout,
                log: tail(&self.dir.join("kube-controller-manager.log")),
            })?
            .map_err(|e| ControlPlaneError::Watch {
                name: format!("ServiceAccount {name}/default"),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// A client from a kubeconfig file (outside any [`ControlPlane`] value, for helper threads).
pub(crate) async fn client_from_file(kubeconfig: &Path) -> Result<Client, ControlPlaneError> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).map_err(|e| ControlPlaneError::Kubeconfig(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| ControlPlaneError::Kubeconfig(e.to_string()))?;
    Ok(Client::try_from(config)?)
}

/// How a kubeconfig authenticates.
pub enum Credentials {
    Certificate(CertKey),
    Token(String),
}

/// A client certificate for `user` in `groups`, signed by the CA.
fn client_cert(ca_pem: &str, ca_key_pem: &str, user: &str, groups: &[&str]) -> Result<CertKey, ControlPlaneError> {
    let issuer = Issuer::from_ca_cert_pem(ca_pem, KeyPair::from_pem(ca_key_pem)?)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, user);
    for group in groups {
        params.distinguished_name.push(DnType::OrganizationName, *group);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = now() - time::Duration::minutes(5);
    params.not_after = now() + time::Duration::days(1);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

fn make_ca() -> Result<(String, String), ControlPlaneError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "slim-e2e cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = now() - time::Duration::minutes(5);
    params.not_after = now() + time::Duration::days(7);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn serving_cert(issuer: &Issuer<'_, KeyPair>, bind: std::net::Ipv4Addr) -> Result<CertKey, ControlPlaneError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
    ])?;
    let mut ips = vec![std::net::Ipv4Addr::LOCALHOST, std::net::Ipv4Addr::new(10, 0, 0, 1), bind];
    ips.sort();
    ips.dedup();
    params.subject_alt_names.extend(ips.into_iter().map(|ip| SanType::IpAddress(ip.into())));
    params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now() - time::Duration::minutes(5);
    params.not_after = now() + time::Duration::days(7);
    let cert = params.signed_by(&key, issuer)?;
    Ok(CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Applies every CRD of the operator (server-side) and waits until each is `Established`.
pub async fn install_crds(client: &Client) -> Result<(), ControlPlaneError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in slim_operator::api::crds() {
        let name = crd.name_any();
        crds.patch(&name, &PatchParams::apply("slim-e2e").force(), &Patch::Apply(&crd)).await?;
        let timeout = Duration::from_secs(30);
        match tokio::time::timeout(timeout, await_condition(crds.clone(), &name, conditions::is_crd_established()))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                return Err(ControlPlaneError::Watch { name: format!("CRD {name}"), reason: error.to_string() });
            }
            Err(_) => {
                return Err(ControlPlaneError::Watch {
                    name: format!("CRD {name}"),
                    reason: format!("not Established within {timeout:?}"),
                });
            }
        }
    }
    Ok(())
}
