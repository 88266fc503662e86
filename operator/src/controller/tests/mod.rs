//! The reconcilers against a mocked API server (tower-test) and fake SLIM services. Each scenario
//! asserts the exact calls a reconciler makes and what it sends.

mod channel;
mod subscription;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use kube::runtime::events::Reporter;
use serde_json::{Value, json};

use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;

use super::{Context, ControllerConfig, Runtime, Stores};
use crate::api::SlimChannel;
use crate::metrics::Metrics;
use crate::slim::NodePool;

pub(super) type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

pub(super) fn context(config: ControllerConfig) -> (Arc<Context>, Handle) {
    context_with(config, NodePool::default())
}

pub(super) fn context_with(config: ControllerConfig, nodes: NodePool) -> (Arc<Context>, Handle) {
    let (ctx, handle, _triggers) = context_with_triggers(config, nodes);
    (ctx, handle)
}

/// A context whose channel reconcile requests (finished invites) can be observed.
pub(super) fn context_with_triggers(
    config: ControllerConfig,
    nodes: NodePool,
) -> (Arc<Context>, Handle, mpsc::UnboundedReceiver<ObjectRef<SlimChannel>>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (trigger, triggered) = mpsc::unbounded_channel();
    let runtime = Runtime {
        client: client.clone(),
        reporter: Reporter { controller: "slim-operator".into(), instance: Some("test".into()) },
        metrics: Arc::new(Metrics::new()),
        nodes,
        channel_managers: Default::default(),
        config,
        caches: Default::default(),
        leadership: super::sole_leader(),
        control_tls: Arc::new(crate::tls::ControlTlsRegistry::new(client.clone(), Default::default(), None)),
    };
    let triggers = super::member_watch::Triggers { channels: trigger, subscriptions: mpsc::unbounded_channel().0 };
    let ctx = Context::new(&runtime, Stores::empty(), triggers);
    (Arc::new(ctx), handle, triggered)
}

/// One expected API call: method, path (and query) prefix, and the JSON the server answers.
pub(super) struct Expect {
    pub method: Method,
    pub path: &'static str,
    pub reply: Value,
}

/// Serves `expected` in order, returning the bodies the reconciler sent.
pub(super) async fn serve(mut handle: Handle, expected: Vec<Expect>) -> Vec<Value> {
    let mut bodies = Vec::new();
    for expect in expected {
        let (request, respond) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("no {} {} within 5 s", expect.method, expect.path))
            .expect("a request");
        let uri = request.uri().to_string();
        assert_eq!(request.method(), expect.method, "{uri}");
        assert_eq!(request.uri().path(), expect.path, "expected {} {}, got {uri}", expect.method, expect.path);
        if expect.path.ends_with("/status") {
            let query = request.uri().query().unwrap_or_default();
            assert!(query.contains("fieldManager=slim-operator") && query.contains("force=true"), "SSA status: {uri}");
        }
        let bytes = request.into_body().collect_bytes().await.expect("body");
        bodies.push(serde_json::from_slice(&bytes).unwrap_or(Value::Null));
        let reply = serde_json::to_vec(&expect.reply).expect("reply");
        respond.send_response(Response::builder().body(Body::from(reply)).expect("response"));
    }
    // Nothing else may be called.
    let extra = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
    if let Ok(Some((request, _))) = extra {
        panic!("unexpected call {} {}", request.method(), request.uri());
    }
    bodies
}

pub(super) const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

pub(super) fn event_reply() -> Value {
    json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e", "namespace": "default"}, "eventTime": null})
}

pub(super) fn ready_of(status_patch: &Value) -> (&str, &str) {
    let conditions = status_patch["status"]["conditions"].as_array().expect("conditions");
    let ready = conditions.iter().find(|c| c["type"] == "Ready").expect("Ready");
    (ready["status"].as_str().unwrap_or(""), ready["reason"].as_str().unwrap_or(""))
}
