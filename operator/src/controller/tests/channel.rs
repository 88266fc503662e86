//! SlimChannel reconciles, against a fake channel manager.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use kube::Resource;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::{EVENTS, Expect, context, context_with_triggers, event_reply, ready_of, serve};
use crate::api::SlimChannel;
use crate::controller::channel::{FINALIZER, reconcile};
use crate::controller::{ControllerConfig, Error};
use crate::slim::NodePool;
use crate::slim::fake_channel_manager::{FakeChannelManager, MANAGER_NAME};

const CHANNELS: &str = "/apis/slim.agntcy.org/v1alpha1/namespaces/default/slimchannels/chat";
const STATUS: &str = "/apis/slim.agntcy.org/v1alpha1/namespaces/default/slimchannels/chat/status";

fn channel(spec: Value) -> SlimChannel {
    let mut channel = SlimChannel::new("chat", serde_json::from_value(spec).expect("spec"));
    channel.meta_mut().namespace = Some("default".into());
    channel.meta_mut().uid = Some("uid-2".into());
    channel.meta_mut().generation = Some(1);
    channel.meta_mut().finalizers = Some(vec![FINALIZER.into()]);
    channel
}

fn reply() -> Value {
    serde_json::to_value(channel(json!({"name": "org/ns/chat"}))).expect("json")
}

fn participants(status_patch: &Value) -> Vec<(String, bool)> {
    status_patch["status"]["participants"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|p| (p["name"].as_str().unwrap_or("").to_owned(), p["joined"].as_bool().unwrap_or(false)))
                .collect()
        })
        .unwrap_or_default()
}

/// These channels consult no nodes (no `spec.nodes`, no default node set): the default node set,
/// a Pod LIST and route lists, is exercised on the real API server (tests/tests/cluster.rs).
fn without_default_nodes() -> ControllerConfig {
    ControllerConfig { default_nodes: Default::default(), ..Default::default() }
}

#[tokio::test]
async fn channel_is_created_and_participants_join_without_waiting_for_an_offline_one() {
    let cm = FakeChannelManager::start().await;
    cm.state().offline.insert("org/ns/dave".into());
    cm.state().offline_delay = Duration::from_secs(3);
    let (ctx, handle, mut triggers) = context_with_triggers(without_default_nodes(), NodePool::default());
    let ch = channel(json!({
        "name": "org/ns/chat",
        "channelManager": {"endpoint": cm.endpoint},
        "participants": ["org/ns/bob", "org/ns/carol", "org/ns/dave"],
    }));

    // First pass: the channel is created, invites start, status says so.
    let server = tokio::spawn(serve(
        handle,
        vec![
            Expect { method: Method::PATCH, path: STATUS, reply: reply() },
            Expect { method: Method::POST, path: EVENTS, reply: event_reply() },
            Expect { method: Method::POST, path: EVENTS, reply: event_reply() },
        ],
    ));
    let action = reconcile(Arc::new(ch.clone()), ctx.clone()).await.expect("reconciled");
    assert_eq!(action, Action::requeue(Duration::from_secs(10)), "busy: a finished invite triggers the next look");
    let bodies = server.await.expect("server");
    assert_eq!(ready_of(&bodies[0]), ("False", "ParticipantsPending"));
    assert_eq!(bodies[0]["status"]["mlsEnabled"], true);
    assert_eq!(bodies[0]["status"]["channelManager"], cm.endpoint.as_str());
    assert_eq!(bodies[1]["reason"], "ChannelCreated");
    assert_eq!(bodies[2]["reason"], "MembersUnwatched", "no node consulted: said once");
    assert!(cm.state().channels.contains_key("org/ns/chat"));

    // Bob's and carol's invites finish well before dave's fails, and each asks for a reconcile.
    for _ in 0..2 {
        let done =
            tokio::time::timeout(Duration::from_secs(2), triggers.recv()).await.expect("a trigger").expect("open");
        assert_eq!(done.name, "chat");
    }
    let mut observed = ch.clone();
    observed.status = Some(serde_json::from_value(bodies[0]["status"].clone()).expect("status"));
    let (ctx2, handle2, _) = context_with_triggers(without_default_nodes(), NodePool::default());
    let ctx2 = Arc::new(crate::controller::Context { channel_engine: ctx.channel_engine.clone(), ..share(ctx2) });
    let server = tokio::spawn(serve(
        handle2,
        vec![
            Expect { method: Method::PATCH, path: STATUS, reply: reply() },
            Expect { method: Method::POST, path: EVENTS, reply: event_reply() },
        ],
    ));
    reconcile(Arc::new(observed), ctx2).await.expect("reconciled");
    let bodies = server.await.expect("server");
    let state = participants(&bodies[0]);
    assert_eq!(
        state,
        vec![("org/ns/bob".into(), true), ("org/ns/carol".into(), true), ("org/ns/dave".into(), false)],
        "online participants are in while dave's invite is still under way"
    );
    assert_eq!((bodies[0]["status"]["joined"].as_i64(), bodies[0]["status"]["desired"].as_i64()), (Some(2), Some(3)));
    assert_eq!(bodies[1]["reason"], "ParticipantsJoined");
    let listed: Vec<String> = cm.state().channels["org/ns/chat"].1.iter().cloned().collect();
    assert!(listed.contains(&MANAGER_NAME.to_owned()), "the manager lists itself");
}

/// A context sharing nothing but what the test passes in (helper for `..` struct updates).
fn share(ctx: Arc<crate::controller::Context>) -> crate::controller::Context {
    Arc::try_unwrap(ctx).ok().expect("the only reference")
}

#[tokio::test]
async fn removed_participants_leave_and_others_stay() {
    let cm = FakeChannelManager::start().await;
    let (ctx, handle, mut triggers) = context_with_triggers(without_default_nodes(), NodePool::default());
    // The channel exists with bob and carol; carol is no longer desired.
    {
        let mut state = cm.state();
        let members =
            ["org/ns/bob/0b3c5a8e-1111-4222-8333-944455556666", "org/ns/carol/0b3c5a8e-1111-4222-8333-944455556667"];
        state.channels.insert(
            "org/ns/chat".into(),
            (true, members.iter().map(|m| m.to_string()).chain([MANAGER_NAME.to_owned()]).collect()),
        );
    }
    let mut ch = channel(
        json!({"name": "org/ns/chat", "channelManager": {"endpoint": cm.endpoint}, "participants": ["org/ns/bob"]}),
    );
    ch.status = Some(
        serde_json::from_value(json!({
            "mlsEnabled": true, "channelManager": cm.endpoint, "joined": 2, "desired": 2,
            "participants": [{"name": "org/ns/bob", "joined": true}, {"name": "org/ns/carol", "joined": true}]
        }))
        .expect("status"),
    );
    let server = tokio::spawn(serve(
        handle,
        vec![
            Expect { method: Method::PATCH, path: STATUS, reply: reply() },
            Expect { method: Method::POST, path: EVENTS, reply: event_reply() },
        ],
    ));
    reconcile(Arc::new(ch), ctx).await.expect("reconciled");
    let bodies = server.await.expect("server");
    assert_eq!(bodies[1]["reason"], "MembersUnwatched");
    let leaving: Vec<&Value> = bodies[0]["status"]["participants"]
        .as_array()
        .expect("participants")
        .iter()
        .filter(|p| p["leaving"] == true)
        .collect();
    assert_eq!(leaving.len(), 1);
    assert_eq!(leaving[0]["name"], "org/ns/carol");
    // The removal runs in the background; its end asks for a reconcile.
    tokio::time::timeout(Duration::from_secs(2), triggers.recv()).await.expect("removal finished").expect("open");
    let state = cm.state();
    assert!(state.calls.contains(&"DeleteParticipant org/ns/chat org/ns/carol".to_owned()), "{:?}", state.calls);
    assert!(!state.calls.iter().any(|c| c.contains("channel-manager")), "the manager itself is never removed");
    assert!(state.channels["org/ns/chat"].1.iter().any(|m| m.starts_with("org/ns/bob/")));
}

#[tokio::test]
async fn mls_change_on_a_live_channel_is_refused_with_a_condition() {
    let cm = FakeChannelManager::start().await;
    let (ctx, handle) = context(without_default_nodes());
    let mut ch =
        channel(json!({"name": "org/ns/chat", "mlsEnabled": false, "channelManager": {"endpoint": cm.endpoint}}));
    ch.status = Some(serde_json::from_value(json!({"mlsEnabled": true})).expect("status"));
    let server = tokio::spawn(serve(handle, vec![Expect { method: Method::PATCH, path: STATUS, reply: reply() }]));
    let action = reconcile(Arc::new(ch), ctx).await.expect("not an error: waiting for the user");
    assert_eq!(action, Action::await_change());
    let bodies = server.await.expect("server");
    assert_eq!(ready_of(&bodies[0]), ("False", "MlsChangeRefused"));
    assert!(cm.state().calls.is_empty(), "nothing is touched");
}

#[tokio::test]
async fn missing_channel_manager_is_a_clear_condition() {
    let (ctx, handle) = context(without_default_nodes());
    let ch = channel(json!({"name": "org/ns/chat"}));
    let server = tokio::spawn(serve(
        handle,
        vec![
            Expect { method: Method::PATCH, path: STATUS, reply: reply() },
            Expect { method: Method::POST, path: EVENTS, reply: event_reply() },
        ],
    ));
    let error = reconcile(Arc::new(ch), ctx).await.expect_err("no manager");
    assert_eq!(error.reason(), "NoChannelManager");
    let bodies = server.await.expect("server");
    assert_eq!(ready_of(&bodies[0]), ("False", "NoChannelManager"));
    assert!(bodies[0]["status"]["conditions"][0]["message"].as_str().unwrap_or("").contains("--channel-manager"));
    assert_eq!(bodies[1]["type"], "Warning");
}

#[tokio::test]
async fn unreachable_channel_manager_fails_with_backoff_not_a_crash() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let (ctx, handle) = context(ControllerConfig {
        channel_manager: Some(format!("http://127.0.0.1:{port}")),
        ..without_default_nodes()
    });
    let ch = channel(json!({"name": "org/ns/chat", "participants": ["org/ns/bob"]}));
    let server = tokio::spawn(serve(
        handle,
        vec![
            Expect { method: Method::PATCH, path: STATUS, reply: reply() },
            Expect { method: Method::POST, path: EVENTS, reply: event_reply() },
        ],
    ));
    let error = reconcile(Arc::new(ch), ctx).await.expect_err("down");
    assert!(matches!(&error, Error::Finalizer(_)));
    assert_eq!(error.reason(), "ChannelManagerUnavailable");
    let bodies = server.await.expect("server");
    assert_eq!(ready_of(&bodies[0]), ("False", "ChannelManagerUnavailable"));
}

#[tokio::test]
async fn delete_removes_the_channel_then_the_finalizer() {
    let cm = FakeChannelManager::start().await;
    cm.state().channels.insert("org/ns/chat".into(), (true, Default::default()));
    let (ctx, handle) = context(without_default_nodes());
    let mut ch = channel(json!({"name": "org/ns/chat", "channelManager": {"endpoint": cm.endpoint}}));
    ch.meta_mut().deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    let server = tokio::spawn(serve(handle, vec![Expect { method: Method::PATCH, path: CHANNELS, reply: reply() }]));
    let action = reconcile(Arc::new(ch), ctx).await.expect("deleted");
    assert_eq!(action, Action::await_change());
    let bodies = server.await.expect("server");
    assert_eq!(bodies[0][1], json!({"op": "remove", "path": "/metadata/finalizers/0"}));
    assert!(cm.state().channels.is_empty());
}
