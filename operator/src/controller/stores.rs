//! The caches the controllers keep (one per kind, one shared Pod cache), and the scrape-time
//! gauges computed from them.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use crate::api::{SlimChannel, Subscription};
use crate::metrics::NodeLabels;
use crate::plan::selector_matches;

/// The caches the controllers keep, handed to the context.
#[derive(Clone)]
pub struct Stores {
    pub subscriptions: Store<Subscription>,
    pub channels: Store<SlimChannel>,
    pub pods: Pods,
}

/// Every Pod in the cluster, from one watch shared by both controllers.
#[derive(Clone)]
pub struct Pods(pub Store<Pod>);

impl Pods {
    /// The Pods in `namespace` whose labels `selector` matches.
    pub fn matching(&self, namespace: &str, selector: &LabelSelector) -> Vec<Arc<Pod>> {
        self.0
            .state()
            .into_iter()
            .filter(|pod| pod.metadata.namespace.as_deref() == Some(namespace))
            .filter(|pod| selector_matches(selector, pod.metadata.labels.as_ref()))
            .collect()
    }
}

/// Where the running controllers publish their caches (for scrape-time metrics).
pub type StoreSlot = Arc<std::sync::RwLock<Option<Stores>>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabels {
    pub namespace: String,
    pub channel: String,
}

/// Gauges computed from the controllers' caches at scrape time: routes installed per node,
/// channel participants joined and desired.
#[derive(Clone)]
pub struct ResourceCollector {
    pub stores: StoreSlot,
}

impl std::fmt::Debug for ResourceCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResourceCollector")
    }
}

impl Collector for ResourceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType::Gauge;
        let Some(stores) = self.stores.read().unwrap_or_else(|p| p.into_inner()).clone() else {
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
        Ok(())
    }
}
