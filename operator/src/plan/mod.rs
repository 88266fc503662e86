//! Pure planning: desired state against observed state, into actions. No IO.

pub mod channel;
pub mod conflicts;
pub mod instances;
pub mod link;
pub mod manager;
pub mod nodes;
pub mod routes;

pub use instances::{Following, following, instance_routes};
pub use link::{LINK_ID_PREFIX, ResolvedTls, render_link};
pub use nodes::{
    NodeTarget, SelectorError, node_targets, parse_equality_selector, pod_targets, selector_matches, selector_query,
};
pub use routes::{Borrowable, DesiredRoute, NoOtherUsers, Users, plan_node};
