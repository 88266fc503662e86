//! Desired channel members against the channel manager's list, planned into invites, removals
//! and re-invites. Pure.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::slim::{Observed, SlimName};

/// Live instances (UUID strings) per participant name, read from the nodes' route lists.
pub type LiveInstances = BTreeMap<String, BTreeSet<String>>;

/// Live instances of each desired participant across node listings (unparsable names have none).
pub fn live_instances<'a>(
    desired: &BTreeSet<String>,
    nodes: impl IntoIterator<Item = &'a Observed> + Clone,
    except_link: Option<&str>,
) -> LiveInstances {
    desired
        .iter()
        .map(|name| {
            let instances = match SlimName::parse(name) {
                Ok(parsed) => nodes
                    .clone()
                    .into_iter()
                    .flat_map(|observed| match except_link {
                        None => observed.instances_of(&parsed).collect::<Vec<_>>(),
                        Some(link) => observed.instances_reachable(&parsed, link).collect(),
                    })
                    .map(|id| uuid::Uuid::from_u128(id).to_string())
                    .collect(),
                Err(_) => BTreeSet::new(),
            };
            (name.clone(), instances)
        })
        .collect()
}

/// The process behind a Pod-selected member, as its Pod tells it. A new Pod, a container that
/// restarted, or a container that is not running means another process than the one that joined,
/// whatever instance id it comes back under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incarnation {
    pub pod_uid: String,
    /// The restarts of the Pod's containers (its app's among them), summed.
    pub restarts: i32,
    /// Every container of the Pod is running.
    pub running: bool,
}

/// The incarnation of each Pod-selected name served by exactly one Pod.
pub type Incarnations = BTreeMap<String, Incarnation>;

impl Incarnation {
    pub fn of(pod: &Pod) -> Self {
        let containers = pod.status.as_ref().and_then(|s| s.container_statuses.as_deref()).unwrap_or_default();
        Self {
            pod_uid: pod.uid().unwrap_or_default(),
            restarts: containers.iter().map(|c| c.restart_count).sum(),
            running: containers.iter().all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some())),
        }
    }

    /// Whether a container of the Pod may still run (no status reported yet counts as may).
    pub fn may_run(pod: &Pod) -> bool {
        let containers = pod.status.as_ref().and_then(|s| s.container_statuses.as_deref()).unwrap_or_default();
        containers.is_empty() || containers.iter().any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
    }

    /// Whether the Pod now (`self`) no longer runs the process that joined as `joined`.
    pub fn replaced(&self, joined: &Incarnation) -> bool {
        self.pod_uid != joined.pod_uid || self.restarts != joined.restarts || !self.running
    }
}

/// `org/ns/bob` of a listed member `org/ns/bob/<uuid>` (a name without instance is returned as is).
pub fn base_name(member: &str) -> &str {
    match member.match_indices('/').nth(2) {
        Some((index, _)) => &member[..index],
        None => member,
    }
}

/// The instance part of a listed member, if any.
pub fn instance_of(member: &str) -> Option<&str> {
    member.match_indices('/').nth(2).map(|(index, _)| &member[index + 1..])
}

/// One desired participant as the plan sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberState {
    pub name: String,
    /// In the channel: listed, and (when live instances are known) with a live instance.
    pub joined: bool,
    /// The listed member (`org/ns/name/<uuid>`).
    pub listed: Option<String>,
    /// Why it is not joined.
    pub note: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelPlan {
    /// Desired but not listed: invite.
    pub add: Vec<String>,
    /// Listed with an instance that is gone while another instance is live (it restarted):
    /// remove the dead instance, then invite.
    pub rejoin: Vec<String>,
    /// Listed with a live instance that is leaving (its Pod is terminating) while another instance
    /// of the name is live: remove it now, while it can still acknowledge (a dead instance takes
    /// the manager ~11 s to remove); its successor is invited once it has disconnected.
    pub hand_over: Vec<String>,
    /// Listed with an instance that is gone, the app of its Pod stopped or restarted since it
    /// joined: remove the dead instance now, so the restarted app is invited as soon as it connects
    /// (a dead instance takes the manager ~11 s to remove).
    pub retire: Vec<String>,
    /// Listed, managed by us before, no longer desired: remove.
    pub remove: Vec<String>,
    /// Every desired participant.
    pub members: Vec<MemberState>,
}

/// Members coming and going, as their Pods tell it:
/// - `leaving`: names with a selected Pod that is terminating;
/// - `departed`: the instance each leaving name had in the channel when it was removed for that
///   (an invite must not reach it: the manager invites a name, and the node picks any of its
///   connected instances);
/// - `restarted`: names whose app is no longer the process that joined (its Pod was replaced, or
///   a container of it restarted or stopped). SLIM derives an app's instance id from its identity,
///   so the new process can come back under the listed instance: only the Pod tells it apart.
#[derive(Clone, Copy, Debug)]
pub struct Turnover<'a> {
    pub leaving: &'a BTreeSet<String>,
    pub departed: &'a BTreeMap<String, String>,
    pub restarted: &'a BTreeSet<String>,
}

impl Turnover<'_> {
    /// No Pod terminating or restarted.
    pub const NONE: Turnover<'static> =
        Turnover { leaving: &EMPTY_NAMES, departed: &EMPTY_DEPARTED, restarted: &EMPTY_NAMES };

    /// The removed instance of `name` still connected while its Pod terminates: hold the invite.
    fn holds(&self, name: &str, alive: &BTreeSet<String>) -> Option<&str> {
        let departed = self.departed.get(name).filter(|instance| alive.contains(*instance))?;
        self.leaving.contains(name).then_some(departed.as_str())
    }
}

static EMPTY_NAMES: BTreeSet<String> = BTreeSet::new();
static EMPTY_DEPARTED: BTreeMap<String, String> = BTreeMap::new();

/// Plans a channel.
/// - `desired`: participant names (`org/ns/name`);
/// - `listed`: what `ListParticipants` returned (instance names, the manager's own included);
/// - `managed_before`: names this SlimChannel made members before (only those are ever removed,
///   so the manager and members added by others are left alone);
/// - `live`: live instances per name, or `None` when no node was consulted. When known, a
///   participant with no live instance is not invited (it would stall the channel's invites);
/// - `turnover`: names whose Pod is terminating or restarted, and the instances removed for it.
pub fn plan_channel(
    desired: &BTreeSet<String>,
    listed: &[String],
    managed_before: &BTreeSet<String>,
    live: Option<&LiveInstances>,
    turnover: Turnover<'_>,
) -> ChannelPlan {
    let mut by_name: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for member in listed {
        by_name.entry(base_name(member)).or_default().push(member);
    }
    let mut plan = ChannelPlan::default();
    for name in desired {
        let members = by_name.get(name.as_str()).cloned().unwrap_or_default();
        let alive = live.map(|live| live.get(name.as_str()).cloned().unwrap_or_default());
        let state = match (members.first(), alive) {
            (None, alive) => plan_absent(name, alive.as_ref(), turnover, &mut plan),
            (Some(first), None) => MemberState::joined(name, first),
            (Some(_), Some(alive)) => plan_listed(name, &members, &alive, turnover, &mut plan),
        };
        plan.members.push(state);
    }
    for name in managed_before.difference(desired) {
        if by_name.contains_key(name.as_str()) {
            plan.remove.push(name.clone());
        }
    }
    plan
}

impl MemberState {
    fn joined(name: &str, listed: &str) -> Self {
        Self { name: name.to_owned(), joined: true, listed: Some(listed.to_owned()), note: None }
    }

    fn out(name: &str, listed: Option<&str>, note: String) -> Self {
        Self { name: name.to_owned(), joined: false, listed: listed.map(str::to_owned), note: Some(note) }
    }
}

/// A desired participant the manager does not list (`alive`: its live instances, when known).
fn plan_absent(
    name: &str,
    alive: Option<&BTreeSet<String>>,
    turnover: Turnover<'_>,
    plan: &mut ChannelPlan,
) -> MemberState {
    let held = alive.and_then(|alive| turnover.holds(name, alive));
    match (alive, held) {
        // The manager serialises invites per channel and takes ~11 s to fail one for an offline
        // participant: inviting it would hold up everyone else.
        (Some(alive), _) if alive.is_empty() => MemberState::out(
            name,
            None,
            "offline: no instance connected to a watched node; invited once it connects".into(),
        ),
        (_, Some(departed)) => MemberState::out(
            name,
            None,
            format!("handing over: invited once instance {departed}, removed as its Pod terminates, has disconnected"),
        ),
        _ => {
            plan.add.push(name.to_owned());
            MemberState::out(name, None, "not in the channel".into())
        }
    }
}

/// A desired participant the manager lists, against its live instances.
fn plan_listed(
    name: &str,
    members: &[&str],
    alive: &BTreeSet<String>,
    turnover: Turnover<'_>,
    plan: &mut ChannelPlan,
) -> MemberState {
    let live_member = members.iter().find(|m| instance_of(m).is_some_and(|i| alive.contains(i)));
    let other = alive.iter().find(|i| live_member.and_then(|m| instance_of(m)) != Some(i.as_str()));
    let restarted = turnover.restarted.contains(name);
    match (live_member, other) {
        (Some(member), successor) if turnover.leaving.contains(name) && (successor.is_some() || restarted) => {
            plan.hand_over.push(name.to_owned());
            let instance = instance_of(member).unwrap_or_default();
            let successor = successor.map_or("its successor".to_owned(), |s| format!("instance {s}"));
            let note = format!(
                "handing over: instance {instance} is leaving (its Pod is terminating) and is removed now; {successor} is invited once it has disconnected"
            );
            MemberState::out(name, Some(member), note)
        }
        (Some(member), _) if restarted => {
            plan.rejoin.push(name.to_owned());
            let note = "restarted: its Pod's app is a new process under the listed instance, removed and re-invited";
            MemberState::out(name, Some(member), note.into())
        }
        (Some(member), _) => MemberState::joined(name, member),
        (None, Some(new_instance)) => {
            plan.rejoin.push(name.to_owned());
            let note = format!("restarted: listed instance is gone, live instance {new_instance} is re-invited");
            MemberState::out(name, Some(members[0]), note)
        }
        (None, None) if restarted => {
            plan.retire.push(name.to_owned());
            let note =
                "restarted: its Pod's app stopped; the listed instance is removed now, invited again once it connects";
            MemberState::out(name, Some(members[0]), note.into())
        }
        (None, None) => MemberState::out(
            name,
            Some(members[0]),
            "listed, but no watched node has the instance connected (offline?)".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    const MANAGER: &str = "org/ns/channel-manager/fb9b4e0d-179a-2618-26a1-4041f8c879ce";
    const BOB: &str = "org/ns/bob/a085c273-27f0-9aea-557e-3ac14fd9f571";
    const CAROL: &str = "org/ns/carol/e0a3a05a-1665-53ef-4297-74bf2afdef57";

    #[test]
    fn names_split_into_base_and_instance() {
        assert_eq!(base_name(BOB), "org/ns/bob");
        assert_eq!(instance_of(BOB), Some("a085c273-27f0-9aea-557e-3ac14fd9f571"));
        assert_eq!(base_name("org/ns/bob"), "org/ns/bob");
        assert_eq!(instance_of("org/ns/bob"), None);
    }

    #[test]
    fn missing_members_are_invited_present_ones_left_alone() {
        let plan = plan_channel(
            &set(&["org/ns/bob", "org/ns/carol"]),
            &[MANAGER.into(), BOB.into()],
            &set(&[]),
            None,
            Turnover::NONE,
        );
        assert_eq!(plan.add, vec!["org/ns/carol".to_string()]);
        assert!(plan.remove.is_empty() && plan.rejoin.is_empty());
        assert!(plan.members[0].joined);
        assert_eq!(plan.members[0].listed.as_deref(), Some(BOB));
        assert!(!plan.members[1].joined);
    }

    #[test]
    fn only_members_we_managed_are_removed() {
        let listed = [MANAGER.to_string(), BOB.to_string(), CAROL.to_string()];
        let plan = plan_channel(
            &set(&["org/ns/bob"]),
            &listed,
            &set(&["org/ns/bob", "org/ns/carol", "org/ns/gone"]),
            None,
            Turnover::NONE,
        );
        assert_eq!(plan.remove, vec!["org/ns/carol".to_string()], "the manager and unlisted names stay untouched");
    }

    #[test]
    fn restarted_member_is_rejoined_offline_one_is_reported() {
        let listed = [BOB.to_string(), CAROL.to_string()];
        let mut live = LiveInstances::new();
        live.insert("org/ns/bob".into(), set(&["d165bd17-d238-547c-ad69-4d19eb78171a"]));
        let plan = plan_channel(&set(&["org/ns/bob", "org/ns/carol"]), &listed, &set(&[]), Some(&live), Turnover::NONE);
        assert_eq!(plan.rejoin, vec!["org/ns/bob".to_string()]);
        assert!(plan.add.is_empty());
        assert!(!plan.members[0].joined);
        assert!(plan.members[0].note.as_deref().unwrap_or("").contains("d165bd17"));
        assert!(!plan.members[1].joined, "carol has no live instance");
        assert!(plan.members[1].note.as_deref().unwrap_or("").contains("offline"));

        live.insert("org/ns/carol".into(), set(&["e0a3a05a-1665-53ef-4297-74bf2afdef57"]));
        let plan = plan_channel(&set(&["org/ns/carol"]), &listed, &set(&[]), Some(&live), Turnover::NONE);
        assert!(plan.members[0].joined && plan.rejoin.is_empty());
    }

    #[test]
    fn offline_participants_are_not_invited_when_nodes_are_known() {
        let mut live = LiveInstances::new();
        live.insert("org/ns/erin".into(), set(&["0b3c5a8e-1111-4222-8333-944455556666"]));
        let desired = set(&["org/ns/dave", "org/ns/erin"]);
        let plan = plan_channel(&desired, &[], &set(&[]), Some(&live), Turnover::NONE);
        assert_eq!(plan.add, vec!["org/ns/erin".to_string()], "dave has no live instance");
        assert!(plan.members[0].note.as_deref().unwrap_or("").starts_with("offline"));
        let blind = plan_channel(&desired, &[], &set(&[]), None, Turnover::NONE);
        assert_eq!(blind.add.len(), 2, "without node information everyone is invited");
    }

    const BOB_NEXT: &str = "d165bd17-d238-547c-ad69-4d19eb78171a";
    const BOB_NOW: &str = "a085c273-27f0-9aea-557e-3ac14fd9f571";

    #[test]
    fn a_leaving_member_with_a_successor_is_handed_over_while_it_can_still_answer() {
        let live: LiveInstances = [("org/ns/bob".to_string(), set(&[BOB_NOW, BOB_NEXT]))].into();
        let leaving_names = set(&["org/ns/bob"]);
        let departed = BTreeMap::new();
        let leaving = Turnover { leaving: &leaving_names, departed: &departed, ..Turnover::NONE };
        let plan = plan_channel(&set(&["org/ns/bob"]), &[BOB.into()], &set(&[]), Some(&live), leaving);
        assert_eq!(plan.hand_over, vec!["org/ns/bob".to_string()]);
        assert!(plan.add.is_empty() && plan.rejoin.is_empty() && plan.remove.is_empty());
        assert!(!plan.members[0].joined);
        assert!(plan.members[0].note.as_deref().unwrap_or("").contains(BOB_NEXT));

        // No Pod terminating: two live instances are just two instances; the listed one stays.
        let plan = plan_channel(&set(&["org/ns/bob"]), &[BOB.into()], &set(&[]), Some(&live), Turnover::NONE);
        assert!(plan.hand_over.is_empty() && plan.members[0].joined);
        // Terminating, but no successor connected yet: nothing to hand over to.
        let alone: LiveInstances = [("org/ns/bob".to_string(), set(&[BOB_NOW]))].into();
        let plan = plan_channel(&set(&["org/ns/bob"]), &[BOB.into()], &set(&[]), Some(&alone), leaving);
        assert!(plan.hand_over.is_empty() && plan.members[0].joined);
    }

    #[test]
    fn the_successor_is_invited_only_once_the_removed_instance_has_disconnected() {
        let leaving_names = set(&["org/ns/bob"]);
        let departed: BTreeMap<String, String> = [("org/ns/bob".to_string(), BOB_NOW.to_string())].into();
        let leaving = Turnover { leaving: &leaving_names, departed: &departed, ..Turnover::NONE };
        let both: LiveInstances = [("org/ns/bob".to_string(), set(&[BOB_NOW, BOB_NEXT]))].into();
        let plan = plan_channel(&set(&["org/ns/bob"]), &[], &set(&[]), Some(&both), leaving);
        assert!(plan.add.is_empty(), "an invite now could reach the leaving instance");
        assert!(plan.members[0].note.as_deref().unwrap_or("").starts_with("handing over"));

        let successor: LiveInstances = [("org/ns/bob".to_string(), set(&[BOB_NEXT]))].into();
        let plan = plan_channel(&set(&["org/ns/bob"]), &[], &set(&[]), Some(&successor), leaving);
        assert_eq!(plan.add, vec!["org/ns/bob".to_string()]);

        // The terminating Pod is gone (or was never ours to wait for): no hold, whatever is live.
        let no_pod = BTreeSet::new();
        let plan = plan_channel(
            &set(&["org/ns/bob"]),
            &[],
            &set(&[]),
            Some(&both),
            Turnover { leaving: &no_pod, departed: &departed, ..Turnover::NONE },
        );
        assert_eq!(plan.add, vec!["org/ns/bob".to_string()]);
    }

    #[test]
    fn a_restarted_app_under_the_listed_instance_is_removed_and_invited_again() {
        // SLIM derived the new process's instance id from the same identity: the nodes list the
        // listed instance as live, only the Pod tells the process changed.
        let live: LiveInstances = [("org/ns/bob".to_string(), set(&[BOB_NOW]))].into();
        let restarted = set(&["org/ns/bob"]);
        let turnover = Turnover { restarted: &restarted, ..Turnover::NONE };
        let plan = plan_channel(&set(&["org/ns/bob"]), &[BOB.into()], &set(&[]), Some(&live), turnover);
        assert_eq!(plan.rejoin, vec!["org/ns/bob".to_string()]);
        assert!(plan.add.is_empty() && plan.hand_over.is_empty() && plan.retire.is_empty());
        assert!(!plan.members[0].joined && plan.members[0].note.as_deref().unwrap_or("").starts_with("restarted"));

        // Its old Pod terminating while the new one serves: handed over while the old one answers.
        let leaving_names = set(&["org/ns/bob"]);
        let departed = BTreeMap::new();
        let turnover = Turnover { leaving: &leaving_names, departed: &departed, restarted: &restarted };
        let plan = plan_channel(&set(&["org/ns/bob"]), &[BOB.into()], &set(&[]), Some(&live), turnover);
        assert_eq!(plan.hand_over, vec!["org/ns/bob".to_string()]);
        assert!(plan.rejoin.is_empty());
        assert!(plan.members[0].note.as_deref().unwrap_or("").contains("its successor is invited once"));
    }

    #[test]
    fn a_stopped_app_is_removed_before_it_is_back() {
        let gone: LiveInstances = [("org/ns/bob".to_string(), BTreeSet::new())].into();
        let restarted = set(&["org/ns/bob"]);
        let turnover = Turnover { restarted: &restarted, ..Turnover::NONE };
        let plan = plan_channel(&set(&["org/ns/bob"]), &[BOB.into()], &set(&[]), Some(&gone), turnover);
        assert_eq!(plan.retire, vec!["org/ns/bob".to_string()]);
        assert!(plan.add.is_empty() && plan.rejoin.is_empty());
        // Without the Pod's word a vanished instance may be a node restart: nothing is removed.
        let plan = plan_channel(&set(&["org/ns/bob"]), &[BOB.into()], &set(&[]), Some(&gone), Turnover::NONE);
        assert!(plan.retire.is_empty() && plan.rejoin.is_empty());
        assert!(plan.members[0].note.as_deref().unwrap_or("").contains("offline"));
    }

    fn pod(uid: &str, containers: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "bob-1", "uid": uid},
            "status": {"phase": "Running", "containerStatuses": containers}
        }))
        .expect("pod")
    }

    #[test]
    fn a_pod_tells_when_its_app_is_another_process() {
        let running = |restarts: i32| {
            serde_json::json!([{"name": "app", "image": "a", "imageID": "", "ready": true,
                "restartCount": restarts, "state": {"running": {}}}])
        };
        let joined = Incarnation::of(&pod("u1", running(0)));
        assert_eq!(joined, Incarnation { pod_uid: "u1".into(), restarts: 0, running: true });
        assert!(!Incarnation::of(&pod("u1", running(0))).replaced(&joined), "the same process");
        assert!(Incarnation::of(&pod("u1", running(1))).replaced(&joined), "the app restarted in its Pod");
        assert!(Incarnation::of(&pod("u2", running(0))).replaced(&joined), "another Pod");
        let crashed = serde_json::json!([{"name": "app", "image": "a", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"terminated": {"exitCode": 137}}}]);
        assert!(Incarnation::of(&pod("u1", crashed)).replaced(&joined), "the app stopped");
        assert!(!Incarnation::may_run(&pod(
            "u1",
            serde_json::json!([{"name": "app", "image": "a", "imageID": "",
            "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 0}}}])
        )));
        assert!(Incarnation::may_run(&pod("u1", running(0))));
        assert!(Incarnation::may_run(&pod("u1", serde_json::json!([]))), "nothing reported yet");
    }
}
