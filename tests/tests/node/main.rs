//! The node tier: what users meet on a node, proven in running Pods on a real kubelet (containerd,
//! CNI bridge, kube-proxy, kube-scheduler; see `slim_e2e::node`). The chart is installed with
//! `helm install` from images of our release binaries (OCI archives, no registry), and the API
//! server calls the webhook served by the operator's Pods.
//!
//! The tests share one install and take turns ([`SERIAL`]): one deletes the leader Pod, which
//! would otherwise race another's Pod creation through the webhook. One test binary (one node,
//! one install), its tests in a file per feature; the helpers they share are here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use kube::{Client, ResourceExt};
use slim_e2e::node::{self, Node, images};
use slim_e2e::{helm, repo_path};
use slim_identity_agent::workload::fake::{AgentState, FakeAgent};

mod chart;
mod identity;
mod quickstart;
mod slim_nodes;

const RELEASE_NAMESPACE: &str = "slim-system";
const RELEASE: &str = "slim";
const OPERATOR_SELECTOR: &str = "app.kubernetes.io/name=slim-operator";
const TRUST_DOMAIN: &str = "cluster.test";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where the injected agents find "SPIRE" (the fake Workload API a test serves): the chart's
/// `spire.socketMode: host-path`.
fn spire_dir(node: &Node) -> PathBuf {
    node.dir.join("spire-agent")
}

/// `helm install` of the chart with the test images, two replicas, once per test binary; waits
/// until the operator's Pods are Ready.
async fn installed() -> (&'static Node, Client) {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let node = node::shared();
    let client = node.plane.client().await.expect("admin client");
    let result = INSTALLED.get_or_init(|| {
        images::ensure(node)?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    runtime.block_on(install(node))
                })
                .join()
                .map_err(|_| "the install panicked".to_owned())?
        })
    });
    if let Err(error) = result {
        panic!("helm install on the node: {error}");
    }
    (node, client)
}

async fn install(node: &Node) -> Result<(), String> {
    let client = node.plane.client().await.map_err(|e| e.to_string())?;
    node.plane.create_namespace(&client, RELEASE_NAMESPACE).await.map_err(|e| e.to_string())?;
    node.prepare_namespace(&client, RELEASE_NAMESPACE).await.map_err(|e| e.to_string())?;
    std::fs::create_dir_all(spire_dir(node)).map_err(|e| e.to_string())?;
    let (operator_repo, operator_tag) = images::OPERATOR.rsplit_once(':').unwrap_or_default();
    let (agent_repo, agent_tag) = images::AGENT.rsplit_once(':').unwrap_or_default();
    let values = node.dir.join("values.yaml");
    std::fs::write(
        &values,
        format!(
            "replicaCount: 2\n\
             image: {{repository: {operator_repo}, tag: {operator_tag}, pullPolicy: Never}}\n\
             sidecar:\n  image: {{repository: {agent_repo}, tag: {agent_tag}, pullPolicy: Never}}\n\
             spire: {{socketMode: host-path, hostPath: {}}}\n\
             webhook: {{failurePolicy: Fail}}\n\
             operator: {{logFormat: text}}\n",
            spire_dir(node).display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let chart = repo_path("charts/slim-operator").display().to_string();
    let kubeconfig = node.plane.admin_kubeconfig.clone();
    let started = Instant::now();
    helm(
        &[
            "install",
            RELEASE,
            &chart,
            "--namespace",
            RELEASE_NAMESPACE,
            "--values",
            &values.display().to_string(),
            "--wait",
            "--timeout",
            "180s",
        ],
        &[("KUBECONFIG", kubeconfig.as_path())],
    )
    .map_err(|e| format!("{e}\nkubelet: {}", node.kubelet_log()))?;
    println!("helm install --wait: the operator's 2 Pods Ready in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn operator_pods(client: &Client) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let list = pods.list(&ListParams::default().labels(OPERATOR_SELECTOR)).await.expect("list operator pods");
    list.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect()
}

/// GET `http://<ip>:<port><path>` from the host (Pod IPs are on the bridge).
fn http_get(ip: std::net::Ipv4Addr, port: u16, path: &str) -> (u16, String) {
    slim_e2e::operator::http_get((ip, port).into(), path).unwrap_or_else(|e| panic!("GET {ip}:{port}{path}: {e}"))
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn webhook_reviews(client: &Client) -> f64 {
    let mut total = 0.0;
    for pod in operator_pods(client).await {
        if let Some(ip) = node::pod_ip(&pod) {
            total += metric_sum(&http_get(ip, 8080, "/metrics").1, "slim_operator_webhook_reviews_total");
        }
    }
    total
}

fn app_pod(name: &str, annotations: serde_json::Value, script: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": images::APP, "imagePullPolicy": "Never", "args": ["-c", script]}]
        }
    }))
    .expect("pod")
}

fn unreachable_subscription(ns: &str, name: &str) -> slim_operator::api::Subscription {
    // A node nobody serves: the leader keeps writing (finalizer, status, events) as it retries.
    serde_json::from_value(serde_json::json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"name": "org/ns/nobody", "nodes": {"endpoints": ["http://10.88.255.254:46358"]},
                 "link": {"endpoint": "http://10.88.255.253:46357", "tls": {"insecure": true}}}
    }))
    .expect("subscription")
}

fn make_world_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // The injected agent runs as 65532; SPIRE's socket is open to every workload too.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
}

fn container_status(pod: &Pod, name: &str, init: bool) -> Option<k8s_openapi::api::core::v1::ContainerStatus> {
    let status = pod.status.as_ref()?;
    let list = if init { status.init_container_statuses.as_ref() } else { status.container_statuses.as_ref() }?;
    list.iter().find(|s| s.name == name).cloned()
}

fn started_at(pod: &Pod, name: &str, init: bool) -> k8s_openapi::jiff::Timestamp {
    container_status(pod, name, init)
        .and_then(|s| s.state?.running?.started_at)
        .map(|t| t.0)
        .unwrap_or_else(|| panic!("{name} running in {pod:?}"))
}

async fn container_log(pods: &Api<Pod>, pod: &str, container: &str) -> String {
    let params = LogParams { container: Some(container.into()), ..Default::default() };
    pods.logs(pod, &params).await.unwrap_or_else(|e| format!("(no log: {e})"))
}

async fn wait_log(pods: &Api<Pod>, pod: &str, container: &str, needle: &str) -> String {
    wait_log_for(pods, pod, container, needle, Duration::from_secs(30)).await
}

async fn wait_log_for(pods: &Api<Pod>, pod: &str, container: &str, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = container_log(pods, pod, container).await;
        if log.contains(needle) || Instant::now() > deadline {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How a SLIM node serves its controller API.
#[derive(Clone, Copy)]
enum Controller {
    Plain,
    /// mTLS: its certificate from the Secret `node-tls`, its clients' CA from `operator-ca` (node
    /// certificates rarely name Pod IPs, so the operator needs `serverName`).
    Mtls,
    /// mTLS with its X.509-SVID and its clients' bundle from the Workload API socket `node.sock` on
    /// the node's SPIRE hostPath (SLIM's own `spire` TLS source).
    Spiffe,
}

/// Two SLIM nodes as a StatefulSet `name` (the `slim` binary, the quickstart's config), reached by
/// the operator through a Subscription's `nodes.selector` (Pod IPs) and by each other and the apps
/// through cluster DNS.
fn slim_nodes(ns: &str, name: &str, controller: Controller, spire_dir: &Path) -> String {
    let tls = |source: &str, client_ca: &str| {
        format!(
            "\n            - endpoint: \"0.0.0.0:46358\"\n              tls:\n                insecure: false\n\
             \x20               source: {source}\n                client_ca: {client_ca}"
        )
    };
    let spire =
        "{type: spire, socket_path: \"unix:///run/spire/agent-sockets/node.sock\", trust_domains: [cluster.test]}";
    let (controller, mounts, volumes) = match controller {
        Controller::Plain => (" [{endpoint: \"0.0.0.0:46358\", tls: {insecure: true}}]".to_owned(), String::new(), String::new()),
        Controller::Mtls => (
            tls("{type: file, cert: /etc/slim-tls/tls.crt, key: /etc/slim-tls/tls.key}", "{type: file, path: /etc/slim-client-ca/ca.crt}"),
            "\n            - {name: tls, mountPath: /etc/slim-tls}\n            - {name: client-ca, mountPath: /etc/slim-client-ca}".to_owned(),
            "\n        - {name: tls, secret: {secretName: node-tls}}\n        - {name: client-ca, secret: {secretName: operator-ca}}".to_owned(),
        ),
        Controller::Spiffe => (
            tls(spire, spire),
            "\n            - {name: spire, mountPath: /run/spire/agent-sockets}".to_owned(),
            format!("\n        - {{name: spire, hostPath: {{path: {}, type: Directory}}}}", spire_dir.display()),
        ),
    };
    format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: {name}-config, namespace: {ns}}}
data:
  config.yaml: |
    runtime: {{n_cores: 1, drain_timeout: 2s}}
    tracing: {{log_level: info}}
    services:
      slim/0:
        node_id: ${{env:SLIM_NODE_ID}}
        dataplane:
          servers: [{{endpoint: "0.0.0.0:46357", tls: {{insecure: true}}}}]
          clients: []
        controller:
          servers:{controller}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  clusterIP: None
  selector: {{app.kubernetes.io/name: {name}}}
  ports: [{{name: data-plane-0, port: 46357}}, {{name: controller-0, port: 46358}}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: {name}, namespace: {ns}}}
spec:
  serviceName: {name}
  replicas: 2
  podManagementPolicy: Parallel
  selector: {{matchLabels: {{app.kubernetes.io/name: {name}}}}}
  template:
    metadata:
      labels: {{app.kubernetes.io/name: {name}, slim.agntcy.org/inject-identity: "false"}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
        - name: slim
          image: {image}
          imagePullPolicy: Never
          args: ["--config", "/etc/slim/config.yaml"]
          env: [{{name: SLIM_NODE_ID, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}]
          ports: [{{name: data-plane-0, containerPort: 46357}}, {{name: controller-0, containerPort: 46358}}]
          readinessProbe: {{tcpSocket: {{port: 46358}}, periodSeconds: 1}}
          volumeMounts:
            - {{name: config, mountPath: /etc/slim}}{mounts}
      volumes:
        - {{name: config, configMap: {{name: {name}-config}}}}{volumes}
"#,
        image = images::SLIM
    )
}

/// Applies the node set `name` in the namespace of `pods` and waits until both Pods are Ready.
async fn start_slim_nodes(node: &Node, pods: &Api<Pod>, name: &str, controller: Controller) {
    let ns = pods.namespace().expect("a namespaced Api").to_owned();
    kubectl_apply(node, &slim_nodes(&ns, name, controller, &spire_dir(node)));
    wait_slim_nodes(pods, name).await;
}

async fn wait_slim_nodes(pods: &Api<Pod>, name: &str) {
    for pod in [format!("{name}-0"), format!("{name}-1")] {
        node::wait_pod(pods, &pod, Duration::from_secs(90), "Ready", node::pod_ready).await.expect("SLIM node Ready");
    }
}

/// A Subscription installing `name` on the node Pod `on` (by selector), over a link to `to`'s data
/// plane (by its DNS name). A `peer` link syncs the apps' own subscriptions both ways, which sessions
/// across nodes need: their traffic goes to `org/ns/app/<instance>`, which a route for the bare
/// name does not match (slim-control-api.md, gotchas).
fn subscription_between(ns: &str, object: &str, name: &str, on: &str, to: &str, connection: &str) -> String {
    format!(
        r#"apiVersion: slim.agntcy.org/v1alpha1
kind: Subscription
metadata: {{name: {object}, namespace: {ns}}}
spec:
  name: {name}
  nodes:
    selector:
      matchLabels: {{app.kubernetes.io/name: slim, statefulset.kubernetes.io/pod-name: {on}}}
  link:
    endpoint: http://{to}.slim.{ns}.svc.cluster.local:46357
    connectionType: {connection}
    tls: {{insecure: true}}
"#
    )
}

fn slim_app(name: &str, script: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"slim.agntcy.org/inject-identity": "false"}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": images::SLIM_APP, "imagePullPolicy": "Never",
                            "command": ["/bin/sh", "-c", script]}]
        }
    }))
    .expect("pod")
}

/// Pod name -> service account of the Pods in `namespace`, kept current every 250 ms.
fn pod_accounts(client: &Client, namespace: &str) -> Arc<Mutex<HashMap<String, String>>> {
    let accounts = Arc::new(Mutex::new(HashMap::new()));
    let (pods, map): (Api<Pod>, _) = (Api::namespaced(client.clone(), namespace), accounts.clone());
    tokio::spawn(async move {
        loop {
            if let Ok(list) = pods.list(&ListParams::default()).await {
                let current = list.items.iter().map(|p| {
                    let account =
                        p.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or("default".into());
                    (p.name_any(), account)
                });
                *map.lock().unwrap_or_else(|p| p.into_inner()) = current.collect();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    accounts
}

/// The Pod a process on this node runs in: its container's hostname is the Pod's name.
fn pod_of_process(pid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let from_env = environ.split(|b| *b == 0).find_map(|v| v.strip_prefix(b"HOSTNAME="));
    match from_env {
        Some(name) => String::from_utf8(name.to_vec()).ok(),
        None => std::fs::read_to_string(format!("/proc/{pid}/root/etc/hostname")).ok().map(|h| h.trim().to_owned()),
    }
}

/// An app Pod `name` with the injected agent (its namespace opts in), running `script`.
fn injected_app(name: &str, script: &str) -> Pod {
    let mut pod = slim_app(name, script);
    pod.metadata.labels = Some([("app".to_owned(), name.to_owned())].into());
    pod.spec.as_mut().expect("spec").restart_policy = Some("Always".to_owned());
    pod
}

/// An app Pod `bob` listening as `org/ns/bob` on the node at `endpoint`, echoing what it gets.
async fn listen_as_bob(pods: &Api<Pod>, endpoint: &str) {
    let script = format!("/opt/python/bin/python3 /harness/slim_app.py listen {endpoint} org/ns/bob");
    pods.create(&PostParams::default(), &slim_app("bob", &script)).await.expect("bob");
}

/// An app Pod `name` (as `org/ns/alice`, on the node at `endpoint`) that sends `message` to bob
/// until his echo comes back (a minute at most); asserts it succeeded and returns its log.
async fn send_to_bob(pods: &Api<Pod>, name: &str, endpoint: &str, message: &str) -> String {
    let script = format!(
        "for i in $(seq 60); do echo go | /opt/python/bin/python3 /harness/slim_app.py send {endpoint} org/ns/alice \
         org/ns/bob {message} && exit 0; sleep 1; done; exit 1"
    );
    pods.create(&PostParams::default(), &slim_app(name, &script)).await.expect("sender");
    let done = |pod: &Pod| {
        pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed")
    };
    let pod = node::wait_pod(pods, name, Duration::from_secs(90), "done", done).await.expect("sender done");
    let log = container_log(pods, name, "app").await;
    assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Succeeded"), "{name}'s exchange: {log}");
    log
}

fn kubectl_apply(node: &Node, yaml: &str) {
    let file = node.dir.join(format!("apply-{:08x}.yaml", rand::random::<u32>()));
    std::fs::write(&file, yaml).expect("write manifest");
    let kubeconfig = node.plane.admin_kubeconfig.clone();
    slim_e2e::kubectl(&["apply", "-f", &file.display().to_string()], &[("KUBECONFIG", kubeconfig.as_path())])
        .unwrap_or_else(|e| panic!("kubectl apply: {e}"));
}

/// Whether the node Pod's own route list (its controller API, read from the host over the
/// bridge) routes `name`.
async fn node_routes(pod: &Pod, name: &str) -> bool {
    let Some(ip) = node::pod_ip(pod) else { return false };
    let pool = slim_operator::slim::NodePool::default();
    let key = slim_operator::slim::SlimName::parse(name).expect("name").key();
    match pool.node(&format!("http://{ip}:46358")).snapshot(Duration::ZERO).await {
        Ok(observed) => observed.routes.iter().any(|(routed, _)| *routed == key),
        Err(_) => false,
    }
}

async fn subscription_ready(client: &Client, ns: &str, name: &str) -> bool {
    ready_condition(client, ns, name).await.is_some_and(|(status, _, _)| status == "True")
}

fn tls_subscription(ns: &str, nodes: &str, object: &str, tls: serde_json::Value) -> slim_operator::api::Subscription {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription",
        "metadata": {"name": object, "namespace": ns},
        "spec": {
            "name": format!("org/ns/{object}"),
            "nodes": {"selector": {"matchLabels": {"app.kubernetes.io/name": nodes,
                                                   "statefulset.kubernetes.io/pod-name": format!("{nodes}-0")}},
                      "tls": tls},
            "link": {"endpoint": format!("http://{nodes}-1.{nodes}.{ns}.svc.cluster.local:46357"), "tls": {"insecure": true}}
        }
    }))
    .expect("subscription")
}

/// Creates one Subscription per case (name, `tls`, expected Ready status and reason) on the node
/// set `nodes` and waits for each to reach its Ready condition; returns each one's message.
async fn expect_ready(
    client: &Client,
    ns: &str,
    nodes: &str,
    cases: &[(&str, serde_json::Value, &str, &str)],
) -> Vec<(String, String)> {
    let subscriptions: Api<slim_operator::api::Subscription> = Api::namespaced(client.clone(), ns);
    for (name, tls, _, _) in cases {
        let subscription = tls_subscription(ns, nodes, name, tls.clone());
        subscriptions.create(&PostParams::default(), &subscription).await.expect("create");
    }
    let mut messages = Vec::new();
    for (name, _, status, reason) in cases {
        let got =
            slim_e2e::wait_for(&format!("{name}: Ready={status} {reason}"), Duration::from_secs(60), async || {
                ready_condition(client, ns, name).await.filter(|(s, r, _)| s == status && r == reason)
            })
            .await;
        println!("{name}: Ready={} {}: {}", got.0, got.1, got.2);
        messages.push((name.to_string(), got.2));
    }
    messages
}

async fn ready_condition(client: &Client, ns: &str, name: &str) -> Option<(String, String, String)> {
    let subscriptions: Api<slim_operator::api::Subscription> = Api::namespaced(client.clone(), ns);
    let status = subscriptions.get_opt(name).await.ok().flatten()?.status?;
    let ready = status.conditions.into_iter().find(|c| c.type_ == "Ready")?;
    Some((ready.status, ready.reason, ready.message))
}

/// The chart switched to SPIFFE control TLS (`controlTls.spiffe`, the SPIRE socket on the node's
/// hostPath mounted into the operator) for as long as it lives; switched back when dropped, so the
/// other tests find the install as they expect even when this one fails.
struct SpiffeOperator<'a>(&'a Node);

impl<'a> SpiffeOperator<'a> {
    fn enable(node: &'a Node) -> Self {
        upgrade(
            node,
            &[
                "--set",
                "controlTls.spiffe.enabled=true",
                "--set",
                &format!("controlTls.spiffe.trustDomain={TRUST_DOMAIN}"),
            ],
        )
        .unwrap_or_else(|e| panic!("helm upgrade to SPIFFE mode: {e}"));
        Self(node)
    }
}

impl Drop for SpiffeOperator<'_> {
    fn drop(&mut self) {
        if let Err(error) = upgrade(self.0, &["--set", "controlTls.spiffe.enabled=false"]) {
            eprintln!("helm upgrade back from SPIFFE mode: {error}");
        }
    }
}

fn upgrade(node: &Node, set: &[&str]) -> Result<String, slim_e2e::HarnessError> {
    let chart = repo_path("charts/slim-operator").display().to_string();
    let kubeconfig = node.plane.admin_kubeconfig.clone();
    let mut args = vec![
        "upgrade",
        RELEASE,
        &chart,
        "--namespace",
        RELEASE_NAMESPACE,
        "--reuse-values",
        "--wait",
        "--timeout",
        "180s",
    ];
    args.extend_from_slice(set);
    helm(&args, &[("KUBECONFIG", kubeconfig.as_path())])
}

/// The chart's SPIFFE issuer on (`identityIssuer.enabled`) for as long as it lives; off again when
/// dropped, so the other tests find the install as they expect even when this one fails.
struct IssuerOn<'a>(&'a Node);

impl<'a> IssuerOn<'a> {
    fn enable(node: &'a Node) -> Self {
        upgrade(node, &["--set", "identityIssuer.enabled=true"])
            .unwrap_or_else(|e| panic!("helm upgrade with the issuer: {e}"));
        Self(node)
    }
}

impl Drop for IssuerOn<'_> {
    fn drop(&mut self) {
        if let Err(error) = upgrade(self.0, &["--set", "identityIssuer.enabled=false"]) {
            eprintln!("helm upgrade without the issuer: {error}");
        }
    }
}
