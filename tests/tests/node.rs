//! The node tier: what users meet on a node, proven in running Pods on a real kubelet (containerd,
//! CNI bridge, kube-proxy, kube-scheduler; see `slim_e2e::node`). The chart is installed with
//! `helm install` from images of our release binaries (OCI archives, no registry), and the API
//! server calls the webhook served by the operator's Pods.
//!
//! The tests share one install and take turns ([`SERIAL`]): one deletes the leader Pod, which
//! would otherwise race another's Pod creation through the webhook.

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

#[tokio::test]
async fn the_chart_runs_in_pods_and_the_api_server_calls_its_webhook() {
    let (node, client) = installed().await;
    let _turn = SERIAL.lock().await;

    println!(
        "the node (control plane, containerd, kubelet, scheduler, kube-proxy, DNS) Ready in {:.1}s",
        node.ready_after.as_secs_f64()
    );
    let operators = operator_pods(&client).await;
    assert_eq!(operators.len(), 2, "two replicas");
    for pod in &operators {
        assert!(node::pod_ready(pod), "{} Ready", pod.name_any());
        let ip = node::pod_ip(pod).expect("pod IP");
        let (code, body) = http_get(ip, 8080, "/metrics");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("slim_operator_"), "{body}");
        // In-cluster config, the chart's RBAC: the operator reads and writes through its ServiceAccount.
        let (code, body) = http_get(ip, 8080, "/readyz");
        assert_eq!(code, 200, "{body}");
    }

    // The operator published its CA in the webhook configuration the chart created.
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = webhooks.get("slim-slim-operator").await.expect("webhook configuration");
    let ca = config.webhooks.as_ref().and_then(|w| w.first()).and_then(|w| w.client_config.ca_bundle.clone());
    assert!(ca.is_some_and(|ca| !ca.0.is_empty()), "caBundle published");

    // The API server calls it for a new Pod that asks for identity.
    let ns = node.namespace(&client, "webhook").await.expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let before = webhook_reviews(&client).await;
    let pod = app_pod("asks", serde_json::json!({"slim.agntcy.org/inject-identity": "true"}), "sleep 1");
    let created = pods.create(&PostParams::default(), &pod).await.expect("create through the webhook");
    let init = created.spec.as_ref().and_then(|s| s.init_containers.clone()).unwrap_or_default();
    assert!(
        init.iter().any(|c| c.name == "slim-identity-agent" && c.restart_policy.as_deref() == Some("Always")),
        "the agent injected as a native sidecar: {init:?}"
    );
    let after = webhook_reviews(&client).await;
    assert!(after >= before + 1.0, "the operator Pods counted the review: {before} -> {after}");
    pods.delete("asks", &DeleteParams::default()).await.expect("delete");
}

#[tokio::test]
async fn the_injected_agent_holds_the_app_until_its_identity_is_written() {
    let (node, client) = installed().await;
    let _turn = SERIAL.lock().await;
    let ns = node.namespace(&client, "identity").await.expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    // "SPIRE" on the node, with nothing registered yet: the Workload API says PermissionDenied.
    let socket = spire_dir(node).join("api.sock");
    let agent = FakeAgent::start(&socket, AgentState::new(TRUST_DOMAIN)).await.expect("fake Workload API");
    make_world_writable(&socket);

    // The app's first line reads its token and verifies it against the bundle.
    let script = "slim-identity-agent verify --bundle /svids/key.jwt --audience slim /svids/jwt_svid.token \
                  && echo app-started && sleep 3600";
    let pod = app_pod(
        "app",
        serde_json::json!({"slim.agntcy.org/inject-identity": "true", "slim.agntcy.org/jwt-audiences": "slim"}),
        script,
    );
    pods.create(&PostParams::default(), &pod).await.expect("create");

    // The agent runs but cannot start (its startup probe waits on /svids): the app stays waiting.
    let agent_running = |pod: &Pod| {
        container_status(pod, "slim-identity-agent", true)
            .is_some_and(|s| s.state.as_ref().and_then(|s| s.running.as_ref()).is_some())
    };
    node::wait_pod(&pods, "app", Duration::from_secs(60), "the agent running", agent_running).await.expect("agent");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pod = pods.get("app").await.expect("pod");
    let agent_status = container_status(&pod, "slim-identity-agent", true).expect("agent status");
    assert_eq!(agent_status.started, Some(false), "the agent's startup probe holds: {agent_status:?}");
    let app_waiting = container_status(&pod, "app", false)
        .and_then(|s| s.state.as_ref()?.waiting.as_ref()?.reason.clone())
        .unwrap_or_default();
    assert_eq!(app_waiting, "PodInitializing", "the app has not started");
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
    assert_eq!(phase, "Pending", "the Pod stays in Init (kubectl: Init:0/1)");
    let log = container_log(&pods, "app", "slim-identity-agent").await;
    println!("agent without an identity:\n{}", log.lines().take(4).collect::<Vec<_>>().join("\n"));
    assert!(
        log.contains("PermissionDenied") || log.contains("permission denied") || log.contains("no identity"),
        "the agent says why: {log}"
    );

    // Registered: the agent writes the files, its probe passes, the app starts and verifies them.
    let registered = Instant::now();
    let spiffe_id = format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/default");
    agent.update(|state| state.issue(&spiffe_id, ""));
    let pod = node::wait_pod(&pods, "app", Duration::from_secs(60), "Ready", node::pod_ready).await.expect("ready");
    println!("identity registered -> app Ready in {:.1}s", registered.elapsed().as_secs_f64());
    let agent_started = started_at(&pod, "slim-identity-agent", true);
    let app_started = started_at(&pod, "app", false);
    assert!(app_started >= agent_started, "the app started after the agent: {agent_started:?} / {app_started:?}");
    let log = wait_log(&pods, "app", "app", "app-started").await;
    println!("app log:\n{log}");
    assert!(
        log.lines().next().is_some_and(|first| first.contains(&spiffe_id)),
        "the first line is the verified identity: {log}"
    );
    pods.delete("app", &DeleteParams::default()).await.expect("delete");
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

#[tokio::test]
async fn a_second_replica_takes_over_when_the_leader_pod_is_deleted() {
    let (node, client) = installed().await;
    let _turn = SERIAL.lock().await;
    let ns = node.namespace(&client, "leader").await.expect("namespace");
    let subscriptions: Api<slim_operator::api::Subscription> = Api::namespaced(client.clone(), &ns);
    subscriptions.create(&PostParams::default(), &unreachable_subscription(&ns, "before")).await.expect("create");
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let holder = |lease: &Lease| lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).unwrap_or_default();
    let leader = slim_e2e::wait_for("a leader", Duration::from_secs(30), async || {
        leases.get_opt("slim-operator-leader").await.ok().flatten().map(|l| holder(&l)).filter(|h| !h.is_empty())
    })
    .await;
    // The leader has written the first object (its finalizer at least).
    slim_e2e::wait_for("the finalizer", Duration::from_secs(30), async || {
        subscriptions.get("before").await.ok().filter(|s| !s.finalizers().is_empty())
    })
    .await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let deleted = Instant::now();
    pods.delete(&leader, &DeleteParams::default()).await.expect("delete the leader");
    let lease = slim_e2e::wait_for("a new leader", Duration::from_secs(20), async || {
        leases
            .get_opt("slim-operator-leader")
            .await
            .ok()
            .flatten()
            .filter(|l| !holder(l).is_empty() && holder(l) != leader)
    })
    .await;
    let took = deleted.elapsed();
    let successor = holder(&lease);
    println!("leader {leader} deleted -> {successor} leads after {:.1}s", took.as_secs_f64());
    assert!(took < Duration::from_secs(15), "within the lease duration (15 s): {took:?}");

    // The new leader reconciles: a new object gets its finalizer.
    subscriptions.create(&PostParams::default(), &unreachable_subscription(&ns, "after")).await.expect("create");
    slim_e2e::wait_for("the new leader's finalizer", Duration::from_secs(30), async || {
        subscriptions.get("after").await.ok().filter(|s| !s.finalizers().is_empty())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Who wrote what, from the API server's audit log (bound tokens name their Pod): the old
    // leader only before the new one acquired the Lease, the new one only after.
    let acquired = lease
        .spec
        .as_ref()
        .and_then(|s| s.acquire_time.as_ref())
        .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .expect("acquireTime");
    let writes: Vec<_> = node
        .plane
        .audited()
        .expect("audit log")
        .into_iter()
        .filter(|w| w.namespace == ns && w.resource == "subscriptions" && !w.pod.is_empty())
        .filter(|w| matches!(w.verb.as_str(), "create" | "update" | "patch" | "delete"))
        .collect();
    let by = |pod: &str| writes.iter().filter(|w| w.pod == pod).collect::<Vec<_>>();
    let (old, new) = (by(&leader), by(&successor));
    assert!(!old.is_empty() && !new.is_empty(), "both leaders wrote in turn: {writes:?}");
    assert_eq!(old.len() + new.len(), writes.len(), "no third writer: {writes:?}");
    assert!(
        old.iter().all(|w| w.at <= acquired),
        "the old leader stopped writing before the takeover ({acquired}): {old:?}"
    );
    assert!(new.iter().all(|w| w.at >= acquired), "the new leader wrote nothing before it led ({acquired}): {new:?}");
    println!(
        "writes to Subscriptions: {} by {leader} before {acquired}, {} by {successor} after",
        old.len(),
        new.len()
    );

    for name in ["before", "after"] {
        subscriptions.delete(name, &DeleteParams::default()).await.expect("delete");
    }
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

#[tokio::test]
async fn slim_node_pods_get_routes_by_selector_and_get_them_back_when_recreated() {
    let (node, client) = installed().await;
    images::ensure_slim(node).expect("SLIM images");
    let _turn = SERIAL.lock().await;
    let ns = node.namespace(&client, "slim").await.expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    start_slim_nodes(node, &pods, "slim", Controller::Plain).await;
    kubectl_apply(
        node,
        &[
            subscription_between(&ns, "bob-via-slim-1", "org/ns/bob", "slim-0", "slim-1", "peer"),
            subscription_between(&ns, "alice-via-slim-0", "org/ns/alice", "slim-1", "slim-0", "remote"),
        ]
        .join("---\n"),
    );
    let started = Instant::now();
    for name in ["bob-via-slim-1", "alice-via-slim-0"] {
        slim_e2e::wait_for(&format!("Subscription {name} Ready"), Duration::from_secs(60), async || {
            subscription_ready(&client, &ns, name).await.then_some(())
        })
        .await;
    }
    println!("2 Subscriptions Ready on node Pods picked by selector in {:.1}s", started.elapsed().as_secs_f64());
    let slim0 = pods.get("slim-0").await.expect("slim-0");
    assert!(node_routes(&slim0, "org/ns/bob").await, "slim-0 lists the route to bob");

    // Apps on different nodes, reaching them by DNS name: bob listens on slim-1; alice, on slim-0,
    // sends until the route carries her message and bob's echo comes back.
    let endpoint = |pod: &str| format!("http://{pod}.slim.{ns}.svc.cluster.local:46357");
    listen_as_bob(&pods, &endpoint("slim-1")).await;
    let log = send_to_bob(&pods, "alice", &endpoint("slim-0"), "hello-1").await;
    assert!(log.contains("reply echo:hello-1"), "bob's echo came back through the nodes: {log}");

    // slim-0 deleted: its StatefulSet recreates it (a new process, no routes), the operator
    // sees the new Pod and installs the route again.
    let old_uid = slim0.uid();
    let deleted = Instant::now();
    pods.delete("slim-0", &DeleteParams::default()).await.expect("delete slim-0");
    let recreated = node::wait_pod(&pods, "slim-0", Duration::from_secs(90), "recreated and Ready", |p| {
        p.uid() != old_uid && node::pod_ready(p)
    })
    .await
    .expect("slim-0 back");
    slim_e2e::wait_for("the route back on the new slim-0", Duration::from_secs(60), async || {
        node_routes(&recreated, "org/ns/bob").await.then_some(())
    })
    .await;
    println!("slim-0 deleted -> recreated with its route in {:.1}s", deleted.elapsed().as_secs_f64());
    let log = send_to_bob(&pods, "alice-again", &endpoint("slim-0"), "hello-2").await;
    assert!(log.contains("reply echo:hello-2"), "after the restart: {log}");
}

/// The quickstart (`examples/00`–`05`, then `07`) applied as a user would, only the app's image name changed
/// (`registry.example/your-slim-app:1.0` stands for the user's own app; here a real SLIM app that
/// reads the example's environment). SLIM's images carry the examples' own names.
#[tokio::test]
async fn the_quickstart_runs_as_written() {
    let (node, client) = installed().await;
    images::ensure_slim(node).expect("SLIM images");
    let _turn = SERIAL.lock().await;
    // "SPIRE" registers the quickstart's workloads.
    let socket = spire_dir(node).join("api.sock");
    // One SPIFFE ID per service account, each caller attested by its Pod (as SPIRE's k8s
    // workload attestor does, and as examples/06 registers them): SLIM derives an app's instance
    // id from its identity, so the channel manager and its members need identities of their own.
    let mut state = AgentState::new(TRUST_DOMAIN);
    for account in ["default", "dave", "slim-channel-manager"] {
        state.issue(&format!("spiffe://{TRUST_DOMAIN}/ns/slim/sa/{account}"), "");
    }
    let accounts = pod_accounts(&client, "slim");
    state.attestor = Some(std::sync::Arc::new(move |pid| {
        let pod = pod_of_process(pid)?;
        let account = accounts.lock().unwrap_or_else(|p| p.into_inner()).get(&pod).cloned()?;
        Some(format!("spiffe://{TRUST_DOMAIN}/ns/slim/sa/{account}"))
    }));
    let _agent = FakeAgent::start(&socket, state).await.expect("fake Workload API");
    make_world_writable(&socket);

    let example = |file: &str| std::fs::read_to_string(repo_path("examples").join(file)).expect("example");
    let started = Instant::now();
    kubectl_apply(node, &example("00-namespace.yaml"));
    node.prepare_namespace(&client, "slim").await.expect("namespace ready for Pods");
    // The channel manager's Secret, as the example's header says to create it.
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "slim-channel-manager"},
        "stringData": {"passphrase": "quickstart-passphrase-0123456789"}
    }))
    .expect("secret");
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), "slim")
        .create(&PostParams::default(), &secret)
        .await
        .expect("channel manager secret");
    for file in ["01-slim-nodes.yaml", "02-channel-manager.yaml", "03-subscriptions.yaml", "04-slimchannel.yaml"] {
        kubectl_apply(node, &example(file));
    }
    kubectl_apply(node, &example("05-app.yaml").replace("registry.example/your-slim-app:1.0", images::SLIM_APP));

    let pods: Api<Pod> = Api::namespaced(client.clone(), "slim");
    wait_slim_nodes(&pods, "slim").await;
    for name in ["bob-via-slim-1", "alice-via-slim-0", "gateway-everywhere"] {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !subscription_ready(&client, "slim", name).await {
            let condition = ready_condition(&client, "slim", name).await;
            assert!(Instant::now() < deadline, "Subscription {name} not Ready after 90 s: {condition:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    println!("quickstart: nodes and Subscriptions Ready {:.1}s after the first apply", started.elapsed().as_secs_f64());

    // Two injected app Pods with SLIM's `spire` identity on the socket the webhook mounted: bob on
    // slim-1 (also a team-chat member), alice on slim-0 opening sessions to him over 03's routes.
    let identity_app = "/opt/python/bin/python3 /harness/slim_identity_app.py";
    let bob =
        injected_app("bob", &format!("{identity_app} listen http://slim-1.slim.slim.svc:46357 org/ns/bob spire:"));
    pods.create(&PostParams::default(), &bob).await.expect("bob");
    let alice =
        format!("{identity_app} send http://slim-0.slim.slim.svc:46357 org/ns/alice spire: org/ns/bob 20; sleep 3600");
    pods.create(&PostParams::default(), &injected_app("alice", &alice)).await.expect("alice");
    let log = wait_log_for(&pods, "alice", "app", "done ", Duration::from_secs(120)).await;
    let replies = log.lines().filter(|l| l.starts_with("reply ")).count();
    let first = log.lines().position(|l| l.starts_with("reply ")).unwrap_or(usize::MAX);
    let failed_after_first = log.lines().skip(first).filter(|l| l.starts_with("error ")).collect::<Vec<_>>();
    println!("quickstart: alice -> bob (injected, spire identity on the agent's socket): {replies} sessions");
    assert!(replies >= 10 && failed_after_first.is_empty(), "sessions between injected apps: {log}");
    for name in ["alice", "bob"] {
        let pod = pods.get(name).await.expect("app pod");
        let app = &pod.spec.as_ref().expect("spec").containers[0];
        let mounts: Vec<&str> = app.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
        assert!(!mounts.iter().any(|m| m.contains("spire")), "no SPIRE volume in {name}'s app: {mounts:?}");
        assert!(mounts.contains(&"/run/slim-identity"), "{name} mounts the agent's socket: {mounts:?}");
    }

    // dave: injected (the namespace's label), its identity written before its first line, then
    // invited into team-chat by the channel manager the SlimChannel names.
    let dave = slim_e2e::wait_for("dave's Pod Ready", Duration::from_secs(90), async || {
        let list = pods.list(&ListParams::default().labels("app=dave")).await.ok()?;
        list.items.into_iter().find(node::pod_ready)
    })
    .await;
    let injected = dave
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == "slim-identity-agent"));
    assert!(injected, "dave got the agent");
    let dave_name = dave.name_any();
    let log = wait_log(&pods, &dave_name, "app", "joined").await;
    assert!(
        log.lines().next().is_some_and(|l| l.starts_with(&format!("identity spiffe://{TRUST_DOMAIN}/ns/slim/sa/dave"))),
        "dave's first line reads the injected identity: {log}"
    );
    let log = if log.contains("joined") {
        log
    } else {
        wait_log_for(&pods, &dave_name, "app", "joined", Duration::from_secs(60)).await
    };
    if !log.contains("joined") {
        let channels: Api<slim_operator::api::SlimChannel> = Api::namespaced(client.clone(), "slim");
        let status = channels.get("team-chat").await.ok().and_then(|c| c.status);
        let managers = pods.list(&ListParams::default().labels("app.kubernetes.io/name=slim-channel-manager")).await;
        for manager in managers.map(|l| l.items).unwrap_or_default() {
            let log = container_log(&pods, &manager.name_any(), "channel-manager").await;
            let agent = container_log(&pods, &manager.name_any(), "slim-identity-agent").await;
            println!("channel manager {}: {log}\nits agent: {agent}", manager.name_any());
        }
        println!("team-chat status: {status:?}");
    }
    assert!(log.contains("joined"), "dave invited into team-chat: {log}");
    let bob_log = wait_log(&pods, "bob", "app", "received hello from org/ns/dave").await;
    assert!(
        bob_log.contains("received hello from org/ns/dave"),
        "dave's message crossed the MLS channel (manager and members on agent sockets): {bob_log}"
    );
    let channels: Api<slim_operator::api::SlimChannel> = Api::namespaced(client.clone(), "slim");
    let channel =
        slim_e2e::wait_for("team-chat's status with dave and bob joined", Duration::from_secs(30), async || {
            let channel = channels.get("team-chat").await.ok()?;
            let status = channel.status.as_ref()?;
            let joined = |name: &str| status.participants.iter().any(|p| p.name == name && p.joined);
            (joined("org/ns/dave") && joined("org/ns/bob")).then_some(channel)
        })
        .await;
    let status = channel.status.as_ref().expect("status");
    let dave_status = status.participants.iter().find(|p| p.name == "org/ns/dave").expect("dave listed");
    assert_eq!(dave_status.pod.as_deref(), Some(dave_name.as_str()), "dave joined as his Pod");
    let carol = status.participants.iter().find(|p| p.name == "org/ns/carol").expect("carol listed");
    assert!(!carol.joined && carol.message.as_deref().is_some_and(|m| m.starts_with("offline")), "{carol:?}");
    println!("quickstart: dave joined team-chat {:.1}s after the first apply", started.elapsed().as_secs_f64());

    // Identity without SPIRE (examples/07): the real kubelet projects the audience-bound token,
    // the agent checks it against the cluster's keys (fetched through the `kubernetes` Service
    // with the Pod's own token) before the app's first line reads it.
    let erin_app =
        example("07-app-kubernetes-identity.yaml").replace("registry.example/your-slim-app:1.0", images::SLIM_APP);
    kubectl_apply(node, &erin_app);
    let erin = slim_e2e::wait_for("erin's Pod Ready", Duration::from_secs(90), async || {
        let list = pods.list(&ListParams::default().labels("app=erin")).await.ok()?;
        list.items.into_iter().find(node::pod_ready)
    })
    .await;
    let volumes = erin.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default();
    assert!(volumes.iter().all(|v| v.host_path.is_none() && v.csi.is_none()), "no SPIRE socket: {volumes:?}");
    let log = wait_log(&pods, &erin.name_any(), "app", "instance").await;
    assert!(
        log.lines().next().is_some_and(|l| l.starts_with("identity system:serviceaccount:slim:erin keys")),
        "erin's first line reads the kubelet-projected token the agent checked: {log}"
    );
    let agent_log = container_log(&pods, &erin.name_any(), "slim-identity-agent").await;
    assert!(!agent_log.contains("not written"), "the agent took the kubelet's token: {agent_log}");
    println!(
        "quickstart: erin (no SPIRE) Ready {:.1}s after the first apply; team-chat status {:?}",
        started.elapsed().as_secs_f64(),
        channel.status
    );
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

#[tokio::test]
async fn slim_node_pods_over_mtls_by_selector_with_a_server_name() {
    let (node, client) = installed().await;
    images::ensure_slim(node).expect("SLIM images");
    let _turn = SERIAL.lock().await;
    let ns = node.namespace(&client, "slim-tls").await.expect("namespace");
    let nodes_ca = slim_e2e::pki::Ca::new("slim nodes");
    let operator_ca = slim_e2e::pki::Ca::new("slim operator clients");
    let other_ca = slim_e2e::pki::Ca::new("someone else");
    let server_name = format!("slim-tls.{ns}.svc");
    let (node_cert, node_key) = nodes_ca.leaf(&[&server_name], 1);
    let (client_cert, client_key) = operator_ca.leaf(&["slim-operator"], 1);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    for (name, data) in [
        ("node-tls", serde_json::json!({"tls.crt": node_cert, "tls.key": node_key})),
        ("operator-ca", serde_json::json!({"ca.crt": operator_ca.pem})),
        ("node-ca", serde_json::json!({"ca.crt": nodes_ca.pem})),
        ("wrong-ca", serde_json::json!({"ca.crt": other_ca.pem})),
        ("operator-client", serde_json::json!({"tls.crt": client_cert, "tls.key": client_key})),
    ] {
        let secret = serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "stringData": data}))
            .expect("secret");
        secrets.create(&PostParams::default(), &secret).await.expect("secret");
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    start_slim_nodes(node, &pods, "slim-tls", Controller::Mtls).await;

    let good = serde_json::json!({"caSecretRef": {"name": "node-ca"}, "clientCertSecretRef": {"name": "operator-client"},
                                  "serverName": server_name});
    let cases = [
        ("good", good.clone(), "True", "RoutesInstalled"),
        (
            "no-server-name",
            serde_json::json!({"caSecretRef": {"name": "node-ca"}, "clientCertSecretRef": {"name": "operator-client"}}),
            "False",
            "TlsUnexpectedServerIdentity",
        ),
        (
            "wrong-ca",
            serde_json::json!({"caSecretRef": {"name": "wrong-ca"}, "clientCertSecretRef": {"name": "operator-client"},
                                        "serverName": server_name}),
            "False",
            "TlsUntrustedServer",
        ),
        (
            "no-client-cert",
            serde_json::json!({"caSecretRef": {"name": "node-ca"}, "serverName": server_name}),
            "False",
            "TlsClientCertificateRefused",
        ),
    ];
    let messages = expect_ready(&client, &ns, "slim-tls", &cases).await;
    for ((_, _, status, _), (name, message)) in cases.iter().zip(messages) {
        if *status == "False" {
            assert!(
                message.contains("https://10.88."),
                "{name}: the message names the node Pod reached by IP: {message}"
            );
        }
    }
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

/// The operator as a Pod in SPIFFE mode: its X.509-SVID from the SPIRE socket the chart mounts,
/// node Pods picked by selector whose controllers take their SVIDs from SLIM's own `spire` source.
#[tokio::test]
async fn the_operator_pod_reaches_nodes_with_its_x509_svid() {
    let (node, client) = installed().await;
    images::ensure_slim(node).expect("SLIM images");
    let _turn = SERIAL.lock().await;
    let ns = node.namespace(&client, "slim-spiffe").await.expect("namespace");

    // One trust domain: the operator's SVID on the chart's socket, the nodes' on another.
    let mut node_state = AgentState::new(TRUST_DOMAIN);
    let mut operator_state = AgentState::new(TRUST_DOMAIN);
    operator_state.authority = node_state.authority.clone();
    let node_id = format!("spiffe://{TRUST_DOMAIN}/slim-node");
    node_state.issue(&node_id, "");
    operator_state.issue(&format!("spiffe://{TRUST_DOMAIN}/ns/{RELEASE_NAMESPACE}/sa/slim-slim-operator"), "");
    let sockets = [spire_dir(node).join("node.sock"), spire_dir(node).join("api.sock")];
    let _node_agent = FakeAgent::start(&sockets[0], node_state).await.expect("the nodes' Workload API");
    let _operator_agent = FakeAgent::start(&sockets[1], operator_state).await.expect("the operator's Workload API");
    sockets.iter().for_each(|s| make_world_writable(s));

    let started = Instant::now();
    let _spiffe = SpiffeOperator::enable(node);
    println!("helm upgrade to SPIFFE mode, operator Pods rolled and Ready in {:.1}s", started.elapsed().as_secs_f64());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    start_slim_nodes(node, &pods, "slim-spiffe", Controller::Spiffe).await;
    let cases = [
        ("by-trust-domain", serde_json::json!({"spiffe": {"trustDomain": TRUST_DOMAIN}}), "True", "RoutesInstalled"),
        ("by-id", serde_json::json!({"spiffe": {"id": node_id}}), "True", "RoutesInstalled"),
        (
            "impostor",
            serde_json::json!({"spiffe": {"id": format!("spiffe://{TRUST_DOMAIN}/impostor")}}),
            "False",
            "TlsUnexpectedServerIdentity",
        ),
    ];
    expect_ready(&client, &ns, "slim-spiffe", &cases).await;
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

/// Identity without SPIRE that opens SLIM sessions: two injected app Pods with
/// `identity-source: kubernetes` get their SPIFFE identities from the operator Pods (the real
/// kubelet projects the token for the issuer's audience and the issuer's CA ConfigMap) and open a
/// new session every second through a SLIM node Pod; the leader Pod is deleted mid-run.
#[tokio::test]
async fn injected_pods_open_slim_sessions_with_the_operators_spiffe_identities() {
    let (node, client) = installed().await;
    images::ensure_slim(node).expect("SLIM images");
    let _turn = SERIAL.lock().await;
    let started = Instant::now();
    let _issuer = IssuerOn::enable(node);
    println!("helm upgrade with the issuer: operator Pods rolled and Ready in {:.1}s", started.elapsed().as_secs_f64());
    let ns = node.namespace(&client, "issued").await.expect("namespace");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let labels = serde_json::json!({"metadata": {"labels": {
        "slim.agntcy.org/inject-identity": "true", "slim.agntcy.org/identity-source": "kubernetes"}}});
    namespaces.patch(&ns, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(labels)).await.expect("labels");
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &ns);
    for name in ["alice", "bob"] {
        let account = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("account");
        accounts.create(&PostParams::default(), &account).await.expect("service account");
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    start_slim_nodes(node, &pods, "slim-issued", Controller::Plain).await;

    let endpoint = format!("http://slim-issued-0.slim-issued.{ns}.svc:46357");
    let identity_app = "/opt/python/bin/python3 /harness/slim_identity_app.py";
    let app = |name: &str, script: String| {
        let mut pod = injected_app(name, &script);
        pod.spec.as_mut().expect("spec").service_account_name = Some(name.to_owned());
        pod
    };
    let bob = app("bob", format!("{identity_app} listen {endpoint} org/ns/bob spire:"));
    pods.create(&PostParams::default(), &bob).await.expect("bob");
    let seconds: u32 = 60;
    let alice =
        app("alice", format!("{identity_app} send {endpoint} org/ns/alice spire: org/ns/bob {seconds}; sleep 3600"));
    pods.create(&PostParams::default(), &alice).await.expect("alice");
    wait_log_for(&pods, "alice", "app", "reply 5 ", Duration::from_secs(120)).await;
    println!("issuer: alice's 5th session {:.1}s after the upgrade", started.elapsed().as_secs_f64());

    // The leader Pod goes; the other replica issues on (every replica does) and takes the lease.
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let lease = leases.get("slim-operator-leader").await.expect("lease");
    let leader = lease.spec.and_then(|s| s.holder_identity).expect("a leader");
    let operators: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    operators.delete(&leader, &DeleteParams::default()).await.expect("delete the leader");
    println!("issuer: leader {leader} deleted mid-run");

    let log = wait_log_for(&pods, "alice", "app", "done ", Duration::from_secs(u64::from(seconds) + 120)).await;
    let replies = log.lines().filter(|l| l.starts_with("reply ")).count();
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error ")).collect();
    println!("issuer: alice -> bob with the operator's SPIFFE identities: {replies} sessions, {} failed", errors.len());
    assert!(replies >= 50 && errors.is_empty(), "sessions between injected apps: {log}");
    for name in ["alice", "bob"] {
        let agent = container_log(&pods, name, "slim-identity-agent").await;
        let id = format!("X.509-SVID issued spiffe_id=spiffe://cluster.local/ns/{ns}/sa/{name}");
        assert!(agent.contains(&id), "{name}'s agent: {agent}");
        let pod = pods.get(name).await.expect("pod");
        let app = &pod.spec.as_ref().expect("spec").containers[0];
        let mounts: Vec<&str> = app.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
        assert!(mounts.contains(&"/run/slim-identity"), "{name}'s app mounts the agent's socket: {mounts:?}");
        assert!(!mounts.iter().any(|m| m.contains("slim.agntcy.org")), "{name}'s app sees no issuer token: {mounts:?}");
    }
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(maps.get_opt("slim-identity-issuer-ca").await.expect("read").is_some(), "the issuer's CA published");
}
