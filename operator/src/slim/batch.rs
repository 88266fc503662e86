//! Pure parts of talking to a node: merging callers' changes into one command, splitting the
//! queue into commands, and mapping a node's acks back to the caller whose item each was.

use std::collections::{HashMap, HashSet};

use super::model::{ChangeItem, ChangeOutcome, ItemFailure, NodeChange, RouteRef};
use super::name::NameKey;
use super::pb::controller::v1 as ctl;
use super::pb::controller::v1::control_message::Payload;
use super::wording::Said;

/// Queued changes, each with what its caller waits on.
pub(super) type Queue<T> = Vec<(NodeChange, T)>;

/// Splits queued changes into one command's worth and the rest: bounded in size (a lone change
/// always goes), and never a change that deletes a link another change in the same command is
/// still using (or uses a link another one deletes).
pub(super) fn take_batch<T>(queued: Queue<T>, max_items: usize) -> (Queue<T>, Queue<T>) {
    let mut batch = Vec::new();
    let mut items = 0;
    let mut used: HashSet<String> = HashSet::new();
    let mut deleted: HashSet<String> = HashSet::new();
    let mut rest = Vec::new();
    for (change, reply) in queued {
        let conflicts =
            change.delete_links.iter().any(|l| used.contains(l)) || change.links_touched().any(|l| deleted.contains(l));
        let fits = batch.is_empty() || items + change.items() <= max_items;
        if conflicts || !fits {
            rest.push((change, reply));
            continue;
        }
        items += change.items();
        used.extend(change.links_touched().map(str::to_owned));
        deleted.extend(change.delete_links.iter().cloned());
        batch.push((change, reply));
    }
    (batch, rest)
}

/// The refusals in one ack, looked up per caller.
pub(super) struct AckFailures {
    links: HashMap<String, String>,
    routes: HashMap<(NameKey, String), String>,
}

impl AckFailures {
    pub(super) fn from_ack(ack: &ctl::ConfigurationCommandAck) -> Self {
        let links = ack
            .connections_status
            .iter()
            .filter(|s| !s.success)
            .map(|s| (s.link_id.clone(), s.error_msg.clone()))
            .collect();
        let routes = ack
            .routes_status
            .iter()
            .filter(|s| !s.success)
            .filter_map(|s| {
                let route = s.route.as_ref()?;
                let key = route.name.as_ref().and_then(NameKey::from_proto)?;
                Some(((key, route.link_id.clone().unwrap_or_default()), s.error_msg.clone()))
            })
            .collect();
        Self { links, routes }
    }

    pub(super) fn outcome_for(&self, change: &NodeChange) -> ChangeOutcome {
        let mut failures = Vec::new();
        let link_failure = |link_id: &str| self.links.get(link_id).cloned();
        let route_failure = |route: &RouteRef| self.routes.get(&(route.name.key(), route.link_id.clone())).cloned();
        let gone = |message: &String| Said::of(message) == Said::NotFound;
        for link in &change.create_links {
            if let Some(message) = link_failure(&link.link_id) {
                failures.push(ItemFailure { item: ChangeItem::CreateLink(link.link_id.clone()), message });
            }
        }
        for route in &change.set_routes {
            if let Some(message) = route_failure(route) {
                failures.push(ItemFailure { item: ChangeItem::SetRoute(route.clone()), message });
            }
        }
        // Deleting what is already gone is done.
        for route in &change.delete_routes {
            if let Some(message) = route_failure(route).filter(|m| !gone(m)) {
                failures.push(ItemFailure { item: ChangeItem::DeleteRoute(route.clone()), message });
            }
        }
        for link_id in &change.delete_links {
            if let Some(message) = link_failure(link_id).filter(|m| !gone(m)) {
                failures.push(ItemFailure { item: ChangeItem::DeleteLink(link_id.clone()), message });
            }
        }
        ChangeOutcome { failures }
    }
}

/// Merges callers' changes into one command, without duplicate links.
pub(super) fn merge<'a>(changes: impl Iterator<Item = &'a NodeChange>) -> ctl::ConfigurationCommand {
    let mut command = ctl::ConfigurationCommand::default();
    let mut links = HashSet::new();
    let mut routes_set = HashSet::new();
    let mut routes_deleted = HashSet::new();
    let mut links_deleted = HashSet::new();
    for change in changes {
        for link in &change.create_links {
            if links.insert(link.link_id.clone()) {
                command
                    .connections_to_create
                    .push(ctl::Connection { link_id: link.link_id.clone(), config_data: link.config_data.clone() });
            }
        }
        for route in &change.set_routes {
            if routes_set.insert(route) {
                command.routes_to_set.push(route_proto(route));
            }
        }
        for route in &change.delete_routes {
            if routes_deleted.insert(route) {
                command.routes_to_delete.push(route_proto(route));
            }
        }
        for link in &change.delete_links {
            if links_deleted.insert(link.clone()) {
                command.connections_to_delete.push(link.clone());
            }
        }
    }
    command
}

pub(super) fn route_proto(route: &RouteRef) -> ctl::Route {
    ctl::Route { name: Some(route.name.to_proto()), link_id: Some(route.link_id.clone()), direction: None }
}

pub(super) fn message(id: &str, payload: Payload) -> ctl::ControlMessage {
    ctl::ControlMessage { message_id: id.to_owned(), payload: Some(payload) }
}

pub(super) fn new_message_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slim::model::test_values::{link, route};

    #[test]
    fn merge_dedupes_links_and_routes() {
        let a =
            NodeChange { create_links: vec![link("l1")], set_routes: vec![route("o/n/a", "l1")], ..Default::default() };
        let b = NodeChange {
            create_links: vec![link("l1")],
            set_routes: vec![route("o/n/a", "l1"), route("o/n/b", "l1")],
            ..Default::default()
        };
        let command = merge([&a, &b].into_iter());
        assert_eq!(command.connections_to_create.len(), 1);
        assert_eq!(command.routes_to_set.len(), 2);
        assert!(!command.reconcile, "the operator never owns the node's whole state");
    }

    #[test]
    fn ack_failures_go_to_the_caller_that_asked() {
        let a = NodeChange { set_routes: vec![route("o/n/a", "l1")], ..Default::default() };
        let b = NodeChange {
            set_routes: vec![route("o/n/b", "l1")],
            delete_routes: vec![route("o/n/c", "l1")],
            ..Default::default()
        };
        let ack = ctl::ConfigurationCommandAck {
            original_message_id: "m".into(),
            connections_status: vec![],
            routes_status: vec![
                ctl::RouteAck {
                    route: Some(route_proto(&route("o/n/b", "l1"))),
                    success: false,
                    error_msg: "boom".into(),
                },
                ctl::RouteAck {
                    route: Some(route_proto(&route("o/n/c", "l1"))),
                    success: false,
                    error_msg: "route not found".into(),
                },
            ],
        };
        let failures = AckFailures::from_ack(&ack);
        assert!(failures.outcome_for(&a).failures.is_empty());
        let outcome = failures.outcome_for(&b);
        assert_eq!(outcome.failures.len(), 1, "not found on delete is success: {outcome:?}");
        assert_eq!(outcome.failures[0].message, "boom");
        assert_eq!(outcome.failures[0].item, ChangeItem::SetRoute(route("o/n/b", "l1")));
        assert_eq!(outcome.failures[0].item.to_string(), "set route o/n/b via l1");
    }

    #[test]
    fn batches_are_bounded_and_never_delete_a_link_in_use() {
        let uses = |l: &str| NodeChange { set_routes: vec![route("o/n/a", l)], ..Default::default() };
        let deletes = |l: &str| NodeChange { delete_links: vec![l.to_owned()], ..Default::default() };
        let (batch, rest) = take_batch(vec![(uses("l1"), 1), (deletes("l1"), 2), (uses("l2"), 3)], 100);
        assert_eq!(batch.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(rest.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [2], "the delete waits for the next command");
        let (batch, rest) = take_batch(vec![(uses("l1"), 1), (uses("l2"), 2)], 1);
        assert_eq!((batch.len(), rest.len()), (1, 1), "bounded: one item per command");
    }

    /// Node acks with arbitrary contents, against a change: mapped without a panic, every failure
    /// is an item of the change the ack refused, and every refused item is a failure (a delete of
    /// what is already gone excepted).
    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::slim::SlimName;

        const NAMES: [&str; 3] = ["o/n/a", "o/n/b", "o/n/c"];
        const LINKS: [&str; 3] = ["l1", "l2", "l3"];
        const MESSAGES: [&str; 4] = ["", "route not found", "boom", "Connection NOT EXIST"];

        fn change() -> impl Strategy<Value = NodeChange> {
            let routes = || prop::collection::vec((0..3usize, 0..3usize), 0..4);
            let links = || prop::collection::vec(0..3usize, 0..3);
            (links(), routes(), routes(), links()).prop_map(|(create, set, delete, delete_links)| NodeChange {
                create_links: create.into_iter().map(|l| link(LINKS[l])).collect(),
                set_routes: set.into_iter().map(|(n, l)| route(NAMES[n], LINKS[l])).collect(),
                delete_routes: delete.into_iter().map(|(n, l)| route(NAMES[n], LINKS[l])).collect(),
                delete_links: delete_links.into_iter().map(|l| LINKS[l].to_owned()).collect(),
            })
        }

        /// Statuses about the change's items and about anything else (random hashes, no name).
        fn ack() -> impl Strategy<Value = ctl::ConfigurationCommandAck> {
            let link_status = (0..4usize, any::<bool>(), 0..4usize).prop_map(|(l, success, m)| ctl::ConnectionAck {
                link_id: LINKS.get(l).map_or_else(|| "other".to_owned(), |l| (*l).to_owned()),
                success,
                error_msg: MESSAGES[m].to_owned(),
            });
            let name = prop_oneof![
                (0..3usize).prop_map(|n| Some(SlimName::parse(NAMES[n]).expect("name").to_proto())),
                (any::<u64>(), any::<u64>()).prop_map(|(a, b)| Some(crate::slim::pb::dataplane::v1::Name {
                    name: Some(crate::slim::pb::dataplane::v1::EncodedName {
                        component_0: a,
                        component_1: b,
                        ..Default::default()
                    }),
                    str_name: None,
                })),
                Just(None),
            ];
            let route_status =
                (name, prop::option::of(0..4usize), any::<bool>(), 0..4usize).prop_map(|(name, l, success, m)| {
                    ctl::RouteAck {
                        route: Some(ctl::Route {
                            name,
                            link_id: l.map(|l| LINKS.get(l).map_or_else(|| "other".to_owned(), |l| (*l).to_owned())),
                            direction: None,
                        }),
                        success,
                        error_msg: MESSAGES[m].to_owned(),
                    }
                });
            (prop::collection::vec(link_status, 0..6), prop::collection::vec(route_status, 0..8)).prop_map(
                |(connections_status, routes_status)| ctl::ConfigurationCommandAck {
                    original_message_id: String::new(),
                    connections_status,
                    routes_status,
                },
            )
        }

        fn refused_link(ack: &ctl::ConfigurationCommandAck, id: &str) -> Option<String> {
            // A refusal counts; of several, the last one's message.
            ack.connections_status
                .iter()
                .filter(|s| !s.success)
                .rev()
                .find(|s| s.link_id == id)
                .map(|s| s.error_msg.clone())
        }

        fn refused_route(ack: &ctl::ConfigurationCommandAck, wanted: &RouteRef) -> Option<String> {
            let matches = |s: &&ctl::RouteAck| {
                s.route.as_ref().is_some_and(|r| {
                    r.name.as_ref().and_then(NameKey::from_proto) == Some(wanted.name.key())
                        && r.link_id.clone().unwrap_or_default() == wanted.link_id
                })
            };
            ack.routes_status.iter().filter(|s| !s.success).rev().find(matches).map(|s| s.error_msg.clone())
        }

        proptest! {
            #[test]
            fn every_refused_item_and_only_those_is_a_failure(change in change(), ack in ack()) {
                let outcome = AckFailures::from_ack(&ack).outcome_for(&change);
                let gone = |m: &str| Said::of(m) == Said::NotFound;
                let mut expected = Vec::new();
                for link in &change.create_links {
                    if let Some(message) = refused_link(&ack, &link.link_id) {
                        expected.push(ItemFailure { item: ChangeItem::CreateLink(link.link_id.clone()), message });
                    }
                }
                for route in &change.set_routes {
                    if let Some(message) = refused_route(&ack, route) {
                        expected.push(ItemFailure { item: ChangeItem::SetRoute(route.clone()), message });
                    }
                }
                for route in &change.delete_routes {
                    if let Some(message) = refused_route(&ack, route).filter(|m| !gone(m)) {
                        expected.push(ItemFailure { item: ChangeItem::DeleteRoute(route.clone()), message });
                    }
                }
                for link in &change.delete_links {
                    if let Some(message) = refused_link(&ack, link).filter(|m| !gone(m)) {
                        expected.push(ItemFailure { item: ChangeItem::DeleteLink(link.clone()), message });
                    }
                }
                prop_assert_eq!(outcome.failures, expected);
            }
        }
    }
}
