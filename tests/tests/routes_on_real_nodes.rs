//! The route engine against real SLIM nodes: what the operator installs is checked through the
//! nodes' own list APIs, and with real SLIM apps exchanging messages across two nodes.

use std::time::Duration;

use slim_e2e::{SlimApp, SlimNode, init_logging};
use slim_operator::api::{ConnectionType, LinkSpec};
use slim_operator::engine::{NodeReport, NodeResult, RouteSync};
use slim_operator::plan::{DesiredRoute, NoOtherUsers, NodeTarget, ResolvedTls, Users, render_link};
use slim_operator::slim::{NodeEvent, NodePool, Observed, RouteRef, SlimName};

fn desired(name: &str, to: &SlimNode) -> DesiredRoute {
    let spec =
        LinkSpec { endpoint: to.data_endpoint(), connection_type: ConnectionType::Remote, tls: None, controller: None };
    let link = render_link(&spec, &ResolvedTls::default());
    let name = SlimName::parse(name).expect("valid name");
    DesiredRoute::new(name, link)
}

fn target(node: &SlimNode) -> NodeTarget {
    NodeTarget { endpoint: node.controller_endpoint(), pod: None }
}

async fn install(
    pool: &NodePool,
    want: &DesiredRoute,
    nodes: &[&SlimNode],
    previous: Option<&RouteRef>,
) -> Vec<NodeReport> {
    let targets: Vec<NodeTarget> = nodes.iter().map(|n| target(n)).collect();
    let previous_nodes: Vec<String> = targets.iter().map(|t| t.endpoint.clone()).collect();
    RouteSync {
        desired: Some(want),
        targets: &targets,
        previous,
        previous_instances: &Default::default(),
        previous_nodes: &previous_nodes,
        users: &NoOtherUsers,
        max_snapshot_age: Duration::ZERO,
    }
    .run(pool)
    .await
}

async fn remove(pool: &NodePool, route: &RouteRef, node: &SlimNode, users: &(dyn Users + Sync)) -> Vec<NodeReport> {
    RouteSync {
        desired: None,
        targets: &[],
        previous: Some(route),
        previous_instances: &Default::default(),
        previous_nodes: &[node.controller_endpoint()],
        users,
        max_snapshot_age: Duration::ZERO,
    }
    .run(pool)
    .await
}

/// The node's own listing, fresh.
async fn listed(pool: &NodePool, node: &SlimNode) -> Observed {
    pool.node(&node.controller_endpoint()).snapshot(Duration::ZERO).await.expect("list routes").as_ref().clone()
}

fn assert_in_sync(reports: &[NodeReport], wrote: bool) {
    for report in reports {
        assert_eq!(report.result, NodeResult::InSync { wrote }, "{report:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_is_installed_kept_updated_and_removed() {
    init_logging();
    let a = SlimNode::start("node-a").expect("node a");
    let b = SlimNode::start("node-b").expect("node b");
    let pool = NodePool::default();

    let bob = desired("org/ns/bob", &b);
    assert_in_sync(&install(&pool, &bob, &[&a], None).await, true);
    let seen = listed(&pool, &a).await;
    assert!(seen.links.contains(&bob.link.link_id), "link listed by the node: {seen:?}");
    assert!(seen.has_route(&bob.route), "route listed by the node: {seen:?}");

    // A resync that finds nothing to change sends no command.
    let client = pool.node(&a.controller_endpoint());
    let writes = client.stats().writes.load(std::sync::atomic::Ordering::Relaxed);
    assert_in_sync(&install(&pool, &bob, &[&a], Some(&bob.route)).await, false);
    assert_eq!(client.stats().writes.load(std::sync::atomic::Ordering::Relaxed), writes, "no-change resync wrote");

    // Update: the name changes; the old route goes, the shared link stays.
    let carol = desired("org/ns/carol", &b);
    assert_in_sync(&install(&pool, &carol, &[&a], Some(&bob.route)).await, true);
    let seen = listed(&pool, &a).await;
    assert!(seen.has_route(&carol.route) && !seen.has_route(&bob.route), "{seen:?}");
    assert!(seen.links.contains(&carol.link.link_id));

    // Delete: route and link are gone from the node.
    assert_in_sync(&remove(&pool, &carol.route, &a, &NoOtherUsers).await, true);
    let seen = listed(&pool, &a).await;
    assert!(!seen.has_route(&carol.route), "{seen:?}");
    assert!(!seen.links.contains(&carol.link.link_id), "{seen:?}");

    // Removing what is already gone is done, without a command.
    assert_in_sync(&remove(&pool, &carol.route, &a, &NoOtherUsers).await, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_link_is_deleted_only_by_its_last_user() {
    init_logging();
    let a = SlimNode::start("node-a").expect("node a");
    let b = SlimNode::start("node-b").expect("node b");
    let pool = NodePool::default();
    let bob = desired("org/ns/bob", &b);
    let carol = desired("org/ns/carol", &b);
    assert_eq!(bob.link.link_id, carol.link.link_id, "equal link specs share one link");
    assert_in_sync(&install(&pool, &bob, &[&a], None).await, true);
    assert_in_sync(&install(&pool, &carol, &[&a], None).await, true);

    struct CarolStillThere(String);
    impl Users for CarolStillThere {
        fn link_in_use(&self, _: &str, link: &str) -> bool {
            link == self.0
        }
        fn route_in_use(&self, _: &str, _: &RouteRef) -> bool {
            false
        }
    }
    assert_in_sync(&remove(&pool, &bob.route, &a, &CarolStillThere(carol.link.link_id.clone())).await, true);
    let seen = listed(&pool, &a).await;
    assert!(!seen.has_route(&bob.route) && seen.has_route(&carol.route), "{seen:?}");
    assert!(seen.links.contains(&carol.link.link_id), "carol still uses the link: {seen:?}");

    assert_in_sync(&remove(&pool, &carol.route, &a, &NoOtherUsers).await, true);
    let seen = listed(&pool, &a).await;
    assert!(!seen.links.contains(&carol.link.link_id), "last user gone: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_is_detected_and_repaired() {
    init_logging();
    let mut a = SlimNode::start("node-a").expect("node a");
    let b = SlimNode::start("node-b").expect("node b");
    let pool = NodePool::default();
    let bob = desired("org/ns/bob", &b);
    let mut events = pool.events();
    assert_in_sync(&install(&pool, &bob, &[&a], None).await, true);

    a.restart().expect("restart node a");
    let event = tokio::time::timeout(Duration::from_secs(60), events.recv())
        .await
        .expect("reconnect announced")
        .expect("event channel open");
    assert_eq!(event, NodeEvent::Reconnected { endpoint: a.controller_endpoint() });
    let seen = listed(&pool, &a).await;
    assert!(!seen.has_route(&bob.route), "a restarted node has lost its routes: {seen:?}");

    // The resync the event triggers reinstalls link and route.
    assert_in_sync(&install(&pool, &bob, &[&a], Some(&bob.route)).await, true);
    let seen = listed(&pool, &a).await;
    assert!(seen.has_route(&bob.route) && seen.links.contains(&bob.link.link_id), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_node_is_reported_not_fatal() {
    init_logging();
    let a = SlimNode::start("node-a").expect("node a");
    let b = SlimNode::start("node-b").expect("node b");
    let pool = NodePool::default();
    let bob = desired("org/ns/bob", &b);
    let dead = NodeTarget { endpoint: format!("http://127.0.0.1:{}", slim_e2e::free_port().expect("port")), pod: None };
    let targets = vec![target(&a), dead.clone()];
    let reports = RouteSync {
        desired: Some(&bob),
        targets: &targets,
        previous: None,
        previous_instances: &Default::default(),
        previous_nodes: &[],
        users: &NoOtherUsers,
        max_snapshot_age: Duration::ZERO,
    }
    .run(&pool)
    .await;
    let by_node = |endpoint: &str| reports.iter().find(|r| r.endpoint == endpoint).expect("report").result.clone();
    assert_eq!(by_node(&a.controller_endpoint()), NodeResult::InSync { wrote: true }, "the live node is not held up");
    assert!(matches!(by_node(&dead.endpoint), NodeResult::Unreachable { .. }), "{reports:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_on_two_nodes_exchange_messages_over_installed_routes() {
    init_logging();
    let a = SlimNode::start("node-a").expect("node a");
    let b = SlimNode::start("node-b").expect("node b");
    let pool = NodePool::default();

    let mut bob = SlimApp::listen(&b, "org/ns/bob").expect("bob on node b");
    let mut alice = SlimApp::sender(&a, "org/ns/alice", "org/ns/bob", "hello over the operator").expect("alice");

    // Discovery goes to the bare name; session traffic to each side's instance.
    let bob_any = desired("org/ns/bob", &b);
    let bob_instance = desired(&format!("org/ns/bob/{}", bob.instance), &b);
    let alice_instance = desired(&format!("org/ns/alice/{}", alice.instance), &a);
    assert_in_sync(&install(&pool, &bob_any, &[&a], None).await, true);
    assert_in_sync(&install(&pool, &bob_instance, &[&a], None).await, true);
    assert_in_sync(&install(&pool, &alice_instance, &[&b], None).await, true);

    alice.go().expect("start alice");
    let reply = alice.wait_for("reply ", Duration::from_secs(60)).unwrap_or_else(|e| {
        panic!(
            "no reply: {e}\nalice: {}\nbob: {}\nnode a: {}\nnode b: {}",
            alice.output(),
            bob.output(),
            a.log(),
            b.log()
        )
    });
    assert_eq!(reply, "reply echo:hello over the operator");
    bob.wait_for("received hello over the operator", Duration::from_secs(5)).expect("bob saw the message");
}
