//! Benchmark: the `slim-operator` binary on the real API server, as users run it.
//!
//!   cargo bench -p slim-e2e --bench operator_at_scale [-- --subscriptions N --pods P]
//!
//! 2,000 Pods (2 of them SLIM node Pods, the rest noise in 10 namespaces) and 1,000 Subscriptions
//! that find their node by `nodes.selector`, half on each of 2 real SLIM nodes, applied through
//! the API server. Prints the time until every Subscription is Ready, the operator's API requests
//! (from the API server's audit log: the operator runs as a ServiceAccount) per Subscription and
//! per reconcile, by verb and resource, and the operator's resident memory (peak and at the end).
//! `SLIM_OPERATOR_BIN` runs another build of the binary (to compare before and after a change).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use slim_e2e::SlimNode;
use slim_e2e::control_plane::{self, Credentials, install_crds};
use slim_e2e::operator::OperatorProcess;
use slim_operator::api::Subscription;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A Running Pod object (no kubelet here: the status is written as a kubelet would).
async fn pod(client: &Client, namespace: &str, name: &str, labels: serde_json::Value, port: u16) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let object: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "example/app:1", "ports": [{"name": "controller-0", "containerPort": port}]}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &object).await.expect("create pod");
    let status = json!({"status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status)).await.expect("pod status");
}

fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn ready(sub: &Subscription) -> bool {
    sub.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until `count` Subscriptions are Ready, following a watch (a LIST of every Subscription
/// every few hundred milliseconds would load the API server more than the operator does at 10,000);
/// returns the highest RSS sampled meanwhile.
async fn all_ready(subs: &Api<Subscription>, count: usize, pid: u32) -> u64 {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let mut ready_now: std::collections::HashSet<String> = Default::default();
    let mut events = std::pin::pin!(watcher(subs.clone(), watcher::Config::default()).applied_objects());
    let mut sample = tokio::time::interval(Duration::from_millis(250));
    let mut peak_rss = 0;
    let deadline = tokio::time::sleep(Duration::from_secs(1800));
    tokio::pin!(deadline);
    while ready_now.len() < count {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(sub)) => {
                    let name = kube::ResourceExt::name_any(&sub);
                    if ready(&sub) { ready_now.insert(name); } else { ready_now.remove(&name); }
                }
                Some(Err(error)) => eprintln!("watch: {error}"),
                None => panic!("the Subscription watch ended"),
            },
            _ = sample.tick() => peak_rss = peak_rss.max(memory(pid).0),
            _ = &mut deadline => panic!("timed out: {} of {count} Subscriptions Ready", ready_now.len()),
        }
    }
    peak_rss
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let count = arg("--subscriptions", 1000);
    let pods = arg("--pods", 2000).max(2);
    let plane = control_plane::shared();
    let admin = plane.client().await.expect("admin client");
    install_crds(&admin).await.expect("CRDs");
    let apps = plane.namespace(&admin, "scale").await.expect("namespace");
    let operator_ns = plane.namespace(&admin, "slim-system").await.expect("namespace");
    let a = SlimNode::start("node-a").expect("node a");
    let b = SlimNode::start("node-b").expect("node b");
    let binary = slim_e2e::operator::operator_binary().expect("binary");
    println!(
        "subscriptions: {count}, pods: {pods}, nodes: 2 real SLIM 3.4.6, API server: the harness's kube-apiserver, binary: {}",
        binary.display()
    );

    // The cluster: the two node Pods and the noise.
    pod(
        &admin,
        &apps,
        "node-a",
        json!({"app.kubernetes.io/name": "slim", "slim.agntcy.org/node": "a"}),
        a.controller_port,
    )
    .await;
    pod(
        &admin,
        &apps,
        "node-b",
        json!({"app.kubernetes.io/name": "slim", "slim.agntcy.org/node": "b"}),
        b.controller_port,
    )
    .await;
    let start = Instant::now();
    let mut noise_namespaces = Vec::new();
    for i in 0..10 {
        noise_namespaces.push(plane.namespace(&admin, &format!("noise{i}")).await.expect("namespace"));
    }
    let noise: Vec<(String, String)> =
        (0..pods - 2).map(|i| (noise_namespaces[i % 10].clone(), format!("app-{i}"))).collect();
    futures::future::join_all(noise.chunks(100).map(|chunk| {
        let admin = admin.clone();
        async move {
            for (namespace, name) in chunk {
                pod(&admin, namespace, name, json!({"app": "noise"}), 8080).await;
            }
        }
    }))
    .await;
    println!("{} noise Pods created in {:.1} s", pods - 2, start.elapsed().as_secs_f64());

    // The operator as a ServiceAccount (cluster-admin: RBAC is not what is measured here).
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "slim-operator"}})).expect("sa");
    Api::<ServiceAccount>::namespaced(admin.clone(), &operator_ns)
        .create(&PostParams::default(), &sa)
        .await
        .expect("sa");
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("bench-{operator_ns}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "slim-operator", "namespace": operator_ns}]
    }))
    .expect("binding");
    Api::<ClusterRoleBinding>::all(admin.clone()).create(&PostParams::default(), &binding).await.expect("binding");
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}})).expect("request");
    let issued: TokenRequest = Api::<ServiceAccount>::namespaced(admin.clone(), &operator_ns)
        .create_subresource("token", "slim-operator", &PostParams::default(), &request)
        .await
        .expect("token");
    let token = issued.status.expect("status").token;
    let kubeconfig = plane.dir.join("bench-operator.kubeconfig");
    plane.write_kubeconfig(&kubeconfig, "slim-operator", &Credentials::Token(token)).expect("kubeconfig");
    let env: Vec<(String, String)> = [
        ("POD_NAMESPACE", operator_ns.as_str()),
        ("POD_NAME", "slim-operator-0"),
        ("SLIM_OPERATOR_DISABLE_WEBHOOK", "true"),
        ("RUST_LOG", "warn"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .into();
    let operator = OperatorProcess::start(&kubeconfig, &env).expect("operator");
    operator.wait_readyz(200, Duration::from_secs(120)).expect("ready");
    let user = format!("system:serviceaccount:{operator_ns}:slim-operator");
    let idle_requests = plane.audited().expect("audit").iter().filter(|r| r.user == user).count();
    let (idle_rss, _) = memory(operator.pid());
    println!("operator ready with {pods} Pods cached: RSS {idle_rss} MiB, {idle_requests} API requests so far");

    // The Subscriptions, applied as `kubectl apply` would, as fast as the API server takes them.
    let subs: Api<Subscription> = Api::namespaced(admin.clone(), &apps);
    let start = Instant::now();
    futures::future::join_all((0..count).collect::<Vec<_>>().chunks(50).map(|chunk| {
        let subs = subs.clone();
        let (a, b) = (a.data_endpoint(), b.data_endpoint());
        async move {
            for &i in chunk {
                // Even ones on node a over a link to b, odd ones on b over a link to a.
                let (on, to) = if i % 2 == 0 { ("a", &b) } else { ("b", &a) };
                let sub: Subscription = serde_json::from_value(json!({
                    "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription", "metadata": {"name": format!("app-{i}")},
                    "spec": {"name": format!("org/bench/app-{i}"),
                             "nodes": {"selector": {"matchLabels": {"slim.agntcy.org/node": on}}},
                             "link": {"endpoint": to}}
                }))
                .expect("subscription");
                subs.patch(&format!("app-{i}"), &PatchParams::apply("bench"), &Patch::Apply(&sub)).await.expect("apply");
            }
        }
    }))
    .await;
    let applied = start.elapsed();
    let peak_rss = all_ready(&subs, count, operator.pid()).await;
    let converged = start.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss, hwm) = memory(operator.pid());
    let metrics = operator.get("/metrics").expect("metrics").1;
    let reconciles: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("slim_operator_reconciles_total{kind=\"Subscription\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let requests: Vec<_> =
        plane.audited().expect("audit").into_iter().filter(|r| r.user == user).skip(idle_requests).collect();
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for r in &requests {
        let resource =
            if r.subresource.is_empty() { r.resource.clone() } else { format!("{}/{}", r.resource, r.subresource) };
        *by_kind.entry(format!("{} {resource}", r.verb)).or_default() += 1;
    }
    println!(
        "applied {count} Subscriptions in {:.1} s; all Ready after {:.1} s",
        applied.as_secs_f64(),
        converged.as_secs_f64()
    );
    println!(
        "operator API requests while converging: {} ({:.2} per Subscription, {:.2} per reconcile; {reconciles} reconciles)",
        requests.len(),
        requests.len() as f64 / count as f64,
        requests.len() as f64 / reconciles.max(1.0)
    );
    for (kind, n) in &by_kind {
        println!("  {kind:<40} {n:>6}");
    }
    let pod_lists = by_kind.iter().filter(|(k, _)| k.starts_with("list pods")).map(|(_, n)| n).sum::<usize>();
    println!("  Pod LISTs per reconcile: {:.3}", pod_lists as f64 / reconciles.max(1.0));
    println!("operator RSS: {rss} MiB now, {hwm} MiB peak (VmHWM), {peak_rss} MiB highest sampled while converging");
    println!("result: all Ready in {:.1} s, RSS peak {hwm} MiB (target < 100 MiB)", converged.as_secs_f64());
}
