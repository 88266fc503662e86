//! The next `SubscriptionStatus` from the previous one and a sync's node reports. Pure.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::api::condition::{self, READY};
use crate::api::{NodeStatus, SubscriptionStatus};
use crate::engine::{NodeReport, NodeResult};

/// Condition reasons a Subscription can carry (documented in the README's troubleshooting).
pub mod reason {
    pub const ROUTES_INSTALLED: &str = "RoutesInstalled";
    pub const NO_NODES: &str = "NoNodes";
    pub const NODE_UNREACHABLE: &str = "NodeUnreachable";
    pub const ROUTE_REJECTED: &str = "RouteRejected";
}

/// The `InstancesFollowed` condition's type.
pub const INSTANCES_FOLLOWED: &str = "InstancesFollowed";

/// Inputs besides the reports.
pub struct StatusInput<'a> {
    pub generation: Option<i64>,
    pub route_name: &'a str,
    pub link_id: &'a str,
    pub now: Timestamp,
    /// How long removal from a node that left the Subscription is retried before it is abandoned.
    pub removal_timeout: Duration,
    /// The instances (UUIDs) routed on every target besides the name.
    pub instances: &'a [String],
    /// How instances are followed; `None` leaves the condition as it was (deletion).
    pub following: Option<&'a Followed>,
}

/// The outcome of following the name's instances, for status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Followed {
    /// Instances are routed as the far node lists them (or need not be).
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
    pub far_node: Option<String>,
}

/// Things the controller should tell the world about (events, metrics).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Notices {
    /// Nodes where the route was installed for the first time.
    pub installed: Vec<String>,
    /// Nodes that had the route (per the previous status) but had lost it: drift repaired.
    pub repaired: Vec<String>,
    /// Nodes the route was removed from.
    pub removed: Vec<String>,
    /// Nodes whose removal was abandoned after the timeout (unreachable or gone).
    pub abandoned: Vec<String>,
    /// Nodes that already had the route and link when first reached: adopted.
    pub adopted: Vec<String>,
}

/// Builds the next status. `lastSyncTime` moves only when a node was written, and the route and
/// link recorded in status move to the new ones only once no node can still hold the old ones, so
/// a later sync still knows what to remove.
pub fn next_status(
    old: &SubscriptionStatus,
    input: &StatusInput<'_>,
    reports: &[NodeReport],
) -> (SubscriptionStatus, Notices) {
    let mut notices = Notices::default();
    let mut nodes: Vec<NodeStatus> = reports
        .iter()
        .filter_map(|report| {
            let before = old.nodes.iter().find(|n| n.endpoint == report.endpoint);
            if report.target {
                Some(target_node(old, input, report, before, &mut notices))
            } else {
                leaving_node(input, report, before, &mut notices)
            }
        })
        .collect();
    nodes.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));

    let settled = reports.iter().all(NodeReport::ok) || old.route_name.is_none();
    let mut status = SubscriptionStatus {
        observed_generation: input.generation,
        conditions: old.conditions.clone(),
        route_name: if settled { Some(input.route_name.to_owned()) } else { old.route_name.clone() },
        link_id: if settled { Some(input.link_id.to_owned()) } else { old.link_id.clone() },
        nodes,
        far_node: input.following.map_or_else(|| old.far_node.clone(), |f| f.far_node.clone()),
    };
    condition::upsert(&mut status.conditions, ready(input, reports));
    if let Some(followed) = input.following {
        let followed = condition::condition(
            INSTANCES_FOLLOWED,
            followed.ok,
            followed.reason,
            followed.message.clone(),
            input.generation,
            input.now,
        );
        condition::upsert(&mut status.conditions, followed);
    }
    (status, notices)
}

/// A node the route must be on: installed, repaired or failing, and the instances it may hold.
fn target_node(
    old: &SubscriptionStatus,
    input: &StatusInput<'_>,
    report: &NodeReport,
    before: Option<&NodeStatus>,
    notices: &mut Notices,
) -> NodeStatus {
    let message = report.result.failure().map(str::to_owned);
    let installed = message.is_none();
    if report.wrote() {
        match before {
            Some(b) if b.route_installed && old.route_name.as_deref() == Some(input.route_name) => {
                notices.repaired.push(report.endpoint.clone())
            }
            _ => notices.installed.push(report.endpoint.clone()),
        }
    }
    let last_sync_time =
        if report.wrote() { Some(Time(input.now)) } else { before.and_then(|b| b.last_sync_time.clone()) };
    // First reached, and nothing had to be written: what the spec wants was already there.
    let adopted = match before {
        None => matches!(report.result, NodeResult::InSync { wrote: false }),
        Some(b) => b.adopted,
    };
    if adopted && before.is_none() {
        notices.adopted.push(report.endpoint.clone());
    }
    // A node not in sync may hold what it had and part of what was sent: both are remembered, so
    // a later sync can remove what is no longer wanted.
    let mut instances = input.instances.to_vec();
    if !installed {
        instances.extend(before.iter().flat_map(|b| b.instances.iter().cloned()));
        instances.sort();
        instances.dedup();
    }
    NodeStatus {
        endpoint: report.endpoint.clone(),
        pod: report.pod.clone(),
        route_installed: installed,
        last_sync_time,
        message,
        removing_since: None,
        instances,
        adopted,
        // A node not reached keeps the link its routes went over.
        link: if installed {
            report.borrowed.clone()
        } else {
            report.borrowed.clone().or(before.and_then(|b| b.link.clone()))
        },
    }
}

/// A node that left the Subscription: gone from status once removed, kept (with `removingSince`)
/// while removal fails, abandoned after the timeout or when its Pod is gone.
fn leaving_node(
    input: &StatusInput<'_>,
    report: &NodeReport,
    before: Option<&NodeStatus>,
    notices: &mut Notices,
) -> Option<NodeStatus> {
    let Some(message) = report.result.failure() else {
        notices.removed.push(report.endpoint.clone());
        return None;
    };
    let since = before.and_then(|b| b.removing_since.clone()).unwrap_or(Time(input.now));
    let expired = input.now.duration_since(since.0).unsigned_abs() >= input.removal_timeout;
    let pod_gone = before.is_some_and(|b| b.pod.is_some());
    if expired || pod_gone {
        notices.abandoned.push(report.endpoint.clone());
        return None;
    }
    Some(NodeStatus {
        endpoint: report.endpoint.clone(),
        pod: before.and_then(|b| b.pod.clone()),
        route_installed: before.is_some_and(|b| b.route_installed),
        last_sync_time: before.and_then(|b| b.last_sync_time.clone()),
        message: Some(format!("removing: {message}")),
        removing_since: Some(since),
        instances: before.map(|b| b.instances.clone()).unwrap_or_default(),
        adopted: before.is_some_and(|b| b.adopted),
        link: before.and_then(|b| b.link.clone()),
    })
}

/// The Ready condition: every target in sync, or why not (a TLS failure named by its cause).
fn ready(input: &StatusInput<'_>, reports: &[NodeReport]) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let targets: Vec<&NodeReport> = reports.iter().filter(|r| r.target).collect();
    let failed: Vec<&NodeReport> = targets.iter().copied().filter(|r| !r.ok()).collect();
    let (ok, reason_text, message) = if targets.is_empty() {
        (
            false,
            reason::NO_NODES,
            "no SLIM node selected: no endpoints, and the selector matches no Running Pod with an IP".to_owned(),
        )
    } else if failed.is_empty() {
        let instances = match input.instances.len() {
            0 => String::new(),
            n => format!(" with {n} instance route(s)"),
        };
        let message = format!(
            "route {} via {}{instances} installed on {} node(s)",
            input.route_name,
            input.link_id,
            targets.len()
        );
        (true, reason::ROUTES_INSTALLED, message)
    } else {
        let rejected = failed.iter().any(|r| matches!(r.result, NodeResult::Rejected(_)));
        let detail: Vec<String> =
            failed.iter().map(|r| format!("{}: {}", r.endpoint, r.result.failure().unwrap_or_default())).collect();
        let tls = failed.iter().find_map(|r| match &r.result {
            NodeResult::Unreachable { tls, .. } => *tls,
            _ => None,
        });
        let reason_text = match (rejected, tls) {
            (true, _) => reason::ROUTE_REJECTED,
            (false, Some(failure)) => failure.reason(),
            (false, None) => reason::NODE_UNREACHABLE,
        };
        let message = format!("{} of {} node(s) not in sync: {}", failed.len(), targets.len(), detail.join("; "));
        (false, reason_text, message)
    };
    condition::condition(READY, ok, reason_text, message, input.generation, input.now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::control::TlsFailure;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("valid")
    }

    fn input(now: i64) -> StatusInput<'static> {
        StatusInput {
            generation: Some(3),
            route_name: "o/n/a",
            link_id: "slimop-1",
            now: at(now),
            removal_timeout: Duration::from_secs(60),
            instances: &[],
            following: None,
        }
    }

    fn report(endpoint: &str, target: bool, result: NodeResult) -> NodeReport {
        NodeReport { endpoint: endpoint.into(), pod: None, target, result, borrowed: None }
    }

    fn ready(status: &SubscriptionStatus) -> (&str, &str) {
        let c = condition::find(&status.conditions, READY).expect("ready");
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn first_install_is_ready_and_stamped() {
        let (status, notices) = next_status(
            &SubscriptionStatus::default(),
            &input(100),
            &[report("http://a", true, NodeResult::InSync { wrote: true })],
        );
        assert_eq!(ready(&status), ("True", reason::ROUTES_INSTALLED));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.route_name.as_deref(), Some("o/n/a"));
        assert_eq!(status.link_id.as_deref(), Some("slimop-1"));
        assert_eq!(status.nodes[0].last_sync_time, Some(Time(at(100))));
        assert_eq!(notices.installed, vec!["http://a".to_string()]);
        assert!(notices.repaired.is_empty());
    }

    #[test]
    fn a_route_already_on_a_node_first_reached_is_adopted_once_and_stays_adopted() {
        let in_sync = |wrote| NodeResult::InSync { wrote };
        let (first, notices) = next_status(
            &SubscriptionStatus::default(),
            &input(100),
            &[report("http://a", true, in_sync(false)), report("http://b", true, in_sync(true))],
        );
        assert_eq!(notices.adopted, vec!["http://a".to_string()]);
        assert_eq!(notices.installed, vec!["http://b".to_string()]);
        assert_eq!((first.nodes[0].adopted, first.nodes[1].adopted), (true, false));
        assert_eq!(ready(&first), ("True", reason::ROUTES_INSTALLED));
        // Later passes (a repair included) keep the mark and say nothing more about it.
        let (later, notices) = next_status(&first, &input(200), &[report("http://a", true, in_sync(true))]);
        assert!(later.nodes[0].adopted && notices.adopted.is_empty());
        assert_eq!(notices.repaired, vec!["http://a".to_string()]);
    }

    #[test]
    fn no_change_resync_keeps_status_identical() {
        let (first, _) = next_status(
            &SubscriptionStatus::default(),
            &input(100),
            &[report("http://a", true, NodeResult::InSync { wrote: true })],
        );
        let (second, notices) =
            next_status(&first, &input(200), &[report("http://a", true, NodeResult::InSync { wrote: false })]);
        assert_eq!(first, second, "nothing changed, so nothing to write");
        assert_eq!(notices, Notices::default());
    }

    #[test]
    fn write_on_a_node_that_had_the_route_is_a_drift_repair() {
        let (first, _) = next_status(
            &SubscriptionStatus::default(),
            &input(100),
            &[report("http://a", true, NodeResult::InSync { wrote: true })],
        );
        let (second, notices) =
            next_status(&first, &input(200), &[report("http://a", true, NodeResult::InSync { wrote: true })]);
        assert_eq!(notices.repaired, vec!["http://a".to_string()]);
        assert_eq!(second.nodes[0].last_sync_time, Some(Time(at(200))));
    }

    #[test]
    fn unreachable_and_rejected_nodes_make_it_not_ready() {
        let reports = [
            report("http://a", true, NodeResult::InSync { wrote: true }),
            report("http://b", true, NodeResult::Unreachable { message: "connect refused".into(), tls: None }),
        ];
        let (status, _) = next_status(&SubscriptionStatus::default(), &input(100), &reports);
        assert_eq!(ready(&status), ("False", reason::NODE_UNREACHABLE));
        let b = status.nodes.iter().find(|n| n.endpoint == "http://b").expect("b");
        assert!(!b.route_installed);
        assert_eq!(b.message.as_deref(), Some("connect refused"));
        let untrusted = [report(
            "https://a",
            true,
            NodeResult::Unreachable {
                message: "node https://a unreachable: connect: invalid peer certificate: UnknownIssuer".into(),
                tls: Some(TlsFailure::UntrustedServer),
            },
        )];
        let (status, _) = next_status(&SubscriptionStatus::default(), &input(100), &untrusted);
        assert_eq!(ready(&status), ("False", "TlsUntrustedServer"));
        let rejected = [report("http://a", true, NodeResult::Rejected("bad".into()))];
        let (status, _) = next_status(&SubscriptionStatus::default(), &input(100), &rejected);
        assert_eq!(ready(&status), ("False", reason::ROUTE_REJECTED));
    }

    #[test]
    fn old_route_is_kept_until_every_node_settled() {
        let old = SubscriptionStatus {
            route_name: Some("o/n/old".into()),
            link_id: Some("slimop-0".into()),
            ..Default::default()
        };
        let reports = [
            report("http://a", true, NodeResult::InSync { wrote: true }),
            report("http://b", true, NodeResult::Unreachable { message: "down".into(), tls: None }),
        ];
        let (status, _) = next_status(&old, &input(100), &reports);
        assert_eq!(status.route_name.as_deref(), Some("o/n/old"), "b may still hold the old route");
    }

    #[test]
    fn leaving_nodes_are_removed_retried_then_abandoned() {
        let old = SubscriptionStatus {
            route_name: Some("o/n/a".into()),
            link_id: Some("slimop-1".into()),
            nodes: vec![NodeStatus { endpoint: "http://gone".into(), route_installed: true, ..Default::default() }],
            ..Default::default()
        };
        let target = report("http://a", true, NodeResult::InSync { wrote: false });
        let (removed, notices) = next_status(
            &old,
            &input(100),
            &[target.clone(), report("http://gone", false, NodeResult::InSync { wrote: true })],
        );
        assert_eq!(removed.nodes.len(), 1);
        assert_eq!(notices.removed, vec!["http://gone".to_string()]);

        let failing = report("http://gone", false, NodeResult::Unreachable { message: "down".into(), tls: None });
        let (pending, _) = next_status(&old, &input(100), &[target.clone(), failing.clone()]);
        let entry = pending.nodes.iter().find(|n| n.endpoint == "http://gone").expect("kept while retrying");
        assert_eq!(entry.removing_since, Some(Time(at(100))));
        let (still, _) = next_status(&pending, &input(130), &[target.clone(), failing.clone()]);
        assert!(still.nodes.iter().any(|n| n.endpoint == "http://gone"), "timeout not reached yet");
        let (gave_up, notices) = next_status(&still, &input(161), &[target, failing]);
        assert!(gave_up.nodes.iter().all(|n| n.endpoint != "http://gone"));
        assert_eq!(notices.abandoned, vec!["http://gone".to_string()]);
    }

    #[test]
    fn instances_routed_are_listed_per_node_and_kept_where_a_node_failed() {
        const OLD: &str = "0b3c5a8e-1111-4222-8333-944455556666";
        const NEW: &str = "d165bd17-d238-547c-ad69-4d19eb78171a";
        let old = SubscriptionStatus {
            route_name: Some("o/n/a".into()),
            link_id: Some("slimop-1".into()),
            nodes: ["http://a", "http://b"]
                .map(|e| NodeStatus { endpoint: e.into(), instances: vec![OLD.into()], ..Default::default() })
                .to_vec(),
            ..Default::default()
        };
        let instances = [NEW.to_owned()];
        let followed = Followed {
            ok: true,
            reason: "Following",
            message: "1 instance on http://far".into(),
            far_node: Some("http://far".into()),
        };
        let input = StatusInput { instances: &instances, following: Some(&followed), ..input(100) };
        let reports = [
            report("http://a", true, NodeResult::InSync { wrote: true }),
            report("http://b", true, NodeResult::Unreachable { message: "down".into(), tls: None }),
        ];
        let (status, _) = next_status(&old, &input, &reports);
        assert_eq!(status.nodes[0].instances, [NEW], "a: what is routed now");
        assert_eq!(status.nodes[1].instances, [OLD, NEW], "b: may hold either");
        assert_eq!(status.far_node.as_deref(), Some("http://far"));
        let condition = condition::find(&status.conditions, INSTANCES_FOLLOWED).expect("condition");
        assert_eq!((condition.status.as_str(), condition.reason.as_str()), ("True", "Following"));
    }

    #[test]
    fn no_targets_is_reported() {
        let (status, _) = next_status(&SubscriptionStatus::default(), &input(1), &[]);
        assert_eq!(ready(&status), ("False", reason::NO_NODES));
    }
}
