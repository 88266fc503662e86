//! Benchmark: Subscriptions whose routes follow their names' live instances (the controllers in
//! this process, the real API server, real SLIM nodes).
//!
//!   cargo bench -p slim-e2e --bench instances [-- --subscriptions N]
//!
//! 1,000 Subscriptions on node a over a `remote` link to node b; b reaches 2 live instances of each
//! name (routes over a link to a third node, as b's list shows an app's instances). Phase 1 applies
//! them with `instances: None` (the bare names only); phase 2 switches them all to `Follow`.
//! Prints, for phase 2: the time until every instance route is on node a, the extra commands and
//! route items per Subscription, and how often node b was listed (one listing per period for all
//! Subscriptions, never one per Subscription).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use slim_e2e::control_plane::{self, install_crds};
use slim_e2e::{SlimNode, wait_for};
use slim_operator::api::{LinkSpec, Subscription};
use slim_operator::controller::ControllerConfig;
use slim_operator::plan::{ResolvedTls, render_link};
use slim_operator::slim::{NodeChange, NodePool, RouteRef, SlimName};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn followed(sub: &Subscription, instances: usize) -> bool {
    sub.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
            && s.nodes.iter().all(|n| n.instances.len() == instances)
            && !s.nodes.is_empty()
    })
}

/// Two instances of every name reachable from `b` (routes over a link to `c`).
async fn live_instances_on(pool: &NodePool, b: &SlimNode, c: &SlimNode, count: usize) {
    let spec: LinkSpec = serde_json::from_value(json!({"endpoint": c.data_endpoint()})).expect("link");
    let link = render_link(&spec, &ResolvedTls::default());
    let routes: Vec<RouteRef> = (0..count)
        .flat_map(|i| {
            let name = SlimName::parse(&format!("org/bench/app-{i}")).expect("name");
            (1..=2u128)
                .map(move |n| RouteRef { name: name.with_instance((i as u128) << 8 | n), link_id: String::new() })
        })
        .map(|r| RouteRef { link_id: link.link_id.clone(), ..r })
        .collect();
    let node = pool.node(&b.controller_endpoint());
    for chunk in routes.chunks(500) {
        let change = NodeChange { create_links: vec![link.clone()], set_routes: chunk.to_vec(), ..Default::default() };
        node.apply(change).await.expect("instances on b");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let count = arg("--subscriptions", 1000);
    let plane = control_plane::shared();
    let client = plane.client().await.expect("admin client");
    install_crds(&client).await.expect("CRDs");
    let namespace = plane.namespace(&client, "instances").await.expect("namespace");
    let (a, b, c) =
        (SlimNode::start("a").expect("a"), SlimNode::start("b").expect("b"), SlimNode::start("c").expect("c"));
    let pool = NodePool::default();
    live_instances_on(&pool, &b, &c, count).await;
    println!("subscriptions: {count}, each name with 2 live instances on the far node; 3 real SLIM 3.4.6 nodes");

    let config = ControllerConfig { resync_interval: Duration::from_secs(600), ..Default::default() };
    let (stop, controllers) =
        slim_e2e::operator::run_in_process(&client, pool.clone(), Default::default(), config, "instances-bench");
    let subs: Api<Subscription> = Api::namespaced(client.clone(), &namespace);
    let apply = |mode: &'static str| {
        let subs = subs.clone();
        let (a, b) = (a.controller_endpoint(), b.clone_endpoints());
        async move {
            let started = Instant::now();
            futures::future::join_all((0..count).collect::<Vec<_>>().chunks(50).map(|chunk| {
                let (subs, a, b) = (subs.clone(), a.clone(), b.clone());
                async move {
                    for &i in chunk {
                        let sub: Subscription = serde_json::from_value(json!({
                            "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription",
                            "metadata": {"name": format!("app-{i}")},
                            "spec": {"name": format!("org/bench/app-{i}"), "instances": mode,
                                     "nodes": {"endpoints": [a]},
                                     "link": {"endpoint": b.0, "controller": b.1}}
                        }))
                        .expect("subscription");
                        let params = PatchParams::apply("bench").force();
                        subs.patch(&format!("app-{i}"), &params, &Patch::Apply(&sub)).await.expect("apply");
                    }
                }
            }))
            .await;
            started
        }
    };

    let node_a = pool.node(&a.controller_endpoint());
    let node_b = pool.node(&b.controller_endpoint());
    let started = apply("None").await;
    wait_for("every bare-name route", Duration::from_secs(900), async || {
        let list = subs.list(&Default::default()).await.ok()?;
        (list.items.iter().filter(|s| followed(s, 0)).count() == count).then_some(())
    })
    .await;
    println!("phase 1 (instances: None): all Ready after {:.1} s", started.elapsed().as_secs_f64());

    let (writes, items, lists) = (
        node_a.stats().writes.load(Relaxed),
        node_a.stats().route_items.load(Relaxed),
        node_b.stats().rpcs.load(Relaxed),
    );
    let started = apply("Follow").await;
    wait_for("every instance route", Duration::from_secs(900), async || {
        let list = subs.list(&Default::default()).await.ok()?;
        (list.items.iter().filter(|s| followed(s, 2)).count() == count).then_some(())
    })
    .await;
    let converged = started.elapsed();
    let on_a = node_a.snapshot(Duration::ZERO).await.expect("list a");
    let instance_routes = on_a.routes.iter().filter(|(k, _)| k.instance != u128::MAX).count();
    let extra_writes = node_a.stats().writes.load(Relaxed) - writes;
    let extra_items = node_a.stats().route_items.load(Relaxed) - items;
    let b_rpcs = node_b.stats().rpcs.load(Relaxed) - lists;
    println!(
        "phase 2 (Follow): all {} instance routes on node a after {:.1} s ({instance_routes} listed by a)",
        count * 2,
        converged.as_secs_f64()
    );
    println!(
        "extra commands to node a: {extra_writes} ({:.3} per Subscription), route items {extra_items} ({:.2} per Subscription)",
        extra_writes as f64 / count as f64,
        extra_items as f64 / count as f64
    );
    println!(
        "node b (the far node) control messages while converging: {b_rpcs} ({:.3} per Subscription; {:.1} per second)",
        b_rpcs as f64 / count as f64,
        b_rpcs as f64 / converged.as_secs_f64().max(0.1)
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controllers).await;
}

trait Endpoints {
    fn clone_endpoints(&self) -> (String, String);
}

impl Endpoints for SlimNode {
    /// (data endpoint, controller endpoint)
    fn clone_endpoints(&self) -> (String, String) {
        (self.data_endpoint(), self.controller_endpoint())
    }
}
