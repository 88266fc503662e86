//! The operator as the Helm chart installs it, minus the Pod: `helm template` rendered into typed
//! objects, its ServiceAccount and exactly its RBAC applied, a kubeconfig of that ServiceAccount,
//! the Deployment's environment. Tests then run the real binary with them.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use serde_json::json;

use crate::control_plane::{self, Credentials};
use crate::operator::chart_environment;
use crate::{helm, repo_path};

/// What `helm template` rendered, as typed objects.
#[derive(Default)]
pub struct Chart {
    pub deployment: Option<Deployment>,
    pub service_accounts: Vec<ServiceAccount>,
    pub cluster_roles: Vec<ClusterRole>,
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    pub roles: Vec<Role>,
    pub role_bindings: Vec<RoleBinding>,
    pub webhooks: Vec<MutatingWebhookConfiguration>,
}

pub fn render(release: &str, namespace: &str, values: &[&str]) -> Chart {
    let chart = repo_path("charts/slim-operator").display().to_string();
    let mut args = vec!["template", release, &chart, "--namespace", namespace];
    for value in values {
        args.extend(["--set", value]);
    }
    let yaml = helm(&args, &[]).expect("helm template");
    let mut rendered = Chart::default();
    for document in serde_yaml::Deserializer::from_str(&yaml) {
        let value = serde_json::Value::deserialize(document).expect("YAML");
        match value["kind"].as_str().unwrap_or_default() {
            "Deployment" => rendered.deployment = serde_json::from_value(value).ok(),
            "ServiceAccount" => rendered.service_accounts.push(serde_json::from_value(value).expect("sa")),
            "ClusterRole" => rendered.cluster_roles.push(serde_json::from_value(value).expect("cr")),
            "ClusterRoleBinding" => rendered.cluster_role_bindings.push(serde_json::from_value(value).expect("crb")),
            "Role" => rendered.roles.push(serde_json::from_value(value).expect("role")),
            "RoleBinding" => rendered.role_bindings.push(serde_json::from_value(value).expect("rb")),
            "MutatingWebhookConfiguration" => rendered.webhooks.push(serde_json::from_value(value).expect("mwc")),
            _ => {}
        }
    }
    rendered
}

/// Applies the chart's identity and RBAC (and its webhook configuration), returns the
/// ServiceAccount's name.
pub async fn apply_rbac(client: &Client, namespace: &str, chart: &Chart) -> String {
    let pp = PostParams::default();
    let sa = chart.service_accounts.first().expect("the chart has a ServiceAccount");
    Api::<ServiceAccount>::namespaced(client.clone(), namespace).create(&pp, sa).await.expect("ServiceAccount");
    for role in &chart.cluster_roles {
        Api::<ClusterRole>::all(client.clone()).create(&pp, role).await.expect("ClusterRole");
    }
    for binding in &chart.cluster_role_bindings {
        Api::<ClusterRoleBinding>::all(client.clone()).create(&pp, binding).await.expect("ClusterRoleBinding");
    }
    // A namespace-scoped install has a Role (and its binding) in the watched namespace too.
    for role in &chart.roles {
        let role_ns = role.metadata.namespace.as_deref().unwrap_or(namespace);
        Api::<Role>::namespaced(client.clone(), role_ns).create(&pp, role).await.expect("Role");
    }
    for binding in &chart.role_bindings {
        let binding_ns = binding.metadata.namespace.as_deref().unwrap_or(namespace);
        Api::<RoleBinding>::namespaced(client.clone(), binding_ns).create(&pp, binding).await.expect("RoleBinding");
    }
    for webhook in &chart.webhooks {
        Api::<MutatingWebhookConfiguration>::all(client.clone()).create(&pp, webhook).await.expect("webhook config");
    }
    sa.name_any()
}

/// A token for the ServiceAccount from the TokenRequest API.
pub async fn token_for(client: &Client, namespace: &str, service_account: &str) -> String {
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}})).expect("request");
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let issued: TokenRequest =
        accounts.create_subresource("token", service_account, &PostParams::default(), &request).await.expect("token");
    issued.status.expect("status").token
}

/// A kubeconfig that authenticates as `service_account` (a TokenRequest token), named after `stem`.
pub async fn kubeconfig_for(
    plane: &control_plane::ControlPlane,
    admin: &Client,
    namespace: &str,
    service_account: &str,
    stem: &str,
) -> std::path::PathBuf {
    let token = token_for(admin, namespace, service_account).await;
    let kubeconfig = plane.dir.join(format!("{stem}.kubeconfig"));
    plane.write_kubeconfig(&kubeconfig, service_account, &Credentials::Token(token)).expect("kubeconfig");
    kubeconfig
}

/// The operator as the chart installs it, minus the Pod: its namespace with the chart's RBAC, a
/// kubeconfig of its ServiceAccount, the Deployment's environment (and the Pod's name and
/// namespace); and a namespace for the user's objects.
pub struct ChartInstall {
    pub operator_ns: String,
    pub apps_ns: String,
    pub chart: Chart,
    pub service_account: String,
    pub kubeconfig: std::path::PathBuf,
    /// `POD_NAME`: the Lease holder's identity.
    pub pod_name: String,
    pub env: Vec<(String, String)>,
}

pub async fn install_as_the_chart(
    plane: &'static control_plane::ControlPlane,
    admin: &Client,
    values: &[&str],
) -> ChartInstall {
    install(plane, admin, values, false).await
}

/// As [`install_as_the_chart`], namespace-scoped: `watchNamespace` is the apps namespace.
pub async fn install_namespace_scoped(plane: &'static control_plane::ControlPlane, admin: &Client) -> ChartInstall {
    install(plane, admin, &[], true).await
}

async fn install(
    plane: &'static control_plane::ControlPlane,
    admin: &Client,
    values: &[&str],
    watch_apps: bool,
) -> ChartInstall {
    let operator_ns = plane.namespace(admin, "slim-system").await.expect("namespace");
    let apps_ns = plane.namespace(admin, "apps").await.expect("namespace");
    let release = format!("op-{}", &operator_ns[operator_ns.len() - 8..]);
    let watch = format!("watchNamespace={apps_ns}");
    let mut values = values.to_vec();
    if watch_apps {
        values.push(watch.as_str());
    }
    let chart = render(&release, &operator_ns, &values);
    let service_account = apply_rbac(admin, &operator_ns, &chart).await;
    let kubeconfig = kubeconfig_for(plane, admin, &operator_ns, &service_account, &release).await;
    let mut env = chart_environment(chart.deployment.as_ref().expect("the chart has a Deployment"));
    let pod_name = format!("{release}-0");
    env.push(("POD_NAME".into(), pod_name.clone()));
    env.push(("POD_NAMESPACE".into(), operator_ns.clone()));
    ChartInstall { operator_ns, apps_ns, chart, service_account, kubeconfig, pod_name, env }
}
