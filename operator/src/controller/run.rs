//! Running both controllers: their watches (one shared Pod watch), readiness, and the tasks
//! beside them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{Api, ListParams};
use kube::core::{DeserializeGuard, error_boundary::InvalidObject};
use kube::runtime::controller::Controller;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{BroadcastStream, UnboundedReceiverStream};
use tracing::{info, warn};

use super::context::{Context, ControllerConfig, error_policy};
use super::index::{Cache, Claims};
use super::stores::{Caches, Pods, Stores};
use super::{Error, channel, member_watch, subscription};
use crate::admin::Gate;
use crate::api::{SlimChannel, Subscription};
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::plan::selector_matches;
use crate::slim::NodePool;

/// What the controllers run with.
#[derive(Clone)]
pub struct Runtime {
    pub client: Client,
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    pub nodes: NodePool,
    /// Channel manager clients (shared so their counters can be scraped).
    pub channel_managers: crate::slim::ChannelManagerPool,
    pub config: ControllerConfig,
    /// The caches as readiness and metrics see them.
    pub caches: Caches,
    /// This replica's leadership: reconciles start only while it leads.
    pub leadership: watch::Receiver<Leadership>,
    /// TLS of the control connections (node controller APIs, channel managers).
    pub control_tls: Arc<crate::tls::ControlTlsRegistry>,
}

/// Leadership for a replica that runs alone (no leader election): it always leads.
pub fn sole_leader() -> watch::Receiver<Leadership> {
    watch::channel(Leadership::sole()).1
}

/// Why the controllers stopped other than by `shutdown` (process-lifecycle failures, not a
/// reconcile's).
#[derive(Debug, thiserror::Error)]
pub enum ControllerFailure {
    /// A CRD missing or RBAC forbidding it, found before anything starts.
    #[error("listing {kind}s: {source}")]
    CannotList { kind: &'static str, source: kube::Error },
    #[error("{0} stopped unexpectedly")]
    TaskEnded(&'static str),
}

/// Runs both controllers until `shutdown` resolves, or until this future is dropped (leadership
/// lost): either way the channel engine's background invites and removals stop with it.
pub async fn run(
    runtime: Runtime,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerFailure> {
    let client = runtime.client.clone();
    let namespace = runtime.config.watch_namespace.as_deref();
    let subscriptions: Api<DeserializeGuard<Subscription>> = watched_api(&client, namespace);
    let channels: Api<DeserializeGuard<SlimChannel>> = watched_api(&client, namespace);
    // Fail fast with a clear message when a CRD is missing or RBAC forbids it.
    let cannot_list = |kind| move |source| ControllerFailure::CannotList { kind, source };
    subscriptions.list(&ListParams::default().limit(1)).await.map_err(cannot_list("Subscription"))?;
    channels.list(&ListParams::default().limit(1)).await.map_err(cannot_list("SlimChannel"))?;

    let shutdown = shutdown.shared();
    let (invalid_tx, invalid_rx) = mpsc::unbounded_channel();
    let (sub_stream, sub_cache, sub_recovery) =
        watched(subscriptions, runtime.caches.subscriptions.clone(), invalid_tx.clone());
    let (channel_stream, channel_cache, channel_recovery) =
        watched(channels, runtime.caches.channels.clone(), invalid_tx);
    let (pod_store, pod_writer) = reflector::store_shared::<Pod>(1024);
    let (Some(sub_pods), Some(channel_pods)) = (pod_writer.subscribe(), pod_writer.subscribe()) else {
        unreachable!("a shared store always has subscribers")
    };
    let pods = Cache::new(pod_store.clone());
    let (trigger, triggered) = mpsc::unbounded_channel();
    let (sub_trigger, sub_triggered) = mpsc::unbounded_channel();
    let triggers = member_watch::Triggers { channels: trigger, subscriptions: sub_trigger };
    let deleted =
        DeletedPods { channels: channel_cache.clone(), subscriptions: sub_cache.clone(), triggers: triggers.clone() };
    let pod_watch =
        pod_watch(watched_api(&client, namespace), pod_writer, pods.clone(), runtime.caches.pods.clone(), deleted);
    let sub_controller = Controller::for_stream(sub_stream, sub_cache.store().clone());
    let channel_controller = Controller::for_stream(channel_stream, channel_cache.store().clone());
    let stores = Stores { subscriptions: sub_cache, channels: channel_cache, pods: Pods(pods) };
    runtime.caches.publish(stores.clone());
    let ctx = Arc::new(Context::new(&runtime, stores, triggers));
    let _stop_engine = ctx.channel_engine.stop_on_drop();

    let controller_config = kube::runtime::controller::Config::default().concurrency(runtime.config.concurrency);
    let node_events = || recheck_after_reconnects(BroadcastStream::new(runtime.nodes.events()).map(|_| ()));
    // A node that reconnects may have restarted and lost its routes: check every object.
    let sub_index = ctx.subscriptions.clone();
    let subscriptions = sub_controller
        .watches_shared_stream(sub_pods, move |pod| subscriptions_selecting(&sub_index, &pod))
        .reconcile_on(UnboundedReceiverStream::new(sub_triggered))
        .reconcile_all_on(node_events())
        .with_config(controller_config.clone())
        .graceful_shutdown_on(shutdown.clone())
        .run(subscription::reconcile, error_policy, ctx.clone())
        .for_each(log_outcome::<Subscription, _>);
    let channel_index = ctx.channels.clone();
    let channels = channel_controller
        .watches_shared_stream(channel_pods, move |pod| channels_selecting(&channel_index, &pod))
        .reconcile_on(UnboundedReceiverStream::new(triggered))
        .reconcile_all_on(node_events())
        .with_config(controller_config)
        .graceful_shutdown_on(shutdown)
        .run(channel::reconcile, error_policy, ctx.clone())
        .for_each(log_outcome::<SlimChannel, _>);
    // Node targets and selected participants come from the Pod cache: a reconcile before it is
    // filled would take every selected node for gone.
    let controllers = async {
        if pod_store.wait_until_ready().await.is_err() {
            return;
        }
        info!("controllers started");
        futures::join!(subscriptions, channels);
    };
    let beside = Beside {
        pod_watch: pod_watch.boxed(),
        sub_recovery: sub_recovery.boxed(),
        channel_recovery: channel_recovery.boxed(),
        reports: report_invalid(invalid_rx, Recorder::new(client, runtime.reporter.clone())).boxed(),
    };
    tokio::select! {
        () = controllers => Ok(()),
        failure = beside.run(&ctx, &runtime) => Err(failure),
    }
}

/// When a node reconnects, everything is checked at once (it may have restarted and lost its
/// routes) and again [`RECHECK_AFTER_RECONNECT`] later: routes that other nodes borrow over the
/// links this node dials broke with its connections, and the links are back only once its own
/// objects have been reconciled (found by the soak: such a route stayed missing until the resync).
fn recheck_after_reconnects(reconnects: impl Stream<Item = ()> + Send + 'static) -> impl Stream<Item = ()> + Send {
    reconnects.flat_map_unordered(None, |()| {
        futures::stream::once(futures::future::ready(()))
            .chain(futures::stream::once(tokio::time::sleep(RECHECK_AFTER_RECONNECT)))
            .boxed()
    })
}

/// See [`recheck_after_reconnects`].
pub const RECHECK_AFTER_RECONNECT: Duration = Duration::from_secs(5);

/// The tasks that run beside the controllers, for as long as they do.
struct Beside {
    pod_watch: futures::future::BoxFuture<'static, ()>,
    sub_recovery: futures::future::BoxFuture<'static, ()>,
    channel_recovery: futures::future::BoxFuture<'static, ()>,
    reports: futures::future::BoxFuture<'static, ()>,
}

impl Beside {
    /// Runs them with the member watch and the control TLS refresh. None ends on its own; if one
    /// did, the controllers stop with it rather than run on without it: the failure says which.
    async fn run(self, ctx: &Context, runtime: &Runtime) -> ControllerFailure {
        let triggers = member_watch::Triggers {
            channels: ctx.channel_trigger.clone(),
            subscriptions: ctx.subscription_trigger.clone(),
        };
        let members = ctx.member_watch.run(runtime.config.member_poll_interval, triggers);
        // Rotated Secrets, files and SVIDs reach the next control connection within this period.
        let tls_refresh = runtime.control_tls.clone().refresh_every(Duration::from_secs(5));
        let ended = tokio::select! {
            () = self.pod_watch => "Pod watch",
            () = self.sub_recovery => "Subscription watch recovery",
            () = self.channel_recovery => "SlimChannel watch recovery",
            () = self.reports => "invalid-object reporter",
            () = members => "member watch",
            () = tls_refresh => "control TLS refresh",
        };
        ControllerFailure::TaskEnded(ended)
    }
}

/// Every `K` in the watched namespace, or in all of them.
fn watched_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// The shared Pod watch, driven for as long as the controllers run. Pods are cached trimmed to
/// what the controllers read.
async fn pod_watch(
    pods: Api<Pod>,
    writer: reflector::store::Writer<Pod>,
    cache: Cache<Pod>,
    gate: Arc<Gate>,
    deleted: DeletedPods,
) {
    watcher(pods, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(super::stores::keep_what_is_read)
        .reflect_shared(writer)
        .for_each(|event| {
            if let Ok(event) = &event {
                cache.follow(event);
            }
            if let Ok(watcher::Event::Delete(pod)) = &event {
                deleted.announce(pod);
            }
            match event {
                Ok(watcher::Event::InitDone) => gate.open(),
                Ok(_) => {}
                Err(error) => {
                    warn!(%error, "Pod watch failing; node targets and selected participants may be stale");
                    gate.close(format!("Pod cache: watch failing: {error}"));
                }
            }
            futures::future::ready(())
        })
        .await
}

/// A watch of every `K` feeding a cache, the cache, and its recovery probe (to run beside the
/// controller). `gate` opens when the first full list is in and closes while the watch fails (the
/// API server unreachable, access revoked). A watch that resumes yields nothing until something
/// changes, so the probe reopens the gate once the API answers a one-item list again.
///
/// An object that does not deserialize as `K` (stored while the CRD's schema was looser, say) is
/// left out of the cache and sent to `invalid`: it is reported, and the others go on.
fn watched<K>(
    api: Api<DeserializeGuard<K>>,
    gate: Arc<Gate>,
    invalid: mpsc::UnboundedSender<(ObjectReference, InvalidObject)>,
) -> (impl Stream<Item = Result<K, watcher::Error>>, Cache<K>, impl std::future::Future<Output = ()>)
where
    K: Resource<DynamicType = ()>
        + Claims
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let kind = K::kind(&()).into_owned();
    let (reader, writer) = reflector::store();
    let cache = Cache::new(reader);
    let follower = cache.clone();
    let (failing, mut failed) = watch::channel(false);
    let failing = Arc::new(failing);
    let recovery = {
        let (api, gate, failing) = (api.clone(), gate.clone(), failing.clone());
        async move {
            loop {
                if failed.wait_for(|f| *f).await.is_err() {
                    return futures::future::pending().await;
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
        .filter_map(move |event| futures::future::ready(valid_only::<K>(event, &invalid)))
        .reflect(writer)
        .inspect(move |event| match event {
            Ok(event @ watcher::Event::InitDone) => {
                follower.follow(event);
                gate.open();
                failing.send_replace(false);
            }
            Ok(event) => follower.follow(event),
            Err(error) => {
                warn!(kind, %error, "watch failing; the cache may be stale");
                gate.close(format!("{kind} cache: watch failing: {error}"));
                failing.send_replace(true);
            }
        })
        .applied_objects();
    (stream, cache, recovery)
}

/// The event with its object when it deserialized; `None` (after sending it to `invalid`) when it
/// did not.
fn valid_only<K>(
    event: Result<watcher::Event<DeserializeGuard<K>>, watcher::Error>,
    invalid: &mpsc::UnboundedSender<(ObjectReference, InvalidObject)>,
) -> Option<Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource<DynamicType = ()>,
{
    let valid = |guard: DeserializeGuard<K>| match guard.0 {
        Ok(obj) => Some(obj),
        Err(error) => {
            let reference = ObjectReference {
                api_version: Some(K::api_version(&()).into_owned()),
                kind: Some(K::kind(&()).into_owned()),
                name: error.metadata.name.clone(),
                namespace: error.metadata.namespace.clone(),
                uid: error.metadata.uid.clone(),
                resource_version: error.metadata.resource_version.clone(),
                ..Default::default()
            };
            let _ = invalid.send((reference, error));
            None
        }
    };
    let event = match event {
        Err(error) => return Some(Err(error)),
        Ok(event) => event,
    };
    let mapped = match event {
        watcher::Event::Apply(guard) => watcher::Event::Apply(valid(guard)?),
        watcher::Event::Delete(guard) => watcher::Event::Delete(valid(guard)?),
        watcher::Event::InitApply(guard) => watcher::Event::InitApply(valid(guard)?),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    };
    Some(Ok(mapped))
}

/// Reports each version of an object that does not deserialize once: a warning in the log and a
/// Warning event `InvalidObject` on the object.
async fn report_invalid(mut invalid: mpsc::UnboundedReceiver<(ObjectReference, InvalidObject)>, recorder: Recorder) {
    let mut reported: HashSet<(Option<String>, Option<String>)> = HashSet::new();
    while let Some((reference, error)) = invalid.recv().await {
        if !reported.insert((reference.uid.clone(), reference.resource_version.clone())) {
            continue;
        }
        warn!(
            kind = ?reference.kind, namespace = ?reference.namespace, name = ?reference.name, error = %error.error,
            "object does not match its schema; skipped until it is fixed"
        );
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "InvalidObject".into(),
            note: Some(crate::api::condition::truncate(
                format!("the operator cannot read this object, so it is not reconciled: {}", error.error),
                1024,
            )),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = recorder.publish(&event, &reference).await {
            warn!(%error, "could not publish event");
        }
    }
    futures::future::pending().await
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

/// Announces a deleted Pod to the objects selecting it. The controllers' shared Pod streams carry
/// only applied Pods (kube-runtime 5 dispatches no deletions to them), and a Pod that is gone
/// matters: a member whose successor waits for it to go, a node that no longer serves.
struct DeletedPods {
    channels: Cache<SlimChannel>,
    subscriptions: Cache<Subscription>,
    triggers: member_watch::Triggers,
}

impl DeletedPods {
    fn announce(&self, pod: &Pod) {
        for channel in channels_selecting(&self.channels, pod) {
            let _ = self.triggers.channels.send(channel);
        }
        for subscription in subscriptions_selecting(&self.subscriptions, pod) {
            let _ = self.triggers.subscriptions.send(subscription);
        }
    }
}

/// SlimChannels in the Pod's namespace whose participant or node selector matches it.
pub(super) fn channels_selecting(cache: &Cache<SlimChannel>, pod: &Pod) -> Vec<ObjectRef<SlimChannel>> {
    let Some(namespace) = pod.meta().namespace.as_deref() else { return Vec::new() };
    let labels = pod.metadata.labels.as_ref();
    cache
        .in_namespace(namespace)
        .into_iter()
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
pub(super) fn subscriptions_selecting(cache: &Cache<Subscription>, pod: &Pod) -> Vec<ObjectRef<Subscription>> {
    let Some(namespace) = pod.meta().namespace.as_deref() else { return Vec::new() };
    cache
        .in_namespace(namespace)
        .into_iter()
        .filter(|sub| {
            sub.spec.nodes.selector.as_ref().is_some_and(|s| selector_matches(s, pod.metadata.labels.as_ref()))
        })
        .map(|sub| ObjectRef::from_obj(&*sub))
        .collect()
}

#[cfg(test)]
mod recheck {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_reconnect_is_checked_at_once_and_again_once_its_links_are_back() {
        let (tx, rx) = mpsc::unbounded_channel::<()>();
        let mut checks = std::pin::pin!(recheck_after_reconnects(UnboundedReceiverStream::new(rx)));
        let start = tokio::time::Instant::now();
        tx.send(()).expect("send");
        checks.next().await.expect("at once");
        assert_eq!(start.elapsed(), Duration::ZERO);
        tx.send(()).expect("a second reconnect meanwhile");
        checks.next().await.expect("at once too, not behind the first one's recheck");
        assert_eq!(start.elapsed(), Duration::ZERO);
        checks.next().await.expect("the first recheck");
        assert_eq!(start.elapsed(), RECHECK_AFTER_RECONNECT);
    }
}
