//! The operator's node clients, one per controller endpoint, shared by every reconcile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use tokio::sync::broadcast;

use super::model::NodeEvent;
use super::node::{NodeClient, NodeClientConfig};
use super::tls::TlsSource;
use crate::metrics::NodeLabels;

/// Clients idle for this long are dropped (their node left every Subscription).
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone)]
pub struct NodePool {
    inner: Arc<Inner>,
}

struct Inner {
    config: NodeClientConfig,
    nodes: Mutex<HashMap<String, (NodeClient, Instant)>>,
    /// TLS for `https://` endpoints, as set by [`NodePool::use_tls`].
    tls: Mutex<HashMap<String, TlsSource>>,
    events: broadcast::Sender<NodeEvent>,
}

impl NodePool {
    pub fn new(config: NodeClientConfig) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            inner: Arc::new(Inner {
                config,
                nodes: Mutex::new(HashMap::new()),
                tls: Mutex::new(HashMap::new()),
                events,
            }),
        }
    }

    /// Connects to `endpoint` with `tls` from now on. The same source again changes nothing
    /// (its rotations reach the client by themselves); another one replaces the client.
    pub fn use_tls(&self, endpoint: &str, tls: TlsSource) {
        let mut sources = self.inner.tls.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if sources.get(endpoint).is_some_and(|current| current.same_channel(&tls)) {
            return;
        }
        sources.insert(endpoint.to_owned(), tls);
        drop(sources);
        self.inner.nodes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(endpoint);
    }

    /// The client for `endpoint`, started on first use. Must be called inside a tokio runtime.
    pub fn node(&self, endpoint: &str) -> NodeClient {
        let mut nodes = self.inner.nodes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        nodes.retain(|key, (_, used)| key == endpoint || now.duration_since(*used) < IDLE_TIMEOUT);
        let entry = nodes.entry(endpoint.to_owned()).or_insert_with(|| {
            let tls = self.inner.tls.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(endpoint).cloned();
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
            for client in &clients {
                let labels = NodeLabels { node: client.endpoint().to_owned() };
                ConstCounter::new(read(client.stats())).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
