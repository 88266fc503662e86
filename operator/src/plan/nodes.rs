//! Which SLIM nodes a Subscription targets: its explicit endpoints plus the selected node Pods.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};

/// The controller port of SLIM's upstream chart.
pub const DEFAULT_CONTROLLER_PORT: i32 = 46358;
/// The container port name SLIM's upstream chart gives the controller API.
pub const CONTROLLER_PORT_NAME: &str = "controller-0";

/// A node a route must be on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeTarget {
    /// `http://host:port` of the node's controller API.
    pub endpoint: String,
    /// The Pod, when the node was found by the selector.
    pub pod: Option<String>,
}

/// Endpoints from the spec plus Running Pods with an IP, sorted and without duplicates.
pub fn pod_targets(
    endpoints: &[String],
    pods: impl IntoIterator<Item = impl std::ops::Deref<Target = Pod>>,
) -> Vec<NodeTarget> {
    targets_with_scheme(endpoints, pods, "http")
}

/// The targets of a node set: its endpoints, and its Pods over `https://` when it has TLS
/// settings (that are not `insecure`), else `http://`.
pub fn node_targets(
    nodes: &crate::api::NodeSet,
    pods: impl IntoIterator<Item = impl std::ops::Deref<Target = Pod>>,
) -> Vec<NodeTarget> {
    let tls = nodes.tls.as_ref().is_some_and(|t| !t.insecure);
    targets_with_scheme(&nodes.endpoints, pods, if tls { "https" } else { "http" })
}

fn targets_with_scheme(
    endpoints: &[String],
    pods: impl IntoIterator<Item = impl std::ops::Deref<Target = Pod>>,
    scheme: &str,
) -> Vec<NodeTarget> {
    let mut targets: Vec<NodeTarget> =
        endpoints.iter().map(|e| NodeTarget { endpoint: e.trim_end_matches('/').to_owned(), pod: None }).collect();
    for pod in pods {
        let pod = &*pod;
        let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()).filter(|ip| !ip.is_empty()) else {
            continue;
        };
        if !serving(pod) {
            continue;
        }
        let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() };
        targets.push(NodeTarget {
            endpoint: format!("{scheme}://{host}:{}", controller_port(pod)),
            pod: pod.metadata.name.clone(),
        });
    }
    targets.sort();
    targets.dedup_by(|a, b| a.endpoint == b.endpoint);
    targets
}

/// Whether the Pod runs and is not being deleted: the one rule for node targets, selected
/// participants and the node at a link's far end.
pub fn serving(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn controller_port(pod: &Pod) -> i32 {
    pod.spec
        .iter()
        .flat_map(|spec| &spec.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(CONTROLLER_PORT_NAME))
        .map_or(DEFAULT_CONTROLLER_PORT, |p| p.container_port)
}

/// A label selector the API server cannot express.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label selector: {0}")]
pub struct SelectorError(String);

/// Parses an equality selector as flags give it (`app.kubernetes.io/name=slim,tier=edge`) into a
/// `LabelSelector`; `""` is none.
pub fn parse_equality_selector(text: &str) -> Result<Option<LabelSelector>, SelectorError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let mut labels = BTreeMap::new();
    for pair in text.split(',') {
        let (key, value) = pair
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .filter(|(k, v)| !k.is_empty() && !v.contains('=') && !k.contains(char::is_whitespace))
            .ok_or_else(|| SelectorError(format!("{pair:?} is not key=value (in {text:?})")))?;
        labels.insert(key.to_owned(), value.to_owned());
    }
    Ok(Some(LabelSelector { match_labels: Some(labels), match_expressions: None }))
}

/// The selector in `labelSelector` query syntax (`a=b,c in (d,e),!f`), as kube's [`Selector`]
/// writes it.
pub fn selector_query(selector: &LabelSelector) -> Result<String, SelectorError> {
    // The API server refuses `In`/`NotIn` without values; kube's `Selector` would write `k in ()`.
    if let Some(expr) = selector
        .match_expressions
        .iter()
        .flatten()
        .find(|e| matches!(e.operator.as_str(), "In" | "NotIn") && e.values.as_ref().is_none_or(Vec::is_empty))
    {
        return Err(SelectorError(format!("{} {} needs values", expr.key, expr.operator)));
    }
    Selector::try_from(selector.clone())
        .map(|s| s.to_string())
        .map_err(|e| SelectorError(format!("{} ({selector:?})", e.0)))
}

/// Whether `labels` satisfy `selector` (kube's [`Selector`], the API server's rules; an empty
/// selector matches all, one with an unknown operator nothing).
pub fn selector_matches(selector: &LabelSelector, labels: Option<&BTreeMap<String, String>>) -> bool {
    label_matcher(selector)(labels)
}

/// [`selector_matches`] for many label sets: the selector is converted once (matching every Pod
/// of a large cluster converted it once per Pod: 2·10⁸ conversions for 10,000 Subscriptions over
/// 20,000 Pods).
pub fn label_matcher(selector: &LabelSelector) -> impl Fn(Option<&BTreeMap<String, String>>) -> bool + use<> {
    let selector = Selector::try_from(selector.clone()).ok();
    move |labels| {
        let empty = BTreeMap::new();
        selector.as_ref().is_some_and(|s| s.matches(labels.unwrap_or(&empty)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality_selectors_from_flags() {
        let parsed =
            parse_equality_selector("app.kubernetes.io/name=slim, tier = edge").expect("parses").expect("some");
        assert_eq!(selector_query(&parsed).expect("query"), "app.kubernetes.io/name=slim,tier=edge");
        assert_eq!(parse_equality_selector("  ").expect("empty"), None);
        for bad in ["app", "=slim", "a=b=c", "a b=c"] {
            assert!(parse_equality_selector(bad).is_err(), "{bad}");
        }
    }
    use serde_json::json;

    fn selector(value: serde_json::Value) -> LabelSelector {
        serde_json::from_value(value).expect("selector")
    }

    #[test]
    fn selector_query_and_matching_agree() {
        let s = selector(json!({
            "matchLabels": {"app": "slim"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "old", "operator": "DoesNotExist"},
                {"key": "zone", "operator": "Exists"}
            ]
        }));
        assert_eq!(selector_query(&s).expect("valid"), "app=slim,tier in (a,b),!old,zone");
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert!(selector_matches(&s, Some(&labels(&[("app", "slim"), ("tier", "a"), ("zone", "z")]))));
        assert!(!selector_matches(&s, Some(&labels(&[("app", "slim"), ("tier", "c"), ("zone", "z")]))));
        assert!(!selector_matches(&s, Some(&labels(&[("app", "slim"), ("tier", "a"), ("zone", "z"), ("old", "1")]))));
        assert!(!selector_matches(&s, None));
        assert!(selector_matches(&LabelSelector::default(), None));
        let bad = selector(json!({"matchExpressions": [{"key": "k", "operator": "Near"}]}));
        assert!(selector_query(&bad).is_err());
    }

    fn pod(name: &str, phase: &str, ip: Option<&str>, port: Option<i32>) -> Pod {
        let ports =
            port.map(|p| json!([{"name": "controller-0", "containerPort": p}, {"name": "data", "containerPort": 1}]));
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "slim", "ports": ports.unwrap_or(json!([]))}]},
            "status": {"phase": phase, "podIP": ip},
        }))
        .expect("pod")
    }

    #[test]
    fn running_pods_with_ip_become_targets() {
        let pods = [
            pod("slim-0", "Running", Some("10.0.0.1"), Some(9000)),
            pod("slim-1", "Running", Some("10.0.0.2"), None),
            pod("slim-2", "Pending", Some("10.0.0.3"), None),
            pod("slim-3", "Running", None, None),
            pod("slim-4", "Running", Some("fd00::4"), None),
        ];
        let targets = pod_targets(&["http://fixed:46358/".to_owned()], &pods);
        let endpoints: Vec<&str> = targets.iter().map(|t| t.endpoint.as_str()).collect();
        assert_eq!(
            endpoints,
            vec!["http://10.0.0.1:9000", "http://10.0.0.2:46358", "http://[fd00::4]:46358", "http://fixed:46358"]
        );
        assert_eq!(targets[0].pod.as_deref(), Some("slim-0"));
        assert_eq!(targets[3].pod, None);
    }

    #[test]
    fn a_node_set_with_tls_reaches_its_pods_over_https() {
        let pods = [pod("slim-0", "Running", Some("10.0.0.1"), None)];
        let mut nodes = crate::api::NodeSet { endpoints: vec!["https://fixed:46358".into()], ..Default::default() };
        let plain: Vec<String> = node_targets(&nodes, &pods).into_iter().map(|t| t.endpoint).collect();
        assert_eq!(plain, ["http://10.0.0.1:46358", "https://fixed:46358"]);
        nodes.tls = Some(crate::api::ControlTls { server_name: Some("slim.slim.svc".into()), ..Default::default() });
        let secure: Vec<String> = node_targets(&nodes, &pods).into_iter().map(|t| t.endpoint).collect();
        assert_eq!(secure, ["https://10.0.0.1:46358", "https://fixed:46358"]);
        nodes.tls = Some(crate::api::ControlTls { insecure: true, ..Default::default() });
        let insecure: Vec<String> = node_targets(&nodes, &pods).into_iter().map(|t| t.endpoint).collect();
        assert_eq!(insecure[0], "http://10.0.0.1:46358");
    }
}
