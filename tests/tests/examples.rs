//! Every example manifest parses into its type (our CRDs into the Rust types, which also pass
//! their CEL rules), and the configs embedded in them parse too.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use kube::core::DynamicObject;
use serde::Deserialize;
use slim_e2e::{example_files, repo_path};
use slim_operator::api::{SlimChannel, Subscription};

fn parse<T: serde::de::DeserializeOwned>(file: &str, json: &serde_json::Value) -> T {
    serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{file}: {} does not parse: {e}", json["kind"]))
}

#[test]
fn every_example_parses_into_its_type() {
    let mut kinds = Vec::new();
    for path in example_files() {
        let file = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).expect("read");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document).expect("YAML");
            if value.is_null() {
                continue;
            }
            let json = serde_json::to_value(&value).expect("json");
            let kind = json["kind"].as_str().unwrap_or_default().to_owned();
            match kind.as_str() {
                "Namespace" => drop(parse::<Namespace>(&file, &json)),
                "ServiceAccount" => drop(parse::<k8s_openapi::api::core::v1::ServiceAccount>(&file, &json)),
                "Service" => drop(parse::<Service>(&file, &json)),
                "Deployment" => drop(parse::<Deployment>(&file, &json)),
                "StatefulSet" => drop(parse::<StatefulSet>(&file, &json)),
                "ConfigMap" => {
                    let config: ConfigMap = parse(&file, &json);
                    for (key, text) in config.data.iter().flatten() {
                        serde_yaml::from_str::<serde_yaml::Value>(text)
                            .unwrap_or_else(|e| panic!("{file}: ConfigMap key {key} is not YAML: {e}"));
                    }
                }
                "Subscription" => {
                    let sub: Subscription = parse(&file, &json);
                    sub.validate_cel().unwrap_or_else(|e| panic!("{file}: Subscription fails its CEL rules: {e:?}"));
                }
                "SlimChannel" => {
                    let channel: SlimChannel = parse(&file, &json);
                    channel.validate_cel().unwrap_or_else(|e| panic!("{file}: SlimChannel fails its CEL rules: {e:?}"));
                }
                "Certificate" | "Issuer" => {
                    let object: DynamicObject = parse(&file, &json);
                    assert_eq!(json["apiVersion"], "cert-manager.io/v1", "{file}");
                    if kind == "Certificate" {
                        assert!(
                            object.data["spec"]["secretName"].is_string(),
                            "{file}: Certificate without secretName"
                        );
                    }
                }
                "ClusterSPIFFEID" => {
                    let object: DynamicObject = parse(&file, &json);
                    assert_eq!(json["apiVersion"], "spire.spiffe.io/v1alpha1");
                    let template = object.data["spec"]["spiffeIDTemplate"].as_str().unwrap_or_default();
                    assert!(template.starts_with("spiffe://"), "{file}: spiffeIDTemplate {template:?}");
                }
                other => panic!("{file}: no test knows kind {other:?}; add it here"),
            }
            kinds.push(kind);
        }
    }
    for expected in ["Subscription", "SlimChannel", "Deployment", "ClusterSPIFFEID", "StatefulSet", "Certificate"] {
        assert!(kinds.iter().any(|k| k == expected), "the quickstart has no {expected}");
    }
}

#[test]
fn the_injected_app_opts_in_and_joins_the_channel() {
    let text = std::fs::read_to_string(repo_path("examples/05-app.yaml")).expect("read");
    let deployment = serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| Deployment::deserialize(d).ok())
        .find(|d| d.metadata.name.as_deref() == Some("dave"))
        .expect("the dave Deployment");
    let template = deployment.spec.expect("spec").template;
    let annotations = template.metadata.as_ref().and_then(|m| m.annotations.clone()).unwrap_or_default();
    assert_eq!(annotations.get("slim.agntcy.org/inject-identity").map(String::as_str), Some("true"));
    let channel: SlimChannel =
        serde_yaml::from_str(&std::fs::read_to_string(repo_path("examples/04-slimchannel.yaml")).expect("read"))
            .expect("channel");
    let selector = channel.spec.participant_selector.expect("selector");
    let labels = template.metadata.as_ref().and_then(|m| m.labels.clone());
    assert!(slim_operator::plan::selector_matches(&selector, labels.as_ref()), "the app is selected by the channel");
    // The app gets the agent's Workload API socket (SLIM's spire identity), not SPIRE's.
    let pod = k8s_openapi::api::core::v1::Pod {
        metadata: template.metadata.unwrap_or_default(),
        spec: template.spec,
        ..Default::default()
    };
    let slim_operator::webhook::Decision::Inject(patch) =
        slim_operator::webhook::decide(&pod, "slim", None, &Default::default())
    else {
        panic!("the example is not injected")
    };
    let patch = serde_json::to_string(&patch).expect("json");
    assert!(patch.contains("unix:///run/slim-identity/agent.sock"), "{patch}");
}

#[test]
fn the_app_without_spire_gets_a_projected_token_from_the_injector() {
    use k8s_openapi::api::core::v1::Pod;
    use slim_operator::webhook::{Decision, InjectorConfig, decide};
    let text = std::fs::read_to_string(repo_path("examples/07-app-kubernetes-identity.yaml")).expect("read");
    let deployment = serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| Deployment::deserialize(d).ok())
        .find(|d| d.metadata.name.as_deref() == Some("erin"))
        .expect("the erin Deployment");
    let template = deployment.spec.expect("spec").template;
    let pod = Pod { metadata: template.metadata.unwrap_or_default(), spec: template.spec, ..Default::default() };
    let Decision::Inject(patch) = decide(&pod, "slim", None, &InjectorConfig::default()) else {
        panic!("the example is not injected")
    };
    let patch = serde_json::to_string(&patch).expect("json");
    assert!(patch.contains("\"serviceAccountToken\"") && patch.contains("identity_source: kubernetes"), "{patch}");
    assert!(!patch.contains("csi.spiffe.io"), "no SPIRE socket: {patch}");
}
