//! The injection webhook registered with a real API server (the harness in
//! `slim_e2e::control_plane`): the webhook runs in this process on 127.0.0.1 and the API server
//! itself calls it for every Pod created through it.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use slim_e2e::control_plane;
use slim_operator::webhook::inject::CONTAINER_NAME;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_injects_pods_through_the_webhook() {
    let client = control_plane::shared().client().await.expect("admin client");
    let host = "127.0.0.1".to_owned();
    let (addr, material) = slim_e2e::webhook::serve(std::slice::from_ref(&host)).await;
    let port = addr.port();

    let plane = control_plane::shared();
    let namespace = plane.namespace(&client, "webhook").await.expect("namespace");
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let name = format!("slim-e2e-{namespace}");
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
        // Created for real (not a dry run): what the API server stores is what a kubelet would run.
        let injected = pods
            .create(&PostParams::default(), &pod("with", json!({"slim.agntcy.org/inject-identity": "true"})))
            .await
            .expect("create annotated pod");
        let init = injected.spec.as_ref().and_then(|s| s.init_containers.clone()).unwrap_or_default();
        let sidecar = init.iter().find(|c| c.name == CONTAINER_NAME).expect("sidecar injected");
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"), "a native sidecar");
        assert!(sidecar.startup_probe.is_some(), "gated by a startup probe");
        let annotations = injected.metadata.annotations.clone().unwrap_or_default();
        assert!(annotations.contains_key("slim.agntcy.org/identity-injected"), "{annotations:?}");
        let stored = pods.get("with").await.expect("get");
        assert_eq!(stored.spec.and_then(|s| s.init_containers).map(|c| c.len()), Some(init.len()));

        // Identity without SPIRE: the server takes the projected token volume as it is (its
        // validation of audience, expiration and paths), and stores it for the kubelet.
        let kubernetes = pods
            .create(
                &PostParams::default(),
                &pod(
                    "kubernetes",
                    json!({"slim.agntcy.org/inject-identity": "true", "slim.agntcy.org/identity-source": "kubernetes"}),
                ),
            )
            .await
            .expect("create a pod with the kubernetes identity source");
        let volumes = kubernetes.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default();
        let projected = volumes
            .iter()
            .find(|v| v.name.starts_with("slim-service-account-token"))
            .and_then(|v| v.projected.as_ref())
            .expect("projected token volume stored");
        let sources = projected.sources.clone().unwrap_or_default();
        let token = sources.iter().find_map(|s| s.service_account_token.as_ref()).expect("token source");
        assert_eq!((token.audience.as_deref(), token.expiration_seconds), (Some("slim"), Some(3600)));
        assert!(volumes.iter().all(|v| v.csi.is_none()), "no SPIRE socket volume");

        let plain = pods.create(&PostParams::default(), &pod("without", json!({}))).await.expect("create plain pod");
        assert!(plain.spec.as_ref().and_then(|s| s.init_containers.as_ref()).is_none_or(|i| i.is_empty()));
        let opted_out = pods
            .create(&PostParams::default(), &pod("opted-out", json!({"slim.agntcy.org/inject-identity": "false"})))
            .await
            .expect("create opted-out pod");
        assert!(opted_out.spec.as_ref().and_then(|s| s.init_containers.as_ref()).is_none_or(|i| i.is_empty()));

        let refused = pods
            .create(
                &PostParams::default(),
                &pod("bad", json!({"slim.agntcy.org/inject-identity": "true", "slim.agntcy.org/key-file-mode": "rw"})),
            )
            .await
            .expect_err("an impossible setting refuses the pod");
        let message = refused.to_string();
        assert!(message.contains("slim.agntcy.org/key-file-mode") && message.contains("octal mode"), "{message}");
        assert!(pods.get_opt("bad").await.expect("get").is_none(), "nothing stored for a refused pod");
    }
    .await;
    let _ = configurations.delete(&name, &DeleteParams::default()).await;
    result
}

fn base64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}
