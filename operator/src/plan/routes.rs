//! Desired vs observed routes on one node, planned into a change. Pure.

use crate::slim::{LinkConfig, NodeChange, Observed, RouteRef};

/// What a Subscription wants on a node: its route and the link it goes over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredRoute {
    pub route: RouteRef,
    pub link: LinkConfig,
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
/// - `desired`: the route that must be there (`None` when removing).
/// - `previous`: the route this Subscription installed before, if it may still be there.
///
/// Creates the link only when the node lacks it, sets the route only when missing, removes the
/// previous route when it is no longer wanted by anyone, and its link when nobody uses it any
/// more. An empty change means the node is in sync.
pub fn plan_node(
    node: &str,
    desired: Option<&DesiredRoute>,
    previous: Option<&RouteRef>,
    observed: &Observed,
    users: &(dyn Users + Sync),
) -> NodeChange {
    let mut change = NodeChange::default();
    if let Some(desired) = desired {
        if !observed.links.contains(&desired.link.link_id) {
            change.create_links.push(desired.link.clone());
        }
        if !observed.has_route(&desired.route) {
            change.set_routes.push(desired.route.clone());
        }
    }
    if let Some(previous) = previous.filter(|p| desired.is_none_or(|d| &d.route != *p)) {
        if observed.has_route(previous) && !users.route_in_use(node, previous) {
            change.delete_routes.push(previous.clone());
        }
        let link_still_wanted = desired.is_some_and(|d| d.link.link_id == previous.link_id);
        if !link_still_wanted
            && observed.links.contains(&previous.link_id)
            && !users.link_in_use(node, &previous.link_id)
        {
            change.delete_links.push(previous.link_id.clone());
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
        DesiredRoute { route: route(name, link), link: LinkConfig { link_id: link.into(), config_data: "{}".into() } }
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
        let change = plan_node("n", Some(&want), None, &Observed::default(), &NoOtherUsers);
        assert_eq!(change.create_links, vec![want.link.clone()]);
        assert_eq!(change.set_routes, vec![want.route.clone()]);
        assert!(change.delete_routes.is_empty() && change.delete_links.is_empty());
    }

    #[test]
    fn in_sync_node_needs_nothing() {
        let want = desired("o/n/a", "l1");
        let seen = observed(&["l1"], std::slice::from_ref(&want.route));
        assert!(plan_node("n", Some(&want), Some(&want.route), &seen, &NoOtherUsers).is_empty());
    }

    #[test]
    fn shared_link_present_only_route_is_set() {
        let want = desired("o/n/a", "l1");
        let seen = observed(&["l1"], &[route("o/n/other", "l1")]);
        let change = plan_node("n", Some(&want), None, &seen, &NoOtherUsers);
        assert!(change.create_links.is_empty());
        assert_eq!(change.set_routes, vec![want.route]);
    }

    #[test]
    fn renamed_route_replaces_the_old_one_on_the_same_link() {
        let want = desired("o/n/new", "l1");
        let old = route("o/n/old", "l1");
        let seen = observed(&["l1"], std::slice::from_ref(&old));
        let change = plan_node("n", Some(&want), Some(&old), &seen, &NoOtherUsers);
        assert_eq!(change.set_routes, vec![want.route]);
        assert_eq!(change.delete_routes, vec![old]);
        assert!(change.delete_links.is_empty(), "the link is still wanted");
    }

    #[test]
    fn moved_link_deletes_the_old_link_when_unused() {
        let want = desired("o/n/a", "l2");
        let old = route("o/n/a", "l1");
        let seen = observed(&["l1"], std::slice::from_ref(&old));
        let change = plan_node("n", Some(&want), Some(&old), &seen, &NoOtherUsers);
        assert_eq!(change.delete_links, vec!["l1".to_string()]);
        let shared = plan_node("n", Some(&want), Some(&old), &seen, &LinkUsedElsewhere);
        assert!(shared.delete_links.is_empty(), "another Subscription still uses l1");
        assert_eq!(shared.delete_routes, vec![old]);
    }

    #[test]
    fn removal_is_a_no_op_when_already_gone() {
        let old = route("o/n/a", "l1");
        assert!(plan_node("n", None, Some(&old), &Observed::default(), &NoOtherUsers).is_empty());
        let seen = observed(&["l1"], std::slice::from_ref(&old));
        let change = plan_node("n", None, Some(&old), &seen, &NoOtherUsers);
        assert_eq!(change.delete_routes, vec![old]);
        assert_eq!(change.delete_links, vec!["l1".to_string()]);
    }

    #[test]
    fn node_that_lost_everything_is_repaired_in_full() {
        let want = desired("o/n/a", "l1");
        let change = plan_node("n", Some(&want), Some(&want.route), &Observed::default(), &NoOtherUsers);
        assert_eq!(change.create_links.len(), 1);
        assert_eq!(change.set_routes.len(), 1);
        assert!(change.delete_routes.is_empty());
    }
}
