//! GitOps health on real objects: the operator (controllers in this process) brings Subscriptions
//! and SlimChannels into each state on a real API server with real SLIM nodes and the real channel
//! manager; `kubectl wait --for=condition=Ready` waits on both kinds; and the Argo CD health check
//! in `argocd/health.lua` (run by a real Lua 5.4, as Argo CD's gopher-lua runs it) classifies each
//! object as the API server returns it.

use std::process::Command;
use std::time::Duration;

use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use slim_e2e::control_plane::{self, install_crds};
use slim_e2e::{ChannelManager, SlimApp, SlimNode, init_logging, kubectl, repo_path, wait_for};
use slim_operator::api::{SlimChannel, Subscription};
use slim_operator::controller::ControllerConfig;
use slim_operator::slim::NodePool;

/// A JSON value as a Lua table constructor.
fn lua(value: &Value) -> String {
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}").replace("\\u{", "\\u{"),
        Value::Array(items) => format!("{{{}}}", items.iter().map(lua).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => {
            let fields = map.iter().map(|(k, v)| format!("[{k:?}] = {}", lua(v)));
            format!("{{{}}}", fields.collect::<Vec<_>>().join(", "))
        }
    }
}

/// `(status, message)` of the health check for `object`, by `lua5.4`.
fn health(object: &Value) -> (String, String) {
    let script = repo_path("argocd/health.lua");
    let program = format!(
        "obj = {}\nlocal hs = dofile({:?})\nio.write(hs.status, \"\\t\", hs.message or \"\")",
        lua(object),
        script.display().to_string()
    );
    let lua_bin = std::env::var("SLIM_LUA").unwrap_or_else(|_| "lua5.4".into());
    let out = Command::new(&lua_bin).arg("-e").arg(&program).output().unwrap_or_else(|e| panic!("{lua_bin}: {e}"));
    assert!(out.status.success(), "lua: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, message) = text.split_once('\t').unwrap_or((&text, ""));
    (status.to_owned(), message.to_owned())
}

fn subscription(name: &str, nodes: Value, link: &str, annotations: Value) -> Subscription {
    serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"name": format!("org/ns/{name}"), "nodes": nodes, "link": {"endpoint": link}},
    }))
    .expect("subscription")
}

fn reason(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> Option<String> {
    conditions.iter().find(|c| c.type_ == "Ready").map(|c| format!("{}/{}", c.status, c.reason))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argocd_health_and_kubectl_wait_on_real_objects() {
    init_logging();
    let plane = control_plane::shared();
    let client: Client = plane.client().await.expect("admin client");
    install_crds(&client).await.expect("CRDs");
    let ns = plane.namespace(&client, "gitops").await.expect("namespace");
    let node = SlimNode::start("node-gitops").expect("node");
    let cm = ChannelManager::start(&node).expect("channel manager");
    let _bob = SlimApp::member(&node, "org/ns/bob").expect("bob");
    let subs: Api<Subscription> = Api::namespaced(client.clone(), &ns);
    let channels: Api<SlimChannel> = Api::namespaced(client.clone(), &ns);
    let endpoints = json!({"endpoints": [node.controller_endpoint()]});
    let link = node.data_endpoint();

    // Before the operator runs: no status.
    subs.create(&PostParams::default(), &subscription("ready", endpoints.clone(), &link, json!({})))
        .await
        .expect("create");
    let fresh = serde_json::to_value(subs.get("ready").await.expect("get")).expect("json");
    let config = ControllerConfig {
        resync_interval: Duration::from_secs(5),
        channel_manager: Some(cm.endpoint()),
        ..Default::default()
    };
    let (stop, running) =
        slim_e2e::operator::run_in_process(&client, NodePool::default(), Default::default(), config, "gitops");
    let unreachable = json!({"endpoints": ["http://127.0.0.1:9"]});
    subs.create(&PostParams::default(), &subscription("unreachable", unreachable, &link, json!({})))
        .await
        .expect("create");
    // A rival for "ready"'s route on the same node over another link, created later: it yields.
    let mut rival = subscription("rival", endpoints.clone(), "http://127.0.0.1:1", json!({}));
    rival.spec.name = "org/ns/ready".into();
    tokio::time::sleep(Duration::from_millis(1100)).await; // creation times have one-second resolution
    subs.create(&PostParams::default(), &rival).await.expect("create rival");
    let paused = json!({"slim.agntcy.org/paused": "true"});
    subs.create(&PostParams::default(), &subscription("paused", endpoints.clone(), &link, paused))
        .await
        .expect("create");
    for (name, participants) in [("team", json!(["org/ns/bob"])), ("waiting", json!(["org/ns/bob", "org/ns/nobody"]))] {
        let channel: SlimChannel = serde_json::from_value(json!({
            "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "SlimChannel",
            "metadata": {"name": name},
            "spec": {"name": format!("org/ns/{name}"), "participants": participants, "nodes": endpoints},
        }))
        .expect("channel");
        channels.create(&PostParams::default(), &channel).await.expect("create channel");
    }

    // `kubectl wait` on both kinds.
    let kubeconfig = plane.admin_kubeconfig.clone();
    for object in ["subscription/ready", "slimchannel/team"] {
        let args = ["wait", "--for=condition=Ready", object, "-n", ns.as_str(), "--timeout=60s"];
        let out = kubectl(&args, &[("KUBECONFIG", kubeconfig.as_path())]).unwrap_or_else(|e| panic!("{object}: {e}"));
        println!("kubectl wait --for=condition=Ready {object}: {}", out.trim());
    }
    let sub_reason = |name: &'static str, want: &'static str| {
        let subs = subs.clone();
        async move {
            wait_for(&format!("{name} {want}"), Duration::from_secs(60), async || {
                let sub = subs.get(name).await.ok()?;
                (reason(&sub.status.as_ref()?.conditions)? == want).then_some(sub)
            })
            .await
        }
    };
    let cases = [
        ("no status yet", fresh, "Progressing"),
        ("Ready", serde_json::to_value(sub_reason("ready", "True/RoutesInstalled").await).expect("json"), "Healthy"),
        (
            "node unreachable",
            serde_json::to_value(sub_reason("unreachable", "False/NodeUnreachable").await).expect("json"),
            "Degraded",
        ),
        (
            "paused",
            serde_json::to_value(sub_reason("paused", "False/ReconciliationPaused").await).expect("json"),
            "Suspended",
        ),
        ("conflict", serde_json::to_value(sub_reason("rival", "False/Conflict").await).expect("json"), "Degraded"),
        ("channel Ready", serde_json::to_value(channels.get("team").await.expect("team")).expect("json"), "Healthy"),
        (
            "channel waiting for a member",
            serde_json::to_value(
                wait_for("waiting ParticipantsPending", Duration::from_secs(60), async || {
                    let channel = channels.get("waiting").await.ok()?;
                    (reason(&channel.status.as_ref()?.conditions)? == "False/ParticipantsPending").then_some(channel)
                })
                .await,
            )
            .expect("json"),
            "Progressing",
        ),
    ];
    for (what, object, want) in &cases {
        let (status, message) = health(object);
        println!("argocd health, {what} ({}): {status} {message}", object["metadata"]["name"].as_str().unwrap_or(""));
        assert_eq!(status, *want, "{what}: {message}\n{object}");
    }
    // A spec the operator has not looked at yet is Progressing, whatever the old status says.
    let mut newer = cases[1].1.clone();
    newer["metadata"]["generation"] = json!(newer["metadata"]["generation"].as_i64().unwrap_or(1) + 1);
    assert_eq!(health(&newer).0, "Progressing");
    let names: Vec<String> =
        subs.list(&Default::default()).await.expect("list").items.iter().map(|s| s.name_any()).collect();
    assert_eq!(names.len(), 4);
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
}
