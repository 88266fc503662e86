//! The operator's node clients, one per controller endpoint, shared by every reconcile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::sync::broadcast;

use super::model::NodeEvent;
use super::node::{NodeClient, NodeClientConfig};
use super::tls::TlsSource;
use crate::metrics::NodeLabels;

/// Clients idle for this long are dropped (their node left every Subscription).
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The shared clients, and (in a view made by [`NodePool::with_tls`]) the TLS of some endpoints.
#[derive(Clone)]
pub struct NodePool {
    inner: Arc<Inner>,
    tls: Arc<HashMap<String, TlsSource>>,
}

struct Inner {
    config: NodeClientConfig,
    /// By endpoint and TLS source (0: plain): objects that name one node with different TLS
    /// settings get different clients, and a wrong setting in one never breaks another's.
    nodes: Mutex<HashMap<(String, u64), (NodeClient, Instant)>>,
    events: broadcast::Sender<NodeEvent>,
}

impl NodePool {
    pub fn new(config: NodeClientConfig) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self { inner: Arc::new(Inner { config, nodes: Mutex::new(HashMap::new()), events }), tls: Arc::default() }
    }

    /// Which TLS source this view uses for `endpoint` (0: plain text).
    pub fn tls_id(&self, endpoint: &str) -> u64 {
        self.tls.get(endpoint).map_or(0, TlsSource::id)
    }

    /// A view of the same clients that connects to the endpoints in `tls` with their TLS.
    pub fn with_tls(&self, tls: HashMap<String, TlsSource>) -> Self {
        Self { inner: self.inner.clone(), tls: Arc::new(tls) }
    }

    /// The client for `endpoint`, started on first use. Must be called inside a tokio runtime.
    pub fn node(&self, endpoint: &str) -> NodeClient {
        let tls = self.tls.get(endpoint).cloned();
        let key = (endpoint.to_owned(), tls.as_ref().map_or(0, TlsSource::id));
        let mut nodes = self.inner.nodes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        nodes.retain(|k, (_, used)| *k == key || now.duration_since(*used) < IDLE_TIMEOUT);
        let entry = nodes.entry(key).or_insert_with(|| {
            (NodeClient::spawn_with_tls(endpoint, self.inner.config.clone(), self.inner.events.clone(), tls), now)
        });
        entry.1 = now;
        entry.0.clone()
    }

    /// Every client currently held, for metrics and benchmarks.
    pub fn clients(&self) -> Vec<NodeClient> {
        let nodes = self.inner.nodes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        nodes.values().map(|(client, _)| client.clone()).collect()
    }

    /// Reconnect announcements (a node that restarted lost its routes).
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.inner.events.subscribe()
    }
}

impl Default for NodePool {
    fn default() -> Self {
        Self::new(NodeClientConfig::default())
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
        type Read = fn(&super::model::NodeStats) -> u64;
        let counters: [(&str, &str, Read); 4] = [
            ("node_commands", "ConfigurationCommands sent to SLIM nodes", |s| s.writes.load(Relaxed)),
            ("node_messages", "Control messages sent to SLIM nodes", |s| s.rpcs.load(Relaxed)),
            ("node_route_items", "Route items (set + delete) sent to SLIM nodes", |s| s.route_items.load(Relaxed)),
            ("node_connects", "Control stream (re)connections to SLIM nodes", |s| s.connects.load(Relaxed)),
        ];
        for (name, help, read) in counters {
            let mut family =
                encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
            // One series per node, summed over its clients (one per TLS setting).
            let mut totals: std::collections::BTreeMap<&str, u64> = Default::default();
            for client in &clients {
                *totals.entry(client.endpoint()).or_default() += read(client.stats());
            }
            for (node, total) in totals {
                ConstCounter::new(total).encode(family.encode_family(&NodeLabels { node: node.to_owned() })?)?;
            }
        }
        // Whether any client of the node has its control stream up (what "node unreachable" alerts on).
        let mut up: std::collections::BTreeMap<&str, i64> = Default::default();
        for client in &clients {
            let connected = i64::try_from(client.stats().connected.load(Relaxed)).unwrap_or(0);
            let entry = up.entry(client.endpoint()).or_default();
            *entry = (*entry).max(connected);
        }
        let mut family = encoder.encode_descriptor(
            "node_connected",
            "1 while the operator's control stream to the SLIM node is up, 0 while it is down",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (node, connected) in up {
            ConstGauge::new(connected).encode(family.encode_family(&NodeLabels { node: node.to_owned() })?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::Metrics;
    use crate::slim::tls::{ServerTrust, TlsMaterial};

    #[tokio::test]
    async fn one_node_with_two_tls_settings_is_two_clients_and_one_series() {
        let pool = NodePool::default();
        let material = TlsMaterial { trust: ServerTrust::SystemRoots, identity: None, server_name: None };
        let (_keep, rx) = tokio::sync::watch::channel(Arc::new(material));
        let endpoint = "https://127.0.0.1:9";
        let tls = pool.with_tls(HashMap::from([(endpoint.to_owned(), TlsSource::new(rx))]));
        let (plain, secure) = (pool.node(endpoint), tls.node(endpoint));
        assert!(!plain.is_same(&secure), "a client per TLS setting");
        assert!(tls.node(endpoint).is_same(&secure), "and the same client again for the same setting");
        let mut metrics = Metrics::new();
        metrics.register_collector(NodeClientCollector { pool: pool.clone() });
        let text = metrics.encode().expect("encode");
        let series = text.lines().filter(|l| l.starts_with("slim_operator_node_connects_total{")).count();
        assert_eq!(series, 1, "{text}");
    }
}
