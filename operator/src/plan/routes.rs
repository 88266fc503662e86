//! Desired vs observed routes on one node, planned into a change. Pure.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::slim::{LinkConfig, NodeChange, Observed, RouteRef};

/// What a Subscription wants on a node: its route, the routes of the name's live instances, and
/// the link they go over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredRoute {
    pub route: RouteRef,
    pub link: LinkConfig,
    /// `org/ns/name/<instance>` over the same link (see `plan::instances`).
    pub instances: Vec<RouteRef>,
    /// Peer links the far node holds: a target holding one of them too syncs subscriptions with
    /// the far node, so it needs no instance routes.
    pub peer_links: Vec<String>,
    /// The far node's listing, when known: the links it dials (see [`DesiredRoute::on_node`]).
    pub far: Option<Arc<Observed>>,
    /// Set on a node whose routes go over the link the far node dials to it, not over `link`.
    pub borrowed: Option<String>,
}

impl DesiredRoute {
    /// `name` over `link`, nothing else known yet.
    pub fn new(name: crate::slim::SlimName, link: LinkConfig) -> Self {
        DesiredRoute {
            route: RouteRef { name, link_id: link.link_id.clone() },
            link,
            instances: Vec::new(),
            peer_links: Vec::new(),
            far: None,
            borrowed: None,
        }
    }

    /// The route and the instance routes.
    pub fn routes(&self) -> impl Iterator<Item = &RouteRef> {
        std::iter::once(&self.route).chain(&self.instances)
    }

    /// The link the routes go over on the node.
    pub fn link_id(&self) -> &str {
        self.borrowed.as_deref().unwrap_or(&self.link.link_id)
    }

    /// What the Subscription wants on one node, as `observed`. When the far node already dials
    /// this node with a link of the same type, the routes go over that link instead of a second
    /// connection between the two nodes: SLIM fans a group channel's messages out over every
    /// connection routing the channel except the one they came in on, so two connections between
    /// two nodes, each routing the channel, send every message round in a loop (members hear
    /// their own messages and acknowledgements stall). Both sides apply this rule; the link with
    /// the lower id is the one kept, so two links created at once settle on one. Peer links sync
    /// subscriptions themselves and are left alone.
    pub fn on_node(&self, observed: &Observed) -> DesiredRoute {
        let Some(link) = borrowable(self, observed) else {
            return DesiredRoute { borrowed: None, ..self.clone() };
        };
        let reachable: Vec<u128> = self
            .far
            .as_deref()
            .map(|far| far.instances_reachable(&self.route.name, &link).collect())
            .unwrap_or_default();
        let over = |route: &RouteRef| RouteRef { name: route.name.clone(), link_id: link.clone() };
        DesiredRoute {
            route: over(&self.route),
            instances: self
                .instances
                .iter()
                .filter(|r| r.name.instance().is_some_and(|id| reachable.contains(&id)))
                .map(over)
                .collect(),
            borrowed: Some(link.clone()),
            ..self.clone()
        }
    }
}

impl DesiredRoute {
    /// Whether the far node dials a link this node's routes would go over if the node listed it
    /// as incoming: a listing of the node that does not may predate that link.
    pub fn may_borrow(&self) -> bool {
        let Some(far) = self.far.as_deref() else { return false };
        Borrowable::of(&self.link).is_some_and(|b| !b.dialed_by(far).is_empty())
    }
}

/// What a Subscription's routes may go over instead of its own link: a link the far node dials,
/// of the same connection type (not `peer`), with a lower id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Borrowable {
    kind: String,
    own: String,
}

impl Borrowable {
    pub fn of(link: &LinkConfig) -> Option<Self> {
        let kind = link.connection_type().filter(|kind| kind != "peer")?;
        Some(Borrowable { kind, own: link.link_id.clone() })
    }

    /// Such links `far` dials.
    pub fn dialed_by(&self, far: &Observed) -> BTreeSet<String> {
        far.dialed
            .iter()
            .filter(|(id, kind)| **kind == self.kind && **id < self.own)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// The link of the same type the far node dials to this node (this node carries exactly one
/// incoming connection with its id), when its id is lower than the Subscription's own link's.
fn borrowable(desired: &DesiredRoute, observed: &Observed) -> Option<String> {
    let far = desired.far.as_deref()?;
    let candidates = Borrowable::of(&desired.link)?.dialed_by(far);
    // The first (lowest id) such link this node carries exactly one incoming connection of.
    candidates.into_iter().find(|id| observed.incoming.get(id) == Some(&1))
}

/// Whether other Subscriptions still need something on a node (so it must not be deleted).
pub trait Users {
    fn link_in_use(&self, node: &str, link_id: &str) -> bool;
    fn route_in_use(&self, node: &str, route: &RouteRef) -> bool;
}

/// Nobody else: for tests and single-owner callers.
pub struct NoOtherUsers;

impl Users for NoOtherUsers {
    fn link_in_use(&self, _: &str, _: &str) -> bool {
        false
    }
    fn route_in_use(&self, _: &str, _: &RouteRef) -> bool {
        false
    }
}

/// Plans one node.
/// - `desired`: the routes that must be there (`None` when removing).
/// - `previous`: the routes this Subscription installed before and may still be there.
///
/// Creates the link only when the node lacks it, sets each route only when missing, removes each
/// previous route no longer wanted by anyone, and a previous link when nobody uses it any more.
/// A node that shares a peer link with the far node gets no instance routes: the peer link syncs
/// the instances, and two paths to one instance break SLIM sessions after their first one. An
/// empty change means the node is in sync.
pub fn plan_node(
    node: &str,
    desired: Option<&DesiredRoute>,
    previous: &[RouteRef],
    observed: &Observed,
    users: &(dyn Users + Sync),
) -> NodeChange {
    let mut change = NodeChange::default();
    let peered = desired.is_some_and(|d| d.peer_links.iter().any(|l| observed.links.contains(l)));
    let wanted_here =
        |route: &RouteRef| desired.is_some_and(|d| route == &d.route || (!peered && d.instances.contains(route)));
    if let Some(desired) = desired {
        if desired.borrowed.is_none() && !observed.links.contains(&desired.link.link_id) {
            change.create_links.push(desired.link.clone());
        }
        change.set_routes.extend(desired.routes().filter(|r| wanted_here(r) && !observed.has_route(r)).cloned());
    }
    let wanted = wanted_here;
    for old in previous.iter().filter(|r| !wanted(r)) {
        if observed.has_route(old) && !users.route_in_use(node, old) && !change.delete_routes.contains(old) {
            change.delete_routes.push(old.clone());
        }
    }
    // A node borrowing the far node's link drops its own (the other side keeps the lower id).
    let own_unused = desired.filter(|d| d.borrowed.is_some()).map(|d| &d.link.link_id);
    let mut old_links: Vec<&String> = previous.iter().map(|r| &r.link_id).chain(own_unused).collect();
    old_links.sort();
    old_links.dedup();
    for link in old_links {
        let still_wanted = desired.is_some_and(|d| d.link_id() == link);
        // Only a link this node dials is deleted here: one dialed to it is the other node's.
        if !still_wanted && observed.dialed.contains_key(link) && !users.link_in_use(node, link) {
            change.delete_links.push(link.clone());
        }
    }
    change
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slim::SlimName;

    fn route(name: &str, link: &str) -> RouteRef {
        RouteRef { name: SlimName::parse(name).expect("valid"), link_id: link.into() }
    }

    fn desired(name: &str, link: &str) -> DesiredRoute {
        DesiredRoute {
            route: route(name, link),
            link: LinkConfig { link_id: link.into(), config_data: "{}".into() },
            instances: Vec::new(),
            peer_links: Vec::new(),
            far: None,
            borrowed: None,
        }
    }

    fn observed(links: &[&str], routes: &[RouteRef]) -> Observed {
        Observed {
            links: links.iter().map(|l| l.to_string()).collect(),
            routes: routes.iter().map(|r| (r.name.key(), r.link_id.clone())).collect(),
            names: routes.iter().map(|r| r.name.key()).collect(),
            dialed: links.iter().map(|l| (l.to_string(), "remote".to_owned())).collect(),
            incoming: Default::default(),
        }
    }

    struct LinkUsedElsewhere;
    impl Users for LinkUsedElsewhere {
        fn link_in_use(&self, _: &str, _: &str) -> bool {
            true
        }
        fn route_in_use(&self, _: &str, _: &RouteRef) -> bool {
            false
        }
    }

    #[test]
    fn empty_node_gets_link_and_route() {
        let want = desired("o/n/a", "l1");
        let change = plan_node("n", Some(&want), &[], &Observed::default(), &NoOtherUsers);
        assert_eq!(change.create_links, vec![want.link.clone()]);
        assert_eq!(change.set_routes, vec![want.route.clone()]);
        assert!(change.delete_routes.is_empty() && change.delete_links.is_empty());
    }

    #[test]
    fn in_sync_node_needs_nothing() {
        let want = desired("o/n/a", "l1");
        let seen = observed(&["l1"], std::slice::from_ref(&want.route));
        assert!(plan_node("n", Some(&want), std::slice::from_ref(&want.route), &seen, &NoOtherUsers).is_empty());
    }

    #[test]
    fn shared_link_present_only_route_is_set() {
        let want = desired("o/n/a", "l1");
        let seen = observed(&["l1"], &[route("o/n/other", "l1")]);
        let change = plan_node("n", Some(&want), &[], &seen, &NoOtherUsers);
        assert!(change.create_links.is_empty());
        assert_eq!(change.set_routes, vec![want.route]);
    }

    #[test]
    fn renamed_route_replaces_the_old_one_on_the_same_link() {
        let want = desired("o/n/new", "l1");
        let old = route("o/n/old", "l1");
        let seen = observed(&["l1"], std::slice::from_ref(&old));
        let change = plan_node("n", Some(&want), std::slice::from_ref(&old), &seen, &NoOtherUsers);
        assert_eq!(change.set_routes, vec![want.route]);
        assert_eq!(change.delete_routes, vec![old]);
        assert!(change.delete_links.is_empty(), "the link is still wanted");
    }

    #[test]
    fn moved_link_deletes_the_old_link_when_unused() {
        let want = desired("o/n/a", "l2");
        let old = route("o/n/a", "l1");
        let seen = observed(&["l1"], std::slice::from_ref(&old));
        let change = plan_node("n", Some(&want), std::slice::from_ref(&old), &seen, &NoOtherUsers);
        assert_eq!(change.delete_links, vec!["l1".to_string()]);
        let shared = plan_node("n", Some(&want), std::slice::from_ref(&old), &seen, &LinkUsedElsewhere);
        assert!(shared.delete_links.is_empty(), "another Subscription still uses l1");
        assert_eq!(shared.delete_routes, vec![old]);
    }

    #[test]
    fn removal_is_a_no_op_when_already_gone() {
        let old = route("o/n/a", "l1");
        assert!(plan_node("n", None, std::slice::from_ref(&old), &Observed::default(), &NoOtherUsers).is_empty());
        let seen = observed(&["l1"], std::slice::from_ref(&old));
        let change = plan_node("n", None, std::slice::from_ref(&old), &seen, &NoOtherUsers);
        assert_eq!(change.delete_routes, vec![old]);
        assert_eq!(change.delete_links, vec!["l1".to_string()]);
    }

    #[test]
    fn instance_routes_come_and_go_with_their_instances() {
        const OLD: &str = "0b3c5a8e-1111-4222-8333-944455556666";
        const NEW: &str = "d165bd17-d238-547c-ad69-4d19eb78171a";
        let mut want = desired("o/n/a", "l1");
        want.instances = vec![route(&format!("o/n/a/{NEW}"), "l1")];
        let old = route(&format!("o/n/a/{OLD}"), "l1");
        let seen = observed(&["l1"], &[want.route.clone(), old.clone()]);
        let change = plan_node("n", Some(&want), &[want.route.clone(), old.clone()], &seen, &NoOtherUsers);
        assert_eq!(change.set_routes, want.instances, "the new instance is routed");
        assert_eq!(change.delete_routes, vec![old], "the gone one is removed");
        assert!(change.create_links.is_empty() && change.delete_links.is_empty(), "the link stays");
        // Deletion removes the name, every instance and the link.
        let routes: Vec<RouteRef> = want.routes().cloned().collect();
        let seen = observed(&["l1"], &routes);
        let change = plan_node("n", None, &routes, &seen, &NoOtherUsers);
        assert_eq!((change.delete_routes.len(), change.delete_links.len()), (2, 1));
    }

    #[test]
    fn a_node_peered_with_the_far_node_gets_no_instance_routes() {
        const ID: &str = "0b3c5a8e-1111-4222-8333-944455556666";
        let mut want = desired("o/n/a", "l1");
        let ours = route(&format!("o/n/a/{ID}"), "l1");
        want.instances = vec![ours.clone()];
        want.peer_links = vec!["peer-link".into()];
        let synced = route(&format!("o/n/a/{ID}"), "peer-link");
        let seen = observed(&["l1", "peer-link"], &[want.route.clone(), synced.clone()]);
        assert!(plan_node("n", Some(&want), &[], &seen, &NoOtherUsers).is_empty(), "the peer link syncs it");
        // Ours was there before the peer link: it goes.
        let seen = observed(&["l1", "peer-link"], &[want.route.clone(), synced, ours.clone()]);
        let change = plan_node("n", Some(&want), std::slice::from_ref(&ours), &seen, &NoOtherUsers);
        assert_eq!(change.delete_routes, vec![ours.clone()]);
        // A node without that peer link gets the instance route.
        let seen = observed(&["l1"], std::slice::from_ref(&want.route));
        assert_eq!(plan_node("n", Some(&want), &[], &seen, &NoOtherUsers).set_routes, vec![ours]);
    }

    #[test]
    fn node_that_lost_everything_is_repaired_in_full() {
        let want = desired("o/n/a", "l1");
        let change =
            plan_node("n", Some(&want), std::slice::from_ref(&want.route), &Observed::default(), &NoOtherUsers);
        assert_eq!(change.create_links.len(), 1);
        assert_eq!(change.set_routes.len(), 1);
        assert!(change.delete_routes.is_empty());
    }

    /// Nodes a and b: `to_b` routes a name on a over link "l-b" (dialed by a); the far node of a
    /// Subscription on b, routing a name to a over its own `own` link, is a.
    mod one_link_between_two_nodes {
        use super::*;

        const CAROL: &str = "0b3c5a8e-1111-4222-8333-944455556666";
        const BOB: &str = "d165bd17-d238-547c-ad69-4d19eb78171a";

        fn link(id: &str, kind: &str) -> LinkConfig {
            LinkConfig {
                link_id: id.into(),
                config_data: format!(r#"{{"link_id":"{id}","connection_type":"{kind}"}}"#),
            }
        }

        /// What the Subscription on b wants: `o/n/team` and carol's and bob's instances of it, as
        /// a (the far node) lists them: carol's is a's own app, bob's a routes back over "l-b".
        fn on_b(own: &str, kind: &str, far_dials: &[(&str, &str)]) -> DesiredRoute {
            let mut far = observed(&[], &[route(&format!("o/n/team/{BOB}"), "l-b")]);
            far.names.insert(SlimName::parse(&format!("o/n/team/{CAROL}")).expect("name").key());
            far.dialed = far_dials.iter().map(|(id, kind)| (id.to_string(), kind.to_string())).collect();
            let mut want = desired("o/n/team", own);
            want.link = link(own, kind);
            want.instances = [CAROL, BOB].iter().map(|id| route(&format!("o/n/team/{id}"), own)).collect();
            want.far = Some(Arc::new(far));
            want
        }

        fn node_b(dialed: &[&str], incoming: &[(&str, usize)]) -> Observed {
            let mut node = observed(dialed, &[]);
            for (id, count) in incoming {
                node.links.insert(id.to_string());
                node.incoming.insert(id.to_string(), *count);
            }
            node
        }

        #[test]
        fn routes_go_over_the_link_the_far_node_dials_and_no_second_one_is_made() {
            let want = on_b("l-z", "remote", &[("l-b", "remote")]).on_node(&node_b(&[], &[("l-b", 1)]));
            assert_eq!(want.borrowed.as_deref(), Some("l-b"));
            assert_eq!(want.route, route("o/n/team", "l-b"));
            // Bob's instance is reached over that very link: routing it back there would loop.
            assert_eq!(want.instances, vec![route(&format!("o/n/team/{CAROL}"), "l-b")]);
            let change = plan_node("b", Some(&want), &[], &node_b(&[], &[("l-b", 1)]), &NoOtherUsers);
            assert!(change.create_links.is_empty(), "no second connection: {change:?}");
            assert_eq!(change.set_routes.len(), 2);
        }

        #[test]
        fn a_link_made_before_is_dropped_for_the_far_nodes_lower_one() {
            let node = node_b(&["l-z"], &[("l-b", 1)]);
            let want = on_b("l-z", "remote", &[("l-b", "remote")]);
            let before = [route("o/n/team", "l-z")];
            let change = plan_node("b", Some(&want.on_node(&node)), &before, &node, &NoOtherUsers);
            assert_eq!(change.delete_links, vec!["l-z".to_owned()]);
            // Another Subscription still routing over it keeps it.
            let change = plan_node("b", Some(&want.on_node(&node)), &before, &node, &LinkUsedElsewhere);
            assert!(change.delete_links.is_empty());
        }

        #[test]
        fn of_two_links_made_at_once_both_sides_keep_the_lower_id() {
            // b dials "l-a" to a, a dials "l-b" to b: each side sees the other's as incoming.
            let b = node_b(&["l-a"], &[("l-b", 1)]);
            assert_eq!(on_b("l-a", "remote", &[("l-b", "remote")]).on_node(&b).borrowed, None, "b keeps l-a");
            let a = node_b(&["l-b"], &[("l-a", 1)]);
            assert_eq!(
                on_b("l-b", "remote", &[("l-a", "remote")]).on_node(&a).borrowed.as_deref(),
                Some("l-a"),
                "a routes over l-a"
            );
        }

        #[test]
        fn peer_links_other_types_and_shared_ids_are_not_borrowed() {
            let b = node_b(&[], &[("l-b", 1)]);
            assert_eq!(on_b("l-z", "peer", &[("l-b", "peer")]).on_node(&b).borrowed, None, "peer syncs itself");
            assert_eq!(on_b("l-z", "remote", &[("l-b", "edge")]).on_node(&b).borrowed, None, "another type");
            // Two nodes dial b with the same link spec: the id does not say which connection is a's.
            let shared = node_b(&[], &[("l-b", 2)]);
            assert_eq!(on_b("l-z", "remote", &[("l-b", "remote")]).on_node(&shared).borrowed, None);
            // The far node not read: nothing to borrow.
            let mut unknown = on_b("l-z", "remote", &[("l-b", "remote")]);
            unknown.far = None;
            assert_eq!(unknown.on_node(&b).borrowed, None);
        }

        #[test]
        fn a_link_dialed_to_the_node_is_never_deleted_from_it() {
            // The Subscription on b used to borrow "l-b" and now routes over its own link again.
            let node = node_b(&["l-z"], &[("l-b", 1)]);
            let mut want = on_b("l-z", "remote", &[]);
            want.instances.clear();
            let before = [route("o/n/team", "l-b")];
            let change = plan_node("b", Some(&want.on_node(&node)), &before, &node, &NoOtherUsers);
            assert!(change.delete_links.is_empty(), "{change:?}");
            // Deleted: its routes over "l-b" go, the link stays a's.
            let node = node_b(&[], &[("l-b", 1)]);
            let mut seen = node.clone();
            seen.routes.insert((before[0].name.key(), "l-b".into()));
            let change = plan_node("b", None, &before, &seen, &NoOtherUsers);
            assert_eq!(change.delete_routes, before.to_vec());
            assert!(change.delete_links.is_empty());
        }
    }

    /// The planner on random desired and observed states of a node: applying its change yields
    /// the desired state, and planning again changes nothing.
    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::slim::ChangeOutcome;

        const NAMES: [&str; 3] = ["o/n/a", "o/n/b", "o/n/c"];
        const INSTANCES: [u128; 3] = [1, 2, 3];
        const LINKS: [&str; 3] = ["l1", "l2", "l3"];

        fn route_of((name, instance, link): (usize, Option<usize>, usize)) -> RouteRef {
            let base = SlimName::parse(NAMES[name]).expect("name");
            let name = instance.map_or_else(|| base.clone(), |i| base.with_instance(INSTANCES[i]));
            RouteRef { name, link_id: LINKS[link].to_owned() }
        }

        fn routes() -> impl Strategy<Value = Vec<RouteRef>> {
            prop::collection::vec((0..3usize, prop::option::of(0..3usize), 0..3usize), 0..8)
                .prop_map(|picks| picks.into_iter().map(route_of).collect())
        }

        /// A node: links it dials (the rest of `incoming` dialed to it), and routes over them.
        fn node() -> impl Strategy<Value = Observed> {
            (
                prop::collection::btree_set(0..3usize, 0..3),
                prop::collection::btree_map(0..3usize, 1..3usize, 0..2),
                routes(),
            )
                .prop_map(|(dialed, incoming, routes)| {
                    let mut node = observed(&[], &[]);
                    for link in dialed {
                        node.links.insert(LINKS[link].into());
                        node.dialed.insert(LINKS[link].into(), "remote".into());
                    }
                    for (link, count) in incoming {
                        node.links.insert(LINKS[link].into());
                        node.incoming.insert(LINKS[link].into(), count);
                    }
                    for route in routes.into_iter().filter(|r| node.links.contains(&r.link_id)) {
                        node.names.insert(route.name.key());
                        node.routes.insert((route.name.key(), route.link_id));
                    }
                    node
                })
        }

        /// What a Subscription wants: its name over a link, instances, and the far node's links.
        fn wanted() -> impl Strategy<Value = Option<DesiredRoute>> {
            let far = prop::collection::btree_map(0..3usize, prop_oneof![Just("remote"), Just("edge")], 0..3);
            prop::option::of((0..3usize, 0..3usize, prop::collection::btree_set(0..3usize, 0..3), far)).prop_map(
                |picked| {
                    let (name, link, instances, far) = picked?;
                    let mut want = desired(NAMES[name], LINKS[link]);
                    want.link = LinkConfig {
                        link_id: LINKS[link].into(),
                        config_data: r#"{"connection_type":"remote"}"#.into(),
                    };
                    want.instances = instances.into_iter().map(|i| route_of((name, Some(i), link))).collect();
                    let mut far_node = observed(&[], &[]);
                    far_node.dialed = far.into_iter().map(|(l, kind)| (LINKS[l].to_owned(), kind.to_owned())).collect();
                    want.far = Some(Arc::new(far_node));
                    Some(want)
                },
            )
        }

        proptest! {
            #[test]
            fn applying_the_plan_reaches_the_desired_state_and_a_second_plan_is_empty(
                node in node(),
                want in wanted(),
                previous in routes(),
            ) {
                let want = want.map(|w| w.on_node(&node));
                let change = plan_node("n", want.as_ref(), &previous, &node, &NoOtherUsers);
                // Only links this node dials are ever deleted.
                for link in &change.delete_links {
                    prop_assert!(node.dialed.contains_key(link), "deleted {link}, dialed to the node");
                }
                let mut after = node.clone();
                after.apply(&change, &ChangeOutcome::default());
                if let Some(want) = &want {
                    prop_assert!(after.links.contains(want.link_id()), "the link is there: {after:?}");
                    for route in want.routes() {
                        prop_assert!(after.has_route(route), "{route:?} is there: {after:?}");
                    }
                }
                for old in &previous {
                    let wanted = want.as_ref().is_some_and(|w| w.routes().any(|r| r == old));
                    prop_assert!(wanted || !after.has_route(old), "{old:?} was removed: {change:?}");
                }
                let again = plan_node("n", want.as_ref(), &previous, &after, &NoOtherUsers);
                prop_assert!(again.is_empty(), "a second plan changes nothing: {again:?}");
            }
        }
    }
}
