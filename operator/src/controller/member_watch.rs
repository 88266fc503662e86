//! Noticing channel members that restarted, at a cost that does not grow with the number of
//! channels: every period, one route-list read per consulted node, shared by all channels; a
//! channel whose members' live instances changed since its last reconcile is reconciled at once.
//!
//! Polling, because the node pushes nothing: measured on SLIM 3.4.6, a client of the node's
//! controller server gets no unsolicited message while apps connect, leave and come back
//! (`tests/tests/control_stream_pushes.rs`). The route list is also what the channel's reconcile
//! already reads (a listing younger than half a period is shared with it).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;

use crate::api::SlimChannel;
use crate::plan::channel::{LiveInstances, live_instances};
use crate::slim::{NodePool, Observed};

/// A node as read: its endpoint and the TLS source of the client (0: plain).
type NodeKey = (String, u64);

/// What a channel's last reconcile saw, and the clients (with the channel's TLS) it used.
#[derive(Clone)]
struct Watched {
    endpoints: Vec<String>,
    pool: NodePool,
    participants: BTreeSet<String>,
    live: LiveInstances,
}

impl Watched {
    fn keys(&self) -> impl Iterator<Item = NodeKey> + '_ {
        self.endpoints.iter().map(|e| (e.clone(), self.pool.tls_id(e)))
    }
}

/// The channels whose members are watched, and what their last reconcile saw.
#[derive(Default)]
pub struct MemberWatch {
    channels: Mutex<HashMap<ObjectRef<SlimChannel>, Watched>>,
}

impl MemberWatch {
    /// Records what a reconcile of `channel` saw on `endpoints`, read through `pool`.
    pub fn record(
        &self,
        channel: ObjectRef<SlimChannel>,
        endpoints: Vec<String>,
        pool: NodePool,
        participants: BTreeSet<String>,
        live: LiveInstances,
    ) {
        self.lock().insert(channel, Watched { endpoints, pool, participants, live });
    }

    /// Stops watching `channel` (deleted, or no node to consult).
    pub fn forget(&self, channel: &ObjectRef<SlimChannel>) {
        self.lock().remove(channel);
    }

    /// Every node some channel consults, with a client to read it.
    fn nodes(&self) -> HashMap<NodeKey, NodePool> {
        let channels = self.lock();
        channels.values().flat_map(|w| w.keys().map(|key| (key, w.pool.clone()))).collect()
    }

    /// The channels whose live members differ from what their last reconcile saw, given one
    /// listing per node (a node that could not be listed leaves its channels alone). The new view
    /// is kept, so a change triggers once.
    fn changed(&self, listed: &HashMap<NodeKey, Arc<Observed>>) -> Vec<ObjectRef<SlimChannel>> {
        let mut channels = self.lock();
        let mut changed = Vec::new();
        for (channel, watched) in channels.iter_mut() {
            let Some(observed) = watched.keys().map(|k| listed.get(&k).map(Arc::as_ref)).collect::<Option<Vec<_>>>()
            else {
                continue;
            };
            let live = live_instances(&watched.participants, observed);
            if live != watched.live {
                watched.live = live;
                changed.push(channel.clone());
            }
        }
        changed
    }

    /// Reads every consulted node each `period` and asks for the reconcile of each channel whose
    /// members changed. Runs until `trigger`'s receiver is gone.
    pub async fn run(&self, period: Duration, trigger: mpsc::UnboundedSender<ObjectRef<SlimChannel>>) {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            // A listing younger than half a period is reused (reconciles read the same nodes).
            let reads = self.nodes().into_iter().map(|(key, pool)| {
                let node = pool.node(&key.0);
                async move { (key, node.snapshot(period / 2).await) }
            });
            let listed: HashMap<NodeKey, Arc<Observed>> = futures::future::join_all(reads)
                .await
                .into_iter()
                .filter_map(|(key, listing)| listing.ok().map(|observed| (key, observed)))
                .collect();
            for channel in self.changed(&listed) {
                tracing::info!(channel = %channel.name, namespace = ?channel.namespace, "member instances changed; reconciling");
                if trigger.send(channel).is_err() {
                    return;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<SlimChannel>, Watched>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slim::SlimName;

    const OLD: &str = "0b3c5a8e-1111-4222-8333-944455556666";
    const NEW: &str = "d165bd17-d238-547c-ad69-4d19eb78171a";

    fn node_with(instances: &[&str]) -> Arc<Observed> {
        let mut observed = Observed::default();
        for name in instances {
            observed.names.insert(SlimName::parse(name).expect("name").key());
        }
        Arc::new(observed)
    }

    fn watch_bob_on(endpoint: &str, instance: &str) -> (MemberWatch, ObjectRef<SlimChannel>) {
        let watch = MemberWatch::default();
        let channel = ObjectRef::new("team").within("apps");
        let live = LiveInstances::from([("org/ns/bob".to_owned(), BTreeSet::from([instance.to_owned()]))]);
        let bob = BTreeSet::from(["org/ns/bob".to_owned()]);
        watch.record(channel.clone(), vec![endpoint.to_owned()], NodePool::default(), bob, live);
        (watch, channel)
    }

    #[test]
    fn a_new_instance_triggers_its_channel_once() {
        let (watch, channel) = watch_bob_on("http://n:1", OLD);
        let same = HashMap::from([(("http://n:1".to_owned(), 0), node_with(&[&format!("org/ns/bob/{OLD}")]))]);
        assert!(watch.changed(&same).is_empty(), "nothing changed");
        let restarted = HashMap::from([(("http://n:1".to_owned(), 0), node_with(&[&format!("org/ns/bob/{NEW}")]))]);
        assert_eq!(watch.changed(&restarted), vec![channel.clone()]);
        assert!(watch.changed(&restarted).is_empty(), "the same change triggers once");
        let gone = HashMap::from([(("http://n:1".to_owned(), 0), node_with(&[]))]);
        assert_eq!(watch.changed(&gone), vec![channel], "a member going offline is news too");
    }

    #[test]
    fn an_unlisted_node_leaves_its_channels_alone_and_forget_stops_watching() {
        let (watch, channel) = watch_bob_on("http://n:1", OLD);
        assert!(watch.changed(&HashMap::new()).is_empty(), "a node that did not answer proves nothing");
        assert_eq!(watch.nodes().into_keys().collect::<Vec<_>>(), vec![("http://n:1".to_owned(), 0)]);
        watch.forget(&channel);
        assert!(watch.nodes().is_empty());
    }
}
