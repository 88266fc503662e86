//! Prometheus metrics (OpenMetrics text on the admin server's `/metrics`). Depends on nothing else
//! in the crate: the scrape-time collectors live next to what they read (`slim::pool`,
//! `controller::stores`).

use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ManagerLabels {
    pub manager: String,
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
    issuer_svids: Family<OutcomeLabels, Counter>,
    issuer_refusals: Family<FailureLabels, Counter>,
    issuer_latency: Family<KindLabels, Histogram>,
    issuer_review_latency: Histogram,
    certificates: Family<CertificateLabels, Gauge>,
    leader: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// `webhook` (the serving certificate, also the issuer's) or `issuer-ca` (the signing CA).
    pub certificate: &'static str,
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
        let issuer_svids = Family::<OutcomeLabels, Counter>::default();
        let issuer_refusals = Family::<FailureLabels, Counter>::default();
        let issuer_latency = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let issuer_review_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register("issuer_requests", "SVID requests by kind (x509, jwt) and result", issuer_svids.clone());
        registry.register("issuer_refusals", "SVID requests refused, by kind and reason", issuer_refusals.clone());
        registry.register("issuer_duration_seconds", "Time to answer an SVID request, by kind", issuer_latency.clone());
        registry.register(
            "issuer_token_review_duration_seconds",
            "Time the API server took to review a token (TokenReview and the pod read)",
            issuer_review_latency.clone(),
        );
        let certificates = Family::<CertificateLabels, Gauge>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the certificate the operator serves or signs with expires (Unix seconds)",
            certificates.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica holds the leader Lease (reconciles), else 0", leader.clone());
        Self {
            registry,
            certificates,
            leader,
            reconciles,
            failures,
            duration,
            drift_repairs,
            webhook_reviews,
            webhook_latency,
            issuer_svids,
            issuer_refusals,
            issuer_latency,
            issuer_review_latency,
        }
    }

    /// One SVID request answered: issued (`refused: None`) or refused with its reason.
    pub fn issuer_outcome(&self, kind: &'static str, refused: Option<&'static str>, elapsed: std::time::Duration) {
        let result = if refused.is_some() { "refused" } else { "issued" };
        self.issuer_svids.get_or_create(&OutcomeLabels { kind, result }).inc();
        if let Some(reason) = refused {
            self.issuer_refusals.get_or_create(&FailureLabels { kind, reason }).inc();
        }
        self.issuer_latency.get_or_create(&KindLabels { kind }).observe(elapsed.as_secs_f64());
    }

    pub fn certificate_expires(&self, certificate: &'static str, not_after: i64) {
        self.certificates.get_or_create(&CertificateLabels { certificate }).set(not_after);
    }

    pub fn leading(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    pub fn issuer_review(&self, elapsed: std::time::Duration) {
        self.issuer_review_latency.observe(elapsed.as_secs_f64());
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
