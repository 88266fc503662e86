//! End-to-end against a real API server (`KUBECONFIG`), with real SLIM nodes on 127.0.0.1 and the
//! controller running in this process. Run with:
//!   cargo test -p slim-e2e --test cluster -- --ignored
//! Needs rights to apply CRDs and to create namespaces.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::Reporter;
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt};
use serde_json::json;
use slim_e2e::{ChannelManager, SlimApp, SlimNode, init_logging};
use slim_operator::api::{self, SlimChannel, Subscription};
use slim_operator::controller::{ControllerConfig, Runtime, run};
use slim_operator::metrics::Metrics;
use slim_operator::plan::{ResolvedTls, render_link};
use slim_operator::slim::{NodePool, RouteRef, SlimName};

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in api::crds() {
        let name = crd.name_any();
        crds.patch(&name, &PatchParams::apply("slim-e2e").force(), &Patch::Apply(&crd)).await.expect("apply CRD");
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("CRD established in time")
        .expect("watch CRD");
    }
}

/// A fresh namespace, deleted when the guard drops.
struct TempNamespace {
    client: Client,
    name: String,
}

impl TempNamespace {
    async fn new(client: &Client) -> Self {
        let name = format!("slim-e2e-{:08x}", rand::random::<u32>());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
        namespaces.create(&PostParams::default(), &ns).await.expect("create namespace");
        Self { client: client.clone(), name }
    }
}

impl Drop for TempNamespace {
    fn drop(&mut self) {
        let client = self.client.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let namespaces: Api<Namespace> = Api::all(client);
                let _ = namespaces.delete(&name, &DeleteParams::default()).await;
            });
        })
        .join();
    }
}

fn ready_status(sub: &Subscription) -> Option<String> {
    let status = sub.status.as_ref()?;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some(format!("{}/{}", ready.status, ready.reason))
}

/// Runs the operator's controllers in this process until the returned sender fires.
fn start_controllers(
    client: &Client,
    pool: &NodePool,
    channel_manager: Option<String>,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), slim_operator::controller::Error>>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = Runtime {
        client: client.clone(),
        reporter: Reporter { controller: "slim-operator".into(), instance: Some("e2e".into()) },
        metrics: Arc::new(Metrics::new()),
        nodes: pool.clone(),
        config: ControllerConfig { resync_interval: Duration::from_secs(5), channel_manager, ..Default::default() },
        ready: [Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false))],
        slot: Default::default(),
    };
    let controller = tokio::spawn(run(runtime, async move {
        let _ = stopped.await;
    }));
    (stop, controller)
}

async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs cluster"]
async fn subscription_lifecycle_on_a_real_cluster() {
    init_logging();
    let client = Client::try_default().await.expect("KUBECONFIG");
    install_crds(&client).await;
    let ns = TempNamespace::new(&client).await;
    let mut a = SlimNode::start("node-a").expect("node a");
    let b = SlimNode::start("node-b").expect("node b");

    let pool = NodePool::default();
    let (stop, controller) = start_controllers(&client, &pool, None);

    let subs: Api<Subscription> = Api::namespaced(client.clone(), &ns.name);
    let sub: Subscription = serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription",
        "metadata": {"name": "bob"},
        "spec": {
            "name": "org/ns/bob",
            "nodes": {"endpoints": [a.controller_endpoint()]},
            "link": {"endpoint": b.data_endpoint()},
        }
    }))
    .expect("subscription");
    subs.create(&PostParams::default(), &sub).await.expect("create");

    let status = wait_for("Ready=True", Duration::from_secs(60), async || {
        let sub = subs.get("bob").await.ok()?;
        ready_status(&sub).filter(|s| s == "True/RoutesInstalled")
    })
    .await;
    assert_eq!(status, "True/RoutesInstalled");
    let link = render_link(&sub.spec.link, &ResolvedTls::default());
    let route = RouteRef { name: SlimName::parse("org/ns/bob").expect("name"), link_id: link.link_id.clone() };
    let node = pool.node(&a.controller_endpoint());
    assert!(node.snapshot(Duration::ZERO).await.expect("list").has_route(&route));

    // Drift: the node restarts empty; the operator reinstalls the route.
    a.restart().expect("restart");
    wait_for("route reinstalled after restart", Duration::from_secs(60), async || {
        node.snapshot(Duration::ZERO).await.ok().filter(|o| o.has_route(&route))
    })
    .await;

    // Delete: the finalizer removes route and link before the object goes.
    subs.delete("bob", &DeleteParams::default()).await.expect("delete");
    wait_for("Subscription gone", Duration::from_secs(60), async || {
        subs.get_opt("bob").await.ok().filter(Option::is_none)
    })
    .await;
    let observed = node.snapshot(Duration::ZERO).await.expect("list");
    assert!(!observed.has_route(&route) && !observed.links.contains(&link.link_id), "{observed:?}");

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs cluster"]
async fn slim_channel_lifecycle_on_a_real_cluster() {
    init_logging();
    let client = Client::try_default().await.expect("KUBECONFIG");
    install_crds(&client).await;
    let ns = TempNamespace::new(&client).await;
    let node = SlimNode::start("node-a").expect("node");
    let cm = ChannelManager::start(&node).expect("channel manager");
    let mut bob = SlimApp::member(&node, "org/ns/bob").expect("bob");
    let mut carol = SlimApp::member(&node, "org/ns/carol").expect("carol");
    let pool = NodePool::default();
    let (stop, controller) = start_controllers(&client, &pool, Some(cm.endpoint()));

    let channels: Api<SlimChannel> = Api::namespaced(client.clone(), &ns.name);
    let channel: SlimChannel = serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "SlimChannel",
        "metadata": {"name": "team-chat"},
        "spec": {
            "name": "org/ns/team-chat",
            "participants": ["org/ns/bob", "org/ns/carol"],
            "nodes": {"endpoints": [node.controller_endpoint()]},
        }
    }))
    .expect("channel");
    channels.create(&PostParams::default(), &channel).await.expect("create");
    wait_for("all joined", Duration::from_secs(60), async || {
        let ch = channels.get("team-chat").await.ok()?;
        let status = ch.status.as_ref()?;
        (status.joined == 2 && status.desired == 2).then_some(())
    })
    .await;
    bob.wait_for("joined", Duration::from_secs(10)).expect("bob invited");
    carol.wait_for("joined", Duration::from_secs(10)).expect("carol invited");
    bob.publish("hello from the cluster").expect("publish");
    carol.wait_for("received hello from the cluster", Duration::from_secs(15)).expect("carol received it");

    // The API server refuses an MLS change on the live channel.
    let refused = channels
        .patch("team-chat", &PatchParams::default(), &Patch::Merge(json!({"spec": {"mlsEnabled": false}})))
        .await
        .expect_err("mlsEnabled is immutable");
    assert!(refused.to_string().contains("mlsEnabled cannot change"), "{refused}");

    channels.delete("team-chat", &DeleteParams::default()).await.expect("delete");
    wait_for("SlimChannel gone", Duration::from_secs(60), async || {
        channels.get_opt("team-chat").await.ok().filter(Option::is_none)
    })
    .await;
    let manager = slim_operator::slim::ChannelManagerClient::new(&cm.endpoint()).expect("client");
    assert!(!manager.list_channels().await.expect("channels").contains(&"org/ns/team-chat".to_owned()));
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn api_server_refuses_invalid_subscriptions_with_clear_messages() {
    let client = Client::try_default().await.expect("KUBECONFIG");
    install_crds(&client).await;
    let ns = TempNamespace::new(&client).await;
    let cases = [
        (
            json!({"name": "org/ns", "nodes": {"endpoints": ["http://n:46358"]}, "link": {"endpoint": "http://b:46357"}}),
            "must be org/namespace/name",
        ),
        (
            json!({"name": "org/ns/a", "nodes": {}, "link": {"endpoint": "http://b:46357"}}),
            "nodes needs at least one endpoint or a selector",
        ),
        (
            json!({"name": "org/ns/a", "nodes": {"endpoints": ["http://n:46358"]}, "link": {"endpoint": "http://b:46357", "connectionType": "mesh"}}),
            "connectionType",
        ),
    ];
    for (i, (spec, expected)) in cases.into_iter().enumerate() {
        let object = json!({"apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription", "metadata": {"name": format!("bad-{i}")}, "spec": spec});
        let data = serde_json::to_vec(&object).expect("json");
        let request = http_request(&ns.name, data);
        let error = client.request::<serde_json::Value>(request).await.expect_err("refused");
        assert!(error.to_string().contains(expected), "{spec}: {error}");
    }
}

/// A raw create (the typed API would refuse to serialise an unknown enum value).
fn http_request(namespace: &str, body: Vec<u8>) -> http::Request<Vec<u8>> {
    http::Request::post(format!("/apis/slim.agntcy.org/v1alpha1/namespaces/{namespace}/subscriptions"))
        .header("content-type", "application/json")
        .body(body)
        .expect("request")
}
