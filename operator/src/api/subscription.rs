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

    /// `Follow` (default): for a name without an instance, also route every live instance of it
    /// (`org/ns/name/<instance>`, what sessions address after their first message) over the same
    /// link, as the node at the far end of the link lists them. `None`: the bare name only.
    #[serde(default)]
    pub instances: InstanceRouting,

    /// `Delete` (default): deleting the Subscription removes its route (and a link no other
    /// Subscription uses) from the nodes. `Retain`: they stay on the nodes.
    #[serde(default, skip_serializing_if = "super::DeletionPolicy::is_default")]
    pub deletion_policy: super::DeletionPolicy,
}

/// Whether a Subscription routes the live instances of its name too.
#[derive(schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InstanceRouting {
    #[default]
    Follow,
    None,
}

/// Where a route is installed. At least one of `endpoints` and `selector` must be set.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("(has(self.endpoints) && size(self.endpoints) > 0) || has(self.selector)")
    .message("nodes needs at least one endpoint or a selector"))]
#[x_kube(validation = Rule::new("!has(self.tls) || !self.tls.insecure || !has(self.endpoints) || self.endpoints.all(e, e.startsWith('http://'))")
    .message("tls.insecure needs http:// endpoints"))]
#[x_kube(validation = Rule::new("!has(self.tls) || self.tls.insecure || !has(self.endpoints) || self.endpoints.all(e, e.startsWith('https://'))")
    .message("TLS settings need https:// endpoints; for plain text set tls.insecure: true"))]
#[serde(rename_all = "camelCase")]
pub struct NodeSet {
    /// Controller API endpoints of SLIM nodes, e.g. `http://slim-0.slim.slim.svc:46358`, or
    /// `https://…` for a controller served with TLS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "controller_endpoints")]
    pub endpoints: Vec<String>,

    /// SLIM node Pods in this namespace. The controller port is the container port named
    /// `controller-0`, else 46358. Only Running Pods with an IP are used; they are reached over
    /// `https://` when `tls` (or the operator's default TLS) is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,

    /// TLS to the nodes' controller APIs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::tls::ControlTls>,
}

fn controller_endpoints(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    super::schema::string_set(
        super::schema::MAX_ENDPOINTS,
        super::schema::ENDPOINT_MAX_LENGTH,
        "self.matches('^https?://[^/\\\\s]+:[0-9]+/?$')",
        "each endpoint must be http://host:port or https://host:port (the node's controller API)",
    )
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

    /// Controller API of the node at the far end (`http://host:port`), whose route list says which
    /// instances of the name are live. Optional: a node Pod whose IP or DNS name and data port the
    /// endpoint names is found without it. Reached with the TLS of `spec.nodes`.
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/\\\\s]+:[0-9]+/?$')")
        .message("controller must be http://host:port or https://host:port (the far node's controller API)"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub controller: Option<String>,

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

    /// The far node whose live instances of the name are followed (`spec.instances: Follow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub far_node: Option<String>,
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
    /// Instances of the name (UUIDs) routed on this node over the link, besides the name itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<String>,
    /// The route and link were already on the node when the Subscription first reached it (left
    /// by a retained Subscription, say): adopted, not written again. Managed like any other since.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopted: bool,
    /// The link the routes go over on this node when it is not the Subscription's own
    /// (`linkId`): the far node already dials this node with a link of the same type, and one
    /// connection between two nodes carries a group channel without looping its messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

impl super::condition::ReadyStatus for SubscriptionStatus {
    fn set_observed_generation(&mut self, generation: Option<i64>) {
        self.observed_generation = generation;
    }

    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;
    use serde_json::json;

    fn sub(spec: serde_json::Value) -> Subscription {
        Subscription::new("s", serde_json::from_value(spec).expect("spec parses"))
    }

    fn valid() -> serde_json::Value {
        json!({
            "name": "org/ns/bob",
            "nodes": {"endpoints": ["http://slim-0.slim:46358"]},
            "link": {"endpoint": "http://slim-b:46357"},
        })
    }

    fn rejection(spec: serde_json::Value) -> String {
        match sub(spec).validate_cel() {
            Ok(()) => String::new(),
            Err(errors) => format!("{errors:?}"),
        }
    }

    #[test]
    fn valid_specs_pass_the_crd_rules() {
        assert_eq!(rejection(valid()), "");
        let mut with_instance = valid();
        with_instance["name"] = json!("org/ns/bob/0b3c5a8e-1111-4222-8333-944455556666");
        assert_eq!(rejection(with_instance), "");
        let mut by_selector = valid();
        by_selector["nodes"] = json!({"selector": {"matchLabels": {"app.kubernetes.io/name": "slim"}}});
        assert_eq!(rejection(by_selector), "");
        let mut secure = valid();
        secure["link"] = json!({"endpoint": "https://slim-b:46357", "tls": {"caSecretRef": {"name": "ca"}}});
        assert_eq!(rejection(secure), "");
    }

    #[test]
    fn bad_specs_are_refused_with_a_clear_message() {
        let cases = [
            (json!({"name": "org/ns"}), "must be org/namespace/name"),
            (json!({"name": "org/ns/bob/not-a-uuid"}), "must be org/namespace/name"),
            (json!({"name": "org/n s/bob"}), "without spaces"),
            (json!({"nodes": {}}), "nodes needs at least one endpoint or a selector"),
            (json!({"nodes": {"endpoints": []}}), "nodes needs at least one endpoint or a selector"),
            (json!({"nodes": {"endpoints": ["slim-0:46358"]}}), "each endpoint must be http://host:port"),
            (json!({"link": {"endpoint": "slim-b"}}), "endpoint must be http://host:port"),
            (json!({"link": {"endpoint": "https://b:1", "tls": {"insecure": true}}}), "tls.insecure needs an http://"),
            (json!({"link": {"endpoint": "http://b:1", "tls": {"insecure": false}}}), "TLS settings need an https://"),
            (
                json!({"link": {"endpoint": "http://b:1", "tls": {"insecure": true, "caSecretRef": {"name": "x"}}}}),
                "an insecure link takes no certificates",
            ),
        ];
        for (patch, expected) in cases {
            let mut spec = valid();
            for (key, value) in patch.as_object().expect("object") {
                spec[key] = value.clone();
            }
            let message = rejection(spec.clone());
            assert!(message.contains(expected), "{spec} -> {message:?}, wanted {expected:?}");
        }
    }

    #[test]
    fn unknown_connection_types_are_not_in_the_schema() {
        let crd = serde_json::to_value(Subscription::crd()).expect("crd");
        let link = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["link"];
        assert_eq!(link["properties"]["connectionType"]["enum"], json!(["remote", "peer", "edge"]));
        let bad: Result<SubscriptionSpec, _> = serde_json::from_value(json!({
            "name": "o/n/a", "nodes": {"endpoints": []}, "link": {"endpoint": "http://b:1", "connectionType": "mesh"}
        }));
        assert!(bad.is_err());
    }

    #[test]
    fn crd_has_short_name_category_and_columns() {
        let crd = Subscription::crd();
        assert_eq!(crd.spec.names.short_names, Some(vec!["slimsub".to_owned()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["slim".to_owned()]));
        let columns: Vec<String> =
            crd.spec.versions[0].additional_printer_columns.iter().flatten().map(|c| c.name.clone()).collect();
        assert_eq!(columns, ["Name", "Ready", "Reason", "Age"]);
    }
}
