//! The CRDs on a real kube-apiserver (the harness in `slim_e2e::control_plane`): the server accepts
//! them (its CEL cost estimator and structural-schema checks included), refuses invalid objects with
//! the rules' own messages, applies defaults, and accepts the examples' objects.

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use slim_e2e::control_plane::{self, install_crds};
use slim_e2e::repo_path;

async fn setup() -> (Client, String) {
    let plane = control_plane::shared();
    let client = plane.client().await.expect("admin client");
    install_crds(&client).await.expect("the API server accepts both CRDs");
    let namespace = plane.namespace(&client, "crds").await.expect("namespace");
    (client, namespace)
}

fn api(client: &Client, namespace: &str, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("slim.agntcy.org", "v1alpha1", kind);
    Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk(&gvk))
}

fn object(kind: &str, name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec
    }))
    .expect("object")
}

fn subscription(patch: Value) -> Value {
    let mut spec = json!({
        "name": "org/ns/bob",
        "nodes": {"endpoints": ["http://slim-0.slim:46358"]},
        "link": {"endpoint": "http://slim-b:46357"},
    });
    merge(&mut spec, patch);
    spec
}

fn channel(patch: Value) -> Value {
    let mut spec = json!({"name": "org/ns/chat", "participants": ["org/ns/bob", "org/ns/carol"]});
    merge(&mut spec, patch);
    spec
}

fn merge(base: &mut Value, patch: Value) {
    if let (Some(base), Value::Object(patch)) = (base.as_object_mut(), patch) {
        for (key, value) in patch {
            base.insert(key, value);
        }
    }
}

/// Creates the object and returns the server's refusal, or "" when it was accepted.
async fn refusal(api: &Api<DynamicObject>, obj: &DynamicObject) -> String {
    match api.create(&PostParams { dry_run: true, ..Default::default() }, obj).await {
        Ok(_) => String::new(),
        Err(error) => error.to_string(),
    }
}

#[tokio::test]
async fn invalid_objects_are_refused_with_the_rules_own_messages() {
    let (client, namespace) = setup().await;
    let subscriptions = api(&client, &namespace, "Subscription");
    let channels = api(&client, &namespace, "SlimChannel");
    let many = |n: usize, f: &dyn Fn(usize) -> String| -> Vec<String> { (0..n).map(f).collect() };

    let subscription_cases = [
        (json!({"name": "org/ns"}), "must be org/namespace/name"),
        (json!({"name": "org/ns/bob/not-a-uuid"}), "must be org/namespace/name"),
        (json!({"name": "org/n s/bob"}), "without spaces"),
        (json!({"name": "o/n"}), "spec.name: Invalid value"),
        (json!({"nodes": {}}), "nodes needs at least one endpoint or a selector"),
        (json!({"nodes": {"endpoints": []}}), "nodes needs at least one endpoint or a selector"),
        (json!({"nodes": {"endpoints": ["slim-0:46358"]}}), "each endpoint must be http://host:port"),
        (
            json!({"nodes": {"endpoints": ["grpc://slim-0:46358"]}}),
            "each endpoint must be http://host:port or https://",
        ),
        (
            json!({"nodes": {"endpoints": ["https://slim-0:46358"], "tls": {"insecure": true}}}),
            "tls.insecure needs http:// endpoints",
        ),
        (
            json!({"nodes": {"endpoints": ["http://slim-0:46358"], "tls": {"serverName": "slim"}}}),
            "TLS settings need https:// endpoints",
        ),
        (
            json!({"nodes": {"endpoints": ["https://s:1"], "tls": {"spiffe": {"trustDomain": "example.org"}, "caSecretRef": {"name": "ca"}}}}),
            "spiffe takes the trust bundle and the client certificate from the Workload API",
        ),
        (
            json!({"nodes": {"endpoints": ["https://s:1"], "tls": {"spiffe": {"id": "spiffe://example.org/x", "trustDomain": "example.org"}}}}),
            "spiffe needs exactly one of id and trustDomain",
        ),
        (
            json!({"nodes": {"endpoints": ["https://s:1"], "tls": {"spiffe": {"id": "https://example.org/x"}}}}),
            "id must be a SPIFFE ID",
        ),
        (
            json!({"nodes": {"endpoints": ["https://s:1"], "tls": {"spiffe": {"trustDomain": "spiffe://example.org"}}}}),
            "trustDomain is a name like example.org",
        ),
        (
            json!({"nodes": {"endpoints": ["https://s:1"], "tls": {"caSecretRef": {"name": "a"}, "caConfigMapRef": {"name": "b"}}}}),
            "one CA source: caSecretRef or caConfigMapRef",
        ),
        (
            json!({"nodes": {"endpoints": ["http://s:1"], "tls": {"insecure": true, "clientCertSecretRef": {"name": "c"}}}}),
            "insecure takes no TLS settings",
        ),
        (json!({"nodes": {"endpoints": ["http://a:1", "http://a:1"]}}), "Duplicate value: \"http://a:1\""),
        (json!({"nodes": {"endpoints": many(65, &|i| format!("http://n{i}:46358"))}}), "must have at most 64 items"),
        (json!({"nodes": {"endpoints": [format!("http://{}:1", "a".repeat(300))]}}), "may not be more than 300"),
        (json!({"link": {"endpoint": "slim-b"}}), "endpoint must be http://host:port or https://host:port"),
        (json!({"link": {"endpoint": "ftp://b:1"}}), "endpoint must be http://host:port or https://host:port"),
        (json!({"link": {"endpoint": "http://b:1", "connectionType": "mesh"}}), "Unsupported value: \"mesh\""),
        (json!({"link": {"endpoint": "https://b:1", "tls": {"insecure": true}}}), "tls.insecure needs an http://"),
        (json!({"link": {"endpoint": "http://b:1", "tls": {"insecure": false}}}), "TLS settings need an https://"),
        (
            json!({"link": {"endpoint": "http://b:1", "tls": {"insecure": true, "caSecretRef": {"name": "ca"}}}}),
            "an insecure link takes no certificates",
        ),
        (json!({"link": {"endpoint": "https://b:1", "tls": {"caSecretRef": {"name": ""}}}}), "caSecretRef.name"),
    ];
    let channel_cases = [
        (json!({"name": "org/ns"}), "must be org/namespace/name (3 components, no spaces)"),
        (json!({"name": "org/ns/chat/extra"}), "must be org/namespace/name (3 components, no spaces)"),
        (json!({"participants": ["bob"]}), "each participant must be org/namespace/name"),
        (json!({"participants": ["o/n/b c"]}), "each participant must be org/namespace/name"),
        (json!({"participants": ["o/n/bob", "o/n/bob"]}), "Duplicate value: \"o/n/bob\""),
        (json!({"participants": many(257, &|i| format!("o/n/p{i}"))}), "must have at most 256 items"),
        (json!({"channelManager": {"endpoint": "cm:10356"}}), "endpoint must be http://host:port"),
        (
            json!({"channelManager": {"endpoint": "http://cm:10356", "tls": {"spiffe": {"trustDomain": "example.org"}}}}),
            "TLS settings need an https:// endpoint",
        ),
        (
            json!({"channelManager": {"endpoint": "https://cm:10356", "tls": {"insecure": true}}}),
            "tls.insecure needs an http:// endpoint",
        ),
        (json!({"nodes": {}}), "nodes needs at least one endpoint or a selector"),
        (json!({"nodes": {"endpoints": ["10.0.0.1:46358"]}}), "each endpoint must be http://host:port"),
    ];
    let mut checked = 0;
    for (i, (patch, expected)) in subscription_cases.into_iter().enumerate() {
        let obj = object("Subscription", &format!("bad-{i}"), subscription(patch.clone()));
        let message = refusal(&subscriptions, &obj).await;
        assert!(message.contains(expected), "Subscription {patch}: got {message:?}, wanted {expected:?}");
        checked += 1;
    }
    for (i, (patch, expected)) in channel_cases.into_iter().enumerate() {
        let obj = object("SlimChannel", &format!("bad-{i}"), channel(patch.clone()));
        let message = refusal(&channels, &obj).await;
        assert!(message.contains(expected), "SlimChannel {patch}: got {message:?}, wanted {expected:?}");
        checked += 1;
    }
    assert!(checked >= 20, "{checked} invalid objects checked");
    // TLS settings that make sense are accepted, at the endpoint limit too.
    for (i, tls) in [
        json!({"caSecretRef": {"name": "node-ca"}, "clientCertSecretRef": {"name": "operator-tls"}, "serverName": "slim"}),
        json!({"caConfigMapRef": {"name": "trust-bundle"}}),
        json!({"spiffe": {"id": "spiffe://example.org/ns/slim/sa/slim"}}),
        json!({"spiffe": {"trustDomain": "example.org"}}),
    ]
    .into_iter()
    .enumerate()
    {
        let nodes = json!({"endpoints": many(64, &|n| format!("https://n{n}.slim.svc:46358")), "tls": tls});
        let obj = object("Subscription", &format!("tls-{i}"), subscription(json!({"nodes": nodes})));
        assert_eq!(refusal(&subscriptions, &obj).await, "", "TLS settings {i}");
    }
    // The limits themselves are accepted.
    let at_limit = channel(json!({"participants": many(256, &|i| format!("o/n/p{i}"))}));
    assert_eq!(refusal(&channels, &object("SlimChannel", "at-limit", at_limit)).await, "");
}

#[tokio::test]
async fn immutable_fields_cannot_change_on_update() {
    let (client, namespace) = setup().await;
    let channels = api(&client, &namespace, "SlimChannel");
    channels.create(&PostParams::default(), &object("SlimChannel", "chat", channel(json!({})))).await.expect("create");
    for (patch, expected) in [
        (json!({"name": "org/ns/other"}), "name is immutable; create a new SlimChannel instead"),
        (json!({"mlsEnabled": false}), "mlsEnabled cannot change on a live channel"),
    ] {
        let error = channels
            .patch("chat", &PatchParams::default(), &Patch::Merge(json!({"spec": patch})))
            .await
            .expect_err("refused");
        assert!(error.to_string().contains(expected), "{patch}: {error}");
    }
    // Other fields still change.
    let updated = channels
        .patch("chat", &PatchParams::default(), &Patch::Merge(json!({"spec": {"participants": ["o/n/dave"]}})))
        .await
        .expect("participants change");
    assert_eq!(updated.data["spec"]["participants"], json!(["o/n/dave"]));
}

#[tokio::test]
async fn defaults_are_applied_by_the_server() {
    let (client, namespace) = setup().await;
    let subscriptions = api(&client, &namespace, "Subscription");
    let spec = subscription(json!({"link": {"endpoint": "https://b:1", "tls": {"caSecretRef": {"name": "ca"}}}}));
    let created =
        subscriptions.create(&PostParams::default(), &object("Subscription", "s", spec)).await.expect("create");
    // What the server stored is what the operator reads back.
    let sub: slim_operator::api::Subscription =
        serde_json::from_value(serde_json::to_value(&created).expect("json")).expect("typed");
    assert_eq!(sub.spec.link.connection_type, slim_operator::api::ConnectionType::Remote);
    let tls = sub.spec.link.tls.expect("tls");
    assert_eq!(tls.ca_secret_ref.expect("ca").key, "ca.crt");
    let channels = api(&client, &namespace, "SlimChannel");
    let created =
        channels.create(&PostParams::default(), &object("SlimChannel", "c", channel(json!({})))).await.expect("create");
    assert_eq!(created.name_any(), "c");
    let ch: slim_operator::api::SlimChannel =
        serde_json::from_value(serde_json::to_value(&created).expect("json")).expect("typed");
    assert!(ch.spec.mls_enabled, "mlsEnabled defaults to true");
}

#[tokio::test]
async fn the_examples_objects_are_accepted() {
    let (client, namespace) = setup().await;
    let mut accepted = 0;
    for file in ["examples/03-subscriptions.yaml", "examples/04-slimchannel.yaml"] {
        let text = std::fs::read_to_string(repo_path(file)).expect("example");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(document).expect("YAML");
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().expect("kind").to_owned();
            let mut obj: DynamicObject = serde_json::from_value(value).expect("object");
            obj.metadata.namespace = None;
            let created = api(&client, &namespace, &kind)
                .create(&PostParams::default(), &obj)
                .await
                .unwrap_or_else(|e| panic!("{file}: {kind} {} refused: {e}", obj.name_any()));
            assert!(created.metadata.uid.is_some());
            accepted += 1;
        }
    }
    assert!(accepted >= 2, "{accepted} example objects");
}

#[tokio::test]
async fn a_user_without_rbac_is_refused_and_with_it_is_allowed() {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let (admin, namespace) = setup().await;
    let plane = control_plane::shared();
    let user = format!("viewer-{namespace}");
    let client = plane.user_client(&user, &[]).await.expect("user client");
    let error = api(&client, &namespace, "Subscription").list(&Default::default()).await.expect_err("no rights yet");
    assert!(matches!(&error, kube::Error::Api(s) if s.is_forbidden()), "{error}");
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": user},
        "rules": [{"apiGroups": ["slim.agntcy.org"], "resources": ["subscriptions"], "verbs": ["list"]}]
    }))
    .expect("role");
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": user},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    }))
    .expect("binding");
    Api::<ClusterRole>::all(admin.clone()).create(&PostParams::default(), &role).await.expect("role");
    Api::<ClusterRoleBinding>::all(admin.clone()).create(&PostParams::default(), &binding).await.expect("binding");
    slim_e2e::wait_for("RBAC applied", std::time::Duration::from_secs(10), async || {
        api(&client, &namespace, "Subscription").list(&Default::default()).await.ok()
    })
    .await;
}
