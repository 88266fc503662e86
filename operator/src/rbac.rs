//! The Kubernetes permissions the operator's code uses, in one table: the Helm chart's RBAC is
//! checked against it (tests/tests/chart.rs), so neither can drift from the other.

/// One rule: API group, resource (with subresource), verbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permission {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// Why the code needs it.
    pub used_by: &'static str,
}

const fn rule(
    group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
    used_by: &'static str,
) -> Permission {
    Permission { group, resource, verbs, used_by }
}

/// What the controllers read and write: cluster-wide (ClusterRole), or in the watched namespace
/// only (a Role there) when the install is namespace-scoped (`watchNamespace`).
pub const WATCHED: &[Permission] = &[
    rule(
        "slim.agntcy.org",
        "subscriptions",
        &["list", "watch", "patch"],
        "Subscription controller; finalizer add/remove",
    ),
    rule("slim.agntcy.org", "subscriptions/status", &["patch"], "status by server-side apply"),
    rule(
        "slim.agntcy.org",
        "subscriptions/finalizers",
        &["update"],
        "finalizers on clusters that enforce owner-reference permissions",
    ),
    rule(
        "slim.agntcy.org",
        "slimchannels",
        &["list", "watch", "patch"],
        "SlimChannel controller; finalizer add/remove",
    ),
    rule("slim.agntcy.org", "slimchannels/status", &["patch"], "status by server-side apply"),
    rule(
        "slim.agntcy.org",
        "slimchannels/finalizers",
        &["update"],
        "finalizers on clusters that enforce owner-reference permissions",
    ),
    rule("events.k8s.io", "events", &["create", "patch"], "events; repeated ones are patched into a series"),
    rule("", "pods", &["list", "watch"], "node and participant selectors"),
    rule("", "secrets", &["get"], "TLS material of links and of control connections (nodes, channel manager)"),
    rule("", "configmaps", &["get"], "CA bundles of control connections (tls.caConfigMapRef)"),
];

/// Cluster-wide (ClusterRole) in every install.
pub const CLUSTER: &[Permission] = &[rule("", "namespaces", &["list", "watch"], "namespace opt-in for injection")];

/// Only when the operator manages the webhook certificate (cluster-wide, restricted by name).
pub const WEBHOOK_CONFIGURATION: &[Permission] =
    &[rule("admissionregistration.k8s.io", "mutatingwebhookconfigurations", &["get", "patch"], "publish caBundle")];

/// Only with the SPIFFE issuer (`identityIssuer.enabled`), cluster-wide.
pub const ISSUER: &[Permission] = &[
    rule("authentication.k8s.io", "tokenreviews", &["create"], "issuer: the agents' tokens, checked by the API server"),
    rule("", "pods", &["get"], "issuer: the pod a token is bound to, read when it asks"),
    rule(
        "",
        "configmaps",
        &["list", "create", "patch"],
        "issuer: its serving CA published in the namespaces of injected pods",
    ),
];

/// In the operator's namespace, only with the SPIFFE issuer.
pub const ISSUER_SECRET: &[Permission] =
    &[rule("", "secrets", &["get", "create", "update"], "issuer: its CA and JWT keys")];

/// Only with `--heal-channel-manager` (`operator.healChannelManager`), where [`WATCHED`] is.
pub const HEAL_CHANNEL_MANAGER: &[Permission] = &[
    rule("", "services", &["get"], "heal: the Service a channel manager endpoint names, to find its Pods"),
    rule("", "pods", &["delete"], "heal: restart a channel manager that lost its SLIM node"),
];

/// In the operator's namespace (Role).
pub const NAMESPACED: &[Permission] =
    &[rule("coordination.k8s.io", "leases", &["get", "create", "update"], "leader election")];

/// In the operator's namespace, only when the operator manages the webhook certificate.
pub const WEBHOOK_SECRET: &[Permission] =
    &[rule("", "secrets", &["get", "create", "update"], "the webhook's serving certificate")];
