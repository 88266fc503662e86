//! The soak's invariants, judged on what SLIM's own lists and the API server say.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{Resource, ResourceExt};
use slim_operator::api::{SlimChannel, Subscription};
use slim_operator::plan::LINK_ID_PREFIX;
use slim_operator::slim::{NameKey, Observed, SlimName};

/// How long a Subscription may say `Ready=True` while a node it names lacks its route (a node
/// restarted: the status lags until the operator hears of it and repairs).
const STALE_READY: Duration = Duration::from_secs(15);

/// What broke, with the state that broke it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error(
        "Subscription {name} said Ready=True for {for_secs} s while node {node} had no route {route} (its routes for the name: {has:?}; seen {at})"
    )]
    ReadyWithoutRoute { name: String, node: String, route: String, for_secs: u64, has: Vec<String>, at: String },
    #[error("{kind} {name} stuck for {for_secs} s: {what}")]
    Stuck { kind: &'static str, name: String, what: String, for_secs: u64 },
    #[error("after the settle period: {0}")]
    NotConverged(String),
    #[error("{writer} wrote while {leader} held the Lease: {what}")]
    TwoWriters { writer: String, leader: String, what: String },
}

/// One look at the system.
pub struct State {
    pub subscriptions: Option<Vec<Subscription>>,
    pub channels: Option<Vec<SlimChannel>>,
    /// Each node's own list (`None`: it could not be read).
    pub nodes: BTreeMap<String, Option<Arc<Observed>>>,
    /// Each channel's members as the manager lists them.
    pub members: BTreeMap<String, Option<Vec<String>>>,
}

impl State {
    /// Everything is as the objects want it: each Ready at its generation with its routes (or
    /// members) in place, nothing being deleted, no route or link nobody wants.
    pub fn converged(&self) -> bool {
        self.problems().is_empty()
    }

    /// What keeps the system from being converged.
    pub fn problems(&self) -> Vec<String> {
        let (Some(subscriptions), Some(channels)) = (&self.subscriptions, &self.channels) else {
            return vec!["the API server did not answer".into()];
        };
        let mut problems = Vec::new();
        for sub in subscriptions {
            problems.extend(self.subscription_problems(sub));
        }
        for channel in channels {
            problems.extend(self.channel_problems(channel));
        }
        problems.extend(self.orphans(subscriptions));
        problems
    }

    fn subscription_problems(&self, sub: &Subscription) -> Vec<String> {
        let name = sub.name_any();
        if sub.meta().deletion_timestamp.is_some() {
            return vec![format!("Subscription {name} is being deleted")];
        }
        let conditions = sub.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
        if !ready_now(conditions, sub.meta().generation, sub.status.as_ref().and_then(|s| s.observed_generation)) {
            return vec![format!("Subscription {name} not Ready: {:?}", ready_reason(conditions))];
        }
        desired_routes(sub)
            .into_iter()
            .filter(|(node, key, link)| !self.has_route(node, key, link))
            .map(|(node, _, link)| format!("Subscription {name}: no route over {link} on {node}"))
            .collect()
    }

    fn channel_problems(&self, channel: &SlimChannel) -> Vec<String> {
        let name = channel.name_any();
        if channel.meta().deletion_timestamp.is_some() {
            return vec![format!("SlimChannel {name} is being deleted")];
        }
        let status = channel.status.as_ref();
        let conditions = status.map_or(&[][..], |s| &s.conditions[..]);
        if !ready_now(conditions, channel.meta().generation, status.and_then(|s| s.observed_generation)) {
            let notes: Vec<String> = status
                .iter()
                .flat_map(|s| &s.participants)
                .filter(|p| !p.joined)
                .map(|p| format!("{}: {}", p.name, p.message.as_deref().unwrap_or("-")))
                .collect();
            let listed = self.members.get(&channel.spec.name);
            return vec![format!(
                "SlimChannel {name} not Ready: {:?}; {notes:?}; the manager lists {listed:?}",
                ready_reason(conditions)
            )];
        }
        let listed = self.members.get(&channel.spec.name).cloned().flatten().unwrap_or_default();
        channel
            .spec
            .participants
            .iter()
            .filter(|p| !listed.iter().any(|l| l.starts_with(&format!("{p}/")) && self.live(l)))
            .map(|p| format!("SlimChannel {name}: no live instance of {p} in the manager's list {listed:?}"))
            .collect()
    }

    /// Whether the instance the manager lists (`org/ns/app/<instance>`) is connected to a node
    /// (a member that restarted has a new one: the old one listed is a member nobody answers for).
    fn live(&self, listed: &str) -> bool {
        let Ok(name) = SlimName::parse(listed) else { return false };
        let Some(instance) = name.instance() else { return false };
        let app = name.without_instance();
        self.nodes.values().flatten().any(|observed| observed.instances_of(&app).any(|i| i == instance))
    }

    /// Routes over the operator's links, and links the operator's nodes dial, that no live
    /// Subscription wants.
    fn orphans(&self, subscriptions: &[Subscription]) -> Vec<String> {
        let wanted: BTreeSet<(String, NameKey, String)> = subscriptions.iter().flat_map(desired_routes).collect();
        let mut problems = Vec::new();
        for (node, listed) in &self.nodes {
            let Some(listed) = listed else {
                problems.push(format!("node {node} could not be listed"));
                continue;
            };
            for (key, link) in listed.routes.iter().filter(|(_, link)| link.starts_with(LINK_ID_PREFIX)) {
                if !wanted.contains(&(node.clone(), *key, link.clone())) {
                    problems.push(format!("orphan route {key:?} over {link} on {node}"));
                }
            }
            for link in listed.dialed.keys().filter(|link| link.starts_with(LINK_ID_PREFIX)) {
                if !wanted.iter().any(|(n, _, l)| n == node && l == link) {
                    problems.push(format!("orphan link {link} dialed by {node}"));
                }
            }
        }
        problems
    }

    fn has_route(&self, node: &str, key: &NameKey, link: &str) -> bool {
        self.nodes.get(node).cloned().flatten().is_some_and(|o| o.routes.contains(&(*key, link.to_owned())))
    }
}

/// `(node, name, link)` of every route a Subscription's status says it has installed.
fn desired_routes(sub: &Subscription) -> Vec<(String, NameKey, String)> {
    let Some(status) = &sub.status else { return Vec::new() };
    let (Some(route), Some(own_link)) = (&status.route_name, &status.link_id) else { return Vec::new() };
    let Ok(name) = SlimName::parse(route) else { return Vec::new() };
    status
        .nodes
        .iter()
        .filter(|n| n.route_installed)
        .map(|n| (n.endpoint.clone(), name.key(), n.link.clone().unwrap_or_else(|| own_link.clone())))
        .collect()
}

fn ready_now(conditions: &[Condition], generation: Option<i64>, observed: Option<i64>) -> bool {
    observed == generation && conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

fn ready_reason(conditions: &[Condition]) -> Option<String> {
    conditions.iter().find(|c| c.type_ == "Ready").map(|c| format!("{} {}: {}", c.status, c.reason, c.message))
}

/// Tracks how long each bad condition has lasted, reporting a violation once per episode.
pub struct Checker {
    cleanup_timeout: Duration,
    /// Bad conditions by key, since when, and whether reported.
    since: BTreeMap<String, (Instant, bool)>,
}

impl Checker {
    pub fn new(cleanup_timeout: Duration) -> Self {
        Self { cleanup_timeout, since: BTreeMap::new() }
    }

    /// The violations `state` shows; with `exact`, anything not converged is one.
    pub fn check(&mut self, state: &State, exact: bool) -> Vec<Violation> {
        let mut seen = BTreeSet::new();
        let mut violations = Vec::new();
        for sub in state.subscriptions.iter().flatten() {
            violations.extend(self.ready_without_route(state, sub, &mut seen));
            violations.extend(self.stuck("Subscription", sub, &mut seen));
        }
        for channel in state.channels.iter().flatten() {
            violations.extend(self.stuck("SlimChannel", channel, &mut seen));
        }
        self.since.retain(|key, _| seen.contains(key));
        if exact {
            violations.extend(state.problems().into_iter().map(Violation::NotConverged));
        }
        violations
    }

    fn ready_without_route(
        &mut self,
        state: &State,
        sub: &Subscription,
        seen: &mut BTreeSet<String>,
    ) -> Vec<Violation> {
        let conditions = sub.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
        if !ready_now(conditions, sub.meta().generation, sub.status.as_ref().and_then(|s| s.observed_generation))
            || sub.meta().deletion_timestamp.is_some()
        {
            return Vec::new();
        }
        let mut violations = Vec::new();
        for (node, key, link) in desired_routes(sub) {
            // A node that cannot be listed (restarting) says nothing either way.
            if state.nodes.get(&node).cloned().flatten().is_none() || state.has_route(&node, &key, &link) {
                continue;
            }
            let id = format!("route {} {node} {link}", sub.name_any());
            if let Some(for_secs) = self.lasting(&id, STALE_READY, seen) {
                let route = format!("{} over {link}", sub.spec.name);
                let listed = state.nodes.get(&node).cloned().flatten();
                let has = listed
                    .iter()
                    .flat_map(|o| o.routes.iter())
                    .filter(|(k, _)| *k == key)
                    .map(|(_, l)| l.clone())
                    .collect();
                let at = k8s_openapi::jiff::Timestamp::now().to_string();
                violations.push(Violation::ReadyWithoutRoute { name: sub.name_any(), node, route, for_secs, has, at });
            }
        }
        violations
    }

    fn stuck<K>(&mut self, kind: &'static str, obj: &K, seen: &mut BTreeSet<String>) -> Option<Violation>
    where
        K: kube::Resource<DynamicType = ()> + StatusConditions,
    {
        let limit = self.cleanup_timeout + Duration::from_secs(30);
        let meta = obj.meta();
        let name = meta.name.clone().unwrap_or_default();
        let what = if meta.deletion_timestamp.is_some() {
            "finalizer held"
        } else if !obj.has_ready() || obj.observed() != meta.generation {
            "Ready unknown at the current generation"
        } else {
            return None;
        };
        let for_secs = self.lasting(&format!("{kind} {name} {what}"), limit, seen)?;
        Some(Violation::Stuck { kind, name, what: what.to_owned(), for_secs })
    }

    /// Marks `key` as bad now; `Some(seconds)` the first time it has lasted longer than `limit`.
    fn lasting(&mut self, key: &str, limit: Duration, seen: &mut BTreeSet<String>) -> Option<u64> {
        seen.insert(key.to_owned());
        let (since, reported) = self.since.entry(key.to_owned()).or_insert((Instant::now(), false));
        if *reported || since.elapsed() < limit {
            return None;
        }
        *reported = true;
        Some(since.elapsed().as_secs())
    }
}

/// What the stuck check reads of either kind.
pub trait StatusConditions {
    fn has_ready(&self) -> bool;
    fn observed(&self) -> Option<i64>;
}

impl StatusConditions for Subscription {
    fn has_ready(&self) -> bool {
        self.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready"))
    }
    fn observed(&self) -> Option<i64> {
        self.status.as_ref().and_then(|s| s.observed_generation)
    }
}

impl StatusConditions for SlimChannel {
    fn has_ready(&self) -> bool {
        self.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready"))
    }
    fn observed(&self) -> Option<i64> {
        self.status.as_ref().and_then(|s| s.observed_generation)
    }
}
