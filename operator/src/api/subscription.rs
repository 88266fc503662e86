//! The `Subscription` custom resource: a SLIM route (a name reachable over a link to another
//! node) installed on a set of SLIM nodes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A route on SLIM nodes: `spec.name` becomes reachable, from every node in `spec.nodes`, over the
/// link described by `spec.link`. The operator installs the link and the route through each node's
/// controller API, repairs them when a node loses them, and removes them on delete.
// clippy reads the repeated `printcolumn(...)` keys as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "slim.agntcy.org",
    version = "v1alpha1",
    kind = "Subscription",
    plural = "subscriptions",
    singular = "subscription",
    shortname = "slimsub",
    category = "slim",
    namespaced,
    doc = "A SLIM route: spec.name reachable from spec.nodes over spec.link.",
    status = "SubscriptionStatus",
    cel,
    printcolumn(name = "Name", type_ = "string", json_path = ".spec.name", description = "SLIM name routed"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionSpec {
    /// SLIM name to route: `org/namespace/name`, optionally followed by `/<instance UUID>` to route
    /// one instance of an app.
    #[x_kube(validation = Rule::new(
        "self.matches('^[^/\\\\s]+/[^/\\\\s]+/[^/\\\\s]+(/[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})?$')"
    ).message("must be org/namespace/name or org/namespace/name/<instance UUID>, without spaces"))]
    #[schemars(length(min = 5, max = 512))]
    pub name: String,

    /// The SLIM nodes the route is installed on: explicit controller endpoints, node Pods chosen
    /// by a label selector, or both.
    pub nodes: NodeSet,

    /// The connection the route is sent over.
    pub link: LinkSpec,
}

/// Where a route is installed. At least one of `endpoints` and `selector` must be set.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("(has(self.endpoints) && size(self.endpoints) > 0) || has(self.selector)")
    .message("nodes needs at least one endpoint or a selector"))]
#[serde(rename_all = "camelCase")]
pub struct NodeSet {
    /// Controller API endpoints of SLIM nodes, e.g. `http://slim-0.slim.slim.svc:46358`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(
        validation = Rule::new("self.all(e, e.matches('^http://[^/\\\\s]+:[0-9]+/?$'))")
            .message("each endpoint must be http://host:port (the node's controller API)"),
        merge_strategy = ListMerge::Set
    )]
    pub endpoints: Vec<String>,

    /// SLIM node Pods in this namespace. The controller port is the container port named
    /// `controller-0`, else 46358. Only Running Pods with an IP are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// The link (connection) the nodes use to reach the name.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.tls) || !self.tls.insecure || self.endpoint.startsWith('http://')")
    .message("tls.insecure needs an http:// endpoint"))]
#[x_kube(validation = Rule::new("!has(self.tls) || self.tls.insecure || self.endpoint.startsWith('https://')")
    .message("TLS settings need an https:// endpoint; for plain http set tls.insecure: true"))]
#[serde(rename_all = "camelCase")]
pub struct LinkSpec {
    /// Data-plane endpoint of the node on the other end, e.g. `http://slim-b.slim.svc:46357`.
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/\\\\s]+:[0-9]+/?$')")
        .message("endpoint must be http://host:port or https://host:port"))]
    #[schemars(length(max = 512))]
    pub endpoint: String,

    /// Connection type: `remote` (default), `peer` (subscriptions sync both ways) or `edge`.
    #[serde(default)]
    pub connection_type: ConnectionType,

    /// TLS of the link. Omitted: plain for http:// endpoints, TLS with system roots for https://.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<LinkTls>,
}

/// SLIM connection types a route may use.
#[derive(schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionType {
    #[default]
    Remote,
    Peer,
    Edge,
}

impl ConnectionType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Remote => "remote",
            Self::Peer => "peer",
            Self::Edge => "edge",
        }
    }
}

/// TLS settings of a link. Certificates come from Secrets in the Subscription's namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!self.insecure || (!has(self.caSecretRef) && !has(self.clientCertSecretRef))")
    .message("an insecure link takes no certificates"))]
#[serde(rename_all = "camelCase")]
pub struct LinkTls {
    /// Plain-text link (no TLS).
    #[serde(default)]
    pub insecure: bool,

    /// Skip verification of the server certificate (testing only).
    #[serde(default)]
    pub insecure_skip_verify: bool,

    /// Secret key holding the CA bundle (PEM) that signs the server certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,

    /// `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) with the client certificate for mTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretRef>,
}

/// A key in a Secret of the same namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret; default `ca.crt`.
    #[serde(default = "default_ca_key")]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".to_owned()
}

/// A Secret of the same namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Observed state of a Subscription.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: the route is installed on every selected node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The route name last installed (used to remove it when `spec.name` changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_name: Option<String>,

    /// Deterministic id of the link: equal link specs share one link per node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_id: Option<String>,

    /// One entry per node the route is (or was, until removed) installed on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeStatus>,
}

/// The route's state on one node.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Controller endpoint of the node.
    pub endpoint: String,
    /// The node Pod, when chosen by the selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The route is installed (as of the last check).
    pub route_installed: bool,
    /// When the route was last installed or repaired on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// Why the route is not installed, or what is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Set when the node left the Subscription and removal has not succeeded yet; removal is
    /// retried until the operator's cleanup timeout, then abandoned with a Warning event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removing_since: Option<Time>,
}
