//! Benchmark: reconcile 1,000 Subscriptions spread over 2 real SLIM nodes.
//!
//!   cargo bench -p slim-e2e --bench subscriptions [-- --subscriptions N --concurrency C]
//!
//! Prints the time to converge, commands and messages per Subscription, the floor (the same
//! routes pushed as one raw command per node), a no-change resync (must send zero commands) and
//! the repair of a node that restarted empty. Each Subscription is reconciled the way the
//! controller does it (listing, plan, change), with the controller's default concurrency.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use futures::StreamExt;
use slim_e2e::SlimNode;
use slim_operator::api::{ConnectionType, LinkSpec};
use slim_operator::engine::{NodeReport, RouteSync};
use slim_operator::plan::{DesiredRoute, NoOtherUsers, NodeTarget, ResolvedTls, render_link};
use slim_operator::slim::{NodeChange, NodePool, SlimName};

struct Sub {
    desired: DesiredRoute,
    target: NodeTarget,
}

fn subscriptions(count: usize, a: &SlimNode, b: &SlimNode) -> Vec<Sub> {
    (0..count)
        .map(|i| {
            // Even ones on node a over a link to b, odd ones on b over a link to a.
            let (on, to) = if i % 2 == 0 { (a, b) } else { (b, a) };
            let spec = LinkSpec {
                endpoint: to.data_endpoint(),
                connection_type: ConnectionType::Remote,
                tls: None,
                controller: None,
            };
            let link = render_link(&spec, &ResolvedTls::default());
            let name = SlimName::parse(&format!("org/bench/app-{i}")).expect("name");
            Sub {
                desired: DesiredRoute::new(name, link),
                target: NodeTarget { endpoint: on.controller_endpoint(), pod: None },
            }
        })
        .collect()
}

/// Reconciles every Subscription once, `concurrency` at a time; returns reports and elapsed time.
async fn reconcile_all(
    pool: &NodePool,
    subs: &[Sub],
    installed: bool,
    concurrency: usize,
) -> (Vec<NodeReport>, Duration) {
    let start = Instant::now();
    let reports: Vec<Vec<NodeReport>> = futures::stream::iter(subs.iter().map(|sub| async move {
        let targets = [sub.target.clone()];
        let previous_nodes = if installed { vec![sub.target.endpoint.clone()] } else { vec![] };
        RouteSync {
            desired: Some(&sub.desired),
            targets: &targets,
            previous: installed.then_some(&sub.desired.route),
            previous_instances: &Default::default(),
            previous_nodes: &previous_nodes,
            users: &NoOtherUsers,
            max_snapshot_age: Duration::from_secs(2),
        }
        .run(pool)
        .await
    }))
    .buffer_unordered(concurrency)
    .collect()
    .await;
    (reports.into_iter().flatten().collect(), start.elapsed())
}

#[derive(Clone, Copy, Default)]
struct Counters {
    commands: u64,
    messages: u64,
}

fn counters(pool: &NodePool) -> Counters {
    pool.clients().iter().fold(Counters::default(), |acc, c| Counters {
        commands: acc.commands + c.stats().writes.load(Relaxed),
        messages: acc.messages + c.stats().rpcs.load(Relaxed),
    })
}

fn delta(after: Counters, before: Counters) -> Counters {
    Counters { commands: after.commands - before.commands, messages: after.messages - before.messages }
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let count = arg("--subscriptions", 1000);
    let concurrency = arg("--concurrency", 16);
    println!("subscriptions: {count}, reconcile concurrency: {concurrency}, nodes: 2 real SLIM 3.4.6 (slim-bindings)");

    // Floor: the same routes as one raw command per node, on a fresh pair.
    let (fa, fb) = (SlimNode::start("floor-a").expect("node"), SlimNode::start("floor-b").expect("node"));
    let floor_pool = NodePool::default();
    let floor_subs = subscriptions(count, &fa, &fb);
    for node in [&fa, &fb] {
        floor_pool.node(&node.controller_endpoint()).snapshot(Duration::ZERO).await.expect("connect");
    }
    let start = Instant::now();
    let batches = [&fa, &fb].map(|node| {
        let endpoint = node.controller_endpoint();
        let mine: Vec<&Sub> = floor_subs.iter().filter(|s| s.target.endpoint == endpoint).collect();
        let change = NodeChange {
            create_links: vec![mine[0].desired.link.clone()],
            set_routes: mine.iter().map(|s| s.desired.route.clone()).collect(),
            ..Default::default()
        };
        let client = floor_pool.node(&endpoint);
        async move { client.apply(change).await }
    });
    for outcome in futures::future::join_all(batches).await {
        assert!(outcome.expect("raw batch").failures.is_empty());
    }
    let floor = start.elapsed();
    println!("floor (one raw command per node):        {:>8.1} ms", floor.as_secs_f64() * 1e3);

    // The operator's path on a second fresh pair.
    let (a, mut b) = (SlimNode::start("node-a").expect("node"), SlimNode::start("node-b").expect("node"));
    let pool = NodePool::default();
    let subs = subscriptions(count, &a, &b);
    for node in [&a, &b] {
        pool.node(&node.controller_endpoint()).snapshot(Duration::ZERO).await.expect("connect");
    }
    let before = counters(&pool);
    let (reports, converge) = reconcile_all(&pool, &subs, false, concurrency).await;
    let used = delta(counters(&pool), before);
    assert!(reports.iter().all(NodeReport::ok), "every Subscription converged");
    let per = |n: u64| n as f64 / count as f64;
    println!(
        "converge ({count} reconciles):              {:>8.1} ms  ({:.2}x floor)",
        converge.as_secs_f64() * 1e3,
        converge.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "  commands per Subscription: {:.3} ({} in all), messages per Subscription: {:.3}",
        per(used.commands),
        used.commands,
        per(used.messages)
    );
    for node in [&a, &b] {
        let seen = pool.node(&node.controller_endpoint()).snapshot(Duration::ZERO).await.expect("list");
        assert_eq!(seen.routes.len(), count / 2, "node lists every route");
    }

    // No-change resync: nothing to write.
    tokio::time::sleep(Duration::from_secs(3)).await; // let cached listings age out, as a periodic resync would
    let before = counters(&pool);
    let (reports, resync) = reconcile_all(&pool, &subs, true, concurrency).await;
    let used = delta(counters(&pool), before);
    assert!(reports.iter().all(NodeReport::ok));
    println!(
        "no-change resync:                         {:>8.1} ms  commands: {}  messages: {}",
        resync.as_secs_f64() * 1e3,
        used.commands,
        used.messages
    );
    assert_eq!(used.commands, 0, "a no-change resync must send no command");

    // Drift repair: node b restarts empty; the reconnect triggers a resync of everything.
    b.restart().expect("restart");
    let mut events = pool.events();
    let _ = tokio::time::timeout(Duration::from_secs(30), events.recv()).await;
    let before = counters(&pool);
    let (reports, repair) = reconcile_all(&pool, &subs, true, concurrency).await;
    let used = delta(counters(&pool), before);
    assert!(reports.iter().all(NodeReport::ok));
    let repaired = reports.iter().filter(|r| r.wrote()).count();
    println!(
        "repair after node restart:                {:>8.1} ms  routes repaired: {repaired}  commands: {}",
        repair.as_secs_f64() * 1e3,
        used.commands
    );
    println!(
        "result: converge/floor = {:.2} (target <= 2.0), no-change resync commands = 0",
        converge.as_secs_f64() / floor.as_secs_f64()
    );
}
