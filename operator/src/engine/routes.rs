//! Realises one Subscription's route on its nodes through their controller APIs. IO against SLIM,
//! nothing of Kubernetes: the controller feeds it resolved inputs and turns its report into status.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;

use crate::plan::{DesiredRoute, NodeTarget, Users, plan_node};
use crate::slim::{ChangeOutcome, NodeError, NodePool, RouteRef};
use crate::tls::control::TlsFailure;

/// One sync of one Subscription.
pub struct RouteSync<'a> {
    /// The route to install; `None` removes it everywhere (deletion).
    pub desired: Option<&'a DesiredRoute>,
    /// Nodes the route must be on.
    pub targets: &'a [NodeTarget],
    /// The route installed before (from status), to remove where it is no longer wanted.
    pub previous: Option<&'a RouteRef>,
    /// The instance routes installed before on each node (from status), likewise.
    pub previous_instances: &'a BTreeMap<String, Vec<RouteRef>>,
    /// Nodes the route was installed on before (from status).
    pub previous_nodes: &'a [String],
    /// Who else uses links and routes on each node.
    pub users: &'a (dyn Users + Sync),
    /// Maximum age of a node listing reused from the cache.
    pub max_snapshot_age: Duration,
}

/// What happened on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeReport {
    pub endpoint: String,
    pub pod: Option<String>,
    /// Is the node still a target (false: the route is being removed from it)?
    pub target: bool,
    pub result: NodeResult,
    /// The far node's link the routes go over on this node, when not the Subscription's own.
    pub borrowed: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeResult {
    /// The node matches the plan; `wrote` says whether a command was needed to get there.
    InSync { wrote: bool },
    /// The node was unreachable or did not answer; `tls` says when a TLS failure was the cause.
    Unreachable { message: String, tls: Option<TlsFailure> },
    /// The node refused part of the change.
    Rejected(String),
}

impl NodeResult {
    /// What went wrong, when something did.
    pub fn failure(&self) -> Option<&str> {
        match self {
            NodeResult::InSync { .. } => None,
            NodeResult::Unreachable { message, .. } | NodeResult::Rejected(message) => Some(message),
        }
    }
}

impl NodeReport {
    pub fn ok(&self) -> bool {
        matches!(self.result, NodeResult::InSync { .. })
    }

    pub fn wrote(&self) -> bool {
        matches!(self.result, NodeResult::InSync { wrote: true })
    }
}

impl RouteSync<'_> {
    /// Plans and applies every node concurrently; one slow node does not hold up the others.
    pub async fn run(&self, pool: &NodePool) -> Vec<NodeReport> {
        let leaving = self
            .previous_nodes
            .iter()
            .filter(|endpoint| !self.targets.iter().any(|t| &t.endpoint == *endpoint))
            .map(|endpoint| (endpoint.clone(), None, false));
        let staying = self.targets.iter().map(|t| (t.endpoint.clone(), t.pod.clone(), true));
        let work = staying.chain(leaving).map(|(endpoint, pod, target)| async move {
            let (result, borrowed) = self.sync_node(pool, &endpoint, target).await;
            NodeReport { endpoint, pod, target, result, borrowed }
        });
        join_all(work).await
    }

    /// The node's result, and the far node's link its routes go over if they do.
    async fn sync_node(&self, pool: &NodePool, endpoint: &str, target: bool) -> (NodeResult, Option<String>) {
        let node = pool.node(endpoint);
        let mut observed = match node.snapshot(self.max_snapshot_age).await {
            Ok(observed) => observed,
            Err(error) => return (failure(error), None),
        };
        let was_here = self.previous_nodes.iter().any(|e| e == endpoint);
        let wanted = self.desired.filter(|_| target);
        let mut desired = wanted.map(|d| d.on_node(&observed));
        // A cached listing may predate the far node's link to this node: read it again before
        // making a second connection between the two.
        if desired.as_ref().is_some_and(|d| d.borrowed.is_none() && d.may_borrow()) && !self.max_snapshot_age.is_zero()
        {
            observed = match node.snapshot(Duration::ZERO).await {
                Ok(observed) => observed,
                Err(error) => return (failure(error), None),
            };
            desired = wanted.map(|d| d.on_node(&observed));
        }
        let borrowed = desired.as_ref().and_then(|d| d.borrowed.clone());
        (self.apply_plan(&node, endpoint, desired.as_ref(), was_here, &observed).await, borrowed)
    }

    async fn apply_plan(
        &self,
        node: &crate::slim::NodeClient,
        endpoint: &str,
        desired: Option<&DesiredRoute>,
        was_here: bool,
        observed: &crate::slim::Observed,
    ) -> NodeResult {
        let previous: Vec<RouteRef> = self
            .previous
            .filter(|_| was_here)
            .into_iter()
            .chain(self.previous_instances.get(endpoint).into_iter().flatten())
            .cloned()
            .collect();
        let change = plan_node(endpoint, desired, &previous, observed, self.users);
        if change.is_empty() {
            return NodeResult::InSync { wrote: false };
        }
        match node.apply(change).await {
            Ok(ChangeOutcome { failures }) if failures.is_empty() => NodeResult::InSync { wrote: true },
            Ok(ChangeOutcome { failures }) => NodeResult::Rejected(
                failures.iter().map(|f| format!("{}: {}", f.item, f.message)).collect::<Vec<_>>().join("; "),
            ),
            Err(error) => failure(error),
        }
    }
}

fn failure(error: NodeError) -> NodeResult {
    match error {
        NodeError::Rejected { reason, .. } => NodeResult::Rejected(reason),
        other => NodeResult::Unreachable { tls: other.tls_failure(), message: other.to_string() },
    }
}
