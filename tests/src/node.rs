//! A real node for the tests: containerd (Debian's 1.6, its own config, state and socket), a CNI
//! bridge, kubelet, kube-scheduler and kube-proxy from `KUBEBUILDER_ASSETS`, registered with a
//! control plane whose API server listens on the bridge's gateway so Pods reach it (through the
//! `kubernetes` Service, as in any cluster: kube-proxy's iptables rules).
//!
//! One node per test binary ([`shared`]), needing root (containerd, mounts, iptables). Everything it
//! leaves is removed when the test binary exits, and again before the next one starts (a killed run
//! leaves processes, mounts and a bridge behind): Pod processes (killed through their cgroups), the
//! containerd shims, mounts under its folder, kube-proxy's iptables chains, the bridge.
//!
//! Images come from OCI archives made by `scripts/oci-image.sh` (the documented recipe), imported
//! into containerd's `k8s.io` namespace: no registry, no daemon.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Node as NodeObject, Pod};
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

use crate::control_plane::{
    self, ControlPlane, ControlPlaneError, Credentials, Options, free_ports, spawn_child, start_on_lasting_thread,
    stop_children, tail,
};

/// The bridge Pods are attached to; its gateway address is where they reach the host.
pub const BRIDGE: &str = "slimk8s0";
pub const POD_SUBNET: &str = "10.88.0.0/16";
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// The sandbox image every Pod starts with (a shell that sleeps until told to stop).
pub const PAUSE_IMAGE: &str = "slim.test/pause:1";
pub const CLUSTER_DOMAIN: &str = "cluster.local";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("the node tier needs root (containerd, mounts, iptables); run the tests as root")]
    NotRoot,
    #[error(
        "{0} is not installed: the node tier needs containerd, runc, the CNI plugins, iptables and conntrack \
         (scripts/test.sh installs them: apt-get install containerd runc containernetworking-plugins iptables \
         conntrack busybox-static)"
    )]
    Missing(String),
    #[error("{command}: {output}")]
    Command { command: String, output: String },
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{what} not within {timeout:?}: {detail}")]
    Timeout { what: String, timeout: Duration, detail: String },
}

/// A running node and its control plane.
pub struct Node {
    pub plane: ControlPlane,
    /// The Node object's name (resolves to 127.0.0.1: the API server dials it for logs and exec).
    pub name: String,
    /// containerd's, kubelet's and the images' files.
    pub dir: PathBuf,
    pub containerd_socket: PathBuf,
    /// From nothing (no control plane, no containerd) to a Ready node.
    pub ready_after: Duration,
}

static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());
static SHARED: OnceLock<Result<Node, String>> = OnceLock::new();

/// The test binary's node, started on first use.
pub fn shared() -> &'static Node {
    let started = SHARED.get_or_init(|| start_on_lasting_thread("node", || Node::start().map_err(|e| e.to_string())));
    match started {
        Ok(node) => node,
        Err(error) => panic!("node: {error}"),
    }
}

/// The node's folder: fixed, so a run cleans what a killed one left.
fn node_dir() -> PathBuf {
    std::env::var_os("SLIM_NODE_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp/slim-e2e-node"))
}

fn run(command: &str, args: &[&str]) -> Result<String, NodeError> {
    let output = Command::new(command)
        .args(args)
        .output()
        .map_err(|e| NodeError::Command { command: format!("{command} {}", args.join(" ")), output: e.to_string() })?;
    if !output.status.success() {
        return Err(NodeError::Command {
            command: format!("{command} {}", args.join(" ")),
            output: format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn which(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(binary))
        .find(|path| path.is_file())
}

/// This machine's host name when it resolves to loopback (the API server reaches the kubelet
/// there), else `localhost`.
fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_lowercase();
    let loopback = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), 0))
        .map(|mut addrs| addrs.any(|a| a.ip().is_loopback()))
        .unwrap_or(false);
    let valid = !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if loopback && valid { host } else { "localhost".into() }
}

extern "C" fn stop_node() {
    // kube-proxy, the scheduler, the kubelet first (nothing restarts what is killed next).
    stop_children(&mut CHILDREN.lock().unwrap_or_else(|p| p.into_inner()));
    clean_leftovers(&node_dir());
}

/// Removes what a node left: Pod processes, shims, mounts, iptables chains, the bridge, files.
fn clean_leftovers(dir: &Path) {
    // Pod processes, through the cgroups the kubelet made for them.
    for _ in 0..3 {
        let pids = cgroup_pids(Path::new("/sys/fs/cgroup/pids/kubepods"));
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The shims and containerd of this node (their command lines name its socket or config).
    let marker = dir.display().to_string();
    for pid in processes_mentioning(&marker) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(200));
    // Mounts under the folder (rootfs overlays, secret tmpfs, network namespaces), deepest first.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> =
        mounts.lines().filter_map(|line| line.split(' ').nth(4)).filter(|point| point.starts_with(&marker)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        if let Ok(point) = std::ffi::CString::new(point) {
            // SAFETY: umount2(2) with a NUL-terminated path that outlives the call.
            unsafe {
                libc::umount2(point.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
    if let Some(proxy) = control_plane::assets().ok().map(|a| a.join("kube-proxy")).filter(|p| p.is_file()) {
        let _ = Command::new(proxy).arg("--cleanup").output();
    }
    // What the kubelet adds and kube-proxy --cleanup leaves (canaries, KUBE-FIREWALL's jumps).
    for iptables in ["iptables", "ip6tables"] {
        for table in ["nat", "mangle", "filter"] {
            remove_kube_chains(iptables, table);
        }
    }
    let _ = Command::new("ip").args(["link", "delete", BRIDGE]).output();
    if std::env::var_os("SLIM_KEEP_NODE").is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Deletes every rule that jumps to a `KUBE-*` chain from a built-in chain, then those chains.
fn remove_kube_chains(iptables: &str, table: &str) {
    let Ok(output) = Command::new(iptables).args(["-t", table, "-S"]).output() else { return };
    let rules = String::from_utf8_lossy(&output.stdout).into_owned();
    for rule in rules.lines().filter(|r| r.starts_with("-A ") && r.contains(" -j KUBE-")) {
        let words: Vec<&str> = rule.split_whitespace().collect();
        if words.get(1).is_some_and(|chain| !chain.starts_with("KUBE-")) {
            // Comments hold spaces inside quotes; split by hand they would not round-trip, and
            // the kubelet's jumps carry none.
            if !rule.contains('"') {
                let mut args = vec!["-t", table, "-D"];
                args.extend(&words[1..]);
                let _ = Command::new(iptables).args(&args).output();
            }
        }
    }
    for chain in rules.lines().filter_map(|r| r.strip_prefix("-N ")).filter(|c| c.starts_with("KUBE-")) {
        let _ = Command::new(iptables).args(["-t", table, "-F", chain]).output();
    }
    for chain in rules.lines().filter_map(|r| r.strip_prefix("-N ")).filter(|c| c.starts_with("KUBE-")) {
        let _ = Command::new(iptables).args(["-t", table, "-X", chain]).output();
    }
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return pids };
    pids.extend(
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse::<i32>().ok()),
    );
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            pids.extend(cgroup_pids(&entry.path()));
        }
    }
    pids
}

fn processes_mentioning(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(marker))
                .unwrap_or(false)
        })
        .collect()
}

fn spawn(what: &'static str, binary: &Path, args: &[String], log: &Path) -> Result<(), NodeError> {
    let child = spawn_child(what, binary, args, log)?;
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).push(child);
    Ok(())
}

impl Node {
    fn start() -> Result<Self, NodeError> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(NodeError::NotRoot);
        }
        for binary in ["containerd", "runc", "ctr", "iptables", "conntrack", "ip"] {
            which(binary).ok_or_else(|| NodeError::Missing(binary.into()))?;
        }
        if !Path::new("/usr/lib/cni/bridge").is_file() {
            return Err(NodeError::Missing("containernetworking-plugins (/usr/lib/cni/bridge)".into()));
        }
        let assets = control_plane::assets()?;
        for binary in ["kubelet", "kube-scheduler", "kube-proxy"] {
            if !assets.join(binary).is_file() {
                return Err(NodeError::Missing(format!("{binary} in KUBEBUILDER_ASSETS")));
            }
        }
        let started = Instant::now();
        let dir = node_dir();
        clean_leftovers(&dir);
        std::fs::create_dir_all(&dir)?;
        // The bridge exists (with the gateway address) before the API server binds to it.
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        run("ip", &["addr", "add", &format!("{GATEWAY}/16"), "dev", BRIDGE])?;
        run("ip", &["link", "set", BRIDGE, "up"])?;
        let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1");

        let plane = ControlPlane::start(&Options {
            bind: GATEWAY,
            advertise: GATEWAY,
            // Webhooks served by Pods: the API server dials the Service's endpoint (the Pod IP).
            extra_flags: vec!["--enable-aggregator-routing=true".into()],
        })?;
        // SAFETY: registers a plain `extern "C" fn` with no arguments. Registered after the
        // control plane's hook, so it runs first (atexit runs in reverse): the node stops while
        // its API server is still there.
        unsafe {
            libc::atexit(stop_node);
        }
        let name = node_name();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(grant_node_roles(&plane))?;

        let socket = dir.join("containerd.sock");
        Self::start_containerd(&dir, &socket)?;
        let mut node = Self { plane, name, dir, containerd_socket: socket, ready_after: Duration::ZERO };
        node.import(&images::pause(&node.dir)?)?;
        node.start_dns()?;
        node.start_kubelet(&assets)?;
        node.start_scheduler(&assets)?;
        node.start_proxy(&assets)?;
        runtime.block_on(node.wait_ready())?;
        node.ready_after = started.elapsed();
        Ok(node)
    }

    fn start_containerd(dir: &Path, socket: &Path) -> Result<(), NodeError> {
        let cni = dir.join("cni");
        std::fs::create_dir_all(&cni)?;
        std::fs::write(
            cni.join("10-slim-e2e.conflist"),
            format!(
                r#"{{"cniVersion": "0.4.0", "name": "slim-e2e", "plugins": [
  {{"type": "bridge", "bridge": "{BRIDGE}", "isGateway": true, "isDefaultGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{POD_SUBNET}", "gateway": "{GATEWAY}"}}]],
              "dataDir": "{}"}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
]}}"#,
                dir.join("cni-ipam").display()
            ),
        )?;
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj, only keep it.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
                root = dir.join("containerd").display(),
                state = dir.join("containerd-state").display(),
                socket = socket.display(),
                cni = cni.display(),
            ),
        )?;
        let containerd = which("containerd").ok_or_else(|| NodeError::Missing("containerd".into()))?;
        let log = dir.join("containerd.log");
        spawn("containerd", &containerd, &[format!("--config={}", config.display())], &log)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err(NodeError::Timeout {
                    what: "containerd's socket".into(),
                    timeout: Duration::from_secs(20),
                    detail: tail(&log),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn kubeconfig(&self, file: &str, user: &str, groups: &[&str]) -> Result<PathBuf, NodeError> {
        let path = self.dir.join(file);
        self.plane.write_kubeconfig(&path, user, &Credentials::Certificate(self.plane.client_cert(user, groups)?))?;
        Ok(path)
    }

    fn start_kubelet(&self, assets: &Path) -> Result<(), NodeError> {
        let kubeconfig =
            self.kubeconfig("kubelet.kubeconfig", &format!("system:node:{}", self.name), &["system:nodes"])?;
        let [port, healthz] = free_ports()?;
        let config = self.dir.join("kubelet.yaml");
        std::fs::write(
            &config,
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://{socket}
clusterDNS: [{GATEWAY}]
clusterDomain: {CLUSTER_DOMAIN}
address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
podLogsDir: {logs}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}
# A test machine's disk is what it is: never evict, never collect images.
evictionHard: {{memory.available: "0%", nodefs.available: "0%", imagefs.available: "0%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
syncFrequency: 5s
fileCheckFrequency: 5s
nodeStatusUpdateFrequency: 5s
serializeImagePulls: false
"#,
                socket = self.containerd_socket.display(),
                logs = self.dir.join("pod-logs").display(),
                ca = self.plane.dir.join("pki/ca.crt").display(),
            ),
        )?;
        spawn(
            "kubelet",
            &assets.join("kubelet"),
            &[
                format!("--config={}", config.display()),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--root-dir={}", self.dir.join("kubelet").display()),
                format!("--cert-dir={}", self.dir.join("kubelet-pki").display()),
                format!("--hostname-override={}", self.name),
                "--v=1".into(),
            ],
            &self.dir.join("kubelet.log"),
        )
    }

    fn start_scheduler(&self, assets: &Path) -> Result<(), NodeError> {
        let kubeconfig = self.kubeconfig("scheduler.kubeconfig", "system:kube-scheduler", &[])?;
        let [port] = free_ports()?;
        let k = kubeconfig.display();
        spawn(
            "kube-scheduler",
            &assets.join("kube-scheduler"),
            &[
                format!("--kubeconfig={k}"),
                format!("--authentication-kubeconfig={k}"),
                format!("--authorization-kubeconfig={k}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                "--leader-elect=false".into(),
            ],
            &self.dir.join("kube-scheduler.log"),
        )
    }

    fn start_proxy(&self, assets: &Path) -> Result<(), NodeError> {
        let kubeconfig = self.kubeconfig("proxy.kubeconfig", "system:kube-proxy", &[])?;
        let [metrics, healthz] = free_ports()?;
        spawn(
            "kube-proxy",
            &assets.join("kube-proxy"),
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--hostname-override={}", self.name),
                "--proxy-mode=iptables".into(),
                // Without br_netfilter a Pod reaching a Service backed by a Pod on the same bridge
                // would get the reply straight from that Pod's IP: masquerade makes it come back
                // through the host, where the NAT is undone.
                "--masquerade-all".into(),
                format!("--cluster-cidr={POD_SUBNET}"),
                // Leave the machine's conntrack sysctls alone.
                "--conntrack-max-per-core=0".into(),
                "--conntrack-tcp-timeout-established=0".into(),
                "--conntrack-tcp-timeout-close-wait=0".into(),
                format!("--metrics-bind-address=127.0.0.1:{metrics}"),
                format!("--healthz-bind-address=127.0.0.1:{healthz}"),
            ],
            &self.dir.join("kube-proxy.log"),
        )
    }

    /// Cluster DNS, standing in for CoreDNS: dnsmasq on the gateway answers from a hosts file
    /// that a thread keeps in step with Services and Pods (`<svc>.<ns>.svc.cluster.local`, and
    /// `<hostname>.<subdomain>.<ns>.svc.cluster.local` for StatefulSet Pods).
    fn start_dns(&self) -> Result<(), NodeError> {
        let dnsmasq = which("dnsmasq").ok_or_else(|| NodeError::Missing("dnsmasq (dnsmasq-base)".into()))?;
        let hosts = self.dir.join("dns");
        std::fs::create_dir_all(&hosts)?;
        spawn(
            "dnsmasq",
            &dnsmasq,
            &[
                "--keep-in-foreground".into(),
                "--no-resolv".into(),
                "--no-hosts".into(),
                format!("--hostsdir={}", hosts.display()),
                format!("--listen-address={GATEWAY}"),
                "--bind-interfaces".into(),
                format!("--local=/{CLUSTER_DOMAIN}/"),
                "--log-facility=-".into(),
                "--user=root".into(),
                "--pid-file=".into(),
            ],
            &self.dir.join("dnsmasq.log"),
        )?;
        let kubeconfig = self.plane.admin_kubeconfig.clone();
        let scratch = self.dir.join("dns.tmp");
        std::thread::Builder::new().name("cluster-dns".into()).spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async move {
                match crate::control_plane::client_from_file(&kubeconfig).await {
                    Ok(client) => follow_dns_records(client, &scratch, &hosts.join("cluster")).await,
                    Err(error) => tracing::warn!(%error, "cluster DNS: no client"),
                }
            });
        })?;
        Ok(())
    }

    /// Waits for the Node to be Ready, then lifts the `not-ready` taint the (disabled) node
    /// lifecycle controller would have lifted.
    async fn wait_ready(&self) -> Result<(), NodeError> {
        let client = self.plane.client().await?;
        let nodes: Api<NodeObject> = Api::all(client);
        let timeout = Duration::from_secs(90);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(node) = nodes.get_opt(&self.name).await? {
                let ready = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                if ready {
                    let taints: Vec<_> = node
                        .spec
                        .as_ref()
                        .and_then(|s| s.taints.clone())
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|t| !t.key.starts_with("node.kubernetes.io/not-ready"))
                        .collect();
                    let patch = serde_json::json!({"spec": {"taints": taints}});
                    nodes.patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(NodeError::Timeout {
                    what: format!("Node {} Ready", self.name),
                    timeout,
                    detail: tail(&self.dir.join("kubelet.log")),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Imports an OCI image archive into the node's containerd (`k8s.io`, the CRI's namespace).
    pub fn import(&self, archive: &Path) -> Result<(), NodeError> {
        let socket = self.containerd_socket.display().to_string();
        run(
            "ctr",
            &["--address", &socket, "--namespace", "k8s.io", "images", "import", &archive.display().to_string()],
        )?;
        Ok(())
    }

    /// Kills a container with SIGKILL (a crash), by its ID as the Pod's status gives it
    /// (`containerd://<id>`); the kubelet restarts it as the Pod's restart policy says.
    pub fn kill_container(&self, container_id: &str) -> Result<(), NodeError> {
        let socket = self.containerd_socket.display().to_string();
        let id = container_id.trim_start_matches("containerd://");
        run("ctr", &["--address", &socket, "--namespace", "k8s.io", "tasks", "kill", "--signal", "SIGKILL", id])?;
        Ok(())
    }

    /// Prepares a namespace for Pods: this API server (OpenShift's tree) adds a ConfigMap
    /// `openshift-service-ca.crt` to every service-account token volume; without it Pods stay in
    /// `ContainerCreating`.
    pub async fn prepare_namespace(&self, client: &Client, namespace: &str) -> Result<(), NodeError> {
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let map = ConfigMap {
            metadata: ObjectMeta { name: Some("openshift-service-ca.crt".into()), ..Default::default() },
            data: Some([("service-ca.crt".to_owned(), self.plane.ca_pem.clone())].into()),
            ..Default::default()
        };
        match maps.create(&PostParams::default(), &map).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// A fresh namespace ready for Pods.
    pub async fn namespace(&self, client: &Client, prefix: &str) -> Result<String, NodeError> {
        let name = self.plane.namespace(client, prefix).await?;
        self.prepare_namespace(client, &name).await?;
        Ok(name)
    }

    /// The kubelet's log (what it said about Pods that would not start).
    pub fn kubelet_log(&self) -> String {
        tail(&self.dir.join("kubelet.log"))
    }
}

/// Keeps `target` holding the cluster's DNS records: Services and Pods are watched (reflector
/// stores), and the file is rewritten (through `scratch`, atomically) whenever what it says changes.
async fn follow_dns_records(client: Client, scratch: &Path, target: &Path) {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Service;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let (services, services_writer) = reflector::store::<Service>();
    let (pods, pods_writer) = reflector::store::<Pod>();
    let service_events = reflector(services_writer, watcher(Api::<Service>::all(client.clone()), Default::default()))
        .default_backoff()
        .map(|_| ());
    let pod_events =
        reflector(pods_writer, watcher(Api::<Pod>::all(client), Default::default())).default_backoff().map(|_| ());
    let mut events = std::pin::pin!(futures::stream::select(service_events, pod_events));
    let mut written = String::new();
    while events.next().await.is_some() {
        let records = hosts_file(
            services.state().iter().map(AsRef::as_ref),
            &pods.state().iter().map(AsRef::as_ref).collect::<Vec<_>>(),
        );
        if records != written && std::fs::write(scratch, &records).is_ok() && std::fs::rename(scratch, target).is_ok() {
            written = records;
        }
    }
}

/// What kube-dns would answer (ready Pods only), as `IP name` lines (sorted, so an unchanged cluster writes nothing).
pub fn hosts_file<'a>(
    services: impl IntoIterator<Item = &'a k8s_openapi::api::core::v1::Service>,
    pods: &[&Pod],
) -> String {
    let mut lines = std::collections::BTreeSet::new();
    let running: Vec<(&Pod, String)> = pods
        .iter()
        .copied()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| Some((p, p.status.as_ref()?.pod_ip.clone()?)))
        .collect();
    for service in services {
        let (Some(name), Some(ns), Some(spec)) = (&service.metadata.name, &service.metadata.namespace, &service.spec)
        else {
            continue;
        };
        let fqdn = format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}");
        match spec.cluster_ip.as_deref() {
            Some("None") => {
                // Headless: the ready Pods it selects.
                let Some(selector) = &spec.selector else { continue };
                for (pod, ip) in &running {
                    let labels = pod.metadata.labels.clone().unwrap_or_default();
                    if pod.metadata.namespace.as_ref() == Some(ns)
                        && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                        && pod_ready(pod)
                    {
                        lines.insert(format!("{ip} {fqdn}"));
                    }
                }
            }
            Some(ip) if !ip.is_empty() => {
                lines.insert(format!("{ip} {fqdn}"));
            }
            _ => {}
        }
    }
    for (pod, ip) in &running {
        let spec = pod.spec.as_ref();
        if let (Some(host), Some(sub), Some(ns)) =
            (spec.and_then(|s| s.hostname.as_ref()), spec.and_then(|s| s.subdomain.as_ref()), &pod.metadata.namespace)
            && pod_ready(pod)
        {
            lines.insert(format!("{ip} {host}.{sub}.{ns}.svc.{CLUSTER_DOMAIN}"));
        }
    }
    lines.into_iter().map(|line| line + "\n").collect()
}

/// Lets the node's components do their jobs on an RBAC-only API server (no Node authorizer).
async fn grant_node_roles(plane: &ControlPlane) -> Result<(), NodeError> {
    let client = plane.client().await?;
    let bindings: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(client);
    let binding: k8s_openapi::api::rbac::v1::ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "slim-e2e:nodes"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}],
    }))
    .map_err(|e| NodeError::Command { command: "ClusterRoleBinding".into(), output: e.to_string() })?;
    bindings.patch("slim-e2e:nodes", &PatchParams::apply("slim-e2e").force(), &Patch::Apply(&binding)).await?;
    Ok(())
}

/// Waits until `pod` satisfies `done`, or says what it is doing.
pub async fn wait_pod(
    pods: &Api<Pod>,
    name: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Pod) -> bool,
) -> Result<Pod, NodeError> {
    let deadline = Instant::now() + timeout;
    loop {
        let pod = pods.get_opt(name).await?;
        if let Some(pod) = &pod
            && done(pod)
        {
            return Ok(pod.clone());
        }
        if Instant::now() > deadline {
            let detail = pod
                .map(|p| serde_json::to_string(&p.status).unwrap_or_default())
                .unwrap_or_else(|| "no such Pod".into());
            return Err(NodeError::Timeout { what: format!("Pod {name}: {what}"), timeout, detail });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether every container of the Pod is ready.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The Pod's IP once it has one.
pub fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
    pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()
}

pub mod images;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_answers_like_kube_dns() {
        let services: Vec<k8s_openapi::api::core::v1::Service> = serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "api", "namespace": "a"}, "spec": {"clusterIP": "10.0.0.7"}},
            {"metadata": {"name": "slim", "namespace": "a"}, "spec": {"clusterIP": "None", "selector": {"app": "slim"}}},
            {"metadata": {"name": "pending", "namespace": "a"}, "spec": {}}
        ]))
        .expect("services");
        let ready = serde_json::json!({"conditions": [{"type": "Ready", "status": "True"}]});
        let pods: Vec<Pod> = serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "slim-0", "namespace": "a", "labels": {"app": "slim"}},
             "spec": {"containers": [], "hostname": "slim-0", "subdomain": "slim"},
             "status": {"podIP": "10.88.0.5", "conditions": ready["conditions"]}},
            {"metadata": {"name": "slim-1", "namespace": "a", "labels": {"app": "slim"}},
             "spec": {"containers": [], "hostname": "slim-1", "subdomain": "slim"},
             "status": {"podIP": "10.88.0.6"}},
            {"metadata": {"name": "other", "namespace": "b", "labels": {"app": "slim"}},
             "spec": {"containers": []}, "status": {"podIP": "10.88.0.9", "conditions": ready["conditions"]}}
        ]))
        .expect("pods");
        assert_eq!(
            hosts_file(&services, &pods.iter().collect::<Vec<_>>()),
            "10.0.0.7 api.a.svc.cluster.local\n\
             10.88.0.5 slim-0.slim.a.svc.cluster.local\n\
             10.88.0.5 slim.a.svc.cluster.local\n"
        );
    }
}
