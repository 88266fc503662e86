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

fn instance_route(name: &str, instance: &str, to: &SlimNode, link_type: &str) -> RouteRef {
    let spec = serde_json::from_value(json!({"endpoint": to.data_endpoint(), "connectionType": link_type}))
        .expect("link spec");
    let link = render_link(&spec, &ResolvedTls::default());
    RouteRef { name: SlimName::parse(&format!("{name}/{instance}")).expect("name"), link_id: link.link_id }
}

async fn has_route(pool: &NodePool, node: &SlimNode, route: &RouteRef) -> bool {
    let node = pool.node(&node.controller_endpoint());
    node.snapshot(Duration::ZERO).await.is_ok_and(|observed| observed.has_route(route))
}

/// One session from a new alice (on `a`) to bob (on `b`): once b routes alice's new instance
/// (the operator follows it), the session is opened, a message sent and bob's echo received.
async fn session(pool: &NodePool, a: &SlimNode, b: &SlimNode, message: &str) -> String {
    let mut alice = SlimApp::sender(a, "org/ns/alice", "org/ns/bob", message).expect("alice");
    let route = instance_route("org/ns/alice", &alice.instance, a, "remote");
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
    let config = ControllerConfig { resync_interval: Duration::from_secs(30), ..Default::default() };
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
    let bob_route = instance_route("org/ns/bob", &bob.instance, &b, "remote");
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
    assert_eq!(status.nodes[0].instances, [bob.instance.clone()], "status lists bob's instance on a");
    assert_eq!(status.far_node.as_deref(), Some(b.controller_endpoint().as_str()));

    // No route by hand: a whole session alice -> bob and back.
    let reply = session(&pool, &a, &b, "hello-1").await;
    assert_eq!(reply, "reply echo:hello-1");

    // bob restarts: a new instance. Routed on a within about a second of b listing it.
    drop(bob);
    let bob = SlimApp::listen(&b, "org/ns/bob").expect("bob again");
    let restarted = Instant::now();
    let new_route = instance_route("org/ns/bob", &bob.instance, &b, "remote");
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
