//! Desired channel members against the channel manager's list, planned into invites, removals
//! and re-invites. Pure.

use std::collections::{BTreeMap, BTreeSet};

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
    /// Listed, managed by us before, no longer desired: remove.
    pub remove: Vec<String>,
    /// Every desired participant.
    pub members: Vec<MemberState>,
}

/// Members on their way out: names with a selected Pod that is terminating, and the instance
/// each had in the channel when it was removed for that (an invite must not reach it: the
/// manager invites a name, and the node picks any of its connected instances).
#[derive(Clone, Copy, Debug)]
pub struct Leaving<'a> {
    pub names: &'a BTreeSet<String>,
    pub departed: &'a BTreeMap<String, String>,
}

impl Leaving<'_> {
    /// No Pod terminating.
    pub const NONE: Leaving<'static> = Leaving { names: &EMPTY_NAMES, departed: &EMPTY_DEPARTED };

    /// The removed instance of `name` still connected while its Pod terminates: hold the invite.
    fn holds(&self, name: &str, alive: &BTreeSet<String>) -> Option<&str> {
        let departed = self.departed.get(name).filter(|instance| alive.contains(*instance))?;
        self.names.contains(name).then_some(departed.as_str())
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
/// - `leaving`: names whose Pod is terminating, and the instances removed for it.
pub fn plan_channel(
    desired: &BTreeSet<String>,
    listed: &[String],
    managed_before: &BTreeSet<String>,
    live: Option<&LiveInstances>,
    leaving: Leaving<'_>,
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
            (None, alive) => plan_absent(name, alive.as_ref(), leaving, &mut plan),
            (Some(first), None) => MemberState::joined(name, first),
            (Some(_), Some(alive)) => plan_listed(name, &members, &alive, leaving, &mut plan),
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
    leaving: Leaving<'_>,
    plan: &mut ChannelPlan,
) -> MemberState {
    let held = alive.and_then(|alive| leaving.holds(name, alive));
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
    leaving: Leaving<'_>,
    plan: &mut ChannelPlan,
) -> MemberState {
    let live_member = members.iter().find(|m| instance_of(m).is_some_and(|i| alive.contains(i)));
    let other = alive.iter().find(|i| live_member.and_then(|m| instance_of(m)) != Some(i.as_str()));
    match (live_member, other) {
        (Some(member), Some(successor)) if leaving.names.contains(name) => {
            plan.hand_over.push(name.to_owned());
            let instance = instance_of(member).unwrap_or_default();
            let note = format!(
                "handing over: instance {instance} is leaving (its Pod is terminating) and is removed now; {successor} is invited once it has disconnected"
            );
            MemberState::out(name, Some(member), note)
        }
        (Some(member), _) => MemberState::joined(name, member),
        (None, Some(new_instance)) => {
            plan.rejoin.push(name.to_owned());
            let note = format!("restarted: listed instance is gone, live instance {new_instance} is re-invited");
            MemberState::out(name, Some(members[0]), note)
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
            Leaving::NONE,
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
            Leaving::NONE,
        );
        assert_eq!(plan.remove, vec!["org/ns/carol".to_string()], "the manager and unlisted names stay untouched");
    }

    #[test]
    fn restarted_member_is_rejoined_offline_one_is_reported() {
        let listed = [BOB.to_string(), CAROL.to_string()];
        let mut live = LiveInstances::new();
        live.insert("org/ns/bob".into(), set(&["d165bd17-d238-547c-ad69-4d19eb78171a"]));
        let plan = plan_channel(&set(&["org/ns/bob", "org/ns/carol"]), &listed, &set(&[]), Some(&live), Leaving::NONE);
        assert_eq!(plan.rejoin, vec!["org/ns/bob".to_string()]);
        assert!(plan.add.is_empty());
        assert!(!plan.members[0].joined);
        assert!(plan.members[0].note.as_deref().unwrap_or("").contains("d165bd17"));
        assert!(!plan.members[1].joined, "carol has no live instance");
        assert!(plan.members[1].note.as_deref().unwrap_or("").contains("offline"));

        live.insert("org/ns/carol".into(), set(&["e0a3a05a-1665-53ef-4297-74bf2afdef57"]));
        let plan = plan_channel(&set(&["org/ns/carol"]), &listed, &set(&[]), Some(&live), Leaving::NONE);
        assert!(plan.members[0].joined && plan.rejoin.is_empty());
    }

    #[test]
    fn offline_participants_are_not_invited_when_nodes_are_known() {
        let mut live = LiveInstances::new();
        live.insert("org/ns/erin".into(), set(&["0b3c5a8e-1111-4222-8333-944455556666"]));
        let desired = set(&["org/ns/dave", "org/ns/erin"]);
        let plan = plan_channel(&desired, &[], &set(&[]), Some(&live), Leaving::NONE);
        assert_eq!(plan.add, vec!["org/ns/erin".to_string()], "dave has no live instance");
        assert!(plan.members[0].note.as_deref().unwrap_or("").starts_with("offline"));
        let blind = plan_channel(&desired, &[], &set(&[]), None, Leaving::NONE);
        assert_eq!(blind.add.len(), 2, "without node information everyone is invited");
    }

    const BOB_NEXT: &str = "d165bd17-d238-547c-ad69-4d19eb78171a";
    const BOB_NOW: &str = "a085c273-27f0-9aea-557e-3ac14fd9f571";

    #[test]
    fn a_leaving_member_with_a_successor_is_handed_over_while_it_can_still_answer() {
        let live: LiveInstances = [("org/ns/bob".to_string(), set(&[BOB_NOW, BOB_NEXT]))].into();
        let leaving_names = set(&["org/ns/bob"]);
        let leaving = Leaving { names: &leaving_names, departed: &BTreeMap::new() };
        let plan = plan_channel(&set(&["org/ns/bob"]), &[BOB.into()], &set(&[]), Some(&live), leaving);
        assert_eq!(plan.hand_over, vec!["org/ns/bob".to_string()]);
        assert!(plan.add.is_empty() && plan.rejoin.is_empty() && plan.remove.is_empty());
        assert!(!plan.members[0].joined);
        assert!(plan.members[0].note.as_deref().unwrap_or("").contains(BOB_NEXT));

        // No Pod terminating: two live instances are just two instances; the listed one stays.
        let plan = plan_channel(&set(&["org/ns/bob"]), &[BOB.into()], &set(&[]), Some(&live), Leaving::NONE);
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
        let leaving = Leaving { names: &leaving_names, departed: &departed };
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
            Leaving { names: &no_pod, departed: &departed },
        );
        assert_eq!(plan.add, vec!["org/ns/bob".to_string()]);
    }
}
