//! Subscriptions over `remote` links carry SLIM sessions: the operator routes every live instance
//! of a Subscription's name, as the node at the far end of the link lists it (real API server,
//! real SLIM nodes, real apps, the controllers in this process). Only the first message of a
//! session goes to the bare name; the rest, and every reply, to `org/ns/<name>/<instance>`.

use std::time::{Duration, Instant};

use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use slim_e2e::control_plane::{self, install_crds};
use slim_e2e::{SlimApp, SlimNode, init_logging, wait_for};
use slim_operator::api::Subscription;
use slim_operator::controller::ControllerConfig;
use slim_operator::plan::{ResolvedTls, render_link};
use slim_operator::slim::{NodePool, RouteRef, SlimName};

/// The control plane, its CRDs, an admin client and a fresh namespace; each test's controllers
/// watch their own namespace only (`watch_namespace`), so the tests run side by side.
async fn setup() -> (Client, String) {
    let plane = control_plane::shared();
    let client = plane.client().await.expect("admin client");
    install_crds(&client).await.expect("CRDs");
    let namespace = plane.namespace(&client, "follow").await.expect("namespace");
    (client, namespace)
}

/// `name` routed on `on` over a `link_type` link to `to`, whose controller API is named.
fn subscription(object: &str, name: &str, on: &SlimNode, to: &SlimNode, link_type: &str) -> Subscription {
    serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription",
        "metadata": {"name": object},
        "spec": {
            "name": name,
            "nodes": {"endpoints": [on.controller_endpoint()]},
            "link": {"endpoint": to.data_endpoint(), "connectionType": link_type, "controller": to.controller_endpoint()},
        }
    }))
    .expect("subscription")
}

fn condition(sub: &Subscription, type_: &str) -> Option<(String, String)> {
    let c = sub.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone()))
}

/// `name/instance` over the one `remote` link between `a` and `b`: Subscriptions both ways share
/// one connection, the link with the lower id (each side's own link is rendered from its spec).
fn instance_route(name: &str, instance: &str, a: &SlimNode, b: &SlimNode) -> RouteRef {
    let link_to = |node: &SlimNode| {
        let spec = serde_json::from_value(json!({"endpoint": node.data_endpoint(), "connectionType": "remote"}))
            .expect("link spec");
        render_link(&spec, &ResolvedTls::default()).link_id
    };
    let link_id = link_to(a).min(link_to(b));
    RouteRef { name: SlimName::parse(&format!("{name}/{instance}")).expect("name"), link_id }
}

async fn has_route(pool: &NodePool, node: &SlimNode, route: &RouteRef) -> bool {
    let node = pool.node(&node.controller_endpoint());
    node.snapshot(Duration::ZERO).await.is_ok_and(|observed| observed.has_route(route))
}

/// One session from a new alice (on `a`) to bob (on `b`): once b routes alice's new instance
/// (the operator follows it), the session is opened, a message sent and bob's echo received.
async fn session(pool: &NodePool, a: &SlimNode, b: &SlimNode, message: &str) -> String {
    let mut alice = SlimApp::sender(a, "org/ns/alice", "org/ns/bob", message).expect("alice");
    let route = instance_route("org/ns/alice", &alice.instance, a, b);
    let started = Instant::now();
    wait_for("alice's instance routed on b", Duration::from_secs(30), async || {
        has_route(pool, b, &route).await.then_some(())
    })
    .await;
    println!("alice's new instance routed on b {:.2}s after it connected", started.elapsed().as_secs_f64());
    tokio::task::block_in_place(|| {
        alice.go().expect("go");
        alice.wait_for("reply ", Duration::from_secs(40)).expect("bob's echo over the session")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_subscriptions_both_ways_carry_sessions_and_follow_a_restart() {
    init_logging();
    let (client, namespace) = setup().await;
    let a = SlimNode::start("node-a").expect("node a");
    let b = SlimNode::start("node-b").expect("node b");
    let config = ControllerConfig {
        resync_interval: Duration::from_secs(30),
        watch_namespace: Some(namespace.clone()),
        ..Default::default()
    };
    let pool = NodePool::default();
    let (stop, controllers) =
        slim_e2e::operator::run_in_process(&client, pool.clone(), Default::default(), config, "follow");
    let subs: Api<Subscription> = Api::namespaced(client.clone(), &namespace);
    let bob = SlimApp::listen(&b, "org/ns/bob").expect("bob on b");
    for sub in [
        subscription("bob-via-b", "org/ns/bob", &a, &b, "remote"),
        subscription("alice-via-a", "org/ns/alice", &b, &a, "remote"),
    ] {
        subs.create(&PostParams::default(), &sub).await.expect("create");
    }
    let bob_route = instance_route("org/ns/bob", &bob.instance, &a, &b);
    wait_for("bob's instance routed on a", Duration::from_secs(30), async || {
        has_route(&pool, &a, &bob_route).await.then_some(())
    })
    .await;
    let status = wait_for("bob-via-b Ready and following", Duration::from_secs(30), async || {
        let sub = subs.get("bob-via-b").await.ok()?;
        let ready = condition(&sub, "Ready")? == ("True".into(), "RoutesInstalled".into());
        let following = condition(&sub, "InstancesFollowed")? == ("True".into(), "Following".into());
        (ready && following).then_some(sub.status?)
    })
    .await;
    assert_eq!(status.nodes[0].instances, std::slice::from_ref(&bob.instance), "status lists bob's instance on a");
    assert_eq!(status.far_node.as_deref(), Some(b.controller_endpoint().as_str()));
    // One connection between a and b: the side whose own link has the higher id says it routes
    // over the other's.
    let shared = bob_route.link_id.clone();
    let borrowers = wait_for("one side routing over the other's link", Duration::from_secs(30), async || {
        let mut borrowers = Vec::new();
        for name in ["bob-via-b", "alice-via-a"] {
            let status = subs.get(name).await.ok()?.status?;
            if let Some(link) = status.nodes.first()?.link.clone() {
                borrowers.push((name, link));
            }
        }
        (!borrowers.is_empty()).then_some(borrowers)
    })
    .await;
    assert_eq!(borrowers.len(), 1, "exactly one side borrows: {borrowers:?}");
    assert_eq!(borrowers[0].1, shared);

    // No route by hand: a whole session alice -> bob and back.
    let reply = session(&pool, &a, &b, "hello-1").await;
    assert_eq!(reply, "reply echo:hello-1");

    // bob restarts: a new instance. Routed on a within about a second of b listing it.
    drop(bob);
    let bob = SlimApp::listen(&b, "org/ns/bob").expect("bob again");
    let restarted = Instant::now();
    let new_route = instance_route("org/ns/bob", &bob.instance, &a, &b);
    wait_for("bob's new instance routed on a", Duration::from_secs(30), async || {
        has_route(&pool, &a, &new_route).await.then_some(())
    })
    .await;
    let follow = restarted.elapsed();
    println!(
        "instance-follow latency after a restart: {:.2}s (app connected -> route on the other node)",
        follow.as_secs_f64()
    );
    wait_for("the old instance's route removed from a", Duration::from_secs(30), async || {
        (!has_route(&pool, &a, &bob_route).await).then_some(())
    })
    .await;
    let reply = session(&pool, &a, &b, "hello-2").await;
    assert_eq!(reply, "reply echo:hello-2");

    // Deleted: the instance routes go with the name's.
    subs.delete("bob-via-b", &DeleteParams::default()).await.expect("delete");
    wait_for("bob-via-b gone", Duration::from_secs(60), async || {
        subs.get_opt("bob-via-b").await.ok().filter(Option::is_none)
    })
    .await;
    assert!(!has_route(&pool, &a, &new_route).await, "the instance route is removed with the Subscription");
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controllers).await;
}

/// What one link type carries between apps on two nodes joined only by Subscriptions of that type.
#[derive(Debug, PartialEq, Eq)]
struct Carries {
    point_to_point: bool,
    /// Both members of the SlimChannel joined.
    group_joined: bool,
    /// Messages crossed both ways in the channel.
    group_crossed: bool,
}

/// Nodes a and b, joined only by `link_type` Subscriptions (each name where its apps are not):
/// a point-to-point session alice (a) -> bob (b), then a SlimChannel moderated by the channel
/// manager on a with bob (b) and carol (a) as members, messages both ways.
async fn carried_over(link_type: &str) -> Carries {
    let (client, namespace) = setup().await;
    let a = SlimNode::start(&format!("{link_type}-a")).expect("node a");
    let b = SlimNode::start(&format!("{link_type}-b")).expect("node b");
    let manager = slim_e2e::ChannelManager::start(&a).expect("channel manager on a");
    let config = ControllerConfig {
        resync_interval: Duration::from_secs(30),
        channel_manager: Some(manager.endpoint()),
        watch_namespace: Some(namespace.clone()),
        ..Default::default()
    };
    let pool = NodePool::default();
    let (stop, controllers) =
        slim_e2e::operator::run_in_process(&client, pool.clone(), Default::default(), config, link_type);
    let subs: Api<Subscription> = Api::namespaced(client.clone(), &namespace);
    // A peer link syncs subscriptions both ways: one link, one Subscription (two would be a cycle).
    let wanted = match link_type {
        "peer" => vec![subscription("bob-via-b", "org/ns/bob", &a, &b, link_type)],
        _ => vec![
            subscription("bob-via-b", "org/ns/bob", &a, &b, link_type),
            subscription("team-via-b", "org/ns/team", &a, &b, link_type),
            subscription("alice-via-a", "org/ns/alice", &b, &a, link_type),
            subscription("manager-via-a", "org/ns/channel-manager", &b, &a, link_type),
            subscription("team-via-a", "org/ns/team", &b, &a, link_type),
        ],
    };
    for sub in &wanted {
        subs.create(&PostParams::default(), sub).await.expect("create");
    }
    for sub in &wanted {
        let name = sub.metadata.name.clone().unwrap_or_default();
        wait_for(&format!("{name} Ready"), Duration::from_secs(60), async || {
            let sub = subs.get(&name).await.ok()?;
            (condition(&sub, "Ready")?.0 == "True").then_some(())
        })
        .await;
    }
    let _bob = SlimApp::listen(&b, "org/ns/bob").expect("bob on b");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let point_to_point = tokio::task::block_in_place(|| {
        let mut alice = SlimApp::sender(&a, "org/ns/alice", "org/ns/bob", "hi").expect("alice");
        // The operator follows alice's new instance within about a second.
        std::thread::sleep(Duration::from_secs(2));
        alice.go().expect("go");
        alice.wait_for("reply echo:hi", Duration::from_secs(30)).is_ok()
    });
    let (group_joined, group_crossed) = group_crosses(&client, &namespace, &a, &b).await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controllers).await;
    Carries { point_to_point, group_joined, group_crossed }
}

/// A SlimChannel `team` with bob (on b) and carol (on a): (both joined, messages crossed both ways).
async fn group_crosses(client: &Client, namespace: &str, a: &SlimNode, b: &SlimNode) -> (bool, bool) {
    use slim_operator::api::SlimChannel;
    let mut bob = SlimApp::member(b, "org/ns/bob-member").expect("bob");
    let mut carol = SlimApp::member(a, "org/ns/carol").expect("carol");
    let subs: Api<Subscription> = Api::namespaced(client.clone(), namespace);
    let existing = subs.get_opt("bob-via-b").await.ok().flatten().map(|s| s.spec.link.connection_type.as_str());
    if existing != Some("peer") {
        let link_type = existing.unwrap_or("remote");
        // Each member's own name is routed where it is not: a group member acknowledges the
        // messages of the others at their instance names.
        for member in [
            subscription("member-via-b", "org/ns/bob-member", a, b, link_type),
            subscription("member-via-a", "org/ns/carol", b, a, link_type),
        ] {
            subs.create(&PostParams::default(), &member).await.expect("member route");
        }
        // One connection between the nodes carries every route, both ways: the Subscriptions of
        // one side route over the link the other side dials (two would loop group messages).
        let started = std::time::Instant::now();
        let links = wait_for("one link between a and b", Duration::from_secs(60), async || {
            let links = links_used(&subs).await;
            (links.len() == 1).then_some(links)
        })
        .await;
        println!(
            "{link_type}: every route over one link {links:?} {:.2} s after the last Subscription",
            started.elapsed().as_secs_f64()
        );
        // As the nodes themselves list their connections: one dialed between them, nothing else.
        let pool = NodePool::default();
        let mut dialed = Vec::new();
        for node in [a, b] {
            let observed = pool.node(&node.controller_endpoint()).snapshot(Duration::ZERO).await.expect("listing");
            dialed.extend(observed.dialed.keys().filter(|l| l.starts_with("slimop-")).cloned());
        }
        assert_eq!(dialed, links.into_iter().collect::<Vec<_>>(), "{link_type}: the nodes hold that one link only");
    }
    let channels: Api<SlimChannel> = Api::namespaced(client.clone(), namespace);
    let channel: SlimChannel = serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "SlimChannel", "metadata": {"name": "team"},
        "spec": {"name": "org/ns/team", "mlsEnabled": false, "participants": ["org/ns/bob-member", "org/ns/carol"],
                 "nodes": {"endpoints": [a.controller_endpoint(), b.controller_endpoint()]}}
    }))
    .expect("channel");
    channels.create(&PostParams::default(), &channel).await.expect("channel");
    let joined = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let status = channels.get("team").await.ok().and_then(|c| c.status);
            if status.is_some_and(|s| s.joined == 2) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await
    .is_ok();
    if !joined {
        let status = channels.get("team").await.ok().and_then(|c| c.status);
        println!("the channel over this link never had both members in: {status:?}");
        return (false, false);
    }
    if std::env::var_os("SLIM_DEBUG_ROUTES").is_some() {
        let pool = NodePool::default();
        for (label, node) in [("a", a), ("b", b)] {
            let observed = pool.node(&node.controller_endpoint()).snapshot(Duration::ZERO).await.expect("list");
            for name in ["org/ns/team", "org/ns/bob-member", "org/ns/carol", "org/ns/channel-manager"] {
                let key = SlimName::parse(name).expect("n").key();
                for (k, link) in observed.routes.iter().filter(|(k, _)| k.components == key.components) {
                    println!("{label}: route {name}/{:x} via {link}", k.instance);
                }
                for k in observed.names.iter().filter(|k| k.components == key.components) {
                    println!("{label}: name {name}/{:x}", k.instance);
                }
            }
        }
    }
    let crossed = tokio::task::block_in_place(|| every_round_crosses_once(&mut bob, &mut carol));
    if !crossed || std::env::var_os("SLIM_DEBUG_ROUTES").is_some() {
        for sub in subs.list(&Default::default()).await.map(|l| l.items).unwrap_or_default() {
            let status = sub.status.unwrap_or_default();
            let conditions: Vec<String> = status
                .conditions
                .iter()
                .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                .collect();
            let instances: Vec<(&Vec<String>, &Option<String>)> =
                status.nodes.iter().map(|n| (&n.instances, &n.link)).collect();
            println!("{:?}: {conditions:?} instances {instances:?}", sub.metadata.name);
        }
    }
    (true, crossed)
}

/// Whether the app printed `line`, before or within 30 s.
fn printed(app: &mut SlimApp, line: &str) -> bool {
    app.output().lines().any(|l| l == line) || app.wait_for(line, Duration::from_secs(30)).is_ok()
}

/// What a member app printed, without SLIM's log lines.
fn lines_of(app: &SlimApp) -> String {
    app.output().lines().filter(|l| !l.contains(" INFO ") && !l.contains(" WARN ")).collect::<Vec<_>>().join(" | ")
}

/// The links the Subscriptions' routes go over, on every node they are on.
async fn links_used(subs: &Api<Subscription>) -> std::collections::BTreeSet<String> {
    let list = subs.list(&Default::default()).await.map(|l| l.items).unwrap_or_default();
    if list
        .iter()
        .any(|sub| sub.status.as_ref().is_none_or(|s| s.nodes.is_empty() || s.nodes.iter().any(|n| !n.route_installed)))
    {
        return Default::default();
    }
    list.iter()
        .filter_map(|sub| sub.status.as_ref())
        .flat_map(|status| status.nodes.iter().map(|node| node.link.clone().or_else(|| status.link_id.clone())))
        .map(|link| link.unwrap_or_default())
        .collect()
}

/// After a warm-up, five rounds, each member publishing one message: true when every message
/// reached the other member exactly once and no member heard its own (a routing loop between the nodes shows as
/// both).
fn every_round_crosses_once(bob: &mut SlimApp, carol: &mut SlimApp) -> bool {
    const ROUNDS: usize = 5;
    if bob.wait_for("joined", Duration::from_secs(10)).is_err()
        || carol.wait_for("joined", Duration::from_secs(10)).is_err()
    {
        return false;
    }
    // The first messages may race the members' own subscriptions: a warm-up first.
    let warm = (0..5).any(|attempt| {
        bob.publish(&format!("warm-b-{attempt}")).ok();
        carol.publish(&format!("warm-a-{attempt}")).ok();
        let to_a = carol.wait_for(&format!("received warm-b-{attempt}"), Duration::from_secs(5)).is_ok();
        to_a && bob.wait_for(&format!("received warm-a-{attempt}"), Duration::from_secs(5)).is_ok()
    });
    if !warm {
        println!("no warm-up message crossed; bob (b): {}\ncarol (a): {}", bob.output(), carol.output());
        return false;
    }
    // Each publish waits for every member's acknowledgement (SLIM retransmits what is not
    // acknowledged): a round ends when both messages crossed and both were acknowledged.
    let mut slowest = Duration::ZERO;
    for round in 0..ROUNDS {
        let started = std::time::Instant::now();
        bob.publish(&format!("from-b-{round}")).ok();
        carol.publish(&format!("from-a-{round}")).ok();
        let done = [
            printed(carol, &format!("received from-b-{round}")),
            printed(bob, &format!("received from-a-{round}")),
            printed(bob, &format!("published from-b-{round}")),
            printed(carol, &format!("published from-a-{round}")),
        ];
        if done.iter().any(|printed| !printed) {
            let missing: Vec<usize> = done.iter().enumerate().filter(|(_, d)| !**d).map(|(i, _)| i).collect();
            println!(
                "round {round} did not cross (missing {missing:?}: 0 carol received, 1 bob received, 2 bob acked, 3 carol acked); bob (b): {}\ncarol (a): {}",
                lines_of(bob),
                lines_of(carol)
            );
            return false;
        }
        slowest = slowest.max(started.elapsed());
    }
    println!("group rounds: {ROUNDS}, the slowest crossed and acknowledged in {:.2} s", slowest.as_secs_f64());
    // Whatever a loop would still deliver arrives within a second.
    let _ = bob.wait_for("\u{0}", Duration::from_secs(1));
    let _ = carol.wait_for("\u{0}", Duration::from_secs(1));
    let count = |app: &SlimApp, line: String| app.output().lines().filter(|l| *l == line).count();
    (0..ROUNDS).all(|round| {
        let once = count(carol, format!("received from-b-{round}")) == 1
            && count(bob, format!("received from-a-{round}")) == 1
            && count(bob, format!("received from-b-{round}")) == 0
            && count(carol, format!("received from-a-{round}")) == 0;
        if !once {
            println!(
                "round {round}: a message twice or back to its sender; bob (b): {}\ncarol (a): {}",
                bob.output(),
                carol.output()
            );
        }
        once
    })
}

/// The link type × traffic matrix (README, Subscription reference). Measured on SLIM 3.4.6:
/// point-to-point sessions and group channels cross over every link type. Over `remote` and
/// `edge` the Subscriptions of the two sides share one connection (the side whose own link has
/// the higher id routes over the other side's), so a group message is fanned out once per node
/// and never comes back; every member's name is routed to the node it is on, or the members'
/// acknowledgements are lost. A `peer` link syncs subscriptions itself (one Subscription).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_each_link_type_carries() {
    init_logging();
    let only = std::env::var("SLIM_LINK_TYPES").unwrap_or_else(|_| "remote,peer,edge".into());
    for link_type in only.split(',') {
        let carries = carried_over(link_type).await;
        println!(
            "link {link_type:6} point-to-point session: {:5} group channel: joined {:5} messages both ways {}",
            carries.point_to_point, carries.group_joined, carries.group_crossed
        );
        assert!(carries.point_to_point, "{link_type}: a point-to-point session crosses");
        assert!(carries.group_joined, "{link_type}: both members join the channel");
        assert!(carries.group_crossed, "{link_type}: group messages cross both ways, once each, acknowledged");
    }
}

/// The quickstart's topology (03): a peer link one way, a remote Subscription back. The peer link
/// syncs alice's instance to b as well; an instance route of ours beside it broke every session
/// after the first (found by the node tier), so a node that reaches an instance over another link
/// gets none. A new session every second from one process: every one completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_link_and_a_remote_subscription_back_carry_repeated_sessions() {
    init_logging();
    let (client, namespace) = setup().await;
    let a = SlimNode::start("mixed-a").expect("node a");
    let b = SlimNode::start("mixed-b").expect("node b");
    let dir = tempfile::tempdir().expect("dir");
    let (_agent, socket) = slim_e2e::identity::dev_agent(dir.path()).await;
    let config = ControllerConfig {
        resync_interval: Duration::from_secs(30),
        watch_namespace: Some(namespace.clone()),
        ..Default::default()
    };
    let pool = NodePool::default();
    let (stop, controllers) =
        slim_e2e::operator::run_in_process(&client, pool.clone(), Default::default(), config, "mixed");
    let subs: Api<Subscription> = Api::namespaced(client.clone(), &namespace);
    for sub in [
        subscription("bob-via-b", "org/ns/bob", &a, &b, "peer"),
        subscription("alice-via-a", "org/ns/alice", &b, &a, "remote"),
    ] {
        subs.create(&PostParams::default(), &sub).await.expect("create");
    }
    for name in ["bob-via-b", "alice-via-a"] {
        wait_for(&format!("{name} Ready"), Duration::from_secs(60), async || {
            (condition(&subs.get(name).await.ok()?, "Ready")?.0 == "True").then_some(())
        })
        .await;
    }
    let identity = slim_e2e::spire_identity(&socket);
    let bob = SlimApp::identity_listener(&b, "org/ns/bob", &identity).expect("bob");
    let bob_on_a = SlimName::parse(&format!("org/ns/bob/{}", bob.instance)).expect("name").key();
    wait_for("bob's instance synced to a", Duration::from_secs(30), async || {
        let observed = pool.node(&a.controller_endpoint()).snapshot(Duration::ZERO).await.ok()?;
        observed.names.contains(&bob_on_a).then_some(())
    })
    .await;
    let mut alice = SlimApp::identity_sender(&a, "org/ns/alice", &identity, "org/ns/bob", 20).expect("alice");
    tokio::task::block_in_place(|| alice.wait_for("done ", Duration::from_secs(120))).expect("alice finishes");
    let output = alice.output();
    let lines: Vec<&str> = output.lines().filter(|l| l.starts_with("reply ") || l.starts_with("error ")).collect();
    let first = lines.iter().position(|l| l.starts_with("reply ")).unwrap_or(lines.len());
    let failed_after: Vec<&&str> = lines[first..].iter().filter(|l| l.starts_with("error ")).collect();
    println!(
        "peer one way, remote back: {} sessions, the first after {first} tries, {} failed after it",
        lines.len() - first - failed_after.len(),
        failed_after.len()
    );
    if !failed_after.is_empty() {
        for (label, node) in [("a", &a), ("b", &b)] {
            let observed = pool.node(&node.controller_endpoint()).snapshot(Duration::ZERO).await.expect("list");
            for name in ["org/ns/alice", "org/ns/bob"] {
                let key = SlimName::parse(name).expect("n").key();
                for (k, link) in observed.routes.iter().filter(|(k, _)| k.components == key.components) {
                    println!(
                        "{label}: route {name}/{:x} via {link} (node link: {})",
                        k.instance,
                        observed.links.contains(link)
                    );
                }
            }
        }
        let status = subs.get("alice-via-a").await.ok().and_then(|s| s.status);
        println!("alice-via-a: {status:?}");
    }
    assert!(lines.len() - first >= 7 && failed_after.is_empty(), "every session after the first works: {output}");
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controllers).await;
}
