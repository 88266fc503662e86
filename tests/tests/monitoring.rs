//! The chart's alerts and dashboard, proven with a real Prometheus (Debian's `prometheus` package:
//! the server and `promtool`): the rules pass `promtool check rules` and their unit tests; every
//! dashboard query is valid PromQL; and a Prometheus scraping the running `slim-operator` binary
//! (real API server, real SLIM nodes, the real channel manager) returns a series for every
//! dashboard panel and puts `SlimNodeUnreachable` in pending, then firing, when a node stops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use slim_e2e::control_plane::{self, install_crds};
use slim_e2e::operator::OperatorProcess;
use slim_e2e::{ChannelManager, KillOnDrop, SlimApp, SlimNode, free_port, init_logging, repo_path, wait_for};
use slim_operator::api::{SlimChannel, Subscription};

fn files() -> PathBuf {
    repo_path("charts/slim-operator/files")
}

fn tool(name: &str) -> String {
    std::env::var(format!("SLIM_{}", name.to_uppercase())).unwrap_or_else(|_| name.to_owned())
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new(tool("promtool")).args(args).current_dir(dir).output().expect("promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

/// Every panel's query, from the dashboard the chart ships.
fn panel_queries() -> Vec<(String, String)> {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(files().join("dashboard.json")).expect("dashboard"))
            .expect("json");
    let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    panels
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            targets.into_iter().map(move |t| (title.clone(), t["expr"].as_str().unwrap_or_default().to_owned()))
        })
        .collect()
}

#[test]
fn promtool_checks_the_alerts_and_runs_their_unit_tests() {
    let checked = promtool(&["check", "rules", "prometheus-rules.yaml"], &files());
    println!("{}", checked.trim());
    let tested = promtool(&["test", "rules", "prometheus-rules.test.yaml"], &files());
    println!("{}", tested.trim());
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    let dir = tempfile::tempdir().expect("dir");
    let rules: Vec<Value> = panel_queries()
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| json!({"record": format!("panel_{i}"), "expr": expr}))
        .collect();
    assert!(rules.len() >= 10, "{rules:?}");
    let file = json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(dir.path().join("panels.yaml"), serde_yaml::to_string(&file).expect("yaml")).expect("write");
    promtool(&["check", "rules", "panels.yaml"], dir.path());
}

/// `%`-encoding of a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server scraping `target` every 2 s and evaluating the chart's rules.
struct Prometheus {
    addr: SocketAddr,
    _process: KillOnDrop,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let config = json!({
            "global": {"scrape_interval": "2s", "scrape_timeout": "2s", "evaluation_interval": "2s"},
            "rule_files": [files().join("prometheus-rules.yaml")],
            "scrape_configs": [{"job_name": "slim-operator", "static_configs": [{"targets": [target.to_string()]}]}],
        });
        std::fs::write(dir.path().join("prometheus.yml"), serde_yaml::to_string(&config).expect("yaml")).expect("cfg");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port().expect("port")).parse().expect("addr");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus");
        Self { addr, _process: KillOnDrop(child), _dir: dir }
    }

    /// `GET path` as HTTP/1.0: Prometheus answers large bodies chunked to HTTP/1.1 clients.
    fn api(&self, path: &str) -> Value {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)) else {
            return Value::Null;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = write!(stream, "GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        serde_json::from_str(body).unwrap_or(Value::Null)
    }

    /// The series `expr` returns now.
    fn query(&self, expr: &str) -> Vec<Value> {
        let answer = self.api(&format!("/api/v1/query?query={}", encode(expr)));
        answer["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The state of `alert` (`pending` / `firing`) for `label=value`, if it is active.
    fn alert(&self, alert: &str, label: &str, value: &str) -> Option<String> {
        let answer = self.api("/api/v1/alerts");
        let alerts = answer["data"]["alerts"].as_array().cloned().unwrap_or_default();
        alerts
            .iter()
            .find(|a| a["labels"]["alertname"] == alert && a["labels"][label] == value)
            .and_then(|a| a["state"].as_str().map(str::to_owned))
    }
}

/// An AdmissionReview for a pod that does not ask for injection (the webhook counts it).
fn review() -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": "apps",
                    "operation": "CREATE", "userInfo": {"username": "test"},
                    "object": {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_operator_fills_every_panel_and_alerts_on_a_stopped_node() {
    init_logging();
    let plane = control_plane::shared();
    let admin = plane.client().await.expect("admin");
    install_crds(&admin).await.expect("CRDs");
    let ns = plane.namespace(&admin, "monitoring").await.expect("namespace");
    let mut a = SlimNode::start("node-monitored").expect("node a");
    let mut b = SlimNode::start("node-to-stop").expect("node b");
    let cm = ChannelManager::start(&a).expect("channel manager");
    let _bob = SlimApp::member(&a, "org/ns/bob").expect("bob");
    let operator_ns = format!("mon-{}", &ns[ns.len() - 8..]);
    plane.create_namespace(&admin, &operator_ns).await.expect("operator namespace");
    let env = vec![
        ("POD_NAMESPACE".to_owned(), operator_ns),
        ("SLIM_OPERATOR_CHANNEL_MANAGER".to_owned(), cm.endpoint()),
        ("SLIM_OPERATOR_RESYNC_INTERVAL".to_owned(), "5s".to_owned()),
    ];
    let operator = OperatorProcess::start(&plane.admin_kubeconfig, &env).expect("operator");
    let prometheus = Prometheus::start(operator.admin);

    // Something for every panel: routes on two nodes, a channel, a failing Subscription, a drift
    // repair (node a restarts), a webhook review.
    let subs: Api<Subscription> = Api::namespaced(admin.clone(), &ns);
    for (name, node, link) in [("on-a", &a, &b), ("on-b", &b, &a)] {
        let sub: Subscription = serde_json::from_value(json!({
            "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription", "metadata": {"name": name},
            "spec": {"name": format!("org/ns/{name}"), "nodes": {"endpoints": [node.controller_endpoint()]},
                     "link": {"endpoint": link.data_endpoint()}},
        }))
        .expect("subscription");
        subs.create(&PostParams::default(), &sub).await.expect("create");
    }
    let broken: Subscription = serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription", "metadata": {"name": "nowhere"},
        "spec": {"name": "org/ns/nowhere", "nodes": {"endpoints": ["http://127.0.0.1:9"]}, "link": {"endpoint": a.data_endpoint()}},
    }))
    .expect("subscription");
    subs.create(&PostParams::default(), &broken).await.expect("create");
    let channel: SlimChannel = serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "SlimChannel", "metadata": {"name": "chat"},
        "spec": {"name": "org/ns/chat", "participants": ["org/ns/bob"], "nodes": {"endpoints": [a.controller_endpoint()]}},
    }))
    .expect("channel");
    Api::<SlimChannel>::namespaced(admin.clone(), &ns).create(&PostParams::default(), &channel).await.expect("channel");
    wait_for("both routes installed", Duration::from_secs(60), async || {
        let ready = |s: &Subscription| {
            s.status.as_ref().is_some_and(|st| st.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        };
        let (x, y) = (subs.get("on-a").await.ok()?, subs.get("on-b").await.ok()?);
        (ready(&x) && ready(&y)).then_some(())
    })
    .await;
    tokio::task::block_in_place(|| a.restart()).expect("restart a");
    let body = review();
    let url = format!("https://{}/mutate", operator.webhook);
    let curl = Command::new("curl")
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
            &url,
        ])
        .output();
    println!(
        "an AdmissionReview to the operator's webhook: {:?}",
        curl.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    );

    let queries = panel_queries();
    let mut missing = queries.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !missing.is_empty() && std::time::Instant::now() < deadline {
        missing.retain(|(_, expr)| prometheus.query(expr).is_empty());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(missing.is_empty(), "dashboard panels with no series: {missing:?}");
    println!("every dashboard panel ({}) returns at least one series from the scraped operator", queries.len());

    // Node b stops: its control stream goes down; the alert goes pending, then (after its 2 min) firing.
    let node_b = b.controller_endpoint();
    b.stop();
    let stopped = std::time::Instant::now();
    let pending = wait_for("SlimNodeUnreachable pending", Duration::from_secs(60), async || {
        prometheus.alert("SlimNodeUnreachable", "node", &node_b).filter(|s| s == "pending")
    })
    .await;
    println!("SlimNodeUnreachable {pending} {:.1}s after node b stopped", stopped.elapsed().as_secs_f64());
    let deadline = std::time::Instant::now() + Duration::from_secs(200);
    while prometheus.alert("SlimNodeUnreachable", "node", &node_b).as_deref() != Some("firing") {
        if std::time::Instant::now() > deadline {
            let samples = prometheus.query(&format!("slim_operator_node_connected{{node=\"{node_b}\"}}[4m]"));
            let up = prometheus.query("up[4m]");
            panic!("SlimNodeUnreachable never fired; node_connected: {samples:?}; up: {up:?}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!("SlimNodeUnreachable firing {:.1}s after node b stopped (for: 2m)", stopped.elapsed().as_secs_f64());
    assert!(prometheus.alert("SlimNodeUnreachable", "node", &a.controller_endpoint()).is_none(), "node a is up");
}
