//! Reconciling a `SlimChannel`: desired participants (spec and selected Pods), live instances
//! (optional nodes), a channel sync, then status and events.

use crate::slim::NodePool;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::channel_status::{ChannelNotices, ChannelStatusInput, next_channel_status, reason};
use super::{Context, Error};
use crate::api::SlimChannel;
use crate::api::condition::failed;
use crate::engine::{ChannelReport, ChannelSync};
use crate::plan::channel::{Incarnation, Incarnations, LiveInstances, live_instances};
use crate::plan::conflicts::{self, Claim};
use crate::plan::{node_targets, selector_query};
use crate::slim::SlimName;

/// Finalizer that keeps a SlimChannel until its channel is deleted from the channel manager.
pub const FINALIZER: &str = "slimchannels.slim.agntcy.org/cleanup";
/// Pod annotation with the SLIM name a selected Pod joins as.
pub const NAME_ANNOTATION: &str = "slim.agntcy.org/name";

/// How often a channel with members not yet in is looked at again (offline ones may connect).
const PENDING_RECHECK: Duration = Duration::from_secs(15);

pub async fn reconcile(channel: Arc<SlimChannel>, ctx: Arc<Context>) -> Result<Action, Error> {
    let (for_apply, for_cleanup) = (ctx.clone(), ctx.clone());
    super::reconcile_finalized(
        channel,
        ctx,
        FINALIZER,
        |channel| async move { apply(&channel, &for_apply).await },
        |channel| async move { cleanup(&channel, &for_cleanup).await },
    )
    .await
}

fn manager_endpoint(channel: &SlimChannel, ctx: &Context) -> Option<String> {
    channel.spec.channel_manager.as_ref().map(|m| m.endpoint.trim_end_matches('/').to_owned()).or_else(|| {
        channel.status.as_ref().and_then(|s| s.channel_manager.clone()).or_else(|| ctx.config.channel_manager.clone())
    })
}

async fn apply(channel: &SlimChannel, ctx: &Context) -> Result<Action, Error> {
    let old = channel.status.clone().unwrap_or_default();
    let generation = channel.meta().generation;
    let fail = |error: Error| async {
        let status = failed(&old, generation, error.reason(), error.to_string(), Timestamp::now());
        super::patch_status(channel, ctx, &status).await?;
        Err::<Action, Error>(error)
    };
    let Some(endpoint) = manager_endpoint(channel, ctx) else {
        return fail(Error::NoChannelManager).await;
    };
    if let Some(message) = conflict(channel, &endpoint, ctx) {
        let status = failed(&old, generation, CONFLICT, message, Timestamp::now());
        super::patch_status(channel, ctx, &status).await?;
        return Ok(Action::requeue(PENDING_RECHECK));
    }
    if old.mls_enabled.is_some_and(|created_with| created_with != channel.spec.mls_enabled) {
        // The CRD refuses this change; an object stored before that rule gets a clear condition.
        let status =
            failed(&old, generation, reason::MLS_CHANGE_REFUSED, Error::MlsChangeRefused.to_string(), Timestamp::now());
        super::patch_status(channel, ctx, &status).await?;
        return Ok(Action::await_change());
    }
    let manager = match ctx.channel_manager(channel, &endpoint).await {
        Ok(manager) => manager,
        Err(error) => return fail(error).await,
    };
    let Participants { desired, pods, leaving, incarnations } = match desired_participants(channel, ctx) {
        Ok(found) => found,
        Err(error) => return fail(error).await,
    };
    // A member on its way out is handed over only while it still answers: read the nodes now, not
    // a listing from before its successor connected.
    let max_age = if leaving.is_empty() { ctx.config.snapshot_max_age } else { Duration::ZERO };
    let (live, consulted, pool) = live_participants(channel, ctx, &desired, max_age).await;
    let key = ObjectRef::from_obj(channel);
    match &live {
        Some(live) => ctx.member_watch.record(key.clone(), consulted.clone(), pool, desired.clone(), live.clone()),
        None => ctx.member_watch.forget(&key),
    }
    let managed_before: BTreeSet<String> = old.participants.iter().map(|p| p.name.clone()).collect();
    let trigger = ctx.channel_trigger.clone();
    let report = ctx
        .channel_engine
        .sync(ChannelSync {
            manager: &manager,
            channel: &channel.spec.name,
            mls_enabled: channel.spec.mls_enabled,
            desired: &desired,
            managed_before: &managed_before,
            live: live.as_ref(),
            leaving: &leaving,
            incarnations: &incarnations,
            on_done: Arc::new(move || {
                let _ = trigger.send(key.clone());
            }),
        })
        .await;
    let report = match report {
        Ok(report) => report,
        Err(error) => return fail(Error::ChannelManager(error)).await,
    };
    let input = ChannelStatusInput {
        generation,
        channel_manager: &endpoint,
        mls_enabled: channel.spec.mls_enabled,
        pods: &pods,
        nodes: if live.is_some() { &consulted } else { &[] },
        watched: !consulted.is_empty(),
        now: Timestamp::now(),
    };
    let (status, notices) = next_channel_status(&old, &input, &report);
    super::patch_status(channel, ctx, &status).await?;
    announce(channel, ctx, &notices).await;
    if report.manager_lost_node.is_some() && ctx.config.heal_channel_manager && status.joined < status.desired {
        super::heal::restart_manager(channel, &endpoint, ctx).await;
    }

    Ok(next_check(&report, status.joined == status.desired, ctx))
}

/// When to look again after a sync.
fn next_check(report: &ChannelReport, all_in: bool, ctx: &Context) -> Action {
    match (report.busy, report.retry_in) {
        // A finished operation triggers a reconcile; the requeue is only a backstop.
        (true, _) => Action::requeue(Duration::from_secs(10)),
        (false, Some(retry)) => Action::requeue(retry.max(Duration::from_millis(500))),
        (false, None) if !all_in => Action::requeue(PENDING_RECHECK),
        (false, None) => Action::requeue(crate::backoff::jitter(ctx.config.resync_interval)),
    }
}

async fn cleanup(channel: &SlimChannel, ctx: &Context) -> Result<Action, Error> {
    ctx.member_watch.forget(&ObjectRef::from_obj(channel));
    if channel.spec.deletion_policy == crate::api::DeletionPolicy::Retain {
        let status = channel.status.clone().unwrap_or_default();
        let joined: Vec<&str> = status.participants.iter().filter(|p| p.joined).map(|p| p.name.as_str()).collect();
        let note = format!(
            "deletionPolicy Retain: left channel {} on {} with {} member(s): {}",
            channel.spec.name,
            status.channel_manager.as_deref().unwrap_or("(no channel manager recorded)"),
            joined.len(),
            joined.join(", ")
        );
        ctx.publish(channel, EventType::Normal, "Retained", note).await;
        return Ok(Action::await_change());
    }
    let Some(endpoint) = manager_endpoint(channel, ctx) else {
        info!("no channel manager was ever used; nothing to delete");
        return Ok(Action::await_change());
    };
    for other in ctx.channels.claiming(&channel.spec.name).iter().filter(|o| o.uid() != channel.uid()) {
        let _ = ctx.channel_trigger.send(ObjectRef::from_obj(&**other));
    }
    if let Some(message) = conflict(channel, &endpoint, ctx) {
        info!(%message, "the channel belongs to an older SlimChannel: not deleted");
        return Ok(Action::await_change());
    }
    let result = match ctx.channel_manager(channel, &endpoint).await {
        Ok(manager) => ctx.channel_engine.delete(&manager, &channel.spec.name).await.map_err(Error::ChannelManager),
        Err(error) => Err(error),
    };
    let Err(error) = result else {
        info!(channel = %channel.spec.name, "channel deleted; releasing the finalizer");
        return Ok(Action::await_change());
    };
    let since = channel.meta().deletion_timestamp.as_ref().map(|t| t.0).unwrap_or_else(Timestamp::now);
    if Timestamp::now().duration_since(since).unsigned_abs() >= ctx.config.cleanup_timeout {
        let note = format!(
            "gave up deleting channel {} after {:?}: {error}; delete it from the channel manager by hand if it still exists",
            channel.spec.name, ctx.config.cleanup_timeout
        );
        ctx.publish(channel, EventType::Warning, "CleanupAbandoned", note).await;
        return Ok(Action::await_change());
    }
    // The condition, the event and the metric all say CleanupPending.
    let error = match error {
        Error::ChannelManager(error) => Error::ChannelCleanupPending(error),
        other => other,
    };
    let old = channel.status.clone().unwrap_or_default();
    let status = failed(&old, channel.meta().generation, error.reason(), error.to_string(), Timestamp::now());
    super::patch_status(channel, ctx, &status).await?;
    Err(error)
}

/// Ready's reason while an older SlimChannel's claim on the same channel wins.
pub const CONFLICT: &str = "Conflict";

fn claim_of(channel: &SlimChannel, endpoint: &str) -> Option<Claim> {
    Some(Claim {
        created: channel.meta().creation_timestamp.as_ref()?.0.as_second(),
        id: format!("{}/{}", channel.namespace().unwrap_or_default(), channel.name_any()),
        name: channel.spec.name.clone(),
        places: [endpoint.to_owned()].into(),
        how: String::new(),
    })
}

/// Why this SlimChannel must yield, if an older one wants the same channel on the same manager.
fn conflict(channel: &SlimChannel, endpoint: &str, ctx: &Context) -> Option<String> {
    let mine = claim_of(channel, endpoint)?;
    let others: Vec<Claim> = ctx
        .channels
        .claiming(&channel.spec.name)
        .iter()
        .filter(|o| o.meta().deletion_timestamp.is_none())
        .filter_map(|o| claim_of(o, &manager_endpoint(o, ctx)?))
        .collect();
    conflicts::winner(&mine, &others).map(|winner| conflicts::message("channel", &mine, winner))
}

/// Who should be in the channel.
#[derive(Default)]
struct Participants {
    /// `spec.participants` plus the names of the serving Pods `participantSelector` picks.
    desired: BTreeSet<String>,
    /// The Pod behind each selected name.
    pods: BTreeMap<String, String>,
    /// Names with a selected Pod that is terminating while its app may still run (its instance is
    /// on its way out).
    leaving: BTreeSet<String>,
    /// The process behind each name one serving Pod has (a name two Pods claim has none).
    incarnations: Incarnations,
}

fn desired_participants(channel: &SlimChannel, ctx: &Context) -> Result<Participants, Error> {
    let mut found = Participants { desired: channel.spec.participants.iter().cloned().collect(), ..Default::default() };
    let Some(selector) = &channel.spec.participant_selector else {
        return Ok(found);
    };
    let namespace = channel.namespace().ok_or(Error::MissingNamespace)?;
    selector_query(selector).map_err(Error::InvalidSelector)?;
    for pod in ctx.pods.matching(&namespace, selector) {
        let Some(name) = pod.annotations().get(NAME_ANNOTATION) else { continue };
        match SlimName::parse(name) {
            Ok(parsed) if parsed.instance().is_none() => {
                if pod.meta().deletion_timestamp.is_some() && Incarnation::may_run(&pod) {
                    found.leaving.insert(name.clone());
                }
                if crate::plan::nodes::serving(&pod) {
                    found.desired.insert(name.clone());
                    if found.pods.insert(name.clone(), pod.name_any()).is_none() {
                        found.incarnations.insert(name.clone(), Incarnation::of(&pod));
                    } else {
                        found.incarnations.remove(name);
                    }
                }
            }
            _ => {
                warn!(pod = %pod.name_any(), annotation = %name, "annotation {NAME_ANNOTATION} is not org/namespace/name; ignored")
            }
        }
    }
    Ok(found)
}

/// Live instances from the channel's nodes (`spec.nodes`, else the operator's default node set)
/// and the endpoints consulted; `None` (unknown) when there are none or any of them could not be
/// listed: a wrong guess would re-invite healthy members.
async fn live_participants(
    channel: &SlimChannel,
    ctx: &Context,
    desired: &BTreeSet<String>,
    max_age: Duration,
) -> (Option<LiveInstances>, Vec<String>, NodePool) {
    let nodes = channel.spec.nodes.as_ref().unwrap_or(&ctx.config.default_nodes);
    let pods = match (&nodes.selector, channel.namespace()) {
        (None, _) | (_, None) => Vec::new(),
        (Some(selector), Some(namespace)) => {
            if let Err(error) = selector_query(selector) {
                warn!(%error, "the channel's node selector is invalid; members' live instances unknown");
                return (None, Vec::new(), ctx.nodes.clone());
            }
            ctx.pods.matching(&namespace, selector)
        }
    };
    let endpoints: Vec<String> = node_targets(nodes, pods).into_iter().map(|t| t.endpoint).collect();
    if endpoints.is_empty() {
        return (None, endpoints, ctx.nodes.clone());
    }
    let namespace = channel.namespace().unwrap_or_default();
    let pool = match ctx.node_pool(&namespace, nodes, &endpoints).await {
        Ok(pool) => pool,
        Err(error) => {
            warn!(%error, "the channel's nodes cannot be reached (TLS settings); members' live instances unknown");
            return (None, endpoints, ctx.nodes.clone());
        }
    };
    let listings =
        futures::future::join_all(endpoints.iter().map(|e| async { pool.node(e).snapshot(max_age).await })).await;
    match listings.into_iter().collect::<Result<Vec<_>, _>>() {
        Ok(observed) => (Some(live_instances(desired, observed.iter().map(|o| o.as_ref()), None)), endpoints, pool),
        Err(error) => {
            warn!(%error, "a node of the channel could not be listed; members' live instances unknown");
            (None, endpoints, pool)
        }
    }
}

async fn announce(channel: &SlimChannel, ctx: &Context, notices: &ChannelNotices) {
    if notices.created {
        let note = format!(
            "channel {} created (MLS {})",
            channel.spec.name,
            if channel.spec.mls_enabled { "on" } else { "off" }
        );
        ctx.publish(channel, EventType::Normal, "ChannelCreated", note).await;
    }
    if !notices.joined.is_empty() {
        ctx.publish(channel, EventType::Normal, "ParticipantsJoined", format!("joined: {}", notices.joined.join(", ")))
            .await;
    }
    if !notices.removed.is_empty() {
        ctx.publish(
            channel,
            EventType::Normal,
            "ParticipantsRemoved",
            format!("removed: {}", notices.removed.join(", ")),
        )
        .await;
    }
    if !notices.failed.is_empty() {
        ctx.publish(channel, EventType::Warning, "InviteFailed", notices.failed.join("; ")).await;
    }
    if notices.adopted {
        let note =
            format!("channel {} already existed on the channel manager: adopted, not created", channel.spec.name);
        ctx.publish(channel, EventType::Normal, "Adopted", note).await;
    }
    if notices.unwatched {
        let note = super::channel_status::NO_NODES_REMEDY.to_owned();
        ctx.publish(channel, EventType::Warning, "MembersUnwatched", note).await;
    }
    if let Some(refusal) = &notices.manager_lost_node {
        let note = format!(
            "the channel manager has lost its connection to its SLIM node ({refusal}); {}",
            super::channel_status::MANAGER_LOST_NODE_REMEDY
        );
        ctx.publish(channel, EventType::Warning, "ChannelManagerLostNode", note).await;
    }
}
