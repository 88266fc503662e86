//! Desired vs observed routes on one node, planned into a change. Pure.

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
}

impl DesiredRoute {
    /// The route and the instance routes.
    pub fn routes(&self) -> impl Iterator<Item = &RouteRef> {
        std::iter::once(&self.route).chain(&self.instances)
    }
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
        if !observed.links.contains(&desired.link.link_id) {
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
    let mut old_links: Vec<&String> = previous.iter().map(|r| &r.link_id).collect();
    old_links.sort();
    old_links.dedup();
    for link in old_links {
        let still_wanted = desired.is_some_and(|d| &d.link.link_id == link);
        if !still_wanted && observed.links.contains(link) && !users.link_in_use(node, link) {
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
        }
    }

    fn observed(links: &[&str], routes: &[RouteRef]) -> Observed {
        Observed {
            links: links.iter().map(|l| l.to_string()).collect(),
            routes: routes.iter().map(|r| (r.name.key(), r.link_id.clone())).collect(),
            names: routes.iter().map(|r| r.name.key()).collect(),
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
}
