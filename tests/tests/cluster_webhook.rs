//! The injection webhook registered with a real API server (`KUBECONFIG`). The webhook runs in this
//! process; the API server must reach it at `SLIM_E2E_WEBHOOK_HOST` (default `host.docker.internal`,
//! what kind and k3d clusters resolve to the host). Run with:
//!   SLIM_E2E_WEBHOOK_HOST=<address the API server can reach> \
//!     cargo test -p slim-e2e --test cluster_webhook -- --ignored

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use slim_operator::metrics::Metrics;
use slim_operator::webhook::inject::CONTAINER_NAME;
use slim_operator::webhook::{CertStore, InjectorConfig, WebhookState, certs, router, serve_tls_on};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs cluster"]
async fn annotated_pods_get_the_sidecar_from_a_registered_webhook() {
    let client = Client::try_default().await.expect("KUBECONFIG");
    let host = std::env::var("SLIM_E2E_WEBHOOK_HOST").unwrap_or_else(|_| "host.docker.internal".to_owned());
    let material = certs::generate(std::slice::from_ref(&host), None).expect("certificates");
    let store = Arc::new(CertStore::default());
    store.set(certs::certified_key(&material.cert_pem, &material.key_pem).expect("key"));
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let state = WebhookState {
        config: Arc::new(InjectorConfig::default()),
        namespaces: Arc::new(|_| Some(BTreeMap::new())),
        metrics: Arc::new(Metrics::new()),
    };
    tokio::spawn(serve_tls_on(listener, router(state), store, std::future::pending()));

    let suffix = format!("{:08x}", rand::random::<u32>());
    let namespace = format!("slim-e2e-webhook-{suffix}");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}})).expect("namespace");
    namespaces.create(&PostParams::default(), &ns).await.expect("namespace");
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let name = format!("slim-e2e-{suffix}");
    let configuration: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "identity.slim.agntcy.org",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
            "clientConfig": {"url": format!("https://{host}:{port}/mutate"), "caBundle": base64(&material.ca_pem)},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        }]
    }))
    .expect("configuration");
    configurations.create(&PostParams::default(), &configuration).await.expect("register webhook");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pod = |name: &str, annotations: serde_json::Value| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]}
        }))
        .expect("pod")
    };
    let result = async {
        let injected = pods
            .create(
                &PostParams { dry_run: true, ..Default::default() },
                &pod("with", json!({"slim.agntcy.org/inject-identity": "true"})),
            )
            .await
            .expect("create annotated pod");
        let init = injected.spec.as_ref().and_then(|s| s.init_containers.clone()).unwrap_or_default();
        assert!(
            init.iter().any(|c| c.name == CONTAINER_NAME && c.restart_policy.as_deref() == Some("Always")),
            "{init:?}"
        );
        let plain = pods
            .create(&PostParams { dry_run: true, ..Default::default() }, &pod("without", json!({})))
            .await
            .expect("create plain pod");
        assert!(plain.spec.as_ref().and_then(|s| s.init_containers.as_ref()).is_none_or(|i| i.is_empty()));
    }
    .await;
    let _ = configurations.delete(&name, &DeleteParams::default()).await;
    let _ = namespaces.delete(&namespace, &DeleteParams::default()).await;
    result
}

fn base64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}
