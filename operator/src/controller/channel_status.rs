//! The next `SlimChannelStatus` from the previous one and a sync's report. Pure.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;

use crate::api::condition::{self, READY};
use crate::api::{ParticipantStatus, SlimChannelStatus};
use crate::engine::ChannelReport;

/// Condition reasons a SlimChannel can carry (documented in the README's troubleshooting).
pub mod reason {
    pub const ALL_JOINED: &str = "AllJoined";
    pub const PARTICIPANTS_PENDING: &str = "ParticipantsPending";
    pub const MLS_CHANGE_REFUSED: &str = "MlsChangeRefused";
    pub const NODES_CONSULTED: &str = "NodesConsulted";
    pub const NO_NODES: &str = "NoNodes";
    pub const MANAGER_LOST_NODE: &str = "ChannelManagerLostNode";
}

/// What to do about a channel manager that lost its node (the condition's message ends with it).
pub const MANAGER_LOST_NODE_REMEDY: &str = "SLIM 3.4.6 does not dial its node again after a failed reconnect: restart the channel manager (its Pod), or run the operator with --heal-channel-manager to have it done";

/// Whether members' restarts are noticed: some SLIM node's route list is read for them.
pub const MEMBERS_WATCHED: &str = "MembersWatched";

/// What to do when no node is consulted (the condition's message and the event's note).
pub const NO_NODES_REMEDY: &str = "no SLIM node is consulted for this channel's members, so a member that restarts is not noticed (and not invited again): set spec.nodes, label the node Pods in this namespace with the default selector (app.kubernetes.io/name=slim), or start the operator with --default-node-endpoints";

pub struct ChannelStatusInput<'a> {
    pub generation: Option<i64>,
    pub channel_manager: &'a str,
    pub mls_enabled: bool,
    /// Pod of each participant chosen by `participantSelector`.
    pub pods: &'a BTreeMap<String, String>,
    /// The nodes whose route lists gave the live instances (none: unknown).
    pub nodes: &'a [String],
    /// Some node is consulted for live members (even if its list could not be read this time).
    pub watched: bool,
    pub now: Timestamp,
}

/// What changed, for events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelNotices {
    pub created: bool,
    pub joined: Vec<String>,
    pub removed: Vec<String>,
    /// Participants whose failure message is new (`name: message`).
    pub failed: Vec<String>,
    /// `MembersWatched` has just become False.
    pub unwatched: bool,
    /// The channel already existed when first synced: adopted.
    pub adopted: bool,
    /// `Ready` has just become `ChannelManagerLostNode`: the manager's refusal.
    pub manager_lost_node: Option<String>,
}

pub fn next_channel_status(
    old: &SlimChannelStatus,
    input: &ChannelStatusInput<'_>,
    report: &ChannelReport,
) -> (SlimChannelStatus, ChannelNotices) {
    let mut notices = ChannelNotices { created: report.created, ..Default::default() };
    let participants = participants(old, input, report, &mut notices);
    let desired = report.members.len();
    let joined = report.members.iter().filter(|m| m.joined).count();
    let mut status = SlimChannelStatus {
        observed_generation: input.generation,
        conditions: old.conditions.clone(),
        mls_enabled: Some(old.mls_enabled.unwrap_or(input.mls_enabled)),
        channel_manager: Some(input.channel_manager.to_owned()),
        joined: i32::try_from(joined).unwrap_or(i32::MAX),
        desired: i32::try_from(desired).unwrap_or(i32::MAX),
        nodes: input.nodes.to_vec(),
        participants,
        // First synced (no manager recorded yet) and not created: it was already there.
        adopted: old.adopted || (old.channel_manager.is_none() && !report.created),
    };
    notices.adopted = status.adopted && !old.adopted;
    let ready = ready_condition(input, report);
    let was_lost = condition::find(&old.conditions, READY).is_some_and(|c| c.reason == reason::MANAGER_LOST_NODE);
    if ready.reason == reason::MANAGER_LOST_NODE && !was_lost {
        notices.manager_lost_node = report.manager_lost_node.clone();
    }
    condition::upsert(&mut status.conditions, ready);
    let was_watched = condition::find(&old.conditions, MEMBERS_WATCHED).is_none_or(|c| c.status == "True");
    notices.unwatched = was_watched && !input.watched;
    let watched = match input.watched {
        true => (reason::NODES_CONSULTED, "members' live instances are read from the channel's SLIM nodes".to_owned()),
        false => (reason::NO_NODES, NO_NODES_REMEDY.to_owned()),
    };
    condition::upsert(
        &mut status.conditions,
        condition::condition(MEMBERS_WATCHED, input.watched, watched.0, watched.1, input.generation, input.now),
    );
    (status, notices)
}

/// Every desired participant and every one being removed, sorted by name; who joined, failed
/// anew or was removed since `old` goes to `notices`.
fn participants(
    old: &SlimChannelStatus,
    input: &ChannelStatusInput<'_>,
    report: &ChannelReport,
    notices: &mut ChannelNotices,
) -> Vec<ParticipantStatus> {
    let before = |name: &str| old.participants.iter().find(|p| p.name == name);
    let mut participants: Vec<ParticipantStatus> = report
        .members
        .iter()
        .map(|m| {
            if m.joined && !before(&m.name).is_some_and(|b| b.joined) {
                notices.joined.push(m.name.clone());
            }
            if let Some(message) = m.message.as_deref().filter(|_| m.failing) {
                let old_message = before(&m.name).and_then(|b| b.message.as_deref());
                if old_message != Some(message) {
                    notices.failed.push(format!("{}: {message}", m.name));
                }
            }
            ParticipantStatus {
                name: m.name.clone(),
                joined: m.joined,
                instance: m.instance.clone(),
                pod: input.pods.get(&m.name).cloned(),
                message: m.message.clone(),
                leaving: false,
            }
        })
        .collect();
    participants.extend(report.leaving.iter().map(|m| ParticipantStatus {
        name: m.name.clone(),
        joined: true,
        instance: None,
        pod: None,
        message: m.message.clone().or_else(|| Some("being removed".into())),
        leaving: true,
    }));
    for gone in old.participants.iter().filter(|p| !participants.iter().any(|n| n.name == p.name)) {
        notices.removed.push(gone.name.clone());
    }
    participants.sort_by(|a, b| a.name.cmp(&b.name));
    participants
}

/// `Ready`: every desired participant joined, or who is still awaited.
fn ready_condition(
    input: &ChannelStatusInput<'_>,
    report: &ChannelReport,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let desired = report.members.len();
    let joined = report.members.iter().filter(|m| m.joined).count();
    let (ok, reason_text, message) = if joined == desired {
        (true, reason::ALL_JOINED, format!("all {desired} participant(s) are in the channel"))
    } else if let Some(refusal) = &report.manager_lost_node {
        let message = format!(
            "{joined} of {desired} joined: the channel manager {} has lost its connection to its SLIM node, so every invite fails ({refusal}); {MANAGER_LOST_NODE_REMEDY}",
            input.channel_manager
        );
        (false, reason::MANAGER_LOST_NODE, message)
    } else {
        let waiting: Vec<&str> = report.members.iter().filter(|m| !m.joined).map(|m| m.name.as_str()).collect();
        (
            false,
            reason::PARTICIPANTS_PENDING,
            format!("{joined} of {desired} joined; waiting for {}", waiting.join(", ")),
        )
    };
    condition::condition(READY, ok, reason_text, message, input.generation, input.now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ParticipantReport;

    fn member(name: &str, joined: bool, message: Option<&str>) -> ParticipantReport {
        ParticipantReport {
            name: name.into(),
            joined,
            instance: joined.then(|| format!("{name}/0b3c5a8e-1111-4222-8333-944455556666")),
            // As the engine words a failed operation's note.
            failing: message.is_some_and(|m| m.contains("failed")),
            message: message.map(str::to_owned),
        }
    }

    fn input(pods: &BTreeMap<String, String>) -> ChannelStatusInput<'_> {
        ChannelStatusInput {
            generation: Some(4),
            channel_manager: "http://cm:10356",
            mls_enabled: true,
            pods,
            nodes: &[],
            watched: true,
            now: Timestamp::from_second(100).expect("time"),
        }
    }

    fn ready(status: &SlimChannelStatus) -> (&str, &str) {
        let c = condition::find(&status.conditions, READY).expect("ready");
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn ready_only_when_everyone_joined() {
        let pods = BTreeMap::from([("o/n/carol".to_string(), "carol-7d9f".to_string())]);
        let report = ChannelReport {
            created: true,
            members: vec![member("o/n/bob", true, None), member("o/n/carol", false, Some("invite in progress"))],
            ..Default::default()
        };
        let (status, notices) = next_channel_status(&SlimChannelStatus::default(), &input(&pods), &report);
        assert_eq!(ready(&status), ("False", reason::PARTICIPANTS_PENDING));
        assert_eq!((status.joined, status.desired), (1, 2));
        assert_eq!(status.mls_enabled, Some(true));
        assert_eq!(status.participants[1].pod.as_deref(), Some("carol-7d9f"));
        assert!(notices.created);
        assert_eq!(notices.joined, vec!["o/n/bob".to_string()]);

        let all_in = ChannelReport {
            members: vec![member("o/n/bob", true, None), member("o/n/carol", true, None)],
            ..Default::default()
        };
        let (status, notices) = next_channel_status(&status, &input(&pods), &all_in);
        assert_eq!(ready(&status), ("True", reason::ALL_JOINED));
        assert_eq!(notices.joined, vec!["o/n/carol".to_string()], "only the newly joined are announced");
    }

    #[test]
    fn a_manager_that_lost_its_node_is_its_own_reason_announced_once() {
        let pods = BTreeMap::new();
        let lost = ChannelReport {
            members: vec![member("o/n/bob", true, None), member("o/n/carol", false, Some("invite failed: …"))],
            manager_lost_node: Some("no matching found for [1, 2, 3, NULL_COMPONENT]".into()),
            ..Default::default()
        };
        let (status, notices) = next_channel_status(&SlimChannelStatus::default(), &input(&pods), &lost);
        assert_eq!(ready(&status), ("False", reason::MANAGER_LOST_NODE));
        let message = &condition::find(&status.conditions, READY).expect("ready").message;
        assert!(message.contains("no matching found") && message.contains("--heal-channel-manager"), "{message}");
        assert_eq!(notices.manager_lost_node.as_deref(), Some("no matching found for [1, 2, 3, NULL_COMPONENT]"));
        let (again, notices) = next_channel_status(&status, &input(&pods), &lost);
        assert_eq!(ready(&again), ("False", reason::MANAGER_LOST_NODE));
        assert_eq!(notices.manager_lost_node, None, "announced once");
        // Everyone in: the manager's state does not hold the channel back.
        let all_in = ChannelReport {
            members: vec![member("o/n/bob", true, None)],
            manager_lost_node: lost.manager_lost_node.clone(),
            ..Default::default()
        };
        assert_eq!(ready(&next_channel_status(&again, &input(&pods), &all_in).0), ("True", reason::ALL_JOINED));
    }

    #[test]
    fn failures_are_announced_once_and_removals_noticed() {
        let pods = BTreeMap::new();
        let failing = ChannelReport {
            members: vec![member("o/n/dave", false, Some("invite failed: offline; retrying in 4s"))],
            leaving: vec![member("o/n/old", true, Some("removal in progress"))],
            ..Default::default()
        };
        let (status, notices) = next_channel_status(&SlimChannelStatus::default(), &input(&pods), &failing);
        assert_eq!(notices.failed.len(), 1);
        assert!(status.participants.iter().any(|p| p.name == "o/n/old" && p.leaving));
        let (status, notices) = next_channel_status(&status, &input(&pods), &failing);
        assert!(notices.failed.is_empty(), "the same failure is not announced again");
        let done = ChannelReport { members: failing.members.clone(), ..Default::default() };
        let (_, notices) = next_channel_status(&status, &input(&pods), &done);
        assert_eq!(notices.removed, vec!["o/n/old".to_string()]);
    }

    #[test]
    fn the_creation_mls_setting_is_kept() {
        let old = SlimChannelStatus { mls_enabled: Some(false), ..Default::default() };
        let (status, _) = next_channel_status(&old, &input(&BTreeMap::new()), &ChannelReport::default());
        assert_eq!(status.mls_enabled, Some(false));
    }

    #[test]
    fn a_channel_that_consults_no_node_says_its_members_are_not_watched_and_warns_once() {
        let pods = BTreeMap::new();
        let report = ChannelReport { members: vec![member("org/ns/a", true, None)], ..Default::default() };
        let unwatched = ChannelStatusInput { watched: false, ..input(&pods) };
        let (status, notices) = next_channel_status(&SlimChannelStatus::default(), &unwatched, &report);
        let watched = condition::find(&status.conditions, MEMBERS_WATCHED).expect("condition");
        assert_eq!((watched.status.as_str(), watched.reason.as_str()), ("False", reason::NO_NODES));
        assert!(watched.message.contains("spec.nodes") && watched.message.contains("--default-node-endpoints"));
        assert!(notices.unwatched, "one Warning event");
        let (again, notices) = next_channel_status(&status, &unwatched, &report);
        assert!(!notices.unwatched, "not repeated");
        let (fixed, notices) = next_channel_status(&again, &input(&pods), &report);
        assert!(!notices.unwatched);
        assert_eq!(condition::find(&fixed.conditions, MEMBERS_WATCHED).map(|c| c.status.as_str()), Some("True"));
        assert_eq!(
            condition::find(&fixed.conditions, READY).map(|c| c.status.as_str()),
            Some("True"),
            "Ready unchanged"
        );
    }

    #[test]
    fn a_channel_found_on_the_manager_at_the_first_sync_is_adopted_once() {
        let pods = BTreeMap::new();
        let found = ChannelReport { members: vec![member("org/ns/a", true, None)], ..Default::default() };
        let (status, notices) = next_channel_status(&SlimChannelStatus::default(), &input(&pods), &found);
        assert!(status.adopted && notices.adopted);
        let (again, notices) = next_channel_status(&status, &input(&pods), &found);
        assert!(again.adopted && !notices.adopted, "said once, kept");
        let created = ChannelReport { created: true, ..found };
        let (fresh, notices) = next_channel_status(&SlimChannelStatus::default(), &input(&pods), &created);
        assert!(!fresh.adopted && !notices.adopted);
    }
}
