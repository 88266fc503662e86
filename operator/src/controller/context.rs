//! What every reconcile shares, and the common shape of both reconcilers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::{mpsc, watch};

use tracing::warn;

use super::run::Runtime;
use super::stores::Stores;
use super::{Error, MANAGER, member_watch, pause};
use crate::api::condition::ReadyStatus;
use crate::api::{NodeSet, SlimChannel, Subscription};
use crate::backoff::{exponential, jitter};
use crate::engine::ChannelEngine;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::slim::{ChannelManagerPool, NodePool};
use k8s_openapi::jiff::Timestamp;

/// Settings of the controllers (from the command line).
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Period of the drift check of every object, even when nothing changed.
    pub resync_interval: Duration,
    /// How long deletion (or removal from a node that left) retries an unreachable node before
    /// giving up on it with a Warning event.
    pub cleanup_timeout: Duration,
    /// Maximum age of a node's route listing reused across reconciles.
    pub snapshot_max_age: Duration,
    /// Retry backoff bounds after a failed reconcile.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Reconciles running at once per kind (0: unbounded).
    pub concurrency: u16,
    /// Channel manager for SlimChannels that name none.
    pub channel_manager: Option<String>,
    /// The SLIM nodes consulted for live member instances when a SlimChannel has no `spec.nodes`
    /// (its selector picks Pods in the SlimChannel's namespace).
    pub default_nodes: NodeSet,
    /// How often every consulted node's route list is read to notice members that restarted (one
    /// read per node for all channels).
    pub member_poll_interval: Duration,
    /// Restart (delete the Pod of) a channel manager that lost its SLIM node.
    pub heal_channel_manager: bool,
    /// Invites and removals in flight at one channel manager (0: unbounded).
    pub channel_manager_in_flight: usize,
    /// Watch Subscriptions, SlimChannels and Pods in this namespace only (`None`: all of them).
    pub watch_namespace: Option<String>,
}

/// Label of the SLIM node Pods used when a SlimChannel names no nodes (the upstream chart's).
pub const DEFAULT_NODE_SELECTOR: &str = "app.kubernetes.io/name=slim";

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(300),
            cleanup_timeout: Duration::from_secs(120),
            snapshot_max_age: Duration::from_secs(2),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            concurrency: 0,
            channel_manager: None,
            default_nodes: NodeSet {
                endpoints: Vec::new(),
                selector: crate::plan::parse_equality_selector(DEFAULT_NODE_SELECTOR).ok().flatten(),
                tls: None,
            },
            member_poll_interval: Duration::from_secs(1),
            heal_channel_manager: false,
            channel_manager_in_flight: crate::engine::channel::DEFAULT_IN_FLIGHT,
            watch_namespace: None,
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    /// One recorder, so its event de-duplication cache is shared.
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub nodes: NodePool,
    pub config: ControllerConfig,
    /// Every Subscription (by namespace and route name): conflicts, link users, Pod mapping.
    pub subscriptions: super::index::Cache<Subscription>,
    /// Every SlimChannel (by namespace and channel name): conflicts, Pod mapping.
    pub channels: super::index::Cache<SlimChannel>,
    /// Every Pod (node targets, selected participants): one cache, no LIST per reconcile.
    pub pods: super::stores::Pods,
    pub channel_engine: ChannelEngine,
    pub channel_managers: ChannelManagerPool,
    /// Asks for a SlimChannel's reconcile (a background invite finished, a member restarted).
    pub channel_trigger: mpsc::UnboundedSender<ObjectRef<SlimChannel>>,
    /// Asks for a Subscription's reconcile (an instance of its name came or went).
    pub subscription_trigger: mpsc::UnboundedSender<ObjectRef<Subscription>>,
    /// Channels' members and Subscriptions' names whose live instances are watched on nodes.
    pub member_watch: member_watch::MemberWatch,
    /// This replica's leadership; nothing is written once it has lapsed.
    pub(crate) leadership: watch::Receiver<Leadership>,
    /// TLS of the control connections.
    pub control_tls: Arc<crate::tls::ControlTlsRegistry>,
    /// Consecutive failures per object (`kind/namespace/name`), for backoff.
    pub(crate) retries: Mutex<HashMap<String, u32>>,
    /// When each channel manager was last restarted for having lost its node.
    pub(crate) healed: Mutex<HashMap<String, std::time::Instant>>,
}

impl Context {
    pub fn new(runtime: &Runtime, stores: Stores, triggers: member_watch::Triggers) -> Self {
        Self {
            recorder: Recorder::new(runtime.client.clone(), runtime.reporter.clone()),
            client: runtime.client.clone(),
            metrics: runtime.metrics.clone(),
            nodes: runtime.nodes.clone(),
            config: runtime.config.clone(),
            subscriptions: stores.subscriptions,
            channels: stores.channels,
            pods: stores.pods,
            channel_engine: ChannelEngine::default().with_in_flight(runtime.config.channel_manager_in_flight),
            channel_managers: runtime.channel_managers.clone(),
            channel_trigger: triggers.channels,
            subscription_trigger: triggers.subscriptions,
            member_watch: Default::default(),
            leadership: runtime.leadership.clone(),
            control_tls: runtime.control_tls.clone(),
            retries: Mutex::new(HashMap::new()),
            healed: Mutex::new(HashMap::new()),
        }
    }

    /// The node clients for `endpoints`: the `https://` ones with the TLS of `nodes` (or the
    /// operator's defaults), the plain `http://` ones as they are.
    pub async fn node_pool(&self, namespace: &str, nodes: &NodeSet, endpoints: &[String]) -> Result<NodePool, Error> {
        let mut tls = HashMap::new();
        for endpoint in endpoints {
            if let Some(source) = self.control_tls.source(namespace, nodes.tls.as_ref(), endpoint).await? {
                tls.insert(endpoint.clone(), source);
            }
        }
        Ok(if tls.is_empty() { self.nodes.clone() } else { self.nodes.with_tls(tls) })
    }

    /// The channel manager client of `channel` at `endpoint`, with the TLS its spec names (or the
    /// operator's defaults).
    pub async fn channel_manager(
        &self,
        channel: &SlimChannel,
        endpoint: &str,
    ) -> Result<crate::slim::ChannelManagerClient, Error> {
        let namespace = channel.namespace().unwrap_or_default();
        let tls = channel.spec.channel_manager.as_ref().and_then(|m| m.tls.as_ref());
        let source = self.control_tls.source(&namespace, tls, endpoint).await?;
        self.channel_managers.client_with_tls(endpoint, source).map_err(Error::ChannelManager)
    }

    /// Whether this replica still leads (its renew deadline has not passed).
    pub fn leading(&self) -> bool {
        self.leadership.borrow().is_leading()
    }

    /// Publishes an event; a failure to publish is logged, never fatal.
    pub async fn publish<K: Resource<DynamicType = ()>>(&self, obj: &K, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(crate::api::condition::truncate(note, 1024)),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(%error, reason, "could not publish event");
        }
    }

    fn next_retry(&self, key: String) -> Duration {
        let mut retries = self.retries.lock().unwrap_or_else(|p| p.into_inner());
        let attempt = retries.entry(key).or_insert(0);
        let delay = exponential(self.config.retry_min, self.config.retry_max, *attempt);
        *attempt = attempt.saturating_add(1);
        jitter(delay)
    }

    fn clear_retries(&self, key: &str) {
        self.retries.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// The common shape of both reconcilers: a span, the duration metric, the finalizer (apply or
/// cleanup), the outcome metric, the retry state, and a Warning event on failure. A replica whose
/// leadership has lapsed does nothing at all.
pub(crate) async fn reconcile_finalized<K, Apply, Cleanup, ApplyFut, CleanupFut>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    finalizer_name: &str,
    apply: Apply,
    cleanup: Cleanup,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + kube::core::object::HasStatus
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::Status: ReadyStatus + Default + serde::Serialize + PartialEq,
    Apply: FnOnce(Arc<K>) -> ApplyFut,
    Cleanup: FnOnce(Arc<K>) -> CleanupFut,
    ApplyFut: std::future::Future<Output = Result<Action, Error>>,
    CleanupFut: std::future::Future<Output = Result<Action, Error>>,
{
    use tracing::Instrument;
    if !ctx.leading() {
        tracing::debug!(name = %obj.name_any(), "not leading: reconcile skipped");
        return Ok(Action::await_change());
    }
    let kind = kind_label(&K::kind(&()));
    let namespace = obj.namespace().ok_or(Error::MissingNamespace)?;
    let span = tracing::info_span!("reconcile", kind, namespace = %namespace, name = %obj.name_any());
    async {
        let _timer = ctx.metrics.reconcile_timer(kind);
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
        if pause::is_paused(obj.meta()) {
            return paused(&*obj, &ctx, &api, finalizer_name).await;
        }
        let result = finalizer::finalizer(&api, finalizer_name, obj.clone(), |event| async {
            match event {
                finalizer::Event::Apply(obj) => apply(obj).await,
                finalizer::Event::Cleanup(obj) => cleanup(obj).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)));
        ctx.metrics.reconciled(kind, result.is_ok());
        match &result {
            Ok(_) => ctx.clear_retries(&retry_key(&*obj)),
            Err(error) => {
                let note = slim_k8s_common::error_chain(error);
                ctx.publish(&*obj, EventType::Warning, error.reason(), note).await;
            }
        }
        result
    }
    .instrument(span)
    .await
}

/// A paused object: its status says so (an event when it starts); deleted, its finalizer is
/// released without a word to SLIM. Nothing else happens until the annotation goes.
async fn paused<K>(obj: &K, ctx: &Context, api: &Api<K>, finalizer_name: &str) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + kube::core::object::HasStatus
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::Status: ReadyStatus + Default + serde::Serialize + PartialEq,
{
    if obj.meta().deletion_timestamp.is_some() {
        let finalizers = obj.finalizers().to_vec();
        if finalizers.iter().any(|f| f == finalizer_name) {
            let remaining: Vec<&String> = finalizers.iter().filter(|f| *f != finalizer_name).collect();
            // `test` first: the list is replaced only if nobody changed it since it was read.
            use json_patch::{PatchOperation, ReplaceOperation, TestOperation, jsonptr::PointerBuf};
            let path = PointerBuf::from_tokens(["metadata", "finalizers"]);
            let patch = json_patch::Patch(vec![
                PatchOperation::Test(TestOperation { path: path.clone(), value: serde_json::json!(finalizers) }),
                PatchOperation::Replace(ReplaceOperation { path, value: serde_json::json!(remaining) }),
            ]);
            api.patch(&obj.name_any(), &kube::api::PatchParams::default(), &kube::api::Patch::Json::<()>(patch))
                .await
                .map_err(Error::Kube)?;
            let note = "deleted while paused: the finalizer is released and nothing is removed from SLIM (what the object had installed stays as it is)";
            ctx.publish(obj, EventType::Normal, "FinalizerReleasedWhilePaused", note.to_owned()).await;
        }
        return Ok(Action::await_change());
    }
    let old = obj.status().cloned().unwrap_or_default();
    let status = pause::paused_status(&old, obj.meta().generation, Timestamp::now());
    if status != old {
        patch_status(obj, ctx, &status).await?;
        let note = format!("{} is set: no write to SLIM until it is removed", pause::ANNOTATION);
        ctx.publish(obj, EventType::Normal, pause::REASON, note).await;
    }
    Ok(Action::await_change())
}

/// Writes `new` as the object's status by server-side apply, only when it differs from what the
/// object has. A `Paused` condition stays only while the object is paused.
pub(crate) async fn patch_status<K>(obj: &K, ctx: &Context, new: &K::Status) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + kube::core::object::HasStatus
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::Status: ReadyStatus + serde::Serialize + PartialEq,
{
    let resumed;
    let new = if pause::is_paused(obj.meta()) {
        new
    } else {
        resumed = pause::resumed(new.clone());
        &resumed
    };
    if obj.status() == Some(new) {
        return Ok(());
    }
    let namespace = obj.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": new});
    api.patch_status(
        &obj.name_any(),
        &kube::api::PatchParams::apply(MANAGER).force(),
        &kube::api::Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

/// `Kind/namespace/name`: the key of per-object retry state.
fn retry_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!("{}/{}/{}", K::kind(&()), obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Retry policy: exponential per object (1 s doubling to 5 min, jittered), reset on success.
pub fn error_policy<K: Resource<DynamicType = ()>>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let kind = K::kind(&());
    ctx.metrics.failed(kind_label(&kind), error.reason());
    let delay = ctx.next_retry(retry_key(&*obj));
    warn!(%kind, name = %obj.name_any(), namespace = ?obj.namespace(), reason = error.reason(), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

pub(crate) fn kind_label(kind: &str) -> &'static str {
    match kind {
        "Subscription" => "Subscription",
        "SlimChannel" => "SlimChannel",
        _ => "Other",
    }
}
