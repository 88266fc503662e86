//! The install path a user takes, on a real API server: `helm install` of the chart (its CRDs
//! included), then every manifest in `examples/`, in order, through `kubectl apply
//! --dry-run=server` (and then for real, so the next file sees what the previous one made).

use std::path::Path;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use slim_e2e::control_plane;
use slim_e2e::{example_files, helm, kubectl, repo_path};

/// Kinds of other projects the examples use: SPIRE's ClusterSPIFFEID (`06-…`, `09-…`) and
/// cert-manager's Issuer and Certificate (`08-…`). Neither is installed here; these stand-ins (same
/// group, version and kind, any content) let the API server take the examples, so only their shape
/// as Kubernetes objects is checked, not the other projects' schemas.
const STAND_INS: [(&str, &str, &str, &str, &str); 3] = [
    ("spire.spiffe.io", "ClusterSPIFFEID", "clusterspiffeids", "Cluster", "v1alpha1"),
    ("cert-manager.io", "Issuer", "issuers", "Namespaced", "v1"),
    ("cert-manager.io", "Certificate", "certificates", "Namespaced", "v1"),
];

fn stand_in(group: &str, kind: &str, plural: &str, scope: &str, version: &str) -> String {
    format!(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {{name: {plural}.{group}}}\n\
         spec:\n  group: {group}\n  scope: {scope}\n  names: {{kind: {kind}, plural: {plural}, singular: {}}}\n\
         \x20 versions:\n  - name: {version}\n    served: true\n    storage: true\n    schema:\n\
         \x20     openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}\n",
        kind.to_lowercase()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_then_every_example_in_order() {
    let plane = control_plane::shared();
    let client = plane.client().await.expect("admin client");
    let kubeconfig = plane.admin_kubeconfig.as_path();
    let env: &[(&str, &Path)] = &[("KUBECONFIG", kubeconfig)];
    let chart = repo_path("charts/slim-operator").display().to_string();

    let installed = helm(&["install", "slim", &chart, "--namespace", "slim-system", "--create-namespace"], env)
        .expect("helm install succeeds on the real API server");
    assert!(installed.contains("STATUS: deployed"), "{installed}");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in ["subscriptions.slim.agntcy.org", "slimchannels.slim.agntcy.org"] {
        crds.get(name).await.unwrap_or_else(|e| panic!("helm installed CRD {name}: {e}"));
    }
    let deployment = Api::<Deployment>::namespaced(client.clone(), "slim-system").get("slim-slim-operator").await;
    assert!(deployment.is_ok(), "the operator Deployment exists: {deployment:?}");
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    assert!(!webhooks.list(&Default::default()).await.expect("list").items.is_empty(), "webhook registered");
    let status = helm(&["status", "slim", "--namespace", "slim-system"], env).expect("helm status");
    assert!(status.contains("STATUS: deployed"), "{status}");

    for (group, kind, plural, scope, version) in STAND_INS {
        let path = plane.dir.join(format!("{plural}-stand-in.yaml"));
        std::fs::write(&path, stand_in(group, kind, plural, scope, version)).expect("write");
        kubectl(&["apply", "-f", &path.display().to_string()], env).expect("stand-in CRD");
        let crd = format!("crd/{plural}.{group}");
        kubectl(&["wait", "--for=condition=Established", &crd, "--timeout=30s"], env).expect("established");
    }

    let files = example_files();
    assert!(files.len() >= 7, "{files:?}");
    for file in &files {
        let path = file.display().to_string();
        let dry = kubectl(&["apply", "--dry-run=server", "-f", &path], env)
            .unwrap_or_else(|e| panic!("{path} refused by the API server: {e}"));
        assert!(dry.contains("(server dry run)"), "{path}: {dry}");
        kubectl(&["apply", "-f", &path], env).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    let uninstalled = helm(&["uninstall", "slim", "--namespace", "slim-system"], env).expect("helm uninstall");
    assert!(uninstalled.contains("uninstalled"), "{uninstalled}");
}
