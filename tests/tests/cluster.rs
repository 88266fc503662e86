//! End-to-end on a real API server (the harness in `slim_e2e::control_plane`), with real SLIM nodes
//! and the real channel manager on 127.0.0.1, and the controllers running in this process.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use slim_e2e::control_plane::{self, install_crds};
use slim_e2e::{ChannelManager, SlimApp, SlimNode, init_logging, wait_for};
use slim_operator::api::{SlimChannel, Subscription};
use slim_operator::controller::ControllerConfig;
use slim_operator::plan::{ResolvedTls, render_link};
use slim_operator::slim::{NodePool, RouteRef, SlimName};

/// The control plane, its CRDs, an admin client and a fresh namespace. Each test's controllers
/// watch its namespace only (`watch_namespace`), so the tests run side by side.
async fn setup() -> (Client, String) {
    let plane = control_plane::shared();
    let client = plane.client().await.expect("admin client");
    install_crds(&client).await.expect("CRDs");
    let namespace = plane.namespace(&client, "e2e").await.expect("namespace");
    (client, namespace)
}

fn ready_status(sub: &Subscription) -> Option<String> {
    let status = sub.status.as_ref()?;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some(format!("{}/{}", ready.status, ready.reason))
}

type Controllers = slim_e2e::operator::InProcess;

/// Runs the operator's controllers in this process until the returned sender fires (5 s resync).
fn start_controllers(
    client: &Client,
    namespace: &str,
    pool: &NodePool,
    channel_manager: Option<String>,
) -> Controllers {
    let config = ControllerConfig { resync_interval: Duration::from_secs(5), channel_manager, ..Default::default() };
    start_controllers_with(client, namespace, pool, config)
}

/// Runs the operator's controllers with `config`, watching `namespace`.
fn start_controllers_with(client: &Client, namespace: &str, pool: &NodePool, config: ControllerConfig) -> Controllers {
    let config = ControllerConfig { watch_namespace: Some(namespace.to_owned()), ..config };
    slim_e2e::operator::run_in_process(client, pool.clone(), Default::default(), config, "e2e")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_lifecycle_on_a_real_cluster() {
    init_logging();
    let (client, namespace) = setup().await;
    let mut a = SlimNode::start("node-a").expect("node a");
    let b = SlimNode::start("node-b").expect("node b");

    let pool = NodePool::default();
    let (stop, controller) = start_controllers(&client, &namespace, &pool, None);

    let subs: Api<Subscription> = Api::namespaced(client.clone(), &namespace);
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
async fn slim_channel_lifecycle_on_a_real_cluster() {
    init_logging();
    let (client, namespace) = setup().await;
    let node = SlimNode::start("node-a").expect("node");
    let cm = ChannelManager::start(&node).expect("channel manager");
    let mut bob = SlimApp::member(&node, "org/ns/bob").expect("bob");
    let mut carol = SlimApp::member(&node, "org/ns/carol").expect("carol");
    let pool = NodePool::default();
    let (stop, controller) = start_controllers(&client, &namespace, &pool, Some(cm.endpoint()));

    let channels: Api<SlimChannel> = Api::namespaced(client.clone(), &namespace);
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

/// A Pod object standing for a SLIM node: labelled as the upstream chart labels node Pods, its
/// `controller-0` port the node's, and (no kubelet here) its status written as a kubelet would:
/// Running at 127.0.0.1, where the real node listens.
async fn node_pod(client: &Client, namespace: &str, node: &SlimNode) {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": node.node_id, "labels": {"app.kubernetes.io/name": "slim"}},
        "spec": {"containers": [{"name": "slim", "image": "ghcr.io/agntcy/slim:3.4.6",
                 "ports": [{"name": "controller-0", "containerPort": node.controller_port}]}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod).await.expect("node Pod");
    let status = json!({"status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}});
    pods.patch_status(&node.node_id, &PatchParams::default(), &Patch::Merge(status)).await.expect("node Pod status");
}

/// A SlimChannel `team` (no `spec.nodes`) with `names` as members, all on one real node that the
/// operator finds through its default node set, with the real channel manager and the controllers
/// running with default flags (a 5 min resync: only the member watch brings restarted members back
/// in time).
struct OneNodeChannel {
    node: SlimNode,
    members: Vec<SlimApp>,
    channels: Api<SlimChannel>,
    controllers: Controllers,
    _manager: ChannelManager,
}

impl OneNodeChannel {
    async fn start(client: &Client, namespace: &str, names: &[&str]) -> Self {
        let node = SlimNode::start("node-a").expect("node");
        node_pod(client, namespace, &node).await;
        let manager = ChannelManager::start(&node).expect("channel manager");
        let members = names.iter().map(|n| SlimApp::member(&node, n).expect("member")).collect();
        let config = ControllerConfig { channel_manager: Some(manager.endpoint()), ..Default::default() };
        let controllers = start_controllers_with(client, namespace, &NodePool::default(), config);
        let channels: Api<SlimChannel> = Api::namespaced(client.clone(), namespace);
        let channel: SlimChannel = serde_json::from_value(json!({
            "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "SlimChannel", "metadata": {"name": "team"},
            "spec": {"name": "org/ns/team", "participants": names}
        }))
        .expect("channel");
        channels.create(&PostParams::default(), &channel).await.expect("create");
        Self { node, members, channels, controllers, _manager: manager }
    }

    async fn stop(self) {
        let (stop, controller) = self.controllers;
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_is_back_without_spec_nodes() {
    init_logging();
    let (client, namespace) = setup().await;
    // Checked: with the member watch's period set to an hour this test fails.
    let mut team = OneNodeChannel::start(&client, &namespace, &["org/ns/bob", "org/ns/carol"]).await;
    let (node, channels) = (&team.node, &team.channels);
    let mut carol = team.members.pop().expect("carol");
    let mut bob = team.members.pop().expect("bob");
    let status = wait_for("both joined", Duration::from_secs(60), async || {
        channels.get("team").await.ok()?.status.filter(|s| s.joined == 2)
    })
    .await;
    assert_eq!(status.nodes, vec![node.controller_endpoint()], "status says which nodes were consulted");
    bob.wait_for("joined", Duration::from_secs(10)).expect("bob joined");
    carol.wait_for("joined", Duration::from_secs(10)).expect("carol joined");

    // bob restarts: a new instance of the same name.
    let old_instance = bob.instance.clone();
    drop(bob);
    let restarted = std::time::Instant::now();
    let mut bob = SlimApp::member(node, "org/ns/bob").expect("bob again");
    bob.wait_for("joined", Duration::from_secs(60)).expect("the restarted bob is invited back");
    let rejoin = restarted.elapsed();
    let back = wait_for("bob's new instance in the status", Duration::from_secs(30), async || {
        let ch = channels.get("team").await.ok()?;
        let bob_status = ch.status?.participants.into_iter().find(|p| p.name == "org/ns/bob")?;
        bob_status
            .instance
            .as_deref()
            .is_some_and(|i| i.ends_with(&bob.instance) && !i.ends_with(&old_instance))
            .then_some(bob_status)
    })
    .await;
    assert!(back.joined, "{back:?}");
    bob.publish("back from a restart").expect("publish");
    carol.wait_for("received back from a restart", Duration::from_secs(15)).expect("carol got it");
    eprintln!("member rejoin after a restart, no spec.nodes, default flags: {:.1} s", rejoin.as_secs_f64());
    drop((bob, carol));
    team.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_restarted_at_once_are_both_back() {
    init_logging();
    let (client, namespace) = setup().await;
    let mut team = OneNodeChannel::start(&client, &namespace, &["org/ns/bob", "org/ns/carol", "org/ns/dave"]).await;
    let (node, channels) = (&team.node, &team.channels);
    let mut members = std::mem::take(&mut team.members);
    for member in &mut members {
        member.wait_for("joined", Duration::from_secs(60)).expect("joined");
    }

    // bob and carol restart together; dave stays.
    let mut dave = members.pop().expect("dave");
    drop(members);
    let restarted = std::time::Instant::now();
    let mut bob = SlimApp::member(node, "org/ns/bob").expect("bob again");
    let mut carol = SlimApp::member(node, "org/ns/carol").expect("carol again");
    bob.wait_for("joined", Duration::from_secs(90)).expect("bob back");
    carol.wait_for("joined", Duration::from_secs(90)).expect("carol back");
    eprintln!("two members restarted at once, both back after {:.1} s", restarted.elapsed().as_secs_f64());
    let status = wait_for("three joined again", Duration::from_secs(30), async || {
        channels.get("team").await.ok()?.status.filter(|s| s.joined == 3)
    })
    .await;
    assert!(status.participants.iter().all(|p| p.joined), "{:?}", status.participants);
    bob.publish("both back").expect("publish");
    carol.wait_for("received both back", Duration::from_secs(15)).expect("carol got bob's message");
    dave.wait_for("received both back", Duration::from_secs(15)).expect("dave, who stayed, got it too");
    drop((bob, carol, dave));
    team.stop().await;
}

/// The Warning event for a node that is down says each cause once, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_is_down_gets_one_readable_warning() {
    use k8s_openapi::api::events::v1::Event;
    init_logging();
    let (client, namespace) = setup().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let endpoint = format!("http://127.0.0.1:{dead}");
    let pool = NodePool::default();
    let (stop, controller) = start_controllers(&client, &namespace, &pool, None);
    let subs: Api<Subscription> = Api::namespaced(client.clone(), &namespace);
    let sub: Subscription = serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription", "metadata": {"name": "nowhere"},
        "spec": {"name": "org/ns/bob", "nodes": {"endpoints": [endpoint]}, "link": {"endpoint": "http://127.0.0.1:1"}}
    }))
    .expect("subscription");
    subs.create(&PostParams::default(), &sub).await.expect("create");
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    let event = wait_for("a Warning event", Duration::from_secs(60), async || {
        events.list(&Default::default()).await.ok()?.items.into_iter().find(|e| e.type_.as_deref() == Some("Warning"))
    })
    .await;
    let note = event.note.clone().unwrap_or_default();
    assert_eq!(event.reason.as_deref(), Some("NodeUnreachable"));
    assert_eq!(
        note,
        format!(
            "node {endpoint} unreachable: connect: transport error: tcp connect error: Connection refused (os error 111)"
        )
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
}

/// A Subscription the operator cannot read (stored while the CRD's schema was looser: a list
/// field holding a string) is reported with a Warning event and skipped; the others are reconciled
/// as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_that_does_not_deserialize_is_reported_and_skipped() {
    use k8s_openapi::api::events::v1::Event;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinition, JSONSchemaProps,
    };
    use kube::api::{ApiResource, DynamicObject};
    init_logging();
    let (client, namespace) = setup().await;
    let a = SlimNode::start("node-a").expect("node a");
    let b = SlimNode::start("node-b").expect("node b");

    // Loosen the schema of spec, store a broken object, then put the real CRD back.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut crd = crds.get("subscriptions.slim.agntcy.org").await.expect("CRD");
    crd.metadata.managed_fields = None;
    for version in &mut crd.spec.versions {
        let schema = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()).expect("schema");
        schema.x_kubernetes_validations = None;
        schema.properties.get_or_insert_default().insert(
            "spec".into(),
            JSONSchemaProps {
                type_: Some("object".into()),
                x_kubernetes_preserve_unknown_fields: Some(true),
                ..Default::default()
            },
        );
    }
    crds.replace("subscriptions.slim.agntcy.org", &PostParams::default(), &crd).await.expect("loosen the CRD");
    let resource = ApiResource::erase::<Subscription>(&());
    let dynamic: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
    let broken: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription", "metadata": {"name": "broken"},
        "spec": {"name": "org/ns/broken", "nodes": {"endpoints": "not-a-list"}, "link": {"endpoint": b.data_endpoint()}}
    }))
    .expect("object");
    wait_for("the loosened schema takes", Duration::from_secs(30), async || {
        dynamic.create(&PostParams::default(), &broken).await.ok()
    })
    .await;
    install_crds(&client).await.expect("the real CRD back");

    let pool = NodePool::default();
    let (stop, controller) = start_controllers(&client, &namespace, &pool, None);
    let subs: Api<Subscription> = Api::namespaced(client.clone(), &namespace);
    let good: Subscription = serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription", "metadata": {"name": "good"},
        "spec": {"name": "org/ns/good", "nodes": {"endpoints": [a.controller_endpoint()]}, "link": {"endpoint": b.data_endpoint()}}
    }))
    .expect("subscription");
    subs.create(&PostParams::default(), &good).await.expect("create");
    wait_for("the good one is Ready", Duration::from_secs(60), async || {
        subs.get("good").await.ok().as_ref().and_then(ready_status).filter(|s| s == "True/RoutesInstalled")
    })
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    let event = wait_for("an InvalidObject event on the broken one", Duration::from_secs(30), async || {
        events.list(&Default::default()).await.ok()?.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("InvalidObject")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken")
        })
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let note = event.note.unwrap_or_default();
    assert!(note.starts_with("the operator cannot read this object, so it is not reconciled: "), "{note}");
    assert!(note.contains("\"not-a-list\". Expected a sequence"), "says what is wrong: {note}");
    let raw = dynamic.get("broken").await.expect("broken");
    assert!(raw.metadata.finalizers.is_none(), "never reconciled: no finalizer");

    dynamic.delete("broken", &DeleteParams::default()).await.expect("delete broken");
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
}

/// A member restarted while its node restarts: carol's node (node-b) comes back empty and carol
/// comes back as a new instance at the same moment, without waiting for anything. The operator
/// must repair node-b's link and routes (Subscriptions) and re-invite carol's new instance
/// (SlimChannel); her message then reaches bob on node-a. The demo's topology: the channel
/// manager and bob on node-a, one peer link from node-b to node-a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_while_its_node_restarts_is_back() {
    init_logging();
    let (client, namespace) = setup().await;
    let node_a = SlimNode::start("node-a").expect("node a");
    let mut node_b = SlimNode::start("node-b").expect("node b");
    let manager = ChannelManager::start(&node_a).expect("channel manager");
    let config = ControllerConfig {
        channel_manager: Some(manager.endpoint()),
        resync_interval: Duration::from_secs(5),
        ..Default::default()
    };
    let (stop, controller) = start_controllers_with(&client, &namespace, &NodePool::default(), config);
    let mut bob = SlimApp::member(&node_a, "org/ns/bob").expect("bob");
    let carol = SlimApp::member(&node_b, "org/ns/carol").expect("carol");
    let subs: Api<Subscription> = Api::namespaced(client.clone(), &namespace);
    for (name, slim_name) in [("bob-via-node-a", "org/ns/bob"), ("team-via-node-a", "org/ns/team")] {
        let sub: Subscription = serde_json::from_value(json!({
            "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription", "metadata": {"name": name},
            "spec": {"name": slim_name, "nodes": {"endpoints": [node_b.controller_endpoint()]},
                     "link": {"endpoint": node_a.data_endpoint(), "connectionType": "peer"}}
        }))
        .expect("subscription");
        subs.create(&PostParams::default(), &sub).await.expect("create");
    }
    let channels: Api<SlimChannel> = Api::namespaced(client.clone(), &namespace);
    let channel: SlimChannel = serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "SlimChannel", "metadata": {"name": "team"},
        "spec": {"name": "org/ns/team", "participants": ["org/ns/bob", "org/ns/carol"],
                 "nodes": {"endpoints": [node_a.controller_endpoint(), node_b.controller_endpoint()]}}
    }))
    .expect("channel");
    channels.create(&PostParams::default(), &channel).await.expect("create");
    wait_for("both joined", Duration::from_secs(90), async || {
        channels.get("team").await.ok()?.status.filter(|s| s.joined == 2)
    })
    .await;
    bob.wait_for("joined", Duration::from_secs(10)).expect("bob joined");

    // node-b and carol restart together.
    let restarted = std::time::Instant::now();
    drop(carol);
    node_b.restart().expect("node-b restart");
    let mut carol = SlimApp::member(&node_b, "org/ns/carol").expect("carol again");
    carol.wait_for("joined", Duration::from_secs(120)).expect("carol is re-invited after her node restarted");
    eprintln!("member restarted with its node: back after {:.1} s", restarted.elapsed().as_secs_f64());
    carol.publish("back with my node").expect("publish");
    bob.wait_for("received back with my node", Duration::from_secs(30)).expect("bob got carol's message");

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
    drop((bob, carol, manager));
}

/// Control TLS through the CRD: a node whose controller API requires mutual TLS is reached with
/// the CA and the client certificate named by Secrets; a wrong CA and a missing client
/// certificate each give their own reason and a Warning naming the node; a client certificate
/// rotated in its Secret is used once the node trusts only the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_reach_mtls_nodes_with_certificates_from_secrets() {
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::api::events::v1::Event;
    use slim_e2e::pki::{Ca, server_tls};
    init_logging();
    let (client, namespace) = setup().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, other, next) = (Ca::new("node CA"), Ca::new("another CA"), Ca::new("next client CA"));
    let node_cert = ca.leaf(&["127.0.0.1", "localhost"], 30);
    let mut node =
        SlimNode::start_with_controller_tls("node-mtls", &server_tls(dir.path(), &node_cert, Some(&ca))).expect("node");
    let target = SlimNode::start("node-target").expect("target");

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let secret = |name: &str, type_: &str, data: serde_json::Value| -> Secret {
        serde_json::from_value(json!({"metadata": {"name": name}, "type": type_, "stringData": data})).expect("secret")
    };
    for (name, pem) in [("node-ca", &ca.pem), ("wrong-ca", &other.pem)] {
        secrets.create(&PostParams::default(), &secret(name, "Opaque", json!({"ca.crt": pem}))).await.expect("CA");
    }
    let client_pem = ca.leaf(&["spiffe://example.org/slim-operator"], 1);
    let tls_data = |pem: &(String, String)| json!({"tls.crt": pem.0, "tls.key": pem.1});
    secrets
        .create(&PostParams::default(), &secret("operator-client", "kubernetes.io/tls", tls_data(&client_pem)))
        .await
        .expect("client Secret");

    let pool = NodePool::default();
    let (stop, controller) = start_controllers(&client, &namespace, &pool, None);
    let subs: Api<Subscription> = Api::namespaced(client.clone(), &namespace);
    let create = |name: &'static str, tls: serde_json::Value| {
        let subs = subs.clone();
        let (endpoint, link) = (node.controller_endpoint(), target.data_endpoint());
        async move {
            let sub: Subscription = serde_json::from_value(json!({
                "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription", "metadata": {"name": name},
                "spec": {"name": format!("org/ns/{name}"), "nodes": {"endpoints": [endpoint], "tls": tls}, "link": {"endpoint": link}}
            }))
            .expect("subscription");
            subs.create(&PostParams::default(), &sub).await.expect("create");
        }
    };
    let wait_ready = |name: &'static str, want: &'static str| {
        let subs = subs.clone();
        async move {
            wait_for(want, Duration::from_secs(60), async || {
                ready_status(&subs.get(name).await.ok()?).filter(|s| s == want)
            })
            .await
        }
    };
    create("bob", json!({"caSecretRef": {"name": "node-ca"}, "clientCertSecretRef": {"name": "operator-client"}}))
        .await;
    create(
        "untrusted",
        json!({"caSecretRef": {"name": "wrong-ca"}, "clientCertSecretRef": {"name": "operator-client"}}),
    )
    .await;
    create("anonymous", json!({"caSecretRef": {"name": "node-ca"}})).await;
    wait_ready("bob", "True/RoutesInstalled").await;
    wait_ready("untrusted", "False/TlsUntrustedServer").await;
    wait_ready("anonymous", "False/TlsClientCertificateRefused").await;
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    let warning = wait_for("a Warning for the untrusted node", Duration::from_secs(30), async || {
        events.list(&Default::default()).await.ok()?.items.into_iter().find(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("untrusted")
                && e.type_.as_deref() == Some("Warning")
        })
    })
    .await;
    let note = warning.note.unwrap_or_default();
    assert_eq!(warning.reason.as_deref(), Some("TlsUntrustedServer"), "{note}");
    assert!(note.contains(&node.controller_endpoint()) && note.contains("UnknownIssuer"), "{note}");

    // Rotation: the client certificate in the Secret is replaced by one of another CA, and the
    // node restarts trusting only that CA (its routes gone, as after any restart).
    let rotated = next.leaf(&["spiffe://example.org/slim-operator"], 1);
    let rotated_at = std::time::Instant::now();
    secrets
        .replace(
            "operator-client",
            &PostParams::default(),
            &secret("operator-client", "kubernetes.io/tls", tls_data(&rotated)),
        )
        .await
        .expect("rotate");
    node.set_controller_tls(&server_tls(dir.path(), &node_cert, Some(&next))).expect("config");
    tokio::task::block_in_place(|| node.restart()).expect("restart");
    let link = render_link(
        &slim_operator::api::LinkSpec {
            endpoint: target.data_endpoint(),
            connection_type: Default::default(),
            tls: None,
            controller: None,
        },
        &ResolvedTls::default(),
    );
    let route = RouteRef { name: SlimName::parse("org/ns/bob").expect("name"), link_id: link.link_id };
    // Read back through a client of our own, with the rotated certificate.
    use slim_operator::tls::control::{ClientIdentity, ServerTrust, TlsMaterial, TlsSource};
    let identity = ClientIdentity::from_pem(rotated.0.as_bytes(), rotated.1.as_bytes()).expect("identity");
    let material = TlsMaterial {
        trust: ServerTrust::Ca(vec![ca.der.clone()]),
        identity: Some(Arc::new(identity)),
        server_name: None,
    };
    let (_keep, rx) = tokio::sync::watch::channel(Arc::new(material));
    let reader = NodePool::default().with_tls([(node.controller_endpoint(), TlsSource::new(rx))].into_iter().collect());
    let client_node = reader.node(&node.controller_endpoint());
    wait_for("the route back, over the rotated certificate", Duration::from_secs(60), async || {
        client_node.snapshot(Duration::ZERO).await.ok().filter(|o| o.has_route(&route))
    })
    .await;
    eprintln!("route back over the rotated certificate {:?} after the Secret changed", rotated_at.elapsed());
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
}
