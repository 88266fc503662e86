//! The operator's SLIM clients (node controller APIs, channel managers), one per endpoint and TLS
//! setting, shared by every reconcile, dropped once idle; and the metrics read from them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::sync::broadcast;

use super::channel_manager::ChannelManagerPool;
use super::model::NodeEvent;
use super::node::{NodeClient, NodeClientConfig};
use crate::metrics::NodeLabels;
use crate::tls::control::TlsSource;

/// Clients idle for this long are dropped (their node left every Subscription, their manager
/// every SlimChannel).
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Clients by endpoint and TLS source (0: plain): objects that name one endpoint with different
/// TLS settings get different clients, and a wrong setting in one never breaks another's. Clones
/// share the clients.
pub struct ClientPool<C> {
    clients: Arc<Mutex<HashMap<PoolKey, (C, Instant)>>>,
}

/// An endpoint and the id of its TLS source (0: plain).
type PoolKey = (String, u64);

impl<C> Clone for ClientPool<C> {
    fn clone(&self) -> Self {
        Self { clients: self.clients.clone() }
    }
}

impl<C> Default for ClientPool<C> {
    fn default() -> Self {
        Self { clients: Arc::default() }
    }
}

impl<C: Clone> ClientPool<C> {
    /// The client of `endpoint` with `tls`, made by `make` on first use; clients unused for
    /// [`IDLE_TIMEOUT`] are dropped meanwhile.
    pub fn get<E>(&self, endpoint: &str, tls: Option<&TlsSource>, make: impl FnOnce() -> Result<C, E>) -> Result<C, E> {
        let key = (endpoint.to_owned(), tls.map_or(0, TlsSource::id));
        let mut clients = self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        clients.retain(|k, (_, used)| *k == key || now.duration_since(*used) < IDLE_TIMEOUT);
        let entry = match clients.entry(key) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => entry.insert((make()?, now)),
        };
        entry.1 = now;
        Ok(entry.0.clone())
    }

    /// Every client held, for metrics and benchmarks.
    pub fn clients(&self) -> Vec<C> {
        let clients = self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        clients.values().map(|(client, _)| client.clone()).collect()
    }
}

/// The shared clients, and (in a view made by [`NodePool::with_tls`]) the TLS of some endpoints.
#[derive(Clone)]
pub struct NodePool {
    inner: Arc<Inner>,
    tls: Arc<HashMap<String, TlsSource>>,
}

struct Inner {
    config: NodeClientConfig,
    nodes: ClientPool<NodeClient>,
    events: broadcast::Sender<NodeEvent>,
}

impl NodePool {
    pub fn new(config: NodeClientConfig) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self { inner: Arc::new(Inner { config, nodes: ClientPool::default(), events }), tls: Arc::default() }
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
        let tls = self.tls.get(endpoint);
        let made = self.inner.nodes.get(endpoint, tls, || {
            let (config, events) = (self.inner.config.clone(), self.inner.events.clone());
            Ok::<_, std::convert::Infallible>(NodeClient::spawn_with_tls(endpoint, config, events, tls.cloned()))
        });
        match made {
            Ok(client) => client,
            Err(never) => match never {},
        }
    }

    /// Every client currently held, for metrics and benchmarks.
    pub fn clients(&self) -> Vec<NodeClient> {
        self.inner.nodes.clients()
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

/// Counters of the SLIM clients (nodes and channel managers), read at scrape time.
#[derive(Clone)]
pub struct ClientCollector {
    pub nodes: NodePool,
    pub channel_managers: ChannelManagerPool,
}

impl std::fmt::Debug for ClientCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientCollector")
    }
}

impl Collector for ClientCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_nodes(&mut encoder)?;
        self.encode_channel_managers(&mut encoder)
    }
}

impl ClientCollector {
    fn encode_nodes(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let clients = self.nodes.clients();
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

    /// `channel_manager_calls_total{manager}`.
    fn encode_channel_managers(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut family = encoder.encode_descriptor(
            "channel_manager_calls",
            "RPCs sent to SLIM channel managers",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        // One series per manager, summed over its clients (one per TLS setting).
        let mut calls: std::collections::BTreeMap<String, u64> = Default::default();
        for client in self.channel_managers.clients() {
            *calls.entry(client.endpoint().to_owned()).or_default() += client.stats().calls.load(Relaxed);
        }
        for (manager, count) in calls {
            let labels = crate::metrics::ManagerLabels { manager };
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::Metrics;
    use crate::tls::control::{ServerTrust, TlsMaterial};

    #[test]
    fn a_client_is_made_once_per_endpoint_and_tls_and_failures_are_not_kept() {
        let pool: ClientPool<u32> = ClientPool::default();
        let made = std::cell::Cell::new(0);
        let make = || {
            made.set(made.get() + 1);
            Ok::<_, ()>(made.get())
        };
        assert_eq!(pool.get("http://a:1", None, make), Ok(1));
        assert_eq!(pool.get("http://a:1", None, make), Ok(1), "reused");
        assert_eq!(pool.get("http://b:1", None, make), Ok(2));
        assert_eq!(pool.get("http://c:1", None, || Err::<u32, _>(())), Err(()));
        assert_eq!(pool.clients().len(), 2, "a failed make leaves nothing behind");
    }

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
        metrics.register_collector(ClientCollector { nodes: pool.clone(), channel_managers: Default::default() });
        let text = metrics.encode().expect("encode");
        let series = text.lines().filter(|l| l.starts_with("slim_operator_node_connects_total{")).count();
        assert_eq!(series, 1, "{text}");
    }
}
