//! Custom resource types of `slim.agntcy.org/v1alpha1`. Types only: no IO.

pub mod channel;
pub mod condition;
mod schema;
pub mod subscription;
pub mod tls;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use channel::{ChannelManagerRef, ParticipantStatus, SlimChannel, SlimChannelSpec, SlimChannelStatus};
pub use subscription::{
    ConnectionType, InstanceRouting, LinkSpec, LinkTls, NodeSet, NodeStatus, SecretKeyRef, SecretRef, Subscription,
    SubscriptionSpec, SubscriptionStatus,
};
pub use tls::{ConfigMapKeyRef, ControlTls, SpiffeServer};

/// What deleting an object does to what it made on SLIM (both kinds).
#[derive(schemars::JsonSchema, serde::Deserialize, serde::Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    /// Remove it: routes and links no other Subscription uses; the channel.
    #[default]
    Delete,
    /// Leave it on SLIM (an event lists what was left); a new object that wants the same is
    /// managed from there on.
    Retain,
}

impl DeletionPolicy {
    fn is_default(&self) -> bool {
        *self == DeletionPolicy::Delete
    }
}

/// API group of every CRD.
pub const GROUP: &str = "slim.agntcy.org";

/// Every CRD the operator serves, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![SlimChannel::crd(), Subscription::crd()]
}

/// File name under `crds/` for a CRD (`<plural>.<group>.yaml`).
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// A CRD as the YAML document committed under `crds/`.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    Ok(format!("---\n{}", serde_yaml::to_string(crd)?))
}

/// Every CRD as one multi-document YAML stream (what `slim-operator crds` prints).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    crds().iter().map(crd_yaml).collect()
}
