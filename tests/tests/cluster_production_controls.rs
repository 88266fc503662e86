//! The controls production users rely on, on a real API server with real SLIM nodes and the real
//! channel manager (controllers in this process): pausing reconciliation, `deletionPolicy: Retain`,
//! an honest status for a channel whose members nobody watches, and a channel manager that lost
//! its SLIM node: reported, and restarted when asked.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use slim_e2e::control_plane::{self, install_crds};
use slim_e2e::{ChannelManager, SlimApp, SlimNode, init_logging, wait_for};
use slim_operator::api::{SlimChannel, Subscription};
use slim_operator::controller::ControllerConfig;
use slim_operator::plan::{ResolvedTls, render_link};
use slim_operator::slim::{NodePool, RouteRef, SlimName};

/// The control plane with the CRDs, an admin client, a fresh namespace. Each test's controllers
/// watch its namespace only (`watch_namespace`), so the tests run side by side.
async fn setup() -> (Client, String) {
    init_logging();
    let plane = control_plane::shared();
    let client = plane.client().await.expect("admin client");
    install_crds(&client).await.expect("CRDs");
    let namespace = plane.namespace(&client, "controls").await.expect("namespace");
    (client, namespace)
}

fn controllers(
    client: &Client,
    namespace: &str,
    pool: &NodePool,
    channel_manager: Option<String>,
) -> slim_e2e::operator::InProcess {
    let config = ControllerConfig {
        resync_interval: Duration::from_secs(5),
        channel_manager,
        watch_namespace: Some(namespace.to_owned()),
        ..Default::default()
    };
    slim_e2e::operator::run_in_process(client, pool.clone(), Default::default(), config, "controls")
}

/// Stops the controllers started by [`controllers`].
async fn shutdown(
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<Result<(), slim_operator::controller::ControllerFailure>>,
) {
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
}

/// A SlimChannel `name` with `spec`.
fn slim_channel(name: &str, spec: serde_json::Value) -> SlimChannel {
    serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "SlimChannel", "metadata": {"name": name}, "spec": spec,
    }))
    .expect("channel")
}

/// Waits until the object `name` is gone.
async fn gone<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(&format!("{name} gone"), Duration::from_secs(30), async || {
        api.get_opt(name).await.ok().filter(Option::is_none)
    })
    .await;
}

fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(&'a str, &'a str)> {
    conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.as_str(), c.reason.as_str()))
}

fn subscription(name: &str, node: &SlimNode, link_to: &SlimNode, extra: serde_json::Value) -> Subscription {
    let mut spec = json!({
        "name": format!("org/ns/{name}"),
        "nodes": {"endpoints": [node.controller_endpoint()]},
        "link": {"endpoint": link_to.data_endpoint()},
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription",
        "metadata": {"name": name}, "spec": spec,
    }))
    .expect("subscription")
}

fn route_of(sub: &Subscription) -> RouteRef {
    let link = render_link(&sub.spec.link, &ResolvedTls::default());
    RouteRef { name: SlimName::parse(&sub.spec.name).expect("name"), link_id: link.link_id }
}

async fn paused(subs: &Api<Subscription>, name: &str, value: Option<&str>) {
    let patch = json!({"metadata": {"annotations": {"slim.agntcy.org/paused": value}}});
    subs.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await.expect("annotate");
}

/// The notes of the events about `name` with `reason`, once per publication (a repeated event
/// is one object with a series: its count is what it says).
async fn events(client: &Client, namespace: &str, name: &str, reason: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let list = api.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    list.into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.reason.as_deref() == Some(reason))
        .flat_map(|e| {
            let count = e.series.as_ref().map_or(1, |s| s.count.max(1)) as usize;
            std::iter::repeat_n(e.note.unwrap_or_default(), count)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_subscription_gets_no_write_and_unpausing_repairs_it_at_once() {
    let (client, namespace) = setup().await;
    let mut a = SlimNode::start("node-paused").expect("node a");
    let b = SlimNode::start("node-paused-link").expect("node b");
    let pool = NodePool::default();
    let (stop, running) = controllers(&client, &namespace, &pool, None);
    let subs: Api<Subscription> = Api::namespaced(client.clone(), &namespace);
    let sub = subscription("paused", &a, &b, json!({}));
    subs.create(&PostParams::default(), &sub).await.expect("create");
    let route = route_of(&sub);
    let node = pool.node(&a.controller_endpoint());
    wait_for("the route installed", Duration::from_secs(60), async || {
        node.snapshot(Duration::ZERO).await.ok().filter(|o| o.has_route(&route))
    })
    .await;

    // Paused: the status says so; the node restarts empty and nothing repairs it.
    paused(&subs, "paused", Some("true")).await;
    wait_for("Paused=True and Ready=False/ReconciliationPaused", Duration::from_secs(30), async || {
        let status = subs.get("paused").await.ok()?.status?;
        let both = (condition(&status.conditions, "Paused"), condition(&status.conditions, "Ready"));
        (both == (Some(("True", "ReconciliationPaused")), Some(("False", "ReconciliationPaused")))).then_some(())
    })
    .await;
    tokio::task::block_in_place(|| a.restart()).expect("restart");
    tokio::time::sleep(Duration::from_secs(12)).await; // more than two resyncs
    let observed = node.snapshot(Duration::ZERO).await.expect("list");
    assert!(!observed.has_route(&route), "a paused Subscription must not repair: {observed:?}");
    println!("paused: the restarted node stayed without the route for 12 s (two resyncs)");

    // Unpaused: repaired at once; the Paused condition goes.
    let unpaused = Instant::now();
    paused(&subs, "paused", None).await;
    wait_for("the route back", Duration::from_secs(60), async || {
        node.snapshot(Duration::ZERO).await.ok().filter(|o| o.has_route(&route))
    })
    .await;
    println!("unpaused: route reinstalled {:.2}s after the annotation was removed", unpaused.elapsed().as_secs_f64());
    wait_for("Ready=True without Paused", Duration::from_secs(30), async || {
        let status = subs.get("paused").await.ok()?.status?;
        let ready = condition(&status.conditions, "Ready") == Some(("True", "RoutesInstalled"));
        (ready && condition(&status.conditions, "Paused").is_none()).then_some(())
    })
    .await;

    // Deleted while paused: the finalizer goes, the route stays.
    paused(&subs, "paused", Some("true")).await;
    wait_for("paused again", Duration::from_secs(30), async || {
        let status = subs.get("paused").await.ok()?.status?;
        (condition(&status.conditions, "Paused") == Some(("True", "ReconciliationPaused"))).then_some(())
    })
    .await;
    subs.delete("paused", &DeleteParams::default()).await.expect("delete");
    gone(&subs, "paused").await;
    assert!(node.snapshot(Duration::ZERO).await.expect("list").has_route(&route), "untouched on SLIM");
    let notes = wait_for("the event", Duration::from_secs(10), async || {
        Some(events(&client, &namespace, "paused", "FinalizerReleasedWhilePaused").await).filter(|n| !n.is_empty())
    })
    .await;
    assert!(notes[0].contains("nothing is removed from SLIM"), "{notes:?}");
    shutdown(stop, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_leaves_the_route_and_the_channel_on_slim() {
    let (client, namespace) = setup().await;
    let a = SlimNode::start("node-retain").expect("node a");
    let b = SlimNode::start("node-retain-link").expect("node b");
    let cm = ChannelManager::start(&a).expect("channel manager");
    let mut bob = SlimApp::member(&a, "org/ns/bob").expect("bob");
    let pool = NodePool::default();
    let (stop, running) = controllers(&client, &namespace, &pool, Some(cm.endpoint()));

    // The API server refuses a policy it does not know.
    let subs: Api<Subscription> = Api::namespaced(client.clone(), &namespace);
    let mut bad = serde_json::to_value(subscription("bad", &a, &b, json!({}))).expect("json");
    bad["spec"]["deletionPolicy"] = json!("Keep");
    let untyped: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, &kube::api::ApiResource::erase::<Subscription>(&()));
    let refused = untyped.create(&PostParams::default(), &serde_json::from_value(bad).expect("object")).await;
    assert!(refused.is_err_and(|e| e.to_string().contains("deletionPolicy")), "Keep is not a policy");

    let sub = subscription("kept", &a, &b, json!({"deletionPolicy": "Retain"}));
    subs.create(&PostParams::default(), &sub).await.expect("create");
    let route = route_of(&sub);
    let node = pool.node(&a.controller_endpoint());
    wait_for("the route installed", Duration::from_secs(60), async || {
        node.snapshot(Duration::ZERO).await.ok().filter(|o| o.has_route(&route))
    })
    .await;
    subs.delete("kept", &DeleteParams::default()).await.expect("delete");
    gone(&subs, "kept").await;
    let observed = node.snapshot(Duration::ZERO).await.expect("list");
    assert!(observed.has_route(&route) && observed.links.contains(&route.link_id), "retained: {observed:?}");
    let notes = events(&client, &namespace, "kept", "Retained").await;
    assert!(notes.first().is_some_and(|n| n.contains("left route org/ns/kept")), "{notes:?}");
    println!("Retain (Subscription): {}", notes[0]);

    // A new Subscription that wants the same route adopts what was retained: nothing written.
    let writes = || node.stats().writes.load(std::sync::atomic::Ordering::Relaxed);
    let before = writes();
    let mut again = subscription("kept-again", &a, &b, json!({}));
    again.spec.name = "org/ns/kept".into();
    subs.create(&PostParams::default(), &again).await.expect("create again");
    let adopted = wait_for("kept-again Ready", Duration::from_secs(60), async || {
        let status = subs.get("kept-again").await.ok()?.status?;
        (condition(&status.conditions, "Ready") == Some(("True", "RoutesInstalled"))).then_some(status)
    })
    .await;
    assert!(adopted.nodes.iter().all(|n| n.adopted), "{adopted:?}");
    assert_eq!(writes(), before, "adopted: no command was sent to the node");
    let notes = events(&client, &namespace, "kept-again", "Adopted").await;
    println!("adopted (Subscription, 0 commands sent): {}", notes.first().cloned().unwrap_or_default());

    let channels: Api<SlimChannel> = Api::namespaced(client.clone(), &namespace);
    let channel = slim_channel(
        "kept-chat",
        json!({"name": "org/ns/kept-chat", "participants": ["org/ns/bob"], "deletionPolicy": "Retain",
                 "nodes": {"endpoints": [a.controller_endpoint()]}}),
    );
    channels.create(&PostParams::default(), &channel).await.expect("create channel");
    bob.wait_for("joined", Duration::from_secs(60)).expect("bob invited");
    wait_for("bob joined in the status", Duration::from_secs(30), async || {
        channels.get("kept-chat").await.ok()?.status.filter(|s| s.joined == 1)
    })
    .await;
    channels.delete("kept-chat", &DeleteParams::default()).await.expect("delete channel");
    gone(&channels, "kept-chat").await;
    let manager = slim_operator::slim::ChannelManagerClient::new(&cm.endpoint()).expect("client");
    let listed = manager.list_channels().await.expect("channels");
    assert!(listed.contains(&"org/ns/kept-chat".to_owned()), "retained on the channel manager: {listed:?}");
    let notes = events(&client, &namespace, "kept-chat", "Retained").await;
    assert!(notes.first().is_some_and(|n| n.contains("org/ns/bob")), "{notes:?}");
    println!("Retain (SlimChannel): {}", notes[0]);

    // A new SlimChannel for the retained channel adopts it, bob still in.
    let nodes = json!({"endpoints": [a.controller_endpoint()]});
    let again = slim_channel(
        "kept-chat-again",
        json!({"name": "org/ns/kept-chat", "participants": ["org/ns/bob"], "nodes": nodes}),
    );
    channels.create(&PostParams::default(), &again).await.expect("create channel again");
    let status = wait_for("kept-chat-again adopted", Duration::from_secs(30), async || {
        channels.get("kept-chat-again").await.ok()?.status.filter(|s| s.adopted && s.joined == 1)
    })
    .await;
    assert_eq!(condition(&status.conditions, "Ready"), Some(("True", "AllJoined")));
    let notes = events(&client, &namespace, "kept-chat-again", "Adopted").await;
    assert!(notes.first().is_some_and(|n| n.contains("not created")), "{notes:?}");
    println!("adopted (SlimChannel): {}", notes[0]);
    shutdown(stop, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_whose_members_nobody_watches_says_so_once() {
    let (client, namespace) = setup().await;
    let node = SlimNode::start("node-unwatched").expect("node");
    let cm = ChannelManager::start(&node).expect("channel manager");
    let mut bob = SlimApp::member(&node, "org/ns/bob").expect("bob");
    let pool = NodePool::default();
    let (stop, running) = controllers(&client, &namespace, &pool, Some(cm.endpoint()));
    let channels: Api<SlimChannel> = Api::namespaced(client.clone(), &namespace);
    let channel = slim_channel("unwatched", json!({"name": "org/ns/unwatched", "participants": ["org/ns/bob"]}));
    channels.create(&PostParams::default(), &channel).await.expect("create");
    bob.wait_for("joined", Duration::from_secs(60)).expect("bob invited");
    // Ready says bob is in (as the channel manager sees it), MembersWatched that nobody watches.
    wait_for("Ready=True and MembersWatched=False", Duration::from_secs(30), async || {
        let status = channels.get("unwatched").await.ok()?.status?;
        let ready = condition(&status.conditions, "Ready") == Some(("True", "AllJoined"));
        (ready && condition(&status.conditions, "MembersWatched") == Some(("False", "NoNodes"))).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(12)).await; // resyncs: the warning is not repeated
    let notes = events(&client, &namespace, "unwatched", "MembersUnwatched").await;
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("spec.nodes") && notes[0].contains("--default-node-endpoints"), "{notes:?}");
    println!("MembersWatched=False/NoNodes, one Warning: {}", notes[0]);
    channels.delete("unwatched", &DeleteParams::default()).await.expect("delete");
    gone(&channels, "unwatched").await;
    shutdown(stop, running).await;
}

/// The Pod of a channel manager serving on 127.0.0.1 (the API server has no kubelet: the test
/// plays its part, and restarts the manager once the Pod is deleted).
async fn manager_pod(client: &Client, namespace: &str) -> Api<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "slim-channel-manager-0", "labels": {"app.kubernetes.io/name": "slim-channel-manager"}},
        "spec": {"containers": [{"name": "channel-manager", "image": "ghcr.io/agntcy/slim/channel-manager:3.4.6"}]},
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod).await.expect("create the manager's Pod");
    let status = json!({"status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}});
    pods.patch_status("slim-channel-manager-0", &PatchParams::default(), &Patch::Merge(status)).await.expect("status");
    pods
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_manager_that_lost_its_node_is_reported_and_restarted() {
    let (client, namespace) = setup().await;
    let mut node = SlimNode::start("node-lost").expect("node");
    let mut cm = ChannelManager::start(&node).expect("channel manager");
    let pods = manager_pod(&client, &namespace).await;
    let pool = NodePool::default();
    let config = ControllerConfig {
        resync_interval: Duration::from_secs(5),
        channel_manager: Some(cm.endpoint()),
        heal_channel_manager: true,
        watch_namespace: Some(namespace.clone()),
        ..Default::default()
    };
    let (stop, running) = slim_e2e::operator::run_in_process(&client, pool, Default::default(), config, "controls");
    let channels: Api<SlimChannel> = Api::namespaced(client.clone(), &namespace);
    let spec = json!({"name": "org/ns/lost", "participants": ["org/ns/bob"], "nodes": {"endpoints": [node.controller_endpoint()]}});
    channels.create(&PostParams::default(), &slim_channel("lost", spec)).await.expect("create");
    let mut bob = SlimApp::member(&node, "org/ns/bob").expect("bob");
    bob.wait_for("joined", Duration::from_secs(60)).expect("bob invited");

    // The node restarts; the manager re-dials while something refuses its call, and gives up.
    node.stop();
    let refuser = slim_e2e::unimplemented_grpc_on(node.data_port).await.expect("refuser");
    tokio::time::sleep(Duration::from_secs(4)).await;
    refuser.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.restart().expect("node back");
    assert!(cm.log().contains("unable to reconnect to remote node"), "{}", cm.log());
    // The apps of the restarted node connect again (a SLIM app does not re-dial its node either).
    drop(bob);
    let mut bob = SlimApp::member(&node, "org/ns/bob").expect("bob again");
    let mut carol = SlimApp::member(&node, "org/ns/carol").expect("carol");
    let lost_at = Instant::now();
    let patch = json!({"spec": {"participants": ["org/ns/bob", "org/ns/carol"]}});
    channels.patch("lost", &PatchParams::default(), &Patch::Merge(patch)).await.expect("add carol");

    // Said as such, once; and the manager's Pod deleted.
    let message = wait_for("Ready=False/ChannelManagerLostNode", Duration::from_secs(60), async || {
        let status = channels.get("lost").await.ok()?.status?;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
        (ready.reason == "ChannelManagerLostNode").then(|| ready.message.clone())
    })
    .await;
    println!("ChannelManagerLostNode {:.1}s after carol was added: {message}", lost_at.elapsed().as_secs_f64());
    assert!(message.contains("no matching found"), "{message}");
    gone(&pods, "slim-channel-manager-0").await;
    let restarted_at = Instant::now();
    println!("the manager's Pod deleted {:.1}s after carol was added", lost_at.elapsed().as_secs_f64());
    assert_eq!(events(&client, &namespace, "lost", "ChannelManagerLostNode").await.len(), 1);
    assert_eq!(events(&client, &namespace, "lost", "ChannelManagerRestarted").await.len(), 1);

    // Its Deployment's new Pod dials the node afresh: carol is invited, the channel Ready again.
    cm.restart().expect("manager restarted");
    carol.wait_for("joined", Duration::from_secs(60)).expect("carol invited by the restarted manager");
    println!("carol joined {:.1}s after the manager restarted", restarted_at.elapsed().as_secs_f64());
    bob.wait_for("joined", Duration::from_secs(60)).expect("bob's new instance invited by the restarted manager");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = channels.get("lost").await.ok().and_then(|c| c.status);
        if status.as_ref().is_some_and(|s| condition(&s.conditions, "Ready") == Some(("True", "AllJoined"))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never Ready again: {status:#?}\nbob: {}\nnode: {}",
            bob.output(),
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Bob's dead instance is removed first (~11 s: the manager's own retries), then his new one
    // invited.
    println!("bob joined again, Ready=True {:.1}s after the manager restarted", restarted_at.elapsed().as_secs_f64());
    channels.delete("lost", &DeleteParams::default()).await.expect("delete");
    gone(&channels, "lost").await;
    shutdown(stop, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_of_two_conflicting_objects_wins_and_the_other_takes_over_when_it_goes() {
    let (client, namespace) = setup().await;
    let a = SlimNode::start("node-contested").expect("node a");
    let b = SlimNode::start("node-link-b").expect("node b");
    let c = SlimNode::start("node-link-c").expect("node c");
    let cm = ChannelManager::start(&a).expect("channel manager");
    let mut bob = SlimApp::member(&a, "org/ns/bob").expect("bob");
    let pool = NodePool::default();
    let (stop, running) = controllers(&client, &namespace, &pool, Some(cm.endpoint()));
    let subs: Api<Subscription> = Api::namespaced(client.clone(), &namespace);
    let ready = |name: &'static str, want: (&'static str, &'static str)| {
        let subs = subs.clone();
        async move {
            wait_for(&format!("{name} Ready={want:?}"), Duration::from_secs(60), async || {
                let sub = subs.get(name).await.ok()?;
                let status = sub.status.clone()?;
                (condition(&status.conditions, "Ready") == Some(want)).then_some(sub)
            })
            .await
        }
    };

    // Same route name on node a, over links to b and to c: the older one wins.
    let mut first = subscription("first", &a, &b, json!({}));
    first.spec.name = "org/ns/shared".into();
    subs.create(&PostParams::default(), &first).await.expect("first");
    ready("first", ("True", "RoutesInstalled")).await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // creation times have one-second resolution
    let mut second = subscription("second", &a, &c, json!({}));
    second.spec.name = "org/ns/shared".into();
    subs.create(&PostParams::default(), &second).await.expect("second");
    let lost = ready("second", ("False", "Conflict")).await;
    let message =
        lost.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready")).map(|c| c.message.clone());
    println!("conflict: second says {message:?}");
    assert!(message.is_some_and(|m| m.contains(&format!("{namespace}/first"))));
    let node = pool.node(&a.controller_endpoint());
    let observed = node.snapshot(Duration::ZERO).await.expect("list");
    assert!(observed.has_route(&route_of(&first)) && !observed.has_route(&route_of(&second)), "{observed:?}");

    // The winner goes: the other takes over.
    let deleted = Instant::now();
    subs.delete("first", &DeleteParams::default()).await.expect("delete first");
    ready("second", ("True", "RoutesInstalled")).await;
    println!("conflict: second took over {:.2}s after first was deleted", deleted.elapsed().as_secs_f64());
    let observed = node.snapshot(Duration::ZERO).await.expect("list");
    assert!(observed.has_route(&route_of(&second)) && !observed.has_route(&route_of(&first)), "{observed:?}");

    // Two SlimChannels for one channel on one manager: the younger yields, and its deletion
    // leaves the winner's channel alone.
    let channels: Api<SlimChannel> = Api::namespaced(client.clone(), &namespace);
    for name in ["chat-first", "chat-second"] {
        let nodes = json!({"endpoints": [a.controller_endpoint()]});
        let channel =
            slim_channel(name, json!({"name": "org/ns/contested", "participants": ["org/ns/bob"], "nodes": nodes}));
        channels.create(&PostParams::default(), &channel).await.expect("channel");
        if name == "chat-first" {
            bob.wait_for("joined", Duration::from_secs(60)).expect("bob invited");
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
    }
    let status = wait_for("chat-second Conflict", Duration::from_secs(30), async || {
        let status = channels.get("chat-second").await.ok()?.status?;
        (condition(&status.conditions, "Ready").map(|c| c.1) == Some("Conflict")).then_some(status)
    })
    .await;
    println!(
        "conflict: chat-second says {:?}",
        status.conditions.iter().find(|c| c.type_ == "Ready").map(|c| &c.message)
    );
    channels.delete("chat-second", &DeleteParams::default()).await.expect("delete");
    gone(&channels, "chat-second").await;
    let manager = slim_operator::slim::ChannelManagerClient::new(&cm.endpoint()).expect("client");
    assert!(manager.list_channels().await.expect("channels").contains(&"org/ns/contested".to_owned()), "still there");
    let first_status = channels.get("chat-first").await.expect("chat-first").status.expect("status");
    assert_eq!(condition(&first_status.conditions, "Ready"), Some(("True", "AllJoined")));
    for name in ["second", "chat-first"] {
        let _ = subs.delete(name, &DeleteParams::default()).await;
        let _ = channels.delete(name, &DeleteParams::default()).await;
    }
    shutdown(stop, running).await;
}

/// A route installed by hand through the node's controller API (what slimctl does), with the link
/// the Subscription's spec renders, is adopted: the operator sends the node nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_installed_by_hand_is_adopted_without_a_write() {
    let (client, namespace) = setup().await;
    let a = SlimNode::start("node-by-hand").expect("node a");
    let b = SlimNode::start("node-by-hand-link").expect("node b");
    let sub = subscription("by-hand", &a, &b, json!({"instances": "None"}));
    let link = render_link(&sub.spec.link, &ResolvedTls::default());
    let route = route_of(&sub);
    let by_hand = NodePool::default().node(&a.controller_endpoint());
    let change = slim_operator::slim::NodeChange {
        create_links: vec![link],
        set_routes: vec![route.clone()],
        ..Default::default()
    };
    by_hand.apply(change).await.expect("installed by hand");

    let pool = NodePool::default();
    let (stop, running) = controllers(&client, &namespace, &pool, None);
    let subs: Api<Subscription> = Api::namespaced(client.clone(), &namespace);
    subs.create(&PostParams::default(), &sub).await.expect("create");
    let status = wait_for("by-hand Ready", Duration::from_secs(60), async || {
        let status = subs.get("by-hand").await.ok()?.status?;
        (condition(&status.conditions, "Ready") == Some(("True", "RoutesInstalled"))).then_some(status)
    })
    .await;
    let writes = pool.node(&a.controller_endpoint()).stats().writes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(status.nodes.iter().all(|n| n.adopted), "{status:?}");
    assert_eq!(writes, 0, "the operator sent the node no command");
    let observed = pool.node(&a.controller_endpoint()).snapshot(Duration::ZERO).await.expect("list");
    assert!(observed.has_route(&route));
    println!("by hand: adopted, {writes} commands sent; {:?}", events(&client, &namespace, "by-hand", "Adopted").await);
    // Managed from now on: deleting the Subscription removes it (policy Delete).
    subs.delete("by-hand", &DeleteParams::default()).await.expect("delete");
    gone(&subs, "by-hand").await;
    let observed = pool.node(&a.controller_endpoint()).snapshot(Duration::ZERO).await.expect("list");
    assert!(!observed.has_route(&route), "removed on delete: {observed:?}");
    shutdown(stop, running).await;
}
