//! Prometheus metrics (OpenMetrics text on the admin server's `/metrics`).

use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::slim::NodePool;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub kind: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

/// Every metric the operator exports, registered under the `slim_operator` prefix.
pub struct Metrics {
    pub registry: Registry,
    reconciles: Family<OutcomeLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Family<KindLabels, Histogram>,
    drift_repairs: Family<NodeLabels, Counter>,
    webhook_reviews: Family<ResultLabels, Counter>,
    webhook_latency: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("slim_operator");
        let reconciles = Family::<OutcomeLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        let drift_repairs = Family::<NodeLabels, Counter>::default();
        registry.register("reconciles", "Reconciles by kind and result", reconciles.clone());
        registry.register("reconcile_failures", "Failed reconciles by kind and reason", failures.clone());
        registry.register("reconcile_duration_seconds", "Reconcile duration by kind", duration.clone());
        registry.register(
            "drift_repairs",
            "Routes or links found missing on a node and reinstalled",
            drift_repairs.clone(),
        );
        let webhook_reviews = Family::<ResultLabels, Counter>::default();
        let webhook_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "webhook_reviews",
            "AdmissionReviews answered, by result (injected, skipped, refused, invalid)",
            webhook_reviews.clone(),
        );
        registry.register(
            "webhook_review_duration_seconds",
            "Time to answer an AdmissionReview",
            webhook_latency.clone(),
        );
        Self { registry, reconciles, failures, duration, drift_repairs, webhook_reviews, webhook_latency }
    }

    pub fn webhook_review(&self, result: &'static str, elapsed: std::time::Duration) {
        self.webhook_reviews.get_or_create(&ResultLabels { result }).inc();
        self.webhook_latency.observe(elapsed.as_secs_f64());
    }

    /// Registers a scrape-time collector (node client counters, per-node route gauges).
    pub fn register_collector(&mut self, collector: impl Collector) {
        self.registry.register_collector(Box::new(collector));
    }

    /// Starts timing a reconcile; the observation is recorded when the guard drops.
    pub fn reconcile_timer(&self, kind: &'static str) -> ReconcileTimer<'_> {
        ReconcileTimer { metrics: self, kind, start: Instant::now() }
    }

    pub fn reconciled(&self, kind: &'static str, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reconciles.get_or_create(&OutcomeLabels { kind, result }).inc();
    }

    pub fn failed(&self, kind: &'static str, reason: &'static str) {
        self.failures.get_or_create(&FailureLabels { kind, reason }).inc();
    }

    pub fn drift_repaired(&self, node: &str) {
        self.drift_repairs.get_or_create(&NodeLabels { node: node.to_owned() }).inc();
    }

    /// The registry as OpenMetrics text.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        let seconds = self.start.elapsed().as_secs_f64();
        self.metrics.duration.get_or_create(&KindLabels { kind: self.kind }).observe(seconds);
    }
}

/// Counters of the SLIM node clients, read at scrape time.
#[derive(Clone)]
pub struct NodeClientCollector {
    pub pool: NodePool,
}

impl std::fmt::Debug for NodeClientCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeClientCollector")
    }
}

impl Collector for NodeClientCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let clients = self.pool.clients();
        type Read = fn(&crate::slim::node::NodeStats) -> u64;
        let counters: [(&str, &str, Read); 4] = [
            ("node_commands", "ConfigurationCommands sent to SLIM nodes", |s| s.writes.load(Relaxed)),
            ("node_messages", "Control messages sent to SLIM nodes", |s| s.rpcs.load(Relaxed)),
            ("node_route_items", "Route items (set + delete) sent to SLIM nodes", |s| s.route_items.load(Relaxed)),
            ("node_connects", "Control stream (re)connections to SLIM nodes", |s| s.connects.load(Relaxed)),
        ];
        for (name, help, read) in counters {
            let mut family =
                encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
            for client in &clients {
                let labels = NodeLabels { node: client.endpoint().to_owned() };
                ConstCounter::new(read(client.stats())).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabels {
    pub namespace: String,
    pub channel: String,
}

/// Gauges computed from the controllers' caches at scrape time: routes installed per node,
/// channel participants joined and desired.
#[derive(Clone)]
pub struct ResourceCollector {
    pub stores: crate::controller::StoreSlot,
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
        let label = |ch: &crate::api::SlimChannel| ChannelLabels {
            namespace: ch.metadata.namespace.clone().unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_recorded_values() {
        let metrics = Metrics::new();
        metrics.reconciled("Subscription", true);
        metrics.failed("Subscription", "NodeUnreachable");
        metrics.drift_repaired("http://n:1");
        drop(metrics.reconcile_timer("Subscription"));
        let text = metrics.encode().expect("encode");
        assert!(text.contains("slim_operator_reconciles_total{kind=\"Subscription\",result=\"success\"} 1"), "{text}");
        assert!(
            text.contains("slim_operator_reconcile_failures_total{kind=\"Subscription\",reason=\"NodeUnreachable\"} 1")
        );
        assert!(text.contains("slim_operator_drift_repairs_total{node=\"http://n:1\"} 1"));
        assert!(text.contains("slim_operator_reconcile_duration_seconds_count{kind=\"Subscription\"} 1"));
    }
}
