//! The `SlimChannel` custom resource: a SLIM group channel and its participants, kept true
//! through the SLIM channel manager (the channel's moderator).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::subscription::NodeSet;

/// A SLIM group channel: the channel exists, every listed participant is in it, removed ones are
/// out, and members that restarted (they come back as a new instance) are invited again.
// clippy reads the repeated `printcolumn(...)` keys as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "slim.agntcy.org",
    version = "v1alpha1",
    kind = "SlimChannel",
    plural = "slimchannels",
    singular = "slimchannel",
    shortname = "slimch",
    category = "slim",
    namespaced,
    doc = "A SLIM group channel and its participants, kept true through the SLIM channel manager.",
    status = "SlimChannelStatus",
    cel,
    printcolumn(name = "Name", type_ = "string", json_path = ".spec.name", description = "SLIM channel name"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Joined",
        type_ = "integer",
        json_path = ".status.joined",
        description = "participants in the channel"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desired",
        description = "participants wanted"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct SlimChannelSpec {
    /// SLIM channel name, `org/namespace/name`. Immutable.
    #[x_kube(validation = Rule::new("self.matches('^[^/\\\\s]+/[^/\\\\s]+/[^/\\\\s]+$')")
        .message("must be org/namespace/name (3 components, no spaces)"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("name is immutable; create a new SlimChannel instead"))]
    #[schemars(length(min = 5, max = 512))]
    pub name: String,

    /// End-to-end encryption (MLS) for the group. Immutable: the channel manager cannot change it
    /// on a live channel; create a new SlimChannel instead.
    #[serde(default = "default_true")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("mlsEnabled cannot change on a live channel; create a new SlimChannel instead"))]
    pub mls_enabled: bool,

    /// The channel manager (the moderator). Default: the operator's `--channel-manager`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_manager: Option<ChannelManagerRef>,

    /// SLIM names (`org/namespace/name`) that must be members.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "participant_names")]
    pub participants: Vec<String>,

    /// Pods in this namespace whose annotation `slim.agntcy.org/name` gives a participant's SLIM
    /// name: they join while they run, without editing the SlimChannel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participant_selector: Option<LabelSelector>,

    /// SLIM nodes the participants connect to. The operator reads their route lists to see each
    /// member's live instance, and re-invites a member whose listed instance is gone (it
    /// restarted). Default: the operator's default node set (`--default-node-selector`, the Pods
    /// labelled `app.kubernetes.io/name=slim` in this namespace, and `--default-node-endpoints`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeSet>,

    /// `Delete` (default): deleting the SlimChannel deletes the channel from the channel manager.
    /// `Retain`: the channel and its members stay.
    #[serde(default, skip_serializing_if = "super::DeletionPolicy::is_default")]
    pub deletion_policy: super::DeletionPolicy,
}

fn participant_names(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    super::schema::string_set(
        super::schema::MAX_PARTICIPANTS,
        super::schema::NAME_MAX_LENGTH,
        "self.matches('^[^/\\\\s]+/[^/\\\\s]+/[^/\\\\s]+$')",
        "each participant must be org/namespace/name (3 components, no spaces)",
    )
}

fn default_true() -> bool {
    true
}

/// Where the channel manager's API is.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.tls) || !self.tls.insecure || self.endpoint.startsWith('http://')")
    .message("tls.insecure needs an http:// endpoint"))]
#[x_kube(validation = Rule::new("!has(self.tls) || self.tls.insecure || self.endpoint.startsWith('https://')")
    .message("TLS settings need an https:// endpoint; for plain text set tls.insecure: true"))]
#[serde(rename_all = "camelCase")]
pub struct ChannelManagerRef {
    /// e.g. `http://slim-channel-manager.slim.svc:10356`, or `https://…` when its API server
    /// has TLS.
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/\\\\s]+:[0-9]+/?$')")
        .message("endpoint must be http://host:port or https://host:port"))]
    #[schemars(length(max = 512))]
    pub endpoint: String,

    /// TLS to the channel manager's API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::tls::ControlTls>,
}

/// Observed state of a SlimChannel.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SlimChannelStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: the channel exists and every desired participant is in it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The MLS setting the channel was created with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mls_enabled: Option<bool>,

    /// The channel manager endpoint in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_manager: Option<String>,

    /// Desired participants in the channel.
    #[serde(default)]
    pub joined: i32,

    /// Desired participants.
    #[serde(default)]
    pub desired: i32,

    /// The SLIM nodes whose route lists told which member instances are live (`spec.nodes`, or
    /// the operator's default node set); empty when none was consulted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,

    /// One entry per desired participant (and per removed one until it is out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub participants: Vec<ParticipantStatus>,

    /// The channel already existed on the channel manager when this SlimChannel first synced it
    /// (left by a retained SlimChannel, say): adopted, not created again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopted: bool,
}

/// A participant's state.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ParticipantStatus {
    /// SLIM name, `org/namespace/name`.
    pub name: String,
    /// The participant is in the channel (a live instance, when nodes are known).
    pub joined: bool,
    /// The member instance as the channel manager lists it (`org/ns/name/<uuid>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The Pod it comes from, when chosen by `participantSelector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Why it is not in, or what is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Being removed (no longer desired).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

impl super::condition::ReadyStatus for SlimChannelStatus {
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
    use serde_json::json;

    fn channel(spec: serde_json::Value) -> SlimChannel {
        SlimChannel::new("c", serde_json::from_value(spec).expect("spec"))
    }

    fn errors(result: Result<(), impl std::fmt::Debug>) -> String {
        result.err().map(|e| format!("{e:?}")).unwrap_or_default()
    }

    #[test]
    fn valid_channel_passes_and_mls_defaults_on() {
        let c = channel(json!({"name": "org/ns/chat", "participants": ["org/ns/bob", "org/ns/carol"]}));
        assert!(c.spec.mls_enabled);
        assert_eq!(errors(c.validate_cel()), "");
    }

    #[test]
    fn bad_names_are_refused() {
        for (spec, expected) in [
            (json!({"name": "org/ns"}), "must be org/namespace/name"),
            (json!({"name": "org/ns/chat/extra"}), "must be org/namespace/name"),
            (json!({"name": "org/ns/chat", "participants": ["bob"]}), "each participant must be"),
            (json!({"name": "org/ns/chat", "channelManager": {"endpoint": "cm:10356"}}), "endpoint must be http"),
        ] {
            let message = errors(channel(spec.clone()).validate_cel());
            assert!(message.contains(expected), "{spec} -> {message}");
        }
    }

    #[test]
    fn participants_are_a_set_checked_per_item() {
        // Uniqueness is the API server's own `x-kubernetes-list-type: set` (no CEL cost); the name
        // rule sits on the items, so its cost is estimated per item (tests/tests/cluster_crds.rs
        // proves both on the real server).
        let crd = serde_json::to_value(<SlimChannel as kube::CustomResourceExt>::crd()).expect("crd");
        let participants = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["participants"];
        assert_eq!(participants["x-kubernetes-list-type"], "set");
        assert_eq!(participants["maxItems"], 256);
        assert_eq!(participants["items"]["maxLength"], 256);
        assert!(participants.get("x-kubernetes-validations").is_none(), "{participants}");
    }

    #[test]
    fn name_and_mls_are_immutable() {
        let old = channel(json!({"name": "org/ns/chat", "mlsEnabled": true}));
        let renamed = channel(json!({"name": "org/ns/other", "mlsEnabled": true}));
        assert!(errors(renamed.validate_cel_update(&old)).contains("name is immutable"));
        let mls_off = channel(json!({"name": "org/ns/chat", "mlsEnabled": false}));
        assert!(errors(mls_off.validate_cel_update(&old)).contains("mlsEnabled cannot change"));
        let more = channel(json!({"name": "org/ns/chat", "mlsEnabled": true, "participants": ["o/n/x"]}));
        assert_eq!(errors(more.validate_cel_update(&old)), "");
    }
}
