//! The node client against the in-process fake node: batching, listings, reconnects.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::fake_node::FakeNode;
use super::{LinkConfig, NodeChange, NodeEvent, NodePool, RouteRef, SlimName};

fn link(id: &str) -> LinkConfig {
    LinkConfig { link_id: id.into(), config_data: format!("{{\"link_id\":\"{id}\"}}") }
}

fn route(name: &str, link: &str) -> RouteRef {
    RouteRef { name: SlimName::parse(name).expect("valid"), link_id: link.into() }
}

#[tokio::test]
async fn concurrent_changes_are_merged_into_few_commands() {
    let node = FakeNode::start().await;
    let pool = NodePool::default();
    let client = pool.node(&node.endpoint);
    client.snapshot(Duration::ZERO).await.expect("connected");
    let changes = (0..300).map(|i| {
        let client = client.clone();
        async move {
            client
                .apply(NodeChange {
                    create_links: vec![link("l1")],
                    set_routes: vec![route(&format!("o/n/app{i}"), "l1")],
                    ..Default::default()
                })
                .await
        }
    });
    for outcome in futures::future::join_all(changes).await {
        assert!(outcome.expect("applied").failures.is_empty());
    }
    let commands = node.state().commands;
    assert_eq!(node.state().routes.len(), 300);
    assert!(commands <= 10, "300 concurrent callers should share commands, took {commands}");
    assert_eq!(client.stats().writes.load(Relaxed) as usize, commands);
}

#[tokio::test]
async fn listings_are_read_to_the_end_and_cached_coherently() {
    let node = FakeNode::start().await;
    let pool = NodePool::default();
    let client = pool.node(&node.endpoint);
    let routes: Vec<RouteRef> = (0..250).map(|i| route(&format!("o/n/app{i}"), "l1")).collect();
    client
        .apply(NodeChange { create_links: vec![link("l1")], set_routes: routes.clone(), ..Default::default() })
        .await
        .expect("applied");
    let fresh = client.snapshot(Duration::ZERO).await.expect("listed");
    assert_eq!(fresh.routes.len(), 250, "three chunks of a listing read until done");
    let messages = client.stats().rpcs.load(Relaxed);
    let cached = client.snapshot(Duration::from_secs(60)).await.expect("cached");
    assert_eq!(client.stats().rpcs.load(Relaxed), messages, "a fresh enough listing is reused");
    assert_eq!(cached, fresh);

    client.apply(NodeChange { delete_routes: vec![routes[0].clone()], ..Default::default() }).await.expect("deleted");
    let after = client.snapshot(Duration::from_secs(60)).await.expect("cached");
    assert!(!after.has_route(&routes[0]), "acked changes update the cache");
    assert_eq!(after.routes.len(), 249);
}

#[tokio::test]
async fn refused_items_and_missing_deletes_are_reported_per_item() {
    let node = FakeNode::start().await;
    let client = NodePool::default().node(&node.endpoint);
    let outcome = client
        .apply(NodeChange { set_routes: vec![route("o/n/a", "nolink")], ..Default::default() })
        .await
        .expect("acked");
    assert_eq!(outcome.failures.len(), 1);
    assert!(outcome.failures[0].message.contains("not found"), "{outcome:?}");
    let outcome = client
        .apply(NodeChange {
            delete_routes: vec![route("o/n/gone", "l1")],
            delete_links: vec!["l1".into()],
            ..Default::default()
        })
        .await
        .expect("acked");
    assert!(outcome.failures.is_empty(), "deleting what is gone is success: {outcome:?}");
}

#[tokio::test]
async fn restart_is_announced_and_pending_callers_fail_fast() {
    let node = FakeNode::start().await;
    let pool = NodePool::default();
    let mut events = pool.events();
    let client = pool.node(&node.endpoint);
    client.snapshot(Duration::ZERO).await.expect("connected");
    node.restart();
    let event = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("announced").expect("open");
    assert_eq!(event, NodeEvent::Reconnected { endpoint: node.endpoint.clone() });
    let fresh = client.snapshot(Duration::from_secs(60)).await.expect("listed after reconnect");
    assert!(fresh.routes.is_empty(), "the cache was dropped with the old stream");
}

#[tokio::test]
async fn unreachable_node_fails_with_its_endpoint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let client = NodePool::default().node(&endpoint);
    let error = client.snapshot(Duration::ZERO).await.expect_err("nothing listens there");
    assert!(error.to_string().contains(&endpoint), "{error}");
}
