//! Subscription reconciles.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use kube::Resource;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::{EVENTS, Expect, context, context_with, event_reply, ready_of, serve};
use crate::api::{Subscription, SubscriptionSpec};
use crate::controller::subscription::{FINALIZER, reconcile};
use crate::controller::{ControllerConfig, Error};
use crate::plan::{ResolvedTls, render_link};
use crate::slim::SlimName;
use crate::slim::fake_node::FakeNode;

const SUBS: &str = "/apis/slim.agntcy.org/v1alpha1/namespaces/default/subscriptions/bob-route";
const STATUS: &str = "/apis/slim.agntcy.org/v1alpha1/namespaces/default/subscriptions/bob-route/status";
fn subscription(endpoints: &[String]) -> Subscription {
    let spec: SubscriptionSpec = serde_json::from_value(json!({
        "name": "org/ns/bob",
        "nodes": {"endpoints": endpoints},
        "link": {"endpoint": "http://slim-b.slim.svc:46357", "tls": {"insecure": true}},
    }))
    .expect("spec");
    let mut sub = Subscription::new("bob-route", spec);
    sub.meta_mut().namespace = Some("default".into());
    sub.meta_mut().uid = Some("uid-1".into());
    sub.meta_mut().generation = Some(2);
    sub.meta_mut().resource_version = Some("7".into());
    sub
}

fn finalized(mut sub: Subscription) -> Subscription {
    sub.meta_mut().finalizers = Some(vec![FINALIZER.into()]);
    sub
}

fn deleting(mut sub: Subscription) -> Subscription {
    sub.meta_mut().deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    sub
}

#[tokio::test]
async fn new_subscription_gets_the_finalizer_first() {
    let (ctx, handle) = context(ControllerConfig::default());
    let sub = subscription(&["http://127.0.0.1:1".into()]);
    let with_finalizer = serde_json::to_value(finalized(sub.clone())).expect("json");
    let server = tokio::spawn(serve(handle, vec![Expect { method: Method::PATCH, path: SUBS, reply: with_finalizer }]));
    let action = reconcile(Arc::new(sub), ctx).await.expect("reconciled");
    assert_eq!(action, Action::await_change());
    let bodies = server.await.expect("server");
    assert_eq!(
        bodies[0],
        json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
               {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}])
    );
}

#[tokio::test]
async fn apply_installs_the_route_and_reports_ready() {
    let node = FakeNode::start().await;
    let (ctx, handle) = context(ControllerConfig::default());
    let sub = finalized(subscription(std::slice::from_ref(&node.endpoint)));
    let server = tokio::spawn(serve(
        handle,
        vec![
            Expect { method: Method::PATCH, path: STATUS, reply: serde_json::to_value(&sub).expect("json") },
            Expect { method: Method::POST, path: EVENTS, reply: event_reply() },
        ],
    ));
    let action = reconcile(Arc::new(sub), ctx.clone()).await.expect("reconciled");
    assert!(action != Action::await_change(), "a synced Subscription is re-checked periodically");
    let bodies = server.await.expect("server");

    let status = &bodies[0];
    assert_eq!(status["apiVersion"], "slim.agntcy.org/v1alpha1");
    assert_eq!(ready_of(status), ("True", "RoutesInstalled"));
    assert_eq!(status["status"]["observedGeneration"], 2);
    assert_eq!(status["status"]["routeName"], "org/ns/bob");
    assert_eq!(status["status"]["nodes"][0]["endpoint"], node.endpoint.as_str());
    assert_eq!(status["status"]["nodes"][0]["routeInstalled"], true);
    assert_eq!(bodies[1]["reason"], "RouteInstalled");
    assert_eq!(bodies[1]["type"], "Normal");

    let link = render_link(&subscription(&[]).spec.link, &ResolvedTls::default());
    assert_eq!(status["status"]["linkId"], link.link_id.as_str());
    let state = node.state();
    assert!(state.links.contains_key(&link.link_id));
    let key = SlimName::parse("org/ns/bob").expect("name").key();
    assert!(state.routes.contains(&(key, link.link_id.clone())));
}

#[tokio::test]
async fn resync_of_an_in_sync_subscription_writes_nothing() {
    let node = FakeNode::start().await;
    let (ctx, handle) = context(ControllerConfig::default());
    let sub = finalized(subscription(std::slice::from_ref(&node.endpoint)));
    // First pass installs and writes status.
    let server = tokio::spawn(serve(
        handle,
        vec![
            Expect { method: Method::PATCH, path: STATUS, reply: sub_reply() },
            Expect { method: Method::POST, path: EVENTS, reply: event_reply() },
        ],
    ));
    reconcile(Arc::new(sub.clone()), ctx.clone()).await.expect("first pass");
    let bodies = server.await.expect("server");
    let mut synced = sub;
    synced.status = Some(serde_json::from_value(bodies[0]["status"].clone()).expect("status"));
    let commands = node.state().commands;

    // Second pass: same status, no Kubernetes call, no SLIM command.
    let (ctx2, handle2) = context_with(ControllerConfig::default(), ctx.nodes.clone());
    let server = tokio::spawn(serve(handle2, vec![]));
    reconcile(Arc::new(synced), ctx2).await.expect("resync");
    server.await.expect("server");
    assert_eq!(node.state().commands, commands, "no-change resync sent a command");
}

#[tokio::test]
async fn unreachable_node_is_not_ready_with_a_warning_and_a_retry() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let dead = format!("http://127.0.0.1:{port}");
    let (ctx, handle) = context(ControllerConfig::default());
    let sub = finalized(subscription(std::slice::from_ref(&dead)));
    let server = tokio::spawn(serve(
        handle,
        vec![
            Expect { method: Method::PATCH, path: STATUS, reply: sub_reply() },
            Expect { method: Method::POST, path: EVENTS, reply: event_reply() },
        ],
    ));
    let error = reconcile(Arc::new(sub.clone()), ctx.clone()).await.expect_err("node is down");
    assert_eq!(error.reason(), "NodeUnreachable");
    let bodies = server.await.expect("server");
    assert_eq!(ready_of(&bodies[0]), ("False", "NodeUnreachable"));
    assert_eq!(bodies[0]["status"]["nodes"][0]["routeInstalled"], false);
    assert!(bodies[0]["status"]["nodes"][0]["message"].as_str().unwrap_or("").contains(&dead));
    assert_eq!(bodies[1]["type"], "Warning");
    assert_eq!(bodies[1]["reason"], "NodeUnreachable");

    let first = crate::controller::error_policy(Arc::new(sub.clone()), &error, ctx.clone());
    let second = crate::controller::error_policy(Arc::new(sub), &error, ctx);
    assert!(first != second, "retries back off");
}

#[tokio::test]
async fn missing_secret_is_reported_before_touching_nodes() {
    let (ctx, handle) = context(ControllerConfig::default());
    let mut sub = finalized(subscription(&["http://127.0.0.1:1".into()]));
    sub.spec.link.endpoint = "https://slim-b:46357".into();
    sub.spec.link.tls = Some(serde_json::from_value(json!({"caSecretRef": {"name": "slim-ca"}})).expect("tls"));
    let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "secrets \"slim-ca\" not found"});
    let server = tokio::spawn(serve(
        handle,
        vec![
            Expect { method: Method::GET, path: "/api/v1/namespaces/default/secrets/slim-ca", reply: not_found },
            Expect { method: Method::PATCH, path: STATUS, reply: sub_reply() },
            Expect { method: Method::POST, path: EVENTS, reply: event_reply() },
        ],
    ));
    let error = reconcile(Arc::new(sub), ctx).await.expect_err("no secret");
    assert!(matches!(&error, Error::Finalizer(_)) && error.reason() == "SecretUnavailable", "{error}");
    let bodies = server.await.expect("server");
    assert_eq!(ready_of(&bodies[1]), ("False", "SecretUnavailable"));
    assert!(bodies[1]["status"]["conditions"][0]["message"].as_str().unwrap_or("").contains("slim-ca"));
}

#[tokio::test]
async fn delete_removes_route_and_link_then_releases_the_finalizer() {
    let node = FakeNode::start().await;
    let (ctx, handle) = context(ControllerConfig::default());
    let sub = finalized(subscription(std::slice::from_ref(&node.endpoint)));
    let server = tokio::spawn(serve(
        handle,
        vec![
            Expect { method: Method::PATCH, path: STATUS, reply: sub_reply() },
            Expect { method: Method::POST, path: EVENTS, reply: event_reply() },
        ],
    ));
    reconcile(Arc::new(sub.clone()), ctx.clone()).await.expect("installed");
    let bodies = server.await.expect("server");
    let mut installed = deleting(sub);
    installed.status = Some(serde_json::from_value(bodies[0]["status"].clone()).expect("status"));
    assert_eq!(node.state().routes.len(), 1);

    let (ctx2, handle2) = context_with(ControllerConfig::default(), ctx.nodes.clone());
    let server = tokio::spawn(serve(handle2, vec![Expect { method: Method::PATCH, path: SUBS, reply: sub_reply() }]));
    let action = reconcile(Arc::new(installed), ctx2).await.expect("cleaned up");
    assert_eq!(action, Action::await_change());
    let bodies = server.await.expect("server");
    assert_eq!(
        bodies[0],
        json!([{"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
               {"op": "remove", "path": "/metadata/finalizers/0"}])
    );
    let state = node.state();
    assert!(state.routes.is_empty() && state.links.is_empty(), "{state:?}");
}

#[tokio::test]
async fn delete_with_an_unreachable_node_waits_then_gives_up() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let dead = format!("http://127.0.0.1:{port}");
    let mut sub = deleting(finalized(subscription(std::slice::from_ref(&dead))));
    sub.status = Some(
        serde_json::from_value(json!({
            "routeName": "org/ns/bob", "linkId": "slimop-0123456789abcdef",
            "nodes": [{"endpoint": dead, "routeInstalled": true}]
        }))
        .expect("status"),
    );

    // Within the timeout: status says what is pending, the finalizer stays, a retry follows.
    let (ctx, handle) = context(ControllerConfig { cleanup_timeout: Duration::from_secs(3600), ..Default::default() });
    let server = tokio::spawn(serve(
        handle,
        vec![
            Expect { method: Method::PATCH, path: STATUS, reply: sub_reply() },
            Expect { method: Method::POST, path: EVENTS, reply: event_reply() },
        ],
    ));
    let error = reconcile(Arc::new(sub.clone()), ctx).await.expect_err("pending");
    assert_eq!(error.reason(), "CleanupPending");
    let bodies = server.await.expect("server");
    assert!(bodies[0]["status"]["nodes"][0]["message"].as_str().unwrap_or("").contains(&dead));

    // Past the timeout: a Warning event, then the finalizer is released.
    let (ctx, handle) = context(ControllerConfig { cleanup_timeout: Duration::ZERO, ..Default::default() });
    let server = tokio::spawn(serve(
        handle,
        vec![
            Expect { method: Method::POST, path: EVENTS, reply: event_reply() },
            Expect { method: Method::PATCH, path: SUBS, reply: sub_reply() },
        ],
    ));
    reconcile(Arc::new(sub), ctx).await.expect("released");
    let bodies = server.await.expect("server");
    assert_eq!(bodies[0]["reason"], "CleanupAbandoned");
    assert_eq!(bodies[0]["type"], "Warning");
    assert_eq!(bodies[1][1]["op"], "remove");
}

/// What the API server answers to a patch: the object.
fn sub_reply() -> Value {
    serde_json::to_value(subscription(&[])).expect("json")
}
