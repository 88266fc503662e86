//! The Helm chart: lint, render with default and non-default values, parse every document into its
//! Kubernetes type, compare the RBAC with what the code uses, keep CRDs identical to `crds/`.
//! Helm comes from `HELM`, else `$SLIM_CACHE/bin/helm` (scripts/test.sh installs it).

use std::collections::BTreeSet;
use std::path::PathBuf;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use kube::core::DynamicObject;
use serde::Deserialize;
use slim_e2e::repo_path;
use slim_operator::rbac::{self, Permission};

fn run_helm(args: &[&str]) -> Result<String, String> {
    slim_e2e::helm(args, &[]).map_err(|e| e.to_string())
}

fn chart() -> String {
    repo_path("charts/slim-operator").display().to_string()
}

fn custom_values() -> String {
    repo_path("tests/fixtures/chart-values-custom.yaml").display().to_string()
}

/// Every rendered document, parsed into its type.
#[derive(Default)]
struct Rendered {
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    bindings: usize,
    webhooks: Vec<MutatingWebhookConfiguration>,
    pdbs: Vec<PodDisruptionBudget>,
    config_maps: Vec<k8s_openapi::api::core::v1::ConfigMap>,
    others: Vec<DynamicObject>,
}

fn render(extra: &[&str]) -> Rendered {
    let chart = chart();
    let mut args = vec!["template", "slim", chart.as_str(), "--namespace", "slim-system"];
    args.extend_from_slice(extra);
    let yaml = run_helm(&args).unwrap_or_else(|e| panic!("helm template {extra:?}: {e}"));
    let mut rendered = Rendered::default();
    for document in serde_yaml::Deserializer::from_str(&yaml) {
        let value = serde_yaml::Value::deserialize(document).expect("YAML document");
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
        let json = serde_json::to_value(&value).expect("json");
        match kind.as_str() {
            "Deployment" => rendered.deployments.push(parse(&json)),
            "Service" => rendered.services.push(parse(&json)),
            "ServiceAccount" => drop(parse::<ServiceAccount>(&json)),
            "ClusterRole" => rendered.cluster_roles.push(parse(&json)),
            "Role" => rendered.roles.push(parse(&json)),
            "ClusterRoleBinding" => {
                parse::<ClusterRoleBinding>(&json);
                rendered.bindings += 1;
            }
            "RoleBinding" => {
                parse::<RoleBinding>(&json);
                rendered.bindings += 1;
            }
            "MutatingWebhookConfiguration" => rendered.webhooks.push(parse(&json)),
            "PodDisruptionBudget" => rendered.pdbs.push(parse(&json)),
            "ConfigMap" => rendered.config_maps.push(parse(&json)),
            "ServiceMonitor" | "Certificate" | "Issuer" | "PrometheusRule" => {
                let object: DynamicObject = parse(&json);
                assert!(object.types.as_ref().is_some_and(|t| !t.api_version.is_empty()));
                rendered.others.push(object);
            }
            other => panic!("unexpected kind {other:?} rendered"),
        }
    }
    rendered
}

/// A rendered document as its Kubernetes type; panics with the document when it does not fit.
fn parse<T: serde::de::DeserializeOwned>(json: &serde_json::Value) -> T {
    serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{} does not parse: {e}\n{json}", json["kind"]))
}

/// (group, resource, verb) triples of rules.
fn triples(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut set = BTreeSet::new();
    for rule in rules {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    set.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    set
}

fn needed(tables: &[&[Permission]]) -> BTreeSet<(String, String, String)> {
    tables
        .iter()
        .flat_map(|t| t.iter())
        .flat_map(|p| p.verbs.iter().map(move |v| (p.group.to_owned(), p.resource.to_owned(), (*v).to_owned())))
        .collect()
}

/// A namespace-scoped install: what the controllers use is granted in the watched namespace only.
#[test]
fn a_namespace_scoped_install_grants_the_watched_rights_in_that_namespace() {
    let rendered = render(&["--set", "watchNamespace=apps", "--set", "operator.healChannelManager=true"]);
    let cluster = triples(&rendered.cluster_roles[0].rules.clone().unwrap_or_default());
    assert_eq!(cluster, needed(&[rbac::CLUSTER, rbac::WEBHOOK_CONFIGURATION]), "no cluster-wide rights on the CRs");
    let watched =
        rendered.roles.iter().find(|r| r.metadata.namespace.as_deref() == Some("apps")).expect("a Role in apps");
    assert_eq!(
        triples(&watched.rules.clone().unwrap_or_default()),
        needed(&[rbac::WATCHED, rbac::HEAL_CHANNEL_MANAGER])
    );
    assert_eq!(rendered.bindings, 3, "the watched Role is bound too");
    let env = rendered.deployments[0]
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|s| s.containers[0].env.clone());
    let watch = env.flatten().into_iter().flatten().find(|e| e.name == "SLIM_OPERATOR_WATCH_NAMESPACE");
    assert_eq!(watch.and_then(|e| e.value).as_deref(), Some("apps"));
}

#[test]
fn chart_lints_strictly_with_default_and_custom_values() {
    run_helm(&["lint", "--strict", &chart()]).unwrap_or_else(|e| panic!("lint: {e}"));
    run_helm(&["lint", "--strict", &chart(), "-f", &custom_values()]).unwrap_or_else(|e| panic!("lint custom: {e}"));
}

#[test]
fn default_render_parses_and_rbac_is_exactly_what_the_code_uses() {
    let rendered = render(&[]);
    assert_eq!(rendered.deployments.len(), 1);
    assert_eq!(rendered.bindings, 2);
    assert!(rendered.pdbs.is_empty(), "one replica: no PodDisruptionBudget");
    let cluster = triples(&rendered.cluster_roles[0].rules.clone().unwrap_or_default());
    assert_eq!(
        cluster,
        needed(&[rbac::CLUSTER, rbac::WATCHED, rbac::WEBHOOK_CONFIGURATION]),
        "ClusterRole vs operator/src/rbac.rs"
    );
    let namespaced = triples(&rendered.roles[0].rules.clone().unwrap_or_default());
    assert_eq!(namespaced, needed(&[rbac::NAMESPACED, rbac::WEBHOOK_SECRET]), "Role vs operator/src/rbac.rs");

    let deployment = &rendered.deployments[0];
    let pod = deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec");
    let container = &pod.containers[0];
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone())
    };
    assert_eq!(probe_path(&container.liveness_probe).as_deref(), Some("/livez"));
    assert_eq!(probe_path(&container.readiness_probe).as_deref(), Some("/readyz"));
    let security = container.security_context.as_ref().expect("security context");
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(pod.security_context.as_ref().and_then(|s| s.run_as_non_root), Some(true));
    let env: Vec<String> = container.env.iter().flatten().map(|e| e.name.clone()).collect();
    for name in ["POD_NAME", "POD_NAMESPACE", "SLIM_OPERATOR_LEADER_ELECTION", "RUST_LOG"] {
        assert!(env.contains(&name.to_owned()), "{name} missing: {env:?}");
    }

    let webhook = &rendered.webhooks[0].webhooks.as_ref().expect("webhooks")[0];
    // The issuer's CA ConfigMap is written after an injection, never for a dry run.
    assert_eq!(webhook.side_effects, "NoneOnDryRun");
    assert_eq!(webhook.admission_review_versions, vec!["v1".to_owned()]);
    assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
    assert_eq!(webhook.reinvocation_policy.as_deref(), Some("IfNeeded"));
    let excluded = &webhook.namespace_selector.as_ref().and_then(|s| s.match_expressions.clone()).expect("selector")[0];
    let values = excluded.values.clone().unwrap_or_default();
    assert!(values.contains(&"kube-system".to_owned()) && values.contains(&"slim-system".to_owned()), "{values:?}");
    let service = webhook.client_config.service.as_ref().expect("service");
    assert_eq!((service.path.as_deref(), service.port), (Some("/mutate"), Some(443)));
    assert!(rendered.services.iter().any(|s| s.metadata.name.as_deref() == Some(service.name.as_str())));
}

#[test]
fn custom_render_follows_the_values() {
    let rendered = render(&["-f", &custom_values()]);
    let deployment = &rendered.deployments[0];
    assert_eq!(deployment.spec.as_ref().and_then(|s| s.replicas), Some(3));
    assert_eq!(rendered.pdbs.len(), 1, "more than one replica: a PodDisruptionBudget");
    let container = &deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("spec").containers[0];
    assert_eq!(container.image.as_deref(), Some("registry.example/slim-operator:9.9.9"));
    let env = |name: &str| {
        container.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.clone()).unwrap_or_default()
    };
    assert_eq!(env("SLIM_OPERATOR_WEBHOOK_CERT_MODE"), "files");
    assert_eq!(env("SLIM_OPERATOR_SPIRE_SOCKET"), "host-path");
    assert_eq!(env("SLIM_OPERATOR_DEFAULT_AUDIENCES"), "slim,gateway");
    assert_eq!(env("SLIM_OPERATOR_CHANNEL_MANAGER"), "http://slim-channel-manager.slim.svc:10356");
    assert_eq!(env("SLIM_OPERATOR_DEFAULT_IDENTITY_SOURCE"), "kubernetes");
    assert_eq!(env("SLIM_OPERATOR_DEFAULT_WORKLOAD_API"), "false");
    // Control TLS: the CA and client Secrets and the SPIRE socket mounted, the operator told where.
    assert_eq!(env("SLIM_OPERATOR_CONTROL_TLS_CA_FILE"), "/etc/slim-operator/control-ca/ca.crt");
    assert_eq!(env("SLIM_OPERATOR_CONTROL_TLS_CLIENT_KEY_FILE"), "/etc/slim-operator/control-client/tls.key");
    assert_eq!(env("SLIM_OPERATOR_SPIFFE_ENDPOINT_SOCKET"), "unix:///run/spire/operator-socket/api.sock");
    assert_eq!(env("SLIM_OPERATOR_CONTROL_TLS_SPIFFE_TRUST_DOMAIN"), "example.org");
    let pod_spec = deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec");
    let volumes: Vec<&str> = pod_spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    for name in ["webhook-tls", "control-ca", "control-client", "spire-agent-socket"] {
        assert!(volumes.contains(&name), "{name} in {volumes:?}");
        assert!(container.volume_mounts.iter().flatten().any(|m| m.name == name), "{name} mounted");
    }
    let socket = pod_spec.volumes.iter().flatten().find(|v| v.name == "spire-agent-socket").expect("socket");
    assert!(socket.host_path.is_some(), "spire.socketMode host-path is followed");
    // bindIssuerDiscovery: Kubernetes' own binding of the discovery role, put back.
    assert_eq!(rendered.bindings, 3);
    let webhook = &rendered.webhooks[0];
    assert!(webhook.metadata.annotations.as_ref().is_some_and(|a| a.contains_key("cert-manager.io/inject-ca-from")));
    assert_eq!(webhook.webhooks.as_ref().expect("webhooks")[0].failure_policy.as_deref(), Some("Fail"));
    let kinds: BTreeSet<String> =
        rendered.others.iter().filter_map(|o| o.types.as_ref().map(|t| t.kind.clone())).collect();
    assert_eq!(
        kinds,
        ["Certificate", "Issuer", "PrometheusRule", "ServiceMonitor"].map(String::from).into_iter().collect()
    );
    // The alerts are the promtool-tested file, unchanged; the dashboard is Grafana's sidecar's.
    let rule = rendered.others.iter().find(|o| o.types.as_ref().is_some_and(|t| t.kind == "PrometheusRule"));
    let file: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_path("charts/slim-operator/files/prometheus-rules.yaml")).expect("rules"),
    )
    .expect("rules yaml");
    assert_eq!(rule.map(|r| r.data["spec"].clone()), Some(file));
    let dashboard =
        rendered.config_maps.iter().find(|c| c.metadata.name.as_deref() == Some("slim-slim-operator-dashboard"));
    let dashboard = dashboard.expect("dashboard ConfigMap");
    assert_eq!(
        dashboard.metadata.labels.as_ref().and_then(|l| l.get("grafana_dashboard")).map(String::as_str),
        Some("1")
    );
    let json: serde_json::Value =
        serde_json::from_str(&dashboard.data.as_ref().expect("data")["slim-operator.json"]).expect("dashboard JSON");
    assert!(json["panels"].as_array().is_some_and(|p| p.len() >= 10));
    // cert-manager mode: the operator patches no webhook configuration; its only Secret is the
    // issuer's keys.
    let cluster = triples(&rendered.cluster_roles[0].rules.clone().unwrap_or_default());
    assert_eq!(cluster, needed(&[rbac::CLUSTER, rbac::WATCHED, rbac::ISSUER, rbac::HEAL_CHANNEL_MANAGER]));
    assert_eq!(env("SLIM_OPERATOR_HEAL_CHANNEL_MANAGER"), "true");
    let namespaced = triples(&rendered.roles[0].rules.clone().unwrap_or_default());
    assert_eq!(namespaced, needed(&[rbac::NAMESPACED, rbac::ISSUER_SECRET]));
    // The issuer: its settings, its port on the webhook Service.
    assert_eq!(env("SLIM_OPERATOR_ISSUER"), "true");
    assert_eq!(env("SLIM_OPERATOR_ISSUER_ADDR"), "0.0.0.0:9444");
    assert_eq!(env("SLIM_OPERATOR_TRUST_DOMAIN"), "prod.example");
    assert_eq!(env("SLIM_OPERATOR_ISSUER_AUDIENCE"), "issuer.example");
    assert_eq!(env("SLIM_OPERATOR_ISSUER_JWT_TTL"), "10m");
    assert_eq!(env("SLIM_OPERATOR_ISSUER_SECRET"), "slim-slim-operator-issuer");
    let ports = |s: &Service| s.spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default();
    let issuer_port = rendered.services.iter().flat_map(ports).find(|p| p.name.as_deref() == Some("issuer"));
    assert_eq!(issuer_port.map(|p| p.port), Some(9444));
    assert!(container.ports.iter().flatten().any(|p| p.name.as_deref() == Some("issuer") && p.container_port == 9444));
    let broken =
        run_helm(&["template", "slim", &chart(), "--set", "identityIssuer.enabled=true,webhook.enabled=false"]);
    assert!(broken.is_err_and(|e| e.contains("needs webhook.enabled")));
}

#[test]
fn schema_rejects_typos_and_bad_types() {
    for (set, expected) in [
        ("iamge.repository=x", "additional properties 'iamge' not allowed"),
        ("replicaCount=many", "replicaCount"),
        ("webhook.failurePolicy=Sometimes", "failurePolicy"),
        ("sidecar.jwtBundleFormat=pem", "jwtBundleFormat"),
        ("operator.resyncInterval=often", "resyncInterval"),
        ("sidecar.identitySource=vault", "identitySource"),
        ("sidecar.workloadApi=maybe", "workloadApi"),
    ] {
        let error = run_helm(&["template", "slim", &chart(), "--set", set]).expect_err(set);
        assert!(error.contains(expected), "{set}: {error}");
    }
    let error =
        run_helm(&["template", "slim", &chart(), "--set", "replicaCount=2", "--set", "leaderElection.enabled=false"])
            .expect_err("two replicas without leader election");
    assert!(error.contains("needs leaderElection.enabled"), "{error}");
}

#[test]
fn chart_crds_are_the_generated_ones() {
    let top = repo_path("crds");
    let chart_crds = repo_path("charts/slim-operator/crds");
    let names = |dir: &PathBuf| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(&top), names(&chart_crds), "charts/slim-operator/crds must hold the same files as crds/");
    for name in names(&top) {
        let a = std::fs::read_to_string(top.join(&name)).expect("read");
        let b = std::fs::read_to_string(chart_crds.join(&name)).expect("read");
        assert!(a == b, "{name} differs: copy crds/*.yaml into charts/slim-operator/crds/");
    }
}
