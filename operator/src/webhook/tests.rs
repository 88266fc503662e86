//! AdmissionReview fixtures through the router (no TLS), asserting the exact JSON patch and the pod
//! after applying it; and a real HTTPS round trip with a certificate swapped at run time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use base64::Engine;
use http::Request;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::inject::{CONFIG_ENV, CONTAINER_NAME, INJECTED, InjectorConfig};
use super::server::{CertStore, WebhookState, router, serve_tls_on};
use super::{Decision, certs, decide};
use crate::metrics::Metrics;
use crate::serve::Limits;

fn state(namespace_labels: BTreeMap<String, BTreeMap<String, String>>) -> WebhookState {
    let mut config =
        InjectorConfig { image: "registry.example/slim-identity-agent:0.1.0".into(), ..Default::default() };
    config.excluded_namespaces.push("slim-system".into());
    WebhookState {
        config: Arc::new(config),
        namespaces: Arc::new(move |ns| namespace_labels.get(ns).cloned()),
        metrics: Arc::new(Metrics::new()),
        issuer_namespaces: None,
    }
}

/// A container's literal environment.
fn env_of(c: &k8s_openapi::api::core::v1::Container) -> Vec<(String, String)> {
    c.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect()
}

fn review(namespace: &str, pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": false,
        }
    })
}

/// Sends a raw body to `/mutate` and returns the response review.
async fn send(state: WebhookState, body: Vec<u8>) -> Value {
    let request =
        Request::post("/mutate").header("content-type", "application/json").body(Body::from(body)).expect("request");
    let response = router(state).oneshot(request).await.expect("response");
    assert_eq!(response.status(), 200);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
    serde_json::from_slice(&bytes).expect("review json")
}

/// The response, the JSON patch (if any) and the pod after applying it.
async fn mutate(state: WebhookState, namespace: &str, pod: Value) -> (Value, Option<Value>, Pod) {
    let response = send(state, serde_json::to_vec(&review(namespace, &pod)).expect("json")).await;
    let answer = response["response"].clone();
    assert_eq!(answer["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    let patch = patch_bytes(&answer).map(|bytes| {
        assert_eq!(answer["patchType"], "JSONPatch");
        serde_json::from_slice::<Value>(&bytes).expect("patch json")
    });
    let mut patched = pod;
    if let Some(ops) = &patch {
        let ops: json_patch::Patch = serde_json::from_value(ops.clone()).expect("patch ops");
        json_patch::patch(&mut patched, &ops).expect("patch applies to the pod");
    }
    let pod: Pod = serde_json::from_value(patched).expect("patched pod parses as a Pod");
    (answer, patch, pod)
}

/// The response's patch bytes: Go's `[]byte` JSON is base64, and kube 5 sends a byte array,
/// which the API server's decoder also accepts; read both.
fn patch_bytes(answer: &Value) -> Option<Vec<u8>> {
    match &answer["patch"] {
        Value::String(encoded) => {
            Some(base64::engine::general_purpose::STANDARD.decode(encoded).expect("base64 patch"))
        }
        Value::Array(bytes) => {
            Some(bytes.iter().map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()).expect("byte")).collect())
        }
        _ => None,
    }
}

fn app_pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "chat-0", "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.example/chat:1"}]}
    })
}

fn sidecar(pod: &Pod) -> &k8s_openapi::api::core::v1::Container {
    let init = pod.spec.as_ref().and_then(|s| s.init_containers.as_ref()).expect("init containers");
    init.iter().find(|c| c.name == CONTAINER_NAME).expect("sidecar injected")
}

/// The injected agent's config, read the way the agent reads it: its own command-line parser on
/// the container's args, then its own config parser on the environment variable they name.
fn agent_config(pod: &Pod) -> Value {
    use slim_identity_agent::cli::{Command, ConfigSource};
    let agent = sidecar(pod);
    let args = agent.args.clone().expect("args");
    let Ok(Command::Run { config: ConfigSource::Env(name), daemon_mode: None }) =
        slim_identity_agent::cli::parse(&args)
    else {
        panic!("the agent's CLI does not take {args:?} as `run with the config from an env var`")
    };
    assert_eq!(name, CONFIG_ENV);
    let env = agent.env.as_ref().expect("env");
    let yaml = env.iter().find(|e| e.name == name).and_then(|e| e.value.clone()).expect("the env var the args name");
    let typed = slim_identity_contract::config::Config::from_yaml(&yaml).expect("the agent loads the injected config");
    assert!(typed.daemon_mode && typed.health_checks.listener_enabled, "{typed:?}");
    let probe = agent.startup_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("startup probe");
    assert_eq!(
        probe.port,
        IntOrString::Int(i32::from(typed.health_checks.bind_port)),
        "the probe asks the agent's port"
    );
    assert_eq!(probe.path.as_deref(), Some(typed.health_checks.readiness_path.as_str()));
    serde_yaml::from_str(&yaml).expect("config is YAML")
}

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webhook").join(name)
}

#[tokio::test]
async fn annotated_pod_gets_the_exact_patch_and_a_native_sidecar() {
    let (answer, patch, pod) =
        mutate(state(BTreeMap::new()), "apps", app_pod(json!({"slim.agntcy.org/inject-identity": "true"}))).await;
    assert_eq!(answer["allowed"], true);
    let patch = patch.expect("a patch");
    let path = golden("annotated-pod.patch.json");
    if std::env::var_os("SLIM_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, serde_json::to_string_pretty(&patch).expect("json") + "\n").expect("write golden");
    }
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("golden file; SLIM_UPDATE_GOLDEN=1 writes it"))
            .expect("golden json");
    assert_eq!(patch, expected, "the exact patch (regenerate with SLIM_UPDATE_GOLDEN=1 after an intended change)");

    let agent = sidecar(&pod);
    assert_eq!(agent.restart_policy.as_deref(), Some("Always"), "a native sidecar");
    assert_eq!(agent.image.as_deref(), Some("registry.example/slim-identity-agent:0.1.0"));
    let startup = agent.startup_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("startup probe");
    assert_eq!(startup.path.as_deref(), Some("/ready"));
    let security = agent.security_context.as_ref().expect("security context");
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_owned()]));

    let spec = pod.spec.as_ref().expect("spec");
    let volumes = spec.volumes.as_ref().expect("volumes");
    let svids = volumes.iter().find(|v| v.name == "slim-svids").expect("svids volume");
    assert_eq!(svids.empty_dir.as_ref().and_then(|e| e.medium.as_deref()), Some("Memory"));
    let socket = volumes.iter().find(|v| v.name == "slim-spire-agent-socket").expect("socket volume");
    assert_eq!(socket.csi.as_ref().map(|c| c.driver.as_str()), Some("csi.spiffe.io"));
    let app_mount = spec.containers[0].volume_mounts.as_ref().expect("mounts")[0].clone();
    assert_eq!((app_mount.mount_path.as_str(), app_mount.read_only), ("/svids", Some(true)));
    assert!(pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(INJECTED)));

    let config = agent_config(&pod);
    assert_eq!(config["cert_dir"], "/svids");
    assert_eq!(
        config["jwt_svids"],
        json!([{"jwt_audience": "slim", "jwt_extra_audiences": [], "jwt_svid_file_name": "jwt_svid.token"}])
    );
    assert_eq!(config["health_checks"]["listener_enabled"], true);
    assert_eq!(config["agent_address"], "/run/spire/agent-sockets/api.sock");
}

#[tokio::test]
async fn pods_that_did_not_ask_are_untouched() {
    let s = state(BTreeMap::new());
    let (answer, patch, _) = mutate(s.clone(), "apps", app_pod(json!({}))).await;
    assert_eq!((answer["allowed"].clone(), patch), (json!(true), None));
    // Opted in, but in a system namespace or the operator's own.
    for namespace in ["kube-system", "slim-system"] {
        let (_, patch, _) =
            mutate(s.clone(), namespace, app_pod(json!({"slim.agntcy.org/inject-identity": "true"}))).await;
        assert_eq!(patch, None, "{namespace}");
    }
}

#[tokio::test]
async fn namespace_label_opts_in_and_the_pod_can_opt_out() {
    let labels =
        BTreeMap::from([("team".to_owned(), BTreeMap::from([(super::inject::INJECT.to_owned(), "true".to_owned())]))]);
    let (_, patch, pod) = mutate(state(labels.clone()), "team", app_pod(json!({}))).await;
    assert!(patch.is_some());
    sidecar(&pod);
    let mut opted_out = app_pod(json!({}));
    opted_out["metadata"]["labels"] = json!({"slim.agntcy.org/inject-identity": "false"});
    let (_, patch, _) = mutate(state(labels), "team", opted_out).await;
    assert_eq!(patch, None);
}

#[tokio::test]
async fn injected_pods_are_not_injected_again() {
    let (_, _, pod) =
        mutate(state(BTreeMap::new()), "apps", app_pod(json!({"slim.agntcy.org/inject-identity": "true"}))).await;
    let again = serde_json::to_value(&pod).expect("json");
    let (answer, patch, _) = mutate(state(BTreeMap::new()), "apps", again).await;
    assert_eq!((answer["allowed"].clone(), patch), (json!(true), None), "reinvocation is a no-op");
    assert_eq!(decide(&pod, "apps", None, &InjectorConfig::default()), Decision::Skip("already injected"));
}

#[tokio::test]
async fn existing_volumes_init_containers_clashes_and_generate_name_are_handled() {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "chat-", "labels": {"slim.agntcy.org/inject-identity": "true"}},
        "spec": {
            "initContainers": [{"name": "migrate", "image": "registry.example/migrate:1"}],
            "containers": [
                {"name": "app", "image": "registry.example/chat:1",
                 "ports": [{"containerPort": 8081}],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                {"name": "metrics", "image": "registry.example/exporter:1"}
            ],
            "volumes": [{"name": "data", "emptyDir": {}}, {"name": "slim-svids", "emptyDir": {}}]
        }
    });
    let (answer, patch, pod) = mutate(state(BTreeMap::new()), "apps", pod).await;
    assert_eq!(answer["allowed"], true);
    let ops: Vec<(String, String)> = patch
        .expect("patch")
        .as_array()
        .expect("ops")
        .iter()
        .map(|op| (op["op"].as_str().unwrap_or("").to_owned(), op["path"].as_str().unwrap_or("").to_owned()))
        .collect();
    let expected = [
        ("add", "/metadata/annotations"),
        ("add", "/spec/volumes/-"),
        ("add", "/spec/volumes/-"),
        ("add", "/spec/volumes/-"),
        ("add", "/spec/initContainers/0"),
        ("add", "/spec/containers/0/volumeMounts/-"),
        ("add", "/spec/containers/0/volumeMounts/-"),
        ("add", "/spec/containers/0/env"),
        ("add", "/spec/containers/1/volumeMounts"),
        ("add", "/spec/containers/1/env"),
    ];
    assert_eq!(ops, expected.map(|(a, b)| (a.to_owned(), b.to_owned())));
    let spec = pod.spec.as_ref().expect("spec");
    let init: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(init, vec![CONTAINER_NAME, "migrate"], "the sidecar runs before other init containers");
    let volumes: Vec<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert_eq!(volumes, vec!["data", "slim-svids", "slim-svids-1", "slim-spire-agent-socket", "slim-identity-socket"]);
    let mounted = spec.containers[1].volume_mounts.as_ref().expect("mounts")[0].name.clone();
    assert_eq!(mounted, "slim-svids-1", "the clash got a fresh name");
    assert_eq!(agent_config(&pod)["health_checks"]["bind_port"], 8082, "8081 is taken by the app");
}

/// The agent serves the Workload API to the app containers by default with SPIRE: a pod-local
/// socket directory, `SPIFFE_ENDPOINT_SOCKET` in the apps, no SPIRE volume in any app container.
#[tokio::test]
async fn apps_get_the_agents_workload_api_socket_and_no_spire_volume() {
    let mut pod = app_pod(json!({"slim.agntcy.org/inject-identity": "true"}));
    pod["spec"]["containers"].as_array_mut().expect("containers").push(
        json!({"name": "own", "image": "x", "env": [{"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///mine"}]}),
    );
    let (_, _, pod) = mutate(state(BTreeMap::new()), "apps", pod).await;
    assert_eq!(agent_config(&pod)["workload_api_socket"], "/run/slim-identity/agent.sock");
    let spec = pod.spec.as_ref().expect("spec");
    let socket = spec.volumes.iter().flatten().find(|v| v.name == "slim-identity-socket").expect("socket volume");
    assert!(socket.empty_dir.is_some(), "pod-local: {socket:?}");
    let agent = sidecar(&pod);
    assert!(
        agent.volume_mounts.iter().flatten().any(|m| m.mount_path == "/run/slim-identity" && m.read_only.is_none())
    );
    let app = &spec.containers[0];
    assert_eq!(env_of(app), [("SPIFFE_ENDPOINT_SOCKET".to_owned(), "unix:///run/slim-identity/agent.sock".to_owned())]);
    assert_eq!(env_of(&spec.containers[1]), [("SPIFFE_ENDPOINT_SOCKET".to_owned(), "unix:///mine".to_owned())], "kept");
    for container in &spec.containers {
        let mounts: Vec<&str> = container.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
        assert_eq!(mounts, ["/svids", "/run/slim-identity"], "no SPIRE volume in {}", container.name);
    }

    // Files only, by annotation; and refused where there is no SPIFFE identity to serve.
    let files_only =
        app_pod(json!({"slim.agntcy.org/inject-identity": "true", "slim.agntcy.org/workload-api": "false"}));
    let (_, _, pod) = mutate(state(BTreeMap::new()), "apps", files_only).await;
    assert!(agent_config(&pod).get("workload_api_socket").is_none(), "not served");
    assert!(pod.spec.as_ref().expect("spec").containers[0].env.is_none());
    let refused = app_pod(json!({
        "slim.agntcy.org/inject-identity": "true",
        "slim.agntcy.org/identity-source": "kubernetes",
        "slim.agntcy.org/workload-api": "true",
    }));
    let (answer, _, _) = mutate(state(BTreeMap::new()), "apps", refused).await;
    assert_eq!(answer["allowed"], false);
    assert!(
        answer["status"]["message"].as_str().unwrap_or("").contains("the operator's issuer, which is off"),
        "{answer}"
    );
}

#[tokio::test]
async fn custom_audiences_and_settings_by_annotation() {
    let pod = app_pod(json!({
        "slim.agntcy.org/inject-identity": "true",
        "slim.agntcy.org/jwt-audiences": "slim, spiffe://example.org/gateway",
        "slim.agntcy.org/jwt-bundle-format": "spiffe-helper",
        "slim.agntcy.org/x509": "false",
        "slim.agntcy.org/svid-mount-path": "/run/identity",
        "slim.agntcy.org/sidecar-memory-limit": "32Mi",
    }));
    let (_, _, pod) = mutate(state(BTreeMap::new()), "apps", pod).await;
    let config = agent_config(&pod);
    assert_eq!(
        config["jwt_svids"],
        json!([
            {"jwt_audience": "slim", "jwt_extra_audiences": [], "jwt_svid_file_name": "jwt_svid-slim.token"},
            {"jwt_audience": "spiffe://example.org/gateway", "jwt_extra_audiences": [], "jwt_svid_file_name": "jwt_svid-spiffe___example_org_gateway.token"}
        ])
    );
    assert_eq!(config["jwt_bundle_format"], "spiffe-helper");
    assert_eq!(config["cert_dir"], "/run/identity");
    assert!(config.get("svid_file_name").is_none(), "X.509 outputs are off");
    let limits = sidecar(&pod).resources.as_ref().and_then(|r| r.limits.clone()).expect("limits");
    assert_eq!(limits["memory"].0, "32Mi");
}

#[tokio::test]
async fn identity_source_kubernetes_projects_a_token_and_needs_no_spire() {
    let pod = app_pod(json!({
        "slim.agntcy.org/inject-identity": "true",
        "slim.agntcy.org/identity-source": "kubernetes",
        "slim.agntcy.org/token-expiration-seconds": "1800",
    }));
    let (answer, _, pod) = mutate(state(BTreeMap::new()), "apps", pod).await;
    assert_eq!(answer["allowed"], true);
    let config = agent_config(&pod);
    assert_eq!(config["identity_source"], "kubernetes");
    assert!(config.get("agent_address").is_none(), "no SPIRE agent");
    assert_eq!(config["jwt_bundle_format"], "jwks");
    assert!(config.get("svid_file_name").is_none(), "no X.509 without SPIRE");
    assert_eq!(config["jwt_svids"][0]["jwt_audience"], "slim");
    assert_eq!(config["kubernetes_token_file"], "/var/run/secrets/slim.agntcy.org/token");

    // The volume: the audience-bound token, a token for the API server, the cluster's CA.
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.clone()).expect("volumes");
    assert!(volumes.iter().all(|v| v.csi.is_none() && v.host_path.is_none()), "no SPIRE socket: {volumes:?}");
    let projected = volumes.iter().find_map(|v| v.projected.clone()).expect("projected volume");
    let value = serde_json::to_value(&projected).expect("json");
    assert_eq!(
        value["sources"],
        json!([
            {"serviceAccountToken": {"audience": "slim", "expirationSeconds": 1800, "path": "token"}},
            {"serviceAccountToken": {"expirationSeconds": 1800, "path": "api-token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        ])
    );
    let agent = sidecar(&pod);
    let mounts = agent.volume_mounts.clone().expect("mounts");
    assert!(mounts.iter().any(|m| m.mount_path == "/var/run/secrets/slim.agntcy.org" && m.read_only == Some(true)));
    let app_mounts = pod.spec.as_ref().map(|s| s.containers[0].volume_mounts.clone().unwrap_or_default()).expect("app");
    assert_eq!(app_mounts.len(), 1, "the app sees /svids only, not the raw token: {app_mounts:?}");
    // The agent knows its pod (the token must be bound to it), and has no SPIRE socket variable.
    let env = agent.env.clone().expect("env");
    let field = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.clone())
            .and_then(|v| v.field_ref)
            .map(|f| f.field_path)
    };
    assert_eq!(field("SLIM_POD_UID").as_deref(), Some("metadata.uid"));
    assert_eq!(field("SLIM_POD_NAME").as_deref(), Some("metadata.name"));
    assert!(env.iter().all(|e| e.name != "SPIFFE_ENDPOINT_SOCKET"));
}

#[tokio::test]
async fn with_the_issuer_kubernetes_pods_get_its_token_and_ca_in_the_agent_and_the_socket_in_the_apps() {
    let mut with_issuer = state(BTreeMap::new());
    let (namespaces, mut published) = tokio::sync::mpsc::unbounded_channel();
    with_issuer.issuer_namespaces = Some(namespaces);
    with_issuer.config = Arc::new(InjectorConfig {
        issuer: Some(super::inject::IssuerInjection {
            url: "https://slim-operator-webhook.slim-system.svc:8444".into(),
            audience: "slim-operator".into(),
            ca_config_map: "slim-identity-issuer-ca".into(),
        }),
        ..(*with_issuer.config).clone()
    });
    let pod =
        app_pod(json!({"slim.agntcy.org/inject-identity": "true", "slim.agntcy.org/identity-source": "kubernetes"}));
    let (answer, _, pod) = mutate(with_issuer, "apps", pod).await;
    assert_eq!(answer["allowed"], true);
    assert_eq!(published.try_recv().ok().as_deref(), Some("apps"), "the CA ConfigMap is asked for");
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations.get(super::inject::INJECTED_SOURCE).map(String::as_str), Some("kubernetes"));
    let config = agent_config(&pod);
    assert_eq!(config["kubernetes_issuer_url"], "https://slim-operator-webhook.slim-system.svc:8444");
    assert_eq!(config["kubernetes_issuer_token_file"], "/var/run/secrets/slim.agntcy.org/issuer-token");
    assert_eq!(config["kubernetes_issuer_ca_file"], "/var/run/secrets/slim.agntcy.org/issuer-ca.crt");
    assert_eq!(config["workload_api_socket"], "/run/slim-identity/agent.sock");
    let projected = pod.spec.as_ref().and_then(|s| s.volumes.clone()).expect("volumes");
    let projected =
        serde_json::to_value(projected.iter().find_map(|v| v.projected.clone()).expect("token volume")).expect("json");
    assert_eq!(
        projected["sources"].as_array().expect("sources")[3..],
        [
            json!({"serviceAccountToken": {"audience": "slim-operator", "expirationSeconds": 3600, "path": "issuer-token"}}),
            json!({"configMap": {"name": "slim-identity-issuer-ca", "items": [{"key": "ca.crt", "path": "issuer-ca.crt"}]}}),
        ]
    );
    let env = sidecar(&pod).env.clone().expect("env");
    let account = env.iter().find(|e| e.name == "SLIM_POD_SERVICE_ACCOUNT").and_then(|e| e.value_from.clone());
    assert_eq!(account.and_then(|v| v.field_ref).map(|f| f.field_path).as_deref(), Some("spec.serviceAccountName"));
    // The app: the outputs and the socket, never the token volume.
    let app = &pod.spec.as_ref().expect("spec").containers[0];
    let mounts: Vec<&str> = app.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    assert_eq!(mounts, ["/svids", "/run/slim-identity"]);
    assert_eq!(env_of(app), [("SPIFFE_ENDPOINT_SOCKET".to_owned(), "unix:///run/slim-identity/agent.sock".to_owned())]);
}

#[tokio::test]
async fn a_namespace_label_sets_the_identity_source_and_the_pod_can_override_it() {
    let labels = BTreeMap::from([(
        "apps".to_owned(),
        BTreeMap::from([("slim.agntcy.org/identity-source".to_owned(), "kubernetes".to_owned())]),
    )]);
    let pod = app_pod(json!({"slim.agntcy.org/inject-identity": "true"}));
    let (_, _, injected) = mutate(state(labels.clone()), "apps", pod).await;
    assert_eq!(agent_config(&injected)["identity_source"], "kubernetes");
    let pod = app_pod(json!({"slim.agntcy.org/inject-identity": "true", "slim.agntcy.org/identity-source": "spiffe"}));
    let (_, _, injected) = mutate(state(labels), "apps", pod).await;
    let config = agent_config(&injected);
    assert!(config.get("identity_source").is_none(), "spiffe: {config}");
    assert!(config["agent_address"].as_str().is_some_and(|a| a.ends_with("api.sock")));
}

#[tokio::test]
async fn impossible_settings_are_refused_with_the_reason() {
    for (annotations, expected) in [
        (
            json!({"slim.agntcy.org/jwt-audiences": "a,b", "slim.agntcy.org/jwt-svid-file-names": "one.token"}),
            "has 1 names for 2 audiences",
        ),
        (json!({"slim.agntcy.org/jwt-bundle-format": "pem"}), "is not jwks or spiffe-helper"),
        (json!({"slim.agntcy.org/svid-containers": "sidecar"}), "the pod has no container \"sidecar\""),
        (json!({"slim.agntcy.org/key-file-mode": "600"}), "is not an octal mode"),
        (json!({"slim.agntcy.org/sidecar-cpu-request": "lots"}), "is not a quantity"),
        (json!({"slim.agntcy.org/identity-source": "vault"}), "\"vault\" is not spiffe or kubernetes"),
        (
            json!({"slim.agntcy.org/identity-source": "kubernetes", "slim.agntcy.org/jwt-audiences": "a,b"}),
            "projects one token: name its audience",
        ),
        (
            json!({"slim.agntcy.org/identity-source": "kubernetes", "slim.agntcy.org/token-expiration-seconds": "60"}),
            "is not a number of seconds from 600 to 86400",
        ),
        (
            json!({"slim.agntcy.org/identity-source": "kubernetes", "slim.agntcy.org/x509": "true"}),
            "X.509-SVIDs need SPIRE",
        ),
        (
            json!({"slim.agntcy.org/identity-source": "kubernetes", "slim.agntcy.org/jwt-bundle-format": "spiffe-helper"}),
            "writes a plain JWKS",
        ),
    ] {
        let mut all = annotations.clone();
        all["slim.agntcy.org/inject-identity"] = json!("true");
        let (answer, patch, _) = mutate(state(BTreeMap::new()), "apps", app_pod(all)).await;
        assert_eq!(answer["allowed"], false, "{annotations}");
        assert_eq!(patch, None);
        let message = answer["status"]["message"].as_str().unwrap_or("");
        assert!(message.contains(expected), "{annotations}: {message}");
    }
}

#[tokio::test]
async fn malformed_reviews_get_an_error_response_not_a_panic() {
    for body in [
        b"not json".to_vec(),
        b"{}".to_vec(),
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x"}}"#.to_vec(),
    ] {
        let response = send(state(BTreeMap::new()), body).await;
        assert_eq!(response["response"]["allowed"], false, "{response}");
        assert!(!response["response"]["status"]["message"].as_str().unwrap_or("").is_empty());
    }
}

/// A TLS connection to the webhook on `port`, trusting `ca_pem` only.
async fn tls_connect(
    port: u16,
    ca_pem: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let server_name =
        rustls::pki_types::ServerName::try_from("slim-operator-webhook.slim-system.svc").map_err(|e| e.to_string())?;
    connector.connect(server_name, tcp).await.map_err(|e| e.to_string())
}

/// Minimal HTTPS client: trusts `ca_pem` only, posts `body` to `/mutate`.
async fn https_post(port: u16, ca_pem: &str, body: Vec<u8>) -> Result<Value, String> {
    let tls = tls_connect(port, ca_pem).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = http::Request::post("/mutate")
        .header("host", "slim-operator-webhook.slim-system.svc")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(axum::body::Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    use http_body_util::BodyExt;
    let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

#[tokio::test]
async fn https_with_a_generated_certificate_and_a_swap_without_restart() {
    let names = certs::service_names("slim-operator-webhook", "slim-system");
    let first = certs::generate(&names, None).expect("certificates");
    let store = Arc::new(CertStore::default());
    store.set(certs::certified_key(&first.cert_pem, &first.key_pem).expect("key"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server =
        tokio::spawn(serve_tls_on(listener, router(state(BTreeMap::new())), store.clone(), Limits::WEBHOOK, async {
            let _ = stopped.await;
        }));
    let body = serde_json::to_vec(&review("apps", &app_pod(json!({"slim.agntcy.org/inject-identity": "true"}))))
        .expect("json");

    let response = https_post(port, &first.ca_pem, body.clone()).await.expect("HTTPS round trip");
    assert_eq!(response["response"]["allowed"], true);
    assert!(patch_bytes(&response["response"]).is_some());

    // Rotation to a new CA: new connections get the new certificate, without a restart.
    let second = certs::generate(&names, None).expect("certificates");
    store.set(certs::certified_key(&second.cert_pem, &second.key_pem).expect("key"));
    assert!(https_post(port, &second.ca_pem, body.clone()).await.is_ok(), "the new certificate is served");
    assert!(https_post(port, &first.ca_pem, body).await.is_err(), "the old CA no longer verifies it");
    let _ = stop.send(());
    let _ = server.await;
}

/// Hostile clients over TLS: connections that finish the handshake and never their headers are
/// closed after the header timeout, while reviews keep being answered, each in under 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_holding_unfinished_requests_are_closed_while_reviews_answer_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let material = certs::generate(&certs::service_names("slim-operator-webhook", "slim-system"), None).expect("certs");
    let store = Arc::new(CertStore::default());
    store.set(certs::certified_key(&material.cert_pem, &material.key_pem).expect("key"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let limits = Limits { header_timeout: Duration::from_secs(1), ..Limits::WEBHOOK };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_tls_on(listener, router(state(BTreeMap::new())), store, limits, async {
        let _ = stopped.await;
    }));
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut tls = tls_connect(port, &material.ca_pem).await.expect("handshake");
        tls.write_all(b"POST /mutate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n").await.expect("write");
        tls.flush().await.expect("flush");
        slow.push(tls);
    }
    let body = serde_json::to_vec(&review("apps", &app_pod(json!({"slim.agntcy.org/inject-identity": "true"}))))
        .expect("json");
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let response = https_post(port, &material.ca_pem, body.clone()).await.expect("review answered");
        slowest = slowest.max(started.elapsed());
        assert_eq!(response["response"]["allowed"], true);
    }
    assert!(slowest < Duration::from_millis(100), "the slowest review took {slowest:?}");
    for tls in &mut slow {
        // Whatever the server says before it closes (nothing, or a 408), it closes.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a connection without headers is closed");
    }
    let _ = stop.send(());
    let _ = server.await;
}

#[test]
fn generated_leaf_is_valid_for_the_service_and_fresh() {
    let material = certs::generate(&certs::service_names("svc", "ns"), None).expect("certificates");
    let (left, total) = certs::lifetime(&material.cert_pem).expect("parses");
    assert!(left > 0 && total >= 364 * 86400);
    assert!(!certs::needs_rotation(&material.cert_pem));
    assert!(certs::needs_rotation("not a certificate"));
    // Re-issuing with the same CA keeps the CA.
    let again = certs::generate(&certs::service_names("svc", "ns"), Some((&material.ca_pem, &material.ca_key_pem)))
        .expect("certificates");
    assert_eq!(again.ca_pem, material.ca_pem);
    assert_ne!(again.cert_pem, material.cert_pem);
    assert!(!format!("{again:?}").contains("PRIVATE KEY"));
}

mod self_managed {
    use super::*;
    use http::{Method, Response};
    use kube::client::Body;

    type Handle = tower_test::mock::Handle<http::Request<Body>, Response<Body>>;

    fn manager() -> certs::SelfManaged {
        certs::SelfManaged {
            namespace: "slim-system".into(),
            secret: "slim-operator-webhook-tls".into(),
            service: "slim-operator-webhook".into(),
            webhook_configuration: "slim-operator".into(),
        }
    }

    fn configuration(ca_bundle: Option<&str>) -> Value {
        let mut client_config =
            json!({"service": {"name": "slim-operator-webhook", "namespace": "slim-system", "path": "/mutate"}});
        if let Some(ca) = ca_bundle {
            client_config["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode(ca));
        }
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "slim-operator"},
            "webhooks": [{"name": "identity.slim.agntcy.org", "admissionReviewVersions": ["v1"], "sideEffects": "None", "clientConfig": client_config}]
        })
    }

    /// Serves the expected calls; returns their bodies.
    async fn serve(mut handle: Handle, expected: Vec<(Method, &'static str, u16, Value)>) -> Vec<Value> {
        let mut bodies = Vec::new();
        for (method, path, status, reply) in expected {
            let (request, respond) = handle.next_request().await.expect("a call");
            assert_eq!((request.method(), request.uri().path()), (&method, path));
            let bytes = request.into_body().collect_bytes().await.expect("body");
            bodies.push(serde_json::from_slice(&bytes).unwrap_or(Value::Null));
            let reply = serde_json::to_vec(&reply).expect("json");
            respond.send_response(Response::builder().status(status).body(Body::from(reply)).expect("response"));
        }
        if let Ok(Some((request, _))) =
            tokio::time::timeout(std::time::Duration::from_millis(200), handle.next_request()).await
        {
            panic!("unexpected call {} {}", request.method(), request.uri());
        }
        bodies
    }

    const SECRET: &str = "/api/v1/namespaces/slim-system/secrets/slim-operator-webhook-tls";
    const SECRETS: &str = "/api/v1/namespaces/slim-system/secrets";
    const MWC: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/slim-operator";

    #[tokio::test]
    async fn first_start_issues_stores_and_publishes_the_ca() {
        let (service, handle) = tower_test::mock::pair::<http::Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "slim-system");
        let not_found =
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
        let created = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "slim-operator-webhook-tls", "namespace": "slim-system"}});
        let server = tokio::spawn(serve(
            handle,
            vec![
                (Method::GET, SECRET, 404, not_found),
                (Method::POST, SECRETS, 201, created),
                (Method::GET, MWC, 200, configuration(None)),
                (Method::PATCH, MWC, 200, configuration(None)),
            ],
        ));
        let store = CertStore::default();
        let wait = manager().sync(&client, &store).await.expect("sync");
        assert!(store.is_loaded(), "the new certificate is served");
        assert!(wait > std::time::Duration::from_secs(60));
        let bodies = server.await.expect("server");
        let data = &bodies[1]["data"];
        for key in ["ca.crt", "ca.key", "tls.crt", "tls.key"] {
            assert!(data[key].is_string(), "Secret has {key}");
        }
        let ca_pem = String::from_utf8(
            base64::engine::general_purpose::STANDARD.decode(data["ca.crt"].as_str().unwrap_or("")).expect("b64"),
        )
        .expect("pem");
        let patch = &bodies[3];
        assert_eq!(patch[0]["op"], "add");
        assert_eq!(patch[0]["path"], "/webhooks/0/clientConfig/caBundle");
        let published =
            base64::engine::general_purpose::STANDARD.decode(patch[0]["value"].as_str().unwrap_or("")).expect("b64");
        assert_eq!(String::from_utf8_lossy(&published), ca_pem, "the CA that signed the served certificate");
    }

    #[tokio::test]
    async fn a_valid_secret_and_a_current_ca_bundle_need_no_writes() {
        let material =
            certs::generate(&certs::service_names("slim-operator-webhook", "slim-system"), None).expect("certs");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "slim-operator-webhook-tls", "namespace": "slim-system", "resourceVersion": "3"},
            "data": {"ca.crt": b64(&material.ca_pem), "ca.key": b64(&material.ca_key_pem), "tls.crt": b64(&material.cert_pem), "tls.key": b64(&material.key_pem)}
        });
        let (service, handle) = tower_test::mock::pair::<http::Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "slim-system");
        let server = tokio::spawn(serve(
            handle,
            vec![(Method::GET, SECRET, 200, secret), (Method::GET, MWC, 200, configuration(Some(&material.ca_pem)))],
        ));
        let store = CertStore::default();
        manager().sync(&client, &store).await.expect("sync");
        assert!(store.is_loaded());
        server.await.expect("no Secret write, no caBundle patch");
    }
}

/// Properties of the webhook on whatever the API server (or anyone reaching the port) sends.
/// `PROPTEST_CASES` sets the case count (256 by default; the soak runs more).
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::webhook::inject::{INJECT, annotation};

    /// Any JSON value, a few levels deep.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map(".{0,8}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Annotations a pod may carry: ours with odd values, and others.
    fn annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
        let keys = prop_oneof![
            Just(INJECT.to_owned()),
            Just(annotation::JWT_AUDIENCES.to_owned()),
            Just(annotation::JWT_SVID_FILE_NAMES.to_owned()),
            Just(annotation::X509.to_owned()),
            Just(annotation::KEY_FILE_MODE.to_owned()),
            Just(annotation::MOUNT_PATH.to_owned()),
            Just(annotation::CONTAINERS.to_owned()),
            Just(annotation::CPU_REQUEST.to_owned()),
            Just(annotation::MEMORY_LIMIT.to_owned()),
            Just(annotation::HEALTH_PORT.to_owned()),
            Just(annotation::IDENTITY_SOURCE.to_owned()),
            Just(annotation::TOKEN_EXPIRATION_SECONDS.to_owned()),
            Just(annotation::WORKLOAD_API.to_owned()),
            "[a-z./-]{1,20}",
        ];
        let values = prop_oneof![Just("true".to_owned()), Just("false".to_owned()), "[ -~]{0,24}", ".{0,8}"];
        prop::collection::btree_map(keys, values, 0..8)
    }

    fn check_answer(response: &Value) -> Result<(), TestCaseError> {
        prop_assert_eq!(&response["kind"], "AdmissionReview");
        let answer = &response["response"];
        prop_assert!(answer["allowed"].is_boolean(), "{response}");
        if answer["allowed"] == false {
            let message = answer["status"]["message"].as_str().unwrap_or_default();
            prop_assert!(!message.is_empty(), "a refusal says why: {response}");
        }
        Ok(())
    }

    proptest! {
        /// Any body at all: an AdmissionReview comes back, a refusal with its reason.
        #[test]
        fn any_body_gets_a_valid_answer(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            check_answer(&runtime.block_on(send(state(BTreeMap::new()), body)))?;
        }

        /// Any JSON in the review's places: the same.
        #[test]
        fn any_json_in_a_review_gets_a_valid_answer(request in json_value(), object in json_value()) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let mut review = review("apps", &object);
            if !request.is_null() {
                review["request"]["options"] = request;
            }
            check_answer(&runtime.block_on(send(state(BTreeMap::new()), serde_json::to_vec(&review).expect("json"))))?;
        }

        /// A pod with any annotations: answered; when it is patched, the patch applies to the pod
        /// and the result is a Pod with the agent in it.
        #[test]
        fn a_pod_with_any_annotations_is_answered_and_any_patch_applies(annotations in annotations()) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let pod = app_pod(serde_json::to_value(&annotations).expect("json"));
            let response = runtime.block_on(send(state(BTreeMap::new()), serde_json::to_vec(&review("apps", &pod)).expect("json")));
            check_answer(&response)?;
            if let Some(bytes) = patch_bytes(&response["response"]) {
                let ops: json_patch::Patch = serde_json::from_slice(&bytes).expect("patch ops");
                let mut patched = pod;
                prop_assert!(json_patch::patch(&mut patched, &ops).is_ok(), "the patch applies");
                let pod: Pod = serde_json::from_value(patched).expect("a Pod");
                let init = pod.spec.and_then(|s| s.init_containers).unwrap_or_default();
                prop_assert!(init.iter().any(|c| c.name == CONTAINER_NAME), "the agent is in it");
            }
        }
    }
}
