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

/// SPIRE's ClusterSPIFFEID kind, which `examples/06-spire-clusterspiffeid.yaml` uses. SPIRE is not
/// installed here; this stand-in (same group, version and kind, any content) lets the API server
/// take the example, so only its shape as a Kubernetes object is checked, not SPIRE's own schema.
const CLUSTER_SPIFFE_ID_STAND_IN: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: clusterspiffeids.spire.spiffe.io}
spec:
  group: spire.spiffe.io
  scope: Cluster
  names: {kind: ClusterSPIFFEID, plural: clusterspiffeids, singular: clusterspiffeid}
  versions:
  - name: v1alpha1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

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

    let stand_in = plane.dir.join("clusterspiffeid-crd.yaml");
    std::fs::write(&stand_in, CLUSTER_SPIFFE_ID_STAND_IN).expect("write");
    kubectl(&["apply", "-f", &stand_in.display().to_string()], env).expect("stand-in CRD");
    kubectl(&["wait", "--for=condition=Established", "crd/clusterspiffeids.spire.spiffe.io", "--timeout=30s"], env)
        .expect("established");

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
