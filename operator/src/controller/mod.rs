//! Kubernetes wiring: the controllers, their shared context, errors and retry policy.

pub mod subscription;
pub mod subscription_status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{finalizer, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio_stream::wrappers::BroadcastStream;
use tracing::{info, warn};

use crate::api::Subscription;
use crate::backoff::{exponential, jitter};
use crate::metrics::Metrics;
use crate::plan::{SelectorError, selector_matches};
use crate::slim::{NameError, NodePool};

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
    /// Reconciles running at once (0: unbounded).
    pub concurrency: u16,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(300),
            cleanup_timeout: Duration::from_secs(120),
            snapshot_max_age: Duration::from_secs(2),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            concurrency: 0,
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
    retries: Mutex<HashMap<ObjectRef<Subscription>, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        nodes: NodePool,
        config: ControllerConfig,
        subscriptions: Store<Subscription>,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            nodes,
            config,
            subscriptions,
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

    fn next_retry(&self, key: ObjectRef<Subscription>) -> Duration {
        let mut retries = self.retries.lock().unwrap_or_else(|p| p.into_inner());
        let attempt = retries.entry(key).or_insert(0);
        let delay = exponential(self.config.retry_min, self.config.retry_max, *attempt);
        *attempt = attempt.saturating_add(1);
        jitter(delay)
    }

    fn clear_retries(&self, key: &ObjectRef<Subscription>) {
        self.retries.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// Reconcile failures. `reason()` is the PascalCase label used for metrics and Warning events.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("object has no namespace")]
    MissingNamespace,
    #[error("spec.name: {0}")]
    InvalidName(#[source] NameError),
    #[error("spec.nodes.selector: {0}")]
    InvalidSelector(#[source] SelectorError),
    #[error("listing node Pods for the selector: {0}")]
    ListPods(#[source] kube::Error),
    #[error("Secret {name}: {reason}")]
    Secret { name: String, reason: String },
    #[error("{0}")]
    NodesNotInSync(String),
    #[error("{0}")]
    RouteRejected(String),
    #[error("deletion waits for {0} node(s) to confirm the route is removed")]
    CleanupPending(usize),
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
            Error::NodesNotInSync(_) => "NodeUnreachable",
            Error::RouteRejected(_) => "RouteRejected",
            Error::CleanupPending(_) => "CleanupPending",
        }
    }
}

/// Retry policy: exponential per object (1 s doubling to 5 min, jittered), reset on success.
pub fn error_policy(sub: Arc<Subscription>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed("Subscription", error.reason());
    let delay = ctx.next_retry(ObjectRef::from_obj(&*sub));
    warn!(subscription = %sub.name_any(), namespace = ?sub.namespace(), reason = error.reason(), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Runs the Subscription controller until `shutdown` resolves. `ready` flips once the cache is
/// synced (for `/readyz`).
pub async fn run_subscriptions(
    client: Client,
    reporter: Reporter,
    metrics: Arc<Metrics>,
    nodes: NodePool,
    config: ControllerConfig,
    ready: Arc<std::sync::atomic::AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    let subscriptions: Api<Subscription> = Api::all(client.clone());
    // Fail fast with a clear message when the CRD is missing or RBAC forbids it.
    subscriptions.list(&ListParams::default().limit(1)).await.map_err(Error::Kube)?;

    let controller = Controller::new(subscriptions, watcher::Config::default().any_semantic());
    let store = controller.store();
    let ctx = Arc::new(Context::new(client.clone(), reporter, metrics, nodes.clone(), config.clone(), store.clone()));

    let ready_store = store.clone();
    tokio::spawn(async move {
        if ready_store.wait_until_ready().await.is_ok() {
            ready.store(true, std::sync::atomic::Ordering::SeqCst);
            info!("Subscription cache synced");
        }
    });

    // A node that reconnects may have restarted and lost its routes: check every Subscription.
    let reconnects = BroadcastStream::new(nodes.events()).map(|_| ());
    let pod_store = store.clone();
    controller
        .watches(Api::<Pod>::all(client), watcher::Config::default().any_semantic(), move |pod| {
            subscriptions_selecting(&pod_store, &pod)
        })
        .reconcile_all_on(reconnects)
        .with_config(kube::runtime::controller::Config::default().concurrency(config.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(subscription::reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "controller event");
            }
        })
        .await;
    Ok(())
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
