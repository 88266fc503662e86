//! Kubernetes wiring: the controllers, their shared context, errors and retry policy.

pub mod channel;
pub mod channel_status;
pub mod leader;
pub mod member_watch;
pub mod subscription;
pub mod subscription_status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, finalizer, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{BroadcastStream, UnboundedReceiverStream};
use tracing::{info, warn};

use crate::admin::Gate;
use crate::api::{NodeSet, SlimChannel, Subscription};
use crate::backoff::{exponential, jitter};
use crate::engine::ChannelEngine;
use crate::metrics::Metrics;
use crate::plan::{SelectorError, selector_matches};
use crate::slim::{ChannelManagerPool, CmError, NameError, NodePool};

/// Field manager for server-side apply, and the events' reporting controller.
pub const MANAGER: &str = "slim-operator";

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
            },
            member_poll_interval: Duration::from_secs(1),
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
    /// Every Subscription, to tell whether a link is still used by another one.
    pub subscriptions: Store<Subscription>,
    /// Every SlimChannel (metrics, Pod mapping).
    pub channels: Store<SlimChannel>,
    pub channel_engine: ChannelEngine,
    pub channel_managers: ChannelManagerPool,
    /// Asks for a SlimChannel's reconcile (a background invite finished, a member restarted).
    pub channel_trigger: mpsc::UnboundedSender<ObjectRef<SlimChannel>>,
    /// Channels whose members' live instances are watched on their nodes.
    pub member_watch: member_watch::MemberWatch,
    /// Consecutive failures per object (`kind/namespace/name`), for backoff.
    retries: Mutex<HashMap<String, u32>>,
}

/// Where the running controllers publish their caches (for scrape-time metrics).
pub type StoreSlot = Arc<std::sync::RwLock<Option<Stores>>>;

/// The caches the controllers keep, handed to the context.
#[derive(Clone)]
pub struct Stores {
    pub subscriptions: Store<Subscription>,
    pub channels: Store<SlimChannel>,
}

impl Context {
    pub fn new(
        client: Client,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        nodes: NodePool,
        config: ControllerConfig,
        stores: Stores,
        channel_trigger: mpsc::UnboundedSender<ObjectRef<SlimChannel>>,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            nodes,
            config,
            subscriptions: stores.subscriptions,
            channels: stores.channels,
            channel_engine: ChannelEngine::default(),
            channel_managers: ChannelManagerPool::default(),
            channel_trigger,
            member_watch: Default::default(),
            retries: Mutex::new(HashMap::new()),
        }
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
/// cleanup), the outcome metric, the retry state, and a Warning event on failure.
pub(crate) async fn reconcile_finalized<K, Apply, Cleanup, ApplyFut, CleanupFut>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    finalizer_name: &str,
    apply: Apply,
    cleanup: Cleanup,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    Apply: FnOnce(Arc<K>) -> ApplyFut,
    Cleanup: FnOnce(Arc<K>) -> CleanupFut,
    ApplyFut: std::future::Future<Output = Result<Action, Error>>,
    CleanupFut: std::future::Future<Output = Result<Action, Error>>,
{
    use tracing::Instrument;
    let kind = kind_label(&K::kind(&()));
    let namespace = obj.namespace().ok_or(Error::MissingNamespace)?;
    let span = tracing::info_span!("reconcile", kind, namespace = %namespace, name = %obj.name_any());
    async {
        let _timer = ctx.metrics.reconcile_timer(kind);
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
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
                let note = crate::slim::node::error_chain(error);
                ctx.publish(&*obj, EventType::Warning, error.reason(), note).await;
            }
        }
        result
    }
    .instrument(span)
    .await
}

/// Writes `new` as the object's status by server-side apply, only when it differs from what the
/// object has.
pub(crate) async fn patch_status<K>(obj: &K, ctx: &Context, new: &K::Status) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + kube::core::object::HasStatus
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::Status: serde::Serialize + PartialEq,
{
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

/// Reconcile failures. `reason()` is the PascalCase label used for metrics and Warning events.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(kube::Error),
    /// A failed apply or cleanup reads as its own cause; the finalizer's bookkeeping errors keep
    /// kube's wording.
    #[error("{}", finalizer_message(.0))]
    Finalizer(Box<finalizer::Error<Error>>),
    #[error("object has no namespace")]
    MissingNamespace,
    #[error("spec.name: {0}")]
    InvalidName(NameError),
    #[error("spec.nodes.selector: {0}")]
    InvalidSelector(SelectorError),
    #[error("listing node Pods for the selector: {0}")]
    ListPods(kube::Error),
    #[error("Secret {name}: {reason}")]
    Secret { name: String, reason: String },
    #[error("{0}")]
    NodeUnreachable(String),
    #[error("{0}")]
    RouteRejected(String),
    #[error("deletion waits for {0} node(s) to confirm the route is removed")]
    CleanupPending(usize),
    #[error("no channel manager: set spec.channelManager.endpoint or run the operator with --channel-manager")]
    NoChannelManager,
    #[error("{0}")]
    ChannelManager(CmError),
    #[error("deleting the channel: {0}")]
    ChannelCleanupPending(CmError),
    #[error("mlsEnabled changed on a live channel; the operator refuses to recreate it")]
    MlsChangeRefused,
}

fn finalizer_message(error: &finalizer::Error<Error>) -> String {
    match error {
        finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => inner.to_string(),
        other => format!("finalizer: {other}"),
    }
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApiError",
            Error::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.reason(),
                _ => "FinalizerError",
            },
            Error::MissingNamespace => "MissingNamespace",
            Error::InvalidName(_) => "InvalidName",
            Error::InvalidSelector(_) => "InvalidSelector",
            Error::ListPods(_) => "ListPodsFailed",
            Error::Secret { .. } => "SecretUnavailable",
            Error::NodeUnreachable(_) => "NodeUnreachable",
            Error::RouteRejected(_) => "RouteRejected",
            Error::CleanupPending(_) => "CleanupPending",
            Error::NoChannelManager => "NoChannelManager",
            Error::ChannelManager(CmError::Refused { .. }) => "ChannelManagerRefused",
            Error::ChannelManager(_) => "ChannelManagerUnavailable",
            Error::ChannelCleanupPending(_) => "CleanupPending",
            Error::MlsChangeRefused => "MlsChangeRefused",
        }
    }
}

/// Retry policy: exponential per object (1 s doubling to 5 min, jittered), reset on success.
pub fn error_policy<K: Resource<DynamicType = ()>>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let kind = K::kind(&());
    ctx.metrics.failed(kind_label(&kind), error.reason());
    let delay = ctx.next_retry(retry_key(&*obj));
    warn!(%kind, name = %obj.name_any(), namespace = ?obj.namespace(), reason = error.reason(), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn kind_label(kind: &str) -> &'static str {
    match kind {
        "Subscription" => "Subscription",
        "SlimChannel" => "SlimChannel",
        _ => "Other",
    }
}

/// Runs both controllers until `shutdown` resolves. Each flag in `ready` flips once its cache is
/// synced (for `/readyz`).
/// What the controllers run with.
#[derive(Clone)]
pub struct Runtime {
    pub client: Client,
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    pub nodes: NodePool,
    pub config: ControllerConfig,
    /// Open while each cache (Subscriptions, SlimChannels) is synced and its watch healthy.
    pub ready: CacheGates,
    /// Receives the caches for scrape-time metrics.
    pub slot: StoreSlot,
}

pub async fn run(
    runtime: Runtime,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let Runtime { client, reporter, metrics, nodes, config, ready, slot } = runtime;
    let subscriptions: Api<Subscription> = Api::all(client.clone());
    let channels: Api<SlimChannel> = Api::all(client.clone());
    // Fail fast with a clear message when a CRD is missing or RBAC forbids it.
    subscriptions.list(&ListParams::default().limit(1)).await.map_err(Error::Kube)?;
    channels.list(&ListParams::default().limit(1)).await.map_err(Error::Kube)?;

    let shutdown = shutdown.shared();
    let (sub_stream, sub_store, sub_recovery) = watched(subscriptions, ready.subscriptions.clone());
    let (channel_stream, channel_store, channel_recovery) = watched(channels, ready.channels.clone());
    let sub_controller = Controller::for_stream(sub_stream, sub_store);
    let channel_controller = Controller::for_stream(channel_stream, channel_store);
    let stores = Stores { subscriptions: sub_controller.store(), channels: channel_controller.store() };
    let (trigger, triggered) = mpsc::unbounded_channel();
    *slot.write().unwrap_or_else(|p| p.into_inner()) = Some(stores.clone());
    let ctx = Arc::new(Context::new(client.clone(), reporter, metrics, nodes.clone(), config.clone(), stores, trigger));

    let controller_config = kube::runtime::controller::Config::default().concurrency(config.concurrency);
    // A node that reconnects may have restarted and lost its routes: check every object.
    let pod_store = ctx.subscriptions.clone();
    let subscriptions = sub_controller
        .watches(Api::<Pod>::all(client.clone()), watcher::Config::default().any_semantic(), move |pod| {
            subscriptions_selecting(&pod_store, &pod)
        })
        .reconcile_all_on(BroadcastStream::new(nodes.events()).map(|_| ()))
        .with_config(controller_config.clone())
        .graceful_shutdown_on(shutdown.clone())
        .run(subscription::reconcile, error_policy, ctx.clone())
        .for_each(log_outcome::<Subscription, _>);
    let watch_ctx = ctx.clone();
    let channel_pods = ctx.channels.clone();
    let channels = channel_controller
        .watches(Api::<Pod>::all(client), watcher::Config::default().any_semantic(), move |pod| {
            channels_selecting(&channel_pods, &pod)
        })
        .reconcile_on(UnboundedReceiverStream::new(triggered))
        .reconcile_all_on(BroadcastStream::new(nodes.events()).map(|_| ()))
        .with_config(controller_config)
        .graceful_shutdown_on(shutdown)
        .run(channel::reconcile, error_policy, ctx)
        .for_each(log_outcome::<SlimChannel, _>);
    let members = watch_ctx.member_watch.run(nodes, config.member_poll_interval, watch_ctx.channel_trigger.clone());
    info!("controllers started");
    // The recovery probes and the member watch never end on their own: they stop with the
    // controllers.
    tokio::select! {
        _ = async { futures::join!(subscriptions, channels) } => {}
        _ = async { futures::join!(sub_recovery, channel_recovery, members) } => {}
    }
    Ok(())
}

/// Readiness of the controllers' caches.
#[derive(Clone, Debug)]
pub struct CacheGates {
    pub subscriptions: Arc<Gate>,
    pub channels: Arc<Gate>,
}

impl Default for CacheGates {
    fn default() -> Self {
        Self {
            subscriptions: Gate::closed("Subscription cache not synced"),
            channels: Gate::closed("SlimChannel cache not synced"),
        }
    }
}

impl CacheGates {
    pub fn state(&self) -> Result<(), String> {
        crate::admin::all_gates(vec![self.subscriptions.clone(), self.channels.clone()])()
    }

    /// Closes both (the controllers stopped, e.g. on losing the lease).
    pub fn reset(&self) {
        self.subscriptions.close("Subscription cache not synced");
        self.channels.close("SlimChannel cache not synced");
    }
}

/// A watch of every `K` feeding a cache, the cache, and its recovery probe (to run beside the
/// controller). `gate` opens when the first full list is in and closes while the watch fails (the
/// API server unreachable, access revoked). A watch that resumes yields nothing until something
/// changes, so the probe reopens the gate once the API answers a one-item list again.
fn watched<K>(
    api: Api<K>,
    gate: Arc<Gate>,
) -> (impl futures::Stream<Item = Result<K, watcher::Error>>, Store<K>, impl std::future::Future<Output = ()>)
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let kind = K::kind(&()).into_owned();
    let (reader, writer) = kube::runtime::reflector::store();
    let (failing, mut failed) = tokio::sync::watch::channel(false);
    let failing = Arc::new(failing);
    let recovery = {
        let (api, gate, failing) = (api.clone(), gate.clone(), failing.clone());
        async move {
            loop {
                if failed.wait_for(|f| *f).await.is_err() {
                    return;
                }
                let mut backoff = crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
                while *failed.borrow() {
                    tokio::time::sleep(backoff.next_delay()).await;
                    if api.list(&ListParams::default().limit(1)).await.is_ok() {
                        gate.open();
                        failing.send_replace(false);
                    }
                }
            }
        }
    };
    let stream = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| match event {
            Ok(watcher::Event::InitDone) => {
                gate.open();
                failing.send_replace(false);
            }
            Ok(_) => {}
            Err(error) => {
                warn!(kind, %error, "watch failing; the cache may be stale");
                gate.close(format!("{kind} cache: watch failing: {error}"));
                failing.send_replace(true);
            }
        })
        .applied_objects();
    (stream, reader, recovery)
}

/// What the controller stream reports besides successful reconciles. A failed reconcile is
/// logged (at warn, with its retry) by `error_policy`; everything else here is news an operator
/// must see: a watch that fails (RBAC, an object that does not deserialize) stalls its kind.
async fn log_outcome<K, T>(result: Result<T, kube::runtime::controller::Error<Error, watcher::Error>>)
where
    K: Resource<DynamicType = ()>,
{
    use kube::runtime::controller::Error as ControllerError;
    match result {
        Ok(_) | Err(ControllerError::ReconcilerFailed(..)) => {}
        Err(ControllerError::ObjectNotFound(object)) => {
            tracing::debug!(%object, "object gone before its reconcile")
        }
        Err(error) => warn!(kind = %K::kind(&()), %error, "controller stream error"),
    }
}

/// SlimChannels in the Pod's namespace whose participant or node selector matches it.
fn channels_selecting(store: &Store<SlimChannel>, pod: &Pod) -> Vec<ObjectRef<SlimChannel>> {
    let namespace = pod.namespace();
    let labels = pod.metadata.labels.as_ref();
    store
        .state()
        .into_iter()
        .filter(|ch| ch.namespace() == namespace)
        .filter(|ch| {
            let participants = ch.spec.participant_selector.as_ref().is_some_and(|s| selector_matches(s, labels));
            let nodes =
                ch.spec.nodes.as_ref().and_then(|n| n.selector.as_ref()).is_some_and(|s| selector_matches(s, labels));
            participants || nodes
        })
        .map(|ch| ObjectRef::from_obj(&*ch))
        .collect()
}

/// Subscriptions in the Pod's namespace whose node selector matches it.
fn subscriptions_selecting(store: &Store<Subscription>, pod: &Pod) -> Vec<ObjectRef<Subscription>> {
    let namespace = pod.namespace();
    store
        .state()
        .into_iter()
        .filter(|sub| sub.namespace() == namespace)
        .filter(|sub| {
            sub.spec.nodes.selector.as_ref().is_some_and(|s| selector_matches(s, pod.metadata.labels.as_ref()))
        })
        .map(|sub| ObjectRef::from_obj(&*sub))
        .collect()
}

#[cfg(test)]
mod tests;
