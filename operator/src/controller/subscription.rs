//! Reconciling a `Subscription`: resolve its desired route, sync every node, write status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::info;

use super::member_watch::FarView;
use super::subscription_status::{Followed, Notices, StatusInput, next_status};
use super::{Context, Error};
use crate::api::condition::failed;
use crate::api::{DeletionPolicy, Subscription, SubscriptionStatus};
use crate::engine::{NodeReport, NodeResult, RouteSync};
use crate::plan::conflicts::{self, Claim};
use crate::plan::instances::reason as follow_reason;
use crate::plan::{
    Borrowable, DesiredRoute, Following, NodeTarget, ResolvedTls, Users, following, instance_routes, node_targets,
    render_link, selector_query,
};
use crate::slim::{NodePool, RouteRef, SlimName};

/// Finalizer that keeps a Subscription until its routes are removed from the nodes.
pub const FINALIZER: &str = "subscriptions.slim.agntcy.org/cleanup";

pub async fn reconcile(sub: Arc<Subscription>, ctx: Arc<Context>) -> Result<Action, Error> {
    let (for_apply, for_cleanup) = (ctx.clone(), ctx.clone());
    super::reconcile_finalized(
        sub,
        ctx,
        FINALIZER,
        |sub| async move { apply(&sub, &for_apply).await },
        |sub| async move { cleanup(&sub, &for_cleanup).await },
    )
    .await
}

/// Create / update / repair.
async fn apply(sub: &Subscription, ctx: &Context) -> Result<Action, Error> {
    let old = sub.status.clone().unwrap_or_default();
    let generation = sub.meta().generation;
    let mut desired = match resolve_desired(sub, ctx).await {
        Ok(desired) => desired,
        Err(error) => {
            let status = failed(&old, generation, error.reason(), error.to_string(), Timestamp::now());
            super::patch_status(sub, ctx, &status).await?;
            return Err(error);
        }
    };
    let targets = match resolve_targets(sub, ctx) {
        Ok(targets) => targets,
        Err(error) => {
            let status = failed(&old, generation, error.reason(), error.to_string(), Timestamp::now());
            super::patch_status(sub, ctx, &status).await?;
            return Err(error);
        }
    };
    if let Some(action) = yield_if_conflicting(sub, &targets, ctx, &old).await? {
        return Ok(action);
    }
    let followed = follow_instances(sub, ctx, &mut desired, &old).await;
    let previous = previous_route(&old);
    let previous_instances = previous_instances(&old);
    let previous_nodes: Vec<String> = old.nodes.iter().map(|n| n.endpoint.clone()).collect();
    let namespace = sub.namespace().unwrap_or_default();
    let endpoints: Vec<String> =
        targets.iter().map(|t| t.endpoint.clone()).chain(previous_nodes.iter().cloned()).collect();
    let pool = match ctx.node_pool(&namespace, &sub.spec.nodes, &endpoints).await {
        Ok(pool) => pool,
        Err(error) => {
            let status = failed(&old, generation, error.reason(), error.to_string(), Timestamp::now());
            super::patch_status(sub, ctx, &status).await?;
            return Err(error);
        }
    };
    let users = StoreUsers { ctx, me: ObjectRef::from_obj(sub) };
    // New instances are planned against fresh listings of the targets: whether a target shares a
    // peer link with the far node (and so needs no instance route) must not be read from a
    // listing older than that link.
    let new_instances = desired.instances.iter().any(|r| !previous_instances.values().flatten().any(|p| p == r));
    let reports = RouteSync {
        desired: Some(&desired),
        targets: &targets,
        previous: previous.as_ref(),
        previous_instances: &previous_instances,
        previous_nodes: &previous_nodes,
        users: &users,
        max_snapshot_age: if new_instances { Duration::ZERO } else { ctx.config.snapshot_max_age },
    }
    .run(&pool)
    .await;

    let route_name = desired.route.name.to_string();
    let instances = instance_ids(&desired.instances);
    let input = StatusInput {
        generation,
        route_name: &route_name,
        link_id: &desired.link.link_id,
        now: Timestamp::now(),
        removal_timeout: ctx.config.cleanup_timeout,
        instances: &instances,
        following: Some(&followed),
    };
    let (status, notices) = next_status(&old, &input, &reports);
    super::patch_status(sub, ctx, &status).await?;
    announce(sub, ctx, &notices, &route_name).await;

    match failure_of(&reports) {
        None if targets.is_empty() => Ok(Action::requeue(ctx.config.resync_interval)),
        None => Ok(Action::requeue(crate::backoff::jitter(ctx.config.resync_interval))),
        Some(error) => Err(error),
    }
}

/// Ready's reason while another Subscription's older claim wins.
pub const CONFLICT: &str = "Conflict";
/// How often a Subscription that yielded looks again (the winner's deletion also triggers it).
const CONFLICT_RECHECK: Duration = Duration::from_secs(10);

/// What a Subscription claims: its route name on its nodes over its link.
fn claim_of(sub: &Subscription, targets: &[NodeTarget]) -> Option<Claim> {
    Some(Claim {
        created: sub.meta().creation_timestamp.as_ref()?.0.as_second(),
        id: format!("{}/{}", sub.namespace().unwrap_or_default(), sub.name_any()),
        name: sub.spec.name.clone(),
        places: targets.iter().map(|t| t.endpoint.clone()).collect(),
        how: serde_json::to_string(&sub.spec.link).ok()?,
    })
}

/// Why this Subscription must yield (the condition's message), if an older one routes its name on
/// a shared node over another link.
fn conflict(sub: &Subscription, targets: &[NodeTarget], ctx: &Context) -> Option<String> {
    let mine = claim_of(sub, targets)?;
    let others: Vec<Claim> = ctx
        .subscriptions
        .claiming(&sub.spec.name)
        .iter()
        .filter(|o| o.meta().deletion_timestamp.is_none())
        .filter_map(|o| resolve_targets(o, ctx).ok().and_then(|targets| claim_of(o, &targets)))
        .collect();
    conflicts::winner(&mine, &others).map(|winner| conflicts::message("route", &mine, winner))
}

/// When an older Subscription wins this one's route: say so in status and look again later.
async fn yield_if_conflicting(
    sub: &Subscription,
    targets: &[NodeTarget],
    ctx: &Context,
    old: &SubscriptionStatus,
) -> Result<Option<Action>, Error> {
    let Some(message) = conflict(sub, targets, ctx) else { return Ok(None) };
    let status = failed(old, sub.meta().generation, CONFLICT, message, Timestamp::now());
    super::patch_status(sub, ctx, &status).await?;
    Ok(Some(Action::requeue(CONFLICT_RECHECK)))
}

/// What a retained Subscription leaves on SLIM, for its event. Pure.
fn retained_note(status: &SubscriptionStatus) -> String {
    let route = status.route_name.as_deref().unwrap_or("(no route recorded)");
    let link = status.link_id.as_deref().unwrap_or("(none)");
    let nodes: Vec<String> = status
        .nodes
        .iter()
        .map(|n| match n.instances.len() {
            0 => n.endpoint.clone(),
            count => format!("{} (+{count} instance routes)", n.endpoint),
        })
        .collect();
    format!(
        "deletionPolicy Retain: left route {route} over link {link} on {}",
        if nodes.is_empty() { "no node".to_owned() } else { nodes.join(", ") }
    )
}

/// Deletion: remove the route (and unused links) from every node it may be on.
async fn cleanup(sub: &Subscription, ctx: &Context) -> Result<Action, Error> {
    ctx.member_watch.forget_subscription(&ObjectRef::from_obj(sub));
    // Subscriptions that yielded to this one take over now.
    for other in ctx.subscriptions.claiming(&sub.spec.name).iter().filter(|o| o.uid() != sub.uid()) {
        let _ = ctx.subscription_trigger.send(ObjectRef::from_obj(&**other));
    }
    let old = sub.status.clone().unwrap_or_default();
    if sub.spec.deletion_policy == DeletionPolicy::Retain {
        ctx.publish(sub, EventType::Normal, "Retained", retained_note(&old)).await;
        return Ok(Action::await_change());
    }
    let (previous, endpoints) = routes_to_remove(sub, ctx, &old).await;
    let namespace = sub.namespace().unwrap_or_default();
    let pool = ctx.node_pool(&namespace, &sub.spec.nodes, &endpoints).await?;
    let failures = remove_everywhere(sub, ctx, &old, &previous, &endpoints, &pool).await;

    let mut pending = Vec::new();
    let mut abandoned = Vec::new();
    let deleting_since = sub.meta().deletion_timestamp.as_ref().map(|t| t.0).unwrap_or_else(Timestamp::now);
    let expired = Timestamp::now().duration_since(deleting_since).unsigned_abs() >= ctx.config.cleanup_timeout;
    for report in failures {
        if expired {
            abandoned.push(report.endpoint);
        } else {
            pending.push(report);
        }
    }
    for endpoint in &abandoned {
        ctx.publish(
            sub,
            EventType::Warning,
            "CleanupAbandoned",
            format!(
                "gave up removing the route from {endpoint} after {:?}: the node is unreachable; if it comes back it may keep the route until it restarts",
                ctx.config.cleanup_timeout
            ),
        )
        .await;
    }
    if pending.is_empty() {
        info!(nodes = endpoints.len(), "routes removed; releasing the finalizer");
        return Ok(Action::await_change());
    }
    let reports: Vec<NodeReport> = pending.iter().cloned().map(|r| NodeReport { target: true, ..r }).collect();
    let route_name = old.route_name.clone().unwrap_or_default();
    let input = StatusInput {
        generation: sub.meta().generation,
        route_name: &route_name,
        link_id: old.link_id.as_deref().unwrap_or_default(),
        now: Timestamp::now(),
        removal_timeout: ctx.config.cleanup_timeout,
        instances: &[],
        following: None,
    };
    let (mut status, _) = next_status(&old, &input, &reports);
    status.route_name = old.route_name.clone();
    status.link_id = old.link_id.clone();
    super::patch_status(sub, ctx, &status).await?;
    Err(Error::CleanupPending(pending.len()))
}

/// What a deleted Subscription removes: the route its status recorded and the one its spec asks
/// for (it may be installed on nodes the status did not record yet), and the nodes of both.
async fn routes_to_remove(sub: &Subscription, ctx: &Context, old: &SubscriptionStatus) -> (Vec<RouteRef>, Vec<String>) {
    let mut previous: Vec<RouteRef> = previous_route(old).into_iter().collect();
    let mut endpoints: Vec<String> = old.nodes.iter().map(|n| n.endpoint.clone()).collect();
    if let Ok(desired) = resolve_desired(sub, ctx).await {
        previous.push(desired.route);
        if let Ok(targets) = resolve_targets(sub, ctx) {
            endpoints.extend(targets.into_iter().map(|t| t.endpoint));
        }
    }
    previous.sort();
    previous.dedup();
    endpoints.sort();
    endpoints.dedup();
    (previous, endpoints)
}

/// Removes each route (and, once, the instance routes the status recorded) from every node: one
/// pass per route, sharing the node listings. The nodes that failed, once each.
async fn remove_everywhere(
    sub: &Subscription,
    ctx: &Context,
    old: &SubscriptionStatus,
    previous: &[RouteRef],
    endpoints: &[String],
    pool: &NodePool,
) -> Vec<NodeReport> {
    let users = StoreUsers { ctx, me: ObjectRef::from_obj(sub) };
    let instances = previous_instances(old);
    let no_instances = BTreeMap::new();
    let mut failures: Vec<NodeReport> = Vec::new();
    for (pass, route) in previous.iter().enumerate() {
        let reports = RouteSync {
            desired: None,
            targets: &[],
            previous: Some(route),
            previous_instances: if pass == 0 { &instances } else { &no_instances },
            previous_nodes: endpoints,
            users: &users,
            max_snapshot_age: ctx.config.snapshot_max_age,
        }
        .run(pool)
        .await;
        failures.extend(reports.into_iter().filter(|r| !r.ok()));
    }
    failures.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    failures.dedup_by(|a, b| a.endpoint == b.endpoint);
    failures
}

/// The route and link the spec asks for, with TLS material read from Secrets.
async fn resolve_desired(sub: &Subscription, ctx: &Context) -> Result<DesiredRoute, Error> {
    let name = SlimName::parse(&sub.spec.name).map_err(Error::InvalidName)?;
    let namespace = sub.namespace().ok_or(Error::MissingNamespace)?;
    let tls = match &sub.spec.link.tls {
        Some(settings) if !settings.insecure => crate::tls::link::resolve(&ctx.client, &namespace, settings).await?,
        _ => ResolvedTls::default(),
    };
    let link = render_link(&sub.spec.link, &tls);
    Ok(DesiredRoute::new(name, link))
}

/// Adds to `desired` the routes of its name's live instances, as the far node of the link lists
/// them (one listing per node, shared: the member watch's poll reads it too and triggers this
/// reconcile when they change). An unreachable far node keeps what was routed before.
async fn follow_instances(
    sub: &Subscription,
    ctx: &Context,
    desired: &mut DesiredRoute,
    old: &SubscriptionStatus,
) -> Followed {
    let key = ObjectRef::from_obj(sub);
    let namespace = sub.namespace().unwrap_or_default();
    let pods = ctx.pods.in_namespace(&namespace);
    let pods: Vec<&k8s_openapi::api::core::v1::Pod> = pods.iter().map(AsRef::as_ref).collect();
    let tls = sub.spec.nodes.tls.as_ref().is_some_and(|t| !t.insecure);
    let name = desired.route.name.clone();
    let link_id = desired.link.link_id.clone();
    let (endpoint, pod) = match following(&sub.spec, &name, &namespace, &pods, tls) {
        Following::Off { reason, message } => {
            ctx.member_watch.forget_subscription(&key);
            return Followed { ok: true, reason, message, far_node: None };
        }
        Following::Unknown(message) => {
            ctx.member_watch.forget_subscription(&key);
            let message = format!("instances of {name} cannot be followed: {message}");
            return Followed { ok: false, reason: follow_reason::FAR_NODE_UNKNOWN, message, far_node: None };
        }
        Following::Far { endpoint, pod } => (endpoint, pod),
    };
    let far = pod.map_or_else(|| endpoint.clone(), |pod| format!("{endpoint} (Pod {pod})"));
    let pool = match ctx.node_pool(&namespace, &sub.spec.nodes, std::slice::from_ref(&endpoint)).await {
        Ok(pool) => pool,
        Err(error) => {
            let message = format!("the far node {far} cannot be reached: {error}");
            return keep_previous(desired, old, message, endpoint);
        }
    };
    let listing = pool.node(&endpoint).snapshot(ctx.config.snapshot_max_age).await;
    let (routes, followed) = match listing {
        Ok(observed) => {
            desired.peer_links = peer_links(ctx).filter(|l| observed.links.contains(l)).collect();
            desired.far = Some(observed.clone());
            let routes = instance_routes(&name, &link_id, &observed);
            let message = format!("{} live instance(s) of {name} on the far node {far}", routes.len());
            (routes, Followed { ok: true, reason: follow_reason::FOLLOWING, message, far_node: Some(endpoint.clone()) })
        }
        Err(error) => {
            let followed =
                keep_previous(desired, old, format!("the far node {far} cannot be listed: {error}"), endpoint.clone());
            (desired.instances.clone(), followed)
        }
    };
    let ids = instance_ids(&routes).into_iter().collect();
    let dialed = Borrowable::of(&desired.link).map(|b| {
        let links = desired.far.as_deref().map(|far| b.dialed_by(far)).unwrap_or_default();
        (b, links)
    });
    let far = FarView { endpoint: &endpoint, pool, name: &name, link_id: &link_id };
    ctx.member_watch.record_subscription(key, far, ids, dialed);
    desired.instances = routes;
    followed
}

/// The links of peer Subscriptions (as their status records them).
fn peer_links(ctx: &Context) -> impl Iterator<Item = String> {
    ctx.subscriptions
        .state()
        .into_iter()
        .filter(|s| s.spec.link.connection_type == crate::api::ConnectionType::Peer)
        .filter_map(|s| s.status.as_ref()?.link_id.clone())
}

/// Keeps routing the instances routed before (an unreachable far node proves none gone).
fn keep_previous(desired: &mut DesiredRoute, old: &SubscriptionStatus, reason: String, endpoint: String) -> Followed {
    let mut ids: Vec<&String> = old.nodes.iter().flat_map(|n| &n.instances).collect();
    ids.sort();
    ids.dedup();
    desired.instances = ids
        .into_iter()
        .filter_map(|id| uuid::Uuid::try_parse(id).ok())
        .map(|id| RouteRef {
            name: desired.route.name.with_instance(id.as_u128()),
            link_id: desired.link.link_id.clone(),
        })
        .collect();
    let message = format!("{reason}; the {} instance route(s) routed before are kept", desired.instances.len());
    Followed { ok: false, reason: follow_reason::FAR_NODE_UNREACHABLE, message, far_node: Some(endpoint) }
}

/// The instances of instance routes, as UUID strings.
fn instance_ids(routes: &[RouteRef]) -> Vec<String> {
    routes.iter().filter_map(|r| r.name.instance()).map(|id| uuid::Uuid::from_u128(id).to_string()).collect()
}

/// The instance routes the status says are on each node (over the recorded link), and the route
/// itself on a node whose routes go over a borrowed link.
fn previous_instances(status: &SubscriptionStatus) -> BTreeMap<String, Vec<RouteRef>> {
    let Some(route) = previous_route(status) else { return BTreeMap::new() };
    let base = route.name.without_instance();
    status
        .nodes
        .iter()
        .map(|node| {
            let link_id = node.link.clone().unwrap_or_else(|| route.link_id.clone());
            let borrowed = node.link.as_ref().map(|_| RouteRef { name: route.name.clone(), link_id: link_id.clone() });
            let routes = node
                .instances
                .iter()
                .filter_map(|id| uuid::Uuid::try_parse(id).ok())
                .map(|id| RouteRef { name: base.with_instance(id.as_u128()), link_id: link_id.clone() })
                .chain(borrowed)
                .collect();
            (node.endpoint.clone(), routes)
        })
        .collect()
}

/// Explicit endpoints plus the Running node Pods the selector picks (from the Pod cache).
fn resolve_targets(sub: &Subscription, ctx: &Context) -> Result<Vec<NodeTarget>, Error> {
    let pods = match &sub.spec.nodes.selector {
        None => Vec::new(),
        Some(selector) => {
            selector_query(selector).map_err(Error::InvalidSelector)?;
            let namespace = sub.namespace().ok_or(Error::MissingNamespace)?;
            ctx.pods.matching(&namespace, selector)
        }
    };
    Ok(node_targets(&sub.spec.nodes, pods))
}

/// The route the status says was installed. A name that does not parse (the status was edited
/// by hand) is said, not silently dropped: that route cannot be removed from the nodes.
fn previous_route(status: &SubscriptionStatus) -> Option<RouteRef> {
    let text = status.route_name.as_deref()?;
    let name = match SlimName::parse(text) {
        Ok(name) => name,
        Err(error) => {
            tracing::warn!(route_name = text, %error, "status.routeName does not parse; the route it names is not cleaned up");
            return None;
        }
    };
    Some(RouteRef { name, link_id: status.link_id.clone()? })
}

/// The first failure among target nodes, as the reconcile's error.
fn failure_of(reports: &[NodeReport]) -> Option<Error> {
    let failed: Vec<&NodeReport> = reports.iter().filter(|r| !r.ok()).collect();
    if failed.is_empty() {
        return None;
    }
    let summary = failed
        .iter()
        .map(|r| match &r.result {
            // The node's error names the node already.
            NodeResult::Unreachable { message, .. } => message.clone(),
            NodeResult::Rejected(m) => format!("{}: {m}", r.endpoint),
            NodeResult::InSync { .. } => String::new(),
        })
        .collect::<Vec<_>>()
        .join("; ");
    if failed.iter().any(|r| matches!(r.result, NodeResult::Rejected(_))) {
        return Some(Error::RouteRejected(summary));
    }
    let tls = failed.iter().find_map(|r| match &r.result {
        NodeResult::Unreachable { tls, .. } => *tls,
        _ => None,
    });
    Some(Error::NodeUnreachable { summary, tls })
}

async fn announce(sub: &Subscription, ctx: &Context, notices: &Notices, route: &str) {
    if !notices.installed.is_empty() {
        let note = format!("route {route} installed on {}", notices.installed.join(", "));
        ctx.publish(sub, EventType::Normal, "RouteInstalled", note).await;
    }
    if !notices.repaired.is_empty() {
        for node in &notices.repaired {
            ctx.metrics.drift_repaired(node);
        }
        let note = format!("route {route} was missing and has been reinstalled on {}", notices.repaired.join(", "));
        ctx.publish(sub, EventType::Normal, "DriftRepaired", note).await;
    }
    if !notices.adopted.is_empty() {
        let note = format!(
            "route {route} and its link were already on {}: adopted, nothing written",
            notices.adopted.join(", ")
        );
        ctx.publish(sub, EventType::Normal, "Adopted", note).await;
    }
    if !notices.removed.is_empty() {
        let note = format!("route removed from {}, which left the Subscription", notices.removed.join(", "));
        ctx.publish(sub, EventType::Normal, "RouteRemoved", note).await;
    }
    if !notices.abandoned.is_empty() {
        let note = format!(
            "gave up removing the route from {} (unreachable past the cleanup timeout, or its Pod is gone)",
            notices.abandoned.join(", ")
        );
        ctx.publish(sub, EventType::Warning, "CleanupAbandoned", note).await;
    }
}

/// Other Subscriptions' recorded links and routes, from the controller's cache.
struct StoreUsers<'a> {
    ctx: &'a Context,
    me: ObjectRef<Subscription>,
}

impl StoreUsers<'_> {
    fn others_on(&self, node: &str) -> impl Iterator<Item = Arc<Subscription>> {
        let node = node.to_owned();
        let me = self.me.clone();
        self.ctx.subscriptions.state().into_iter().filter(move |s| {
            ObjectRef::from_obj(&**s) != me
                && s.meta().deletion_timestamp.is_none()
                && s.status.as_ref().is_some_and(|st| st.nodes.iter().any(|n| n.endpoint == node))
        })
    }
}

impl Users for StoreUsers<'_> {
    /// Another Subscription routes over the link on the node (its own link, unless it borrows
    /// the far node's there).
    fn link_in_use(&self, node: &str, link_id: &str) -> bool {
        self.others_on(node).any(|s| {
            let Some(status) = s.status.as_ref() else { return false };
            let borrows_here = status.nodes.iter().any(|n| n.endpoint == node && n.link.is_some());
            !borrows_here && status.link_id.as_deref() == Some(link_id)
        })
    }

    fn route_in_use(&self, node: &str, route: &RouteRef) -> bool {
        self.others_on(node).any(|s| {
            let Some(status) = s.status.as_ref() else { return false };
            previous_route(status).as_ref() == Some(route)
                || previous_instances(status).get(node).is_some_and(|routes| routes.contains(route))
        })
    }
}
