//! The caches the controllers keep (one per kind, one shared Pod cache), and the scrape-time
//! gauges computed from them.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use super::index::Cache;
use crate::admin::Gate;
use crate::api::{SlimChannel, Subscription};
use crate::metrics::NodeLabels;
use crate::plan::nodes::label_matcher;

/// The caches the controllers keep, handed to the context.
#[derive(Clone)]
pub struct Stores {
    pub subscriptions: Cache<Subscription>,
    pub channels: Cache<SlimChannel>,
    pub pods: Pods,
}

impl Stores {
    /// Empty caches (nothing watched feeds them): for tests of a reconcile.
    pub fn empty() -> Self {
        Self {
            subscriptions: Cache::new(kube::runtime::reflector::store().0),
            channels: Cache::new(kube::runtime::reflector::store().0),
            pods: Pods(Cache::new(kube::runtime::reflector::store().0)),
        }
    }
}

/// Every Pod in the cluster, from one watch shared by both controllers.
#[derive(Clone)]
pub struct Pods(pub Cache<Pod>);

impl Pods {
    /// The Pods in `namespace`.
    pub fn in_namespace(&self, namespace: &str) -> Vec<Arc<Pod>> {
        self.0.in_namespace(namespace)
    }

    /// The Pods in `namespace` whose labels `selector` matches.
    pub fn matching(&self, namespace: &str, selector: &LabelSelector) -> Vec<Arc<Pod>> {
        let matches = label_matcher(selector);
        let mut pods = self.0.in_namespace(namespace);
        pods.retain(|pod| matches(pod.metadata.labels.as_ref()));
        pods
    }
}

/// Trims a Pod to what the controllers read (labels, annotations, deletion, the containers' names
/// and ports, phase, IPs, restart counts), so that caching every Pod of a large cluster stays cheap.
pub fn keep_what_is_read(pod: &mut Pod) {
    use k8s_openapi::api::core::v1::{
        Container, ContainerState, ContainerStateRunning, ContainerStatus, PodSpec, PodStatus,
    };
    pod.metadata.managed_fields = None;
    if let Some(annotations) = pod.metadata.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    if let Some(spec) = pod.spec.take() {
        let containers = spec
            .containers
            .into_iter()
            .map(|c| Container { name: c.name, ports: c.ports, ..Default::default() })
            .collect();
        // Hostname and subdomain: a link's DNS name tells the node Pod at its far end.
        pod.spec =
            Some(PodSpec { containers, hostname: spec.hostname, subdomain: spec.subdomain, ..Default::default() });
    }
    if let Some(status) = pod.status.take() {
        let container_statuses = status.container_statuses.map(|statuses| {
            statuses
                .into_iter()
                .map(|c| {
                    // Whether it runs (a member's process), not since when nor how it ended.
                    let running = c.state.is_some_and(|s| s.running.is_some());
                    let state = running.then(|| ContainerState {
                        running: Some(ContainerStateRunning::default()),
                        ..Default::default()
                    });
                    ContainerStatus { name: c.name, restart_count: c.restart_count, state, ..Default::default() }
                })
                .collect()
        });
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            container_statuses,
            ..Default::default()
        });
    }
}

/// The leader's caches as the rest of the process sees them: whether each is synced and its
/// watch healthy (readiness), and the caches themselves once the controllers run (scrape-time
/// metrics). Cloning shares them.
#[derive(Clone)]
pub struct Caches {
    pub subscriptions: Arc<Gate>,
    pub channels: Arc<Gate>,
    pub pods: Arc<Gate>,
    stores: Arc<std::sync::RwLock<Option<Stores>>>,
}

const NOT_SYNCED: [&str; 3] = ["Subscription cache not synced", "SlimChannel cache not synced", "Pod cache not synced"];

impl Default for Caches {
    fn default() -> Self {
        Self {
            subscriptions: Gate::closed(NOT_SYNCED[0]),
            channels: Gate::closed(NOT_SYNCED[1]),
            pods: Gate::closed(NOT_SYNCED[2]),
            stores: Arc::default(),
        }
    }
}

impl Caches {
    /// `Ok` when every cache is synced, else why not.
    pub fn state(&self) -> Result<(), String> {
        crate::admin::all_gates(vec![self.subscriptions.clone(), self.channels.clone(), self.pods.clone()])()
    }

    /// The running controllers' caches.
    pub fn publish(&self, stores: Stores) {
        *self.stores.write().unwrap_or_else(|p| p.into_inner()) = Some(stores);
    }

    /// The controllers stopped (e.g. on losing the lease): nothing is synced, nothing to show.
    pub fn reset(&self) {
        for (gate, reason) in [&self.subscriptions, &self.channels, &self.pods].into_iter().zip(NOT_SYNCED) {
            gate.close(reason);
        }
        *self.stores.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn stores(&self) -> Option<Stores> {
        self.stores.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabels {
    pub namespace: String,
    pub channel: String,
}

/// One object's `Ready` condition, for alerts ("not Ready for 10 minutes").
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// The condition's reason (`ReconciliationPaused` lets alerts leave paused objects alone).
    pub reason: String,
}

/// `(1 if Ready=True, reason)` of a status's conditions; no condition yet: `(0, "")`.
fn ready_of(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> (i64, String) {
    conditions
        .iter()
        .find(|c| c.type_ == crate::api::condition::READY)
        .map_or((0, String::new()), |c| (i64::from(c.status == "True"), c.reason.clone()))
}

/// Gauges computed from the controllers' caches at scrape time: routes installed per node,
/// channel participants joined and desired.
#[derive(Clone)]
pub struct ResourceCollector {
    pub caches: Caches,
}

impl std::fmt::Debug for ResourceCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResourceCollector")
    }
}

impl Collector for ResourceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType::Gauge;
        let Some(stores) = self.caches.stores() else {
            return Ok(());
        };
        let mut routes: std::collections::BTreeMap<String, i64> = Default::default();
        for sub in stores.subscriptions.state() {
            for node in sub.status.iter().flat_map(|s| &s.nodes) {
                *routes.entry(node.endpoint.clone()).or_default() += i64::from(node.route_installed);
            }
        }
        let mut family =
            encoder.encode_descriptor("node_routes", "Subscription routes installed per SLIM node", None, Gauge)?;
        for (node, count) in routes {
            ConstGauge::new(count).encode(family.encode_family(&NodeLabels { node })?)?;
        }
        let channels = stores.channels.state();
        let label = |ch: &SlimChannel| ChannelLabels {
            namespace: ch.namespace().unwrap_or_default(),
            channel: ch.spec.name.clone(),
        };
        let mut joined = encoder.encode_descriptor(
            "channel_participants_joined",
            "Desired participants in the channel",
            None,
            Gauge,
        )?;
        for ch in &channels {
            let value = ch.status.as_ref().map_or(0, |s| i64::from(s.joined));
            ConstGauge::new(value).encode(joined.encode_family(&label(ch))?)?;
        }
        let mut desired = encoder.encode_descriptor(
            "channel_participants_desired",
            "Participants wanted in the channel",
            None,
            Gauge,
        )?;
        for ch in &channels {
            let value = ch.status.as_ref().map_or(0, |s| i64::from(s.desired));
            ConstGauge::new(value).encode(desired.encode_family(&label(ch))?)?;
        }
        let mut ready = encoder.encode_descriptor(
            "resource_ready",
            "1 while the object's Ready condition is True, by kind, object and the condition's reason",
            None,
            Gauge,
        )?;
        let subscriptions = stores.subscriptions.state();
        let objects =
            subscriptions
                .iter()
                .map(|s| ("Subscription", s.namespace(), s.name_any(), s.status.as_ref().map(|s| &s.conditions[..])))
                .chain(channels.iter().map(|c| {
                    ("SlimChannel", c.namespace(), c.name_any(), c.status.as_ref().map(|s| &s.conditions[..]))
                }));
        for (kind, namespace, name, conditions) in objects {
            let (value, reason) = ready_of(conditions.unwrap_or_default());
            let labels = ReadyLabels { kind, namespace: namespace.unwrap_or_default(), name, reason };
            ConstGauge::new(value).encode(ready.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_pod_keeps_what_targets_and_members_are_read_from() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "slim-0", "namespace": "ns", "labels": {"app.kubernetes.io/name": "slim"},
                         "annotations": {"slim.agntcy.org/name": "org/ns/bob", "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"containers": [{"name": "slim", "image": "slim:1", "args": ["--big"], "env": [{"name": "A", "value": "1"}],
                                     "ports": [{"name": "controller-0", "containerPort": 46358}]}],
                     "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "10.0.0.7", "podIPs": [{"ip": "10.0.0.7"}],
                       "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "slim", "image": "slim:1", "imageID": "x", "ready": true, "restartCount": 3,
                                              "state": {"running": {"startedAt": "2026-12-07T00:00:00Z"}}}]}
        }))
        .expect("pod");
        let targets_before = crate::plan::pod_targets(&[], [&pod]);
        let incarnation_before = crate::plan::channel::Incarnation::of(&pod);
        keep_what_is_read(&mut pod);
        assert_eq!(crate::plan::channel::Incarnation::of(&pod), incarnation_before, "same member process");
        assert!(incarnation_before.running);
        assert_eq!(crate::plan::pod_targets(&[], [&pod]), targets_before, "same node target");
        assert_eq!(pod.metadata.annotations.as_ref().map(|a| a.len()), Some(1), "the name annotation stays");
        assert!(pod.metadata.managed_fields.is_none());
        let spec = pod.spec.as_ref().expect("spec");
        assert!(spec.volumes.is_none() && spec.containers[0].args.is_none() && spec.containers[0].env.is_none());
        let status = pod.status.as_ref().expect("status");
        assert!(status.conditions.is_none());
        assert_eq!(status.container_statuses.as_ref().map(|c| c[0].restart_count), Some(3));
    }
}
