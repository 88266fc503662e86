//! What the operator knows of a SLIM node's state and what it asks of it: value types only, no
//! IO (the planner builds on these; the node client in `node` speaks them over gRPC).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::name::{NameKey, SlimName};

/// A link (connection) as the operator creates it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LinkConfig {
    pub link_id: String,
    /// The node's client config as JSON. May hold TLS key material: never log it.
    pub config_data: String,
}

impl LinkConfig {
    /// The connection type the config asks for (`remote`, `peer`, `edge`).
    pub fn connection_type(&self) -> Option<String> {
        let config: serde_json::Value = serde_json::from_str(&self.config_data).ok()?;
        Some(config.get("connection_type")?.as_str()?.to_owned())
    }
}

/// A route: a name reachable over a link.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteRef {
    pub name: SlimName,
    pub link_id: String,
}

/// What one caller wants changed on a node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeChange {
    pub create_links: Vec<LinkConfig>,
    pub set_routes: Vec<RouteRef>,
    pub delete_routes: Vec<RouteRef>,
    pub delete_links: Vec<String>,
}

impl NodeChange {
    pub fn is_empty(&self) -> bool {
        self.create_links.is_empty()
            && self.set_routes.is_empty()
            && self.delete_routes.is_empty()
            && self.delete_links.is_empty()
    }

    pub(super) fn items(&self) -> usize {
        self.create_links.len() + self.set_routes.len() + self.delete_routes.len() + self.delete_links.len()
    }

    pub(super) fn links_touched(&self) -> impl Iterator<Item = &str> {
        self.create_links.iter().map(|l| l.link_id.as_str()).chain(self.set_routes.iter().map(|r| r.link_id.as_str()))
    }
}

/// One item of a change, as the node acknowledges it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ChangeItem {
    CreateLink(String),
    SetRoute(RouteRef),
    DeleteRoute(RouteRef),
    DeleteLink(String),
}

impl std::fmt::Display for ChangeItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangeItem::CreateLink(link) => write!(f, "create link {link}"),
            ChangeItem::SetRoute(route) => write!(f, "set route {} via {}", route.name, route.link_id),
            ChangeItem::DeleteRoute(route) => write!(f, "delete route {} via {}", route.name, route.link_id),
            ChangeItem::DeleteLink(link) => write!(f, "delete link {link}"),
        }
    }
}

/// The items of a change the node refused, with its reasons. Empty means everything held.
/// "Not found" on a delete counts as done.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeOutcome {
    pub failures: Vec<ItemFailure>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemFailure {
    pub item: ChangeItem,
    pub message: String,
}

impl ChangeOutcome {
    fn refused(&self, item: &ChangeItem) -> bool {
        self.failures.iter().any(|f| f.item == *item)
    }
}

/// What a node reports: links by id, (name, link) routes that go over a link, and every name the
/// node routes (including apps connected to it: `org/ns/app/<instance>`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub links: BTreeSet<String>,
    pub routes: BTreeSet<(NameKey, String)>,
    pub names: BTreeSet<NameKey>,
    /// The links this node dials, with their connection type (`remote`, `peer`, `edge`).
    pub dialed: BTreeMap<String, String>,
    /// The links other nodes dial to this one, with how many connections carry each id (two
    /// nodes dialing this one with the same link spec share an id).
    pub incoming: BTreeMap<String, usize>,
}

impl Observed {
    pub fn has_route(&self, route: &RouteRef) -> bool {
        self.routes.contains(&(route.name.key(), route.link_id.clone()))
    }

    /// Instance ids of `name` (its three components) the node routes: the live instances of an
    /// app connected to it.
    pub fn instances_of(&self, name: &SlimName) -> impl Iterator<Item = u128> + '_ {
        let components = name.key().components;
        self.names
            .range(NameKey { components, instance: 0 }..=NameKey { components, instance: u128::MAX })
            .map(|key| key.instance)
            .filter(|instance| *instance != super::name::NO_INSTANCE)
    }

    /// Instance ids of `name` the node reaches other than over `link_id` (its own apps, and
    /// routes over other links): where traffic for them sent over `link_id` can go on to.
    pub fn instances_reachable<'a>(&'a self, name: &SlimName, link_id: &'a str) -> impl Iterator<Item = u128> + 'a {
        let components = name.key().components;
        self.instances_of(name).filter(move |instance| {
            let key = NameKey { components, instance: *instance };
            let mut links = self.routes.range((key, String::new())..).take_while(|(k, _)| *k == key).map(|(_, l)| l);
            // A name with no route over a link is the node's own app's.
            links.next().is_none_or(|first| first != link_id || links.any(|l| l != link_id))
        })
    }

    /// Applies a change the node acknowledged (minus the items it refused).
    pub(crate) fn apply(&mut self, change: &NodeChange, outcome: &ChangeOutcome) {
        for link in &change.create_links {
            if !outcome.refused(&ChangeItem::CreateLink(link.link_id.clone())) {
                self.links.insert(link.link_id.clone());
                self.dialed.insert(link.link_id.clone(), link.connection_type().unwrap_or_default());
            }
        }
        for route in &change.set_routes {
            if !outcome.refused(&ChangeItem::SetRoute(route.clone())) {
                self.routes.insert((route.name.key(), route.link_id.clone()));
                self.names.insert(route.name.key());
            }
        }
        for route in &change.delete_routes {
            self.routes.remove(&(route.name.key(), route.link_id.clone()));
        }
        for link in &change.delete_links {
            self.links.remove(link);
            self.dialed.remove(link);
            self.routes.retain(|(_, l)| l != link);
        }
    }
}

/// Why a control endpoint (a node's controller API, a channel manager) could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unreachable {
    /// The TLS handshake failed for a cause an operator can act on (classified where rustls
    /// reported it).
    #[error("{detail}")]
    Tls { failure: crate::tls::control::TlsFailure, detail: String },
    /// Connecting failed otherwise (refused, no such host, timed out), or the stream broke.
    #[error("{0}")]
    Transport(String),
}

impl Unreachable {
    /// From a transport error (tonic, hyper, the TLS connector): its whole chain after `context`,
    /// and its TLS cause when it has one.
    pub fn of(context: &str, error: &(dyn std::error::Error + 'static)) -> Self {
        let detail = format!("{context}: {}", slim_k8s_common::error_chain(error));
        match crate::tls::control::TlsFailure::in_chain(error) {
            Some(failure) => Unreachable::Tls { failure, detail },
            None => Unreachable::Transport(detail),
        }
    }

    pub fn tls_failure(&self) -> Option<crate::tls::control::TlsFailure> {
        match self {
            Unreachable::Tls { failure, .. } => Some(*failure),
            Unreachable::Transport(_) => None,
        }
    }
}

/// Node-level failures: the change or listing did not complete.
#[derive(Clone, Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node {endpoint} unreachable: {cause}")]
    Unavailable { endpoint: String, cause: Unreachable },
    #[error("node {endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("node {endpoint} rejected the command: {reason}")]
    Rejected { endpoint: String, reason: String },
    #[error("node client for {endpoint} has stopped")]
    Stopped { endpoint: String },
}

impl NodeError {
    /// The TLS failure that kept the node unreachable, when that is the cause.
    pub fn tls_failure(&self) -> Option<crate::tls::control::TlsFailure> {
        match self {
            NodeError::Unavailable { cause, .. } => cause.tls_failure(),
            _ => None,
        }
    }
}

/// Counters of what a client sent; shared with metrics and benchmarks.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Control messages sent (commands and list requests).
    pub rpcs: AtomicU64,
    /// `ConfigurationCommand`s sent.
    pub writes: AtomicU64,
    /// Route items sent in commands (set + delete).
    pub route_items: AtomicU64,
    /// Successful stream (re)connections.
    pub connects: AtomicU64,
    /// 1 while the control stream is up, 0 while it is down (or never came up).
    pub connected: AtomicU64,
}

/// Announced on the pool's channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEvent {
    /// The stream came back after a break: the node may have restarted and lost its state.
    Reconnected { endpoint: String },
}

/// Short constructors for the slim module's tests.
#[cfg(test)]
pub(crate) mod test_values {
    use super::*;

    pub fn route(name: &str, link: &str) -> RouteRef {
        RouteRef { name: SlimName::parse(name).expect("valid"), link_id: link.to_owned() }
    }

    pub fn link(id: &str) -> LinkConfig {
        LinkConfig { link_id: id.to_owned(), config_data: format!("{{\"link_id\":\"{id}\"}}") }
    }
}

#[cfg(test)]
mod tests {
    use super::test_values::{link, route};
    use super::*;

    #[test]
    fn observed_follows_acked_changes() {
        let mut observed = Observed::default();
        let change = NodeChange {
            create_links: vec![link("l1")],
            set_routes: vec![route("o/n/a", "l1"), route("o/n/b", "l1")],
            ..Default::default()
        };
        let outcome = ChangeOutcome {
            failures: vec![ItemFailure { item: ChangeItem::SetRoute(route("o/n/b", "l1")), message: "no".into() }],
        };
        observed.apply(&change, &outcome);
        assert!(observed.links.contains("l1"));
        assert!(observed.has_route(&route("o/n/a", "l1")));
        assert!(!observed.has_route(&route("o/n/b", "l1")), "refused items are not recorded");
        observed
            .apply(&NodeChange { delete_links: vec!["l1".into()], ..Default::default() }, &ChangeOutcome::default());
        assert!(observed.links.is_empty() && observed.routes.is_empty());
    }
}
