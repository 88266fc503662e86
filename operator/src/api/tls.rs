//! TLS from the operator to the SLIM components it drives (node controller APIs, the channel
//! manager): the `tls` block of `nodes` and `channelManager`. Types only.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::subscription::{SecretKeyRef, SecretRef};

/// TLS settings of the operator's control connections. Omitted: the operator's defaults
/// (`--control-tls-*`) for `https://` endpoints, plain text for `http://` ones.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, Default)]
#[x_kube(validation = Rule::new("!self.insecure || (!has(self.caSecretRef) && !has(self.caConfigMapRef) && !has(self.clientCertSecretRef) && !has(self.spiffe) && !has(self.serverName))")
    .message("insecure takes no TLS settings"))]
#[x_kube(validation = Rule::new("!has(self.spiffe) || (!has(self.caSecretRef) && !has(self.caConfigMapRef) && !has(self.clientCertSecretRef))")
    .message("spiffe takes the trust bundle and the client certificate from the Workload API: no caSecretRef, caConfigMapRef or clientCertSecretRef"))]
#[x_kube(validation = Rule::new("!has(self.caSecretRef) || !has(self.caConfigMapRef)")
    .message("one CA source: caSecretRef or caConfigMapRef"))]
#[serde(rename_all = "camelCase")]
pub struct ControlTls {
    /// Plain text, even when the operator has TLS defaults (needs `http://` endpoints).
    #[serde(default)]
    pub insecure: bool,

    /// Secret key holding the CA bundle (PEM) that signs the servers' certificates. Without a CA
    /// source and without `spiffe`: the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,

    /// ConfigMap key holding the CA bundle (e.g. cert-manager's trust-manager bundles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map_ref: Option<ConfigMapKeyRef>,

    /// `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) with the operator's client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretRef>,

    /// SPIFFE mode: the operator presents its own X.509-SVID (from its Workload API socket),
    /// checks the server's chain against its trust bundle and authorises the server by SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe: Option<SpiffeServer>,

    /// The name checked in the server's certificate instead of the endpoint's host (node Pods are
    /// reached by IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub server_name: Option<String>,
}

/// Which SPIFFE IDs the server may have: exactly one of `id` and `trustDomain`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash)]
#[x_kube(validation = Rule::new("has(self.id) != has(self.trustDomain)")
    .message("spiffe needs exactly one of id and trustDomain"))]
#[serde(rename_all = "camelCase")]
pub struct SpiffeServer {
    /// The server's exact SPIFFE ID, e.g. `spiffe://example.org/ns/slim/sa/slim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^spiffe://[a-z0-9._-]+(/[^/\\\\s]+)*$')")
        .message("id must be a SPIFFE ID: spiffe://<trust domain>/<path>"))]
    #[schemars(length(max = 2048))]
    pub id: Option<String>,

    /// Any server of this trust domain, e.g. `example.org`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9._-]+$')")
        .message("trustDomain is a name like example.org (no spiffe://)"))]
    #[schemars(length(max = 255))]
    pub trust_domain: Option<String>,
}

/// A key in a ConfigMap of the same namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// ConfigMap name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the ConfigMap; default `ca.crt`.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".to_owned()
}
