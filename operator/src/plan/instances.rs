//! Routes that follow a name's live instances. Pure.
//!
//! A session's first message goes to the bare name (`org/ns/bob`); everything after it, and every
//! reply, goes to the instance (`org/ns/bob/<uuid>`), which a bare-name route does not match. So a
//! Subscription over a `remote` or `edge` link also routes every instance of its name that the
//! node at the far end of the link can reach (its apps, and what it routes on, except back over
//! this very link). A `peer` link syncs subscriptions by itself.

use k8s_openapi::api::core::v1::Pod;

use crate::api::{ConnectionType, InstanceRouting, SubscriptionSpec};
use crate::slim::{Observed, RouteRef, SlimName};

/// The data port of SLIM's upstream chart and its container port name.
pub const DEFAULT_DATA_PORT: i32 = 46357;
pub const DATA_PORT_NAME: &str = "data-plane-0";

/// Condition reasons of `InstancesFollowed`.
pub mod reason {
    pub const FOLLOWING: &str = "Following";
    pub const NOT_REQUESTED: &str = "NotRequested";
    pub const INSTANCE_NAME: &str = "InstanceName";
    pub const PEER_LINK: &str = "PeerLink";
    pub const FAR_NODE_UNKNOWN: &str = "FarNodeUnknown";
    pub const FAR_NODE_UNREACHABLE: &str = "FarNodeUnreachable";
}

/// Whether and where a Subscription's instances are followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Following {
    /// Not needed or not wanted: the reason (a condition reason) and why.
    Off { reason: &'static str, message: String },
    /// The far node's controller API (and its Pod, when found through the Pod cache).
    Far { endpoint: String, pod: Option<String> },
    /// Wanted, but the far node is not known: why (said in status).
    Unknown(String),
}

/// Decides how `spec`'s instances are followed; `pods` are the cached Pods, `tls` whether the
/// far node's controller is reached over `https://` (the Subscription's node TLS).
pub fn following(spec: &SubscriptionSpec, name: &SlimName, namespace: &str, pods: &[&Pod], tls: bool) -> Following {
    if spec.instances == InstanceRouting::None {
        let message = "spec.instances is None: only the bare name is routed".to_owned();
        return Following::Off { reason: reason::NOT_REQUESTED, message };
    }
    if name.instance().is_some() {
        let message = "the name is one instance: its route is the only one needed".to_owned();
        return Following::Off { reason: reason::INSTANCE_NAME, message };
    }
    if spec.link.connection_type == ConnectionType::Peer {
        let message = "a peer link syncs subscriptions both ways: SLIM routes the instances itself".to_owned();
        return Following::Off { reason: reason::PEER_LINK, message };
    }
    if let Some(controller) = &spec.link.controller {
        return Following::Far { endpoint: controller.trim_end_matches('/').to_owned(), pod: None };
    }
    match far_pod(&spec.link.endpoint, namespace, pods) {
        Some(pod) => match controller_endpoint(pod, tls) {
            Some(endpoint) => Following::Far { endpoint, pod: pod.metadata.name.clone() },
            None => Following::Unknown(format!(
                "the far node's Pod {} has no IP yet",
                pod.metadata.name.as_deref().unwrap_or_default()
            )),
        },
        None => Following::Unknown(format!(
            "no node Pod serves {} (by IP, or <pod>.<service>.<namespace> DNS name, and data port); set spec.link.controller to the far node's controller API",
            spec.link.endpoint
        )),
    }
}

/// `(host, port)` of an `http(s)://host:port` endpoint.
fn host_port(endpoint: &str) -> Option<(&str, i32)> {
    let rest = endpoint.split_once("://")?.1.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    Some((host.trim_start_matches('[').trim_end_matches(']'), port.parse().ok()?))
}

/// The node Pod at the far end of `endpoint`: its IP, or its DNS name
/// `<hostname>.<subdomain>[.<namespace>[.svc[.<cluster domain>]]]`, serving SLIM's data plane on
/// the endpoint's port.
fn far_pod<'a>(endpoint: &str, namespace: &str, pods: &[&'a Pod]) -> Option<&'a Pod> {
    let (host, port) = host_port(endpoint)?;
    let labels: Vec<&str> = host.split('.').collect();
    let by_dns = |pod: &Pod| {
        let spec = pod.spec.as_ref();
        let hostname = spec.and_then(|s| s.hostname.as_deref()).or(pod.metadata.name.as_deref());
        let subdomain = spec.and_then(|s| s.subdomain.as_deref());
        let pod_namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        match labels.as_slice() {
            [h, s] => Some(*h) == hostname && Some(*s) == subdomain && pod_namespace == namespace,
            [h, s, n, rest @ ..] => {
                Some(*h) == hostname
                    && Some(*s) == subdomain
                    && *n == pod_namespace
                    && rest.first().is_none_or(|svc| *svc == "svc")
            }
            _ => false,
        }
    };
    let by_ip = |pod: &Pod| pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) == Some(host);
    pods.iter().copied().find(|pod| (by_ip(pod) || by_dns(pod)) && data_port(pod) == port && super::nodes::serving(pod))
}

fn data_port(pod: &Pod) -> i32 {
    named_port(pod, DATA_PORT_NAME).unwrap_or(DEFAULT_DATA_PORT)
}

fn named_port(pod: &Pod, name: &str) -> Option<i32> {
    pod.spec
        .iter()
        .flat_map(|spec| &spec.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port)
}

fn controller_endpoint(pod: &Pod, tls: bool) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() };
    let port = named_port(pod, super::nodes::CONTROLLER_PORT_NAME).unwrap_or(super::nodes::DEFAULT_CONTROLLER_PORT);
    Some(format!("{}://{host}:{port}", if tls { "https" } else { "http" }))
}

/// The instance routes for `name` over `link_id`: one per instance the far node reaches other
/// than back over that link, sorted.
pub fn instance_routes(name: &SlimName, link_id: &str, far: &Observed) -> Vec<RouteRef> {
    far.instances_reachable(name, link_id)
        .map(|instance| RouteRef { name: name.with_instance(instance), link_id: link_id.to_owned() })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{LinkSpec, NodeSet};
    use serde_json::json;

    fn spec(link: serde_json::Value) -> SubscriptionSpec {
        SubscriptionSpec {
            name: "org/ns/bob".into(),
            nodes: NodeSet::default(),
            link: serde_json::from_value::<LinkSpec>(link).expect("link"),
            instances: InstanceRouting::Follow,
            deletion_policy: Default::default(),
        }
    }

    fn node_pod(name: &str, ip: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "slim"},
            "spec": {"hostname": name, "subdomain": "slim", "containers": [{"name": "slim", "ports": [
                {"name": "data-plane-0", "containerPort": 46357}, {"name": "controller-0", "containerPort": 46358}]}]},
            "status": {"phase": "Running", "podIP": ip}
        }))
        .expect("pod")
    }

    fn bob() -> SlimName {
        SlimName::parse("org/ns/bob").expect("name")
    }

    #[test]
    fn the_far_node_is_found_by_dns_name_or_ip_and_data_port() {
        let pods = [node_pod("slim-0", "10.88.0.5"), node_pod("slim-1", "10.88.0.6")];
        let refs: Vec<&Pod> = pods.iter().collect();
        let far = |endpoint: &str| following(&spec(json!({"endpoint": endpoint})), &bob(), "slim", &refs, false);
        let slim1 = Following::Far { endpoint: "http://10.88.0.6:46358".into(), pod: Some("slim-1".into()) };
        assert_eq!(far("http://slim-1.slim.slim.svc.cluster.local:46357"), slim1);
        assert_eq!(far("http://slim-1.slim.slim.svc:46357"), slim1);
        assert_eq!(far("http://slim-1.slim:46357"), slim1);
        assert_eq!(far("http://10.88.0.6:46357"), slim1);
        assert!(matches!(far("http://slim-1.slim.other.svc:46357"), Following::Unknown(_)), "another namespace");
        assert!(matches!(far("http://slim-1.slim:9999"), Following::Unknown(_)), "not its data port");
        let unknown = far("http://gateway.example.com:46357");
        assert!(matches!(&unknown, Following::Unknown(m) if m.contains("set spec.link.controller")), "{unknown:?}");
        let tls = following(&spec(json!({"endpoint": "http://10.88.0.6:46357"})), &bob(), "slim", &refs, true);
        assert!(matches!(tls, Following::Far { endpoint, .. } if endpoint == "https://10.88.0.6:46358"));
    }

    #[test]
    fn an_explicit_controller_wins_and_some_links_need_nothing() {
        let explicit = spec(json!({"endpoint": "http://b.example:46357", "controller": "https://b.example:46358/"}));
        assert_eq!(
            following(&explicit, &bob(), "slim", &[], false),
            Following::Far { endpoint: "https://b.example:46358".into(), pod: None }
        );
        let peer = spec(json!({"endpoint": "http://b:46357", "connectionType": "peer"}));
        assert!(matches!(
            following(&peer, &bob(), "slim", &[], false),
            Following::Off { reason: reason::PEER_LINK, .. }
        ));
        let mut none = spec(json!({"endpoint": "http://b:46357"}));
        none.instances = InstanceRouting::None;
        assert!(matches!(
            following(&none, &bob(), "s", &[], false),
            Following::Off { reason: reason::NOT_REQUESTED, .. }
        ));
        let one = SlimName::parse("org/ns/bob/0b3c5a8e-1111-4222-8333-944455556666").expect("name");
        let plain = spec(json!({"endpoint": "http://b:46357"}));
        assert!(matches!(
            following(&plain, &one, "s", &[], false),
            Following::Off { reason: reason::INSTANCE_NAME, .. }
        ));
    }

    #[test]
    fn instances_are_routed_except_those_reached_back_over_the_same_link() {
        let here = "0b3c5a8e-1111-4222-8333-944455556666";
        let elsewhere = "d165bd17-d238-547c-ad69-4d19eb78171a";
        let looped = "aaaaaaaa-1111-4222-8333-944455556666";
        let key = |instance: &str| SlimName::parse(&format!("org/ns/bob/{instance}")).expect("name").key();
        let mut far = Observed::default();
        far.names.extend([key(here), key(elsewhere), key(looped), bob().key()]);
        far.routes.insert((key(elsewhere), "link-to-c".into()));
        far.routes.insert((key(looped), "ours".into()));
        let routes: Vec<String> = instance_routes(&bob(), "ours", &far).iter().map(|r| r.name.to_string()).collect();
        let mut expected = vec![format!("org/ns/bob/{here}"), format!("org/ns/bob/{elsewhere}")];
        expected.sort();
        assert_eq!(routes, expected);
    }
}
