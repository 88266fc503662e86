//! Noticing live instances that come and go (channel members that restarted, instances a
//! Subscription routes), at a cost that does not grow with the number of objects: every period,
//! one route-list read per consulted node, shared by all of them; an object whose names' live
//! instances changed since its last reconcile is reconciled at once.
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

use crate::api::{SlimChannel, Subscription};
use crate::plan::Borrowable;
use crate::plan::channel::{LiveInstances, live_instances};
use crate::slim::{NodePool, Observed, SlimName};

/// An object whose names' instances are watched.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Watcher {
    /// A channel's members, on the nodes it consults.
    Channel(ObjectRef<SlimChannel>),
    /// A Subscription's name, on the node at the far end of its link.
    Subscription(ObjectRef<Subscription>),
}

/// Where a change is announced: the reconcile triggers of both controllers.
#[derive(Clone)]
pub struct Triggers {
    pub channels: mpsc::UnboundedSender<ObjectRef<SlimChannel>>,
    pub subscriptions: mpsc::UnboundedSender<ObjectRef<Subscription>>,
}

impl Triggers {
    fn send(&self, watcher: Watcher) -> bool {
        match watcher {
            Watcher::Channel(channel) => self.channels.send(channel).is_ok(),
            Watcher::Subscription(subscription) => self.subscriptions.send(subscription).is_ok(),
        }
    }
}

/// A Subscription's far node, as its reconcile read it: where, through which clients, for which
/// name, and the Subscription's own link.
pub struct FarView<'a> {
    pub endpoint: &'a str,
    pub pool: NodePool,
    pub name: &'a SlimName,
    pub link_id: &'a str,
}

/// A node as read: its endpoint and the TLS source of the client (0: plain).
type NodeKey = (String, u64);

/// What an object's last reconcile saw, and the clients (with the object's TLS) it used.
#[derive(Clone)]
struct Watched {
    endpoints: Vec<String>,
    pool: NodePool,
    participants: BTreeSet<String>,
    /// Instances reached only back over this link are not counted (a Subscription's own link).
    except_link: Option<String>,
    live: LiveInstances,
    /// For a Subscription, the links the far node dials that its routes may go over instead of
    /// its own: one appearing or going changes its plan (`DesiredRoute::on_node`).
    dialed: Option<(Borrowable, BTreeSet<String>)>,
}

impl Watched {
    fn keys(&self) -> impl Iterator<Item = NodeKey> + '_ {
        self.endpoints.iter().map(|e| (e.clone(), self.pool.tls_id(e)))
    }
}

/// The objects whose names are watched, and what their last reconcile saw.
#[derive(Default)]
pub struct MemberWatch {
    channels: Mutex<HashMap<Watcher, Watched>>,
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
        let watched = Watched { endpoints, pool, participants, except_link: None, live, dialed: None };
        self.lock().insert(Watcher::Channel(channel), watched);
    }

    /// Records what a reconcile of `subscription` saw on its far node: the instances of its name
    /// the far node reaches other than over the Subscription's link, and the links it dials.
    pub fn record_subscription(
        &self,
        subscription: ObjectRef<Subscription>,
        far: FarView<'_>,
        instances: BTreeSet<String>,
        dialed: Option<(Borrowable, BTreeSet<String>)>,
    ) {
        let name = far.name.to_string();
        let watched = Watched {
            endpoints: vec![far.endpoint.to_owned()],
            pool: far.pool,
            participants: BTreeSet::from([name.clone()]),
            except_link: Some(far.link_id.to_owned()),
            live: LiveInstances::from([(name, instances)]),
            dialed,
        };
        self.lock().insert(Watcher::Subscription(subscription), watched);
    }

    /// Stops watching `channel` (deleted, or no node to consult).
    pub fn forget(&self, channel: &ObjectRef<SlimChannel>) {
        self.lock().remove(&Watcher::Channel(channel.clone()));
    }

    /// Stops watching `subscription` (deleted, or nothing to follow).
    pub fn forget_subscription(&self, subscription: &ObjectRef<Subscription>) {
        self.lock().remove(&Watcher::Subscription(subscription.clone()));
    }

    /// Every node some channel consults, with a client to read it.
    fn nodes(&self) -> HashMap<NodeKey, NodePool> {
        let channels = self.lock();
        channels.values().flat_map(|w| w.keys().map(|key| (key, w.pool.clone()))).collect()
    }

    /// The objects whose live instances differ from what their last reconcile saw, given one
    /// listing per node (a node that could not be listed leaves its objects alone). The new view
    /// is kept, so a change triggers once.
    fn changed(&self, listed: &HashMap<NodeKey, Arc<Observed>>) -> Vec<Watcher> {
        let mut channels = self.lock();
        let mut changed = Vec::new();
        for (channel, watched) in channels.iter_mut() {
            let Some(observed) = watched.keys().map(|k| listed.get(&k).map(Arc::as_ref)).collect::<Option<Vec<_>>>()
            else {
                continue;
            };
            let live = live_instances(&watched.participants, observed.iter().copied(), watched.except_link.as_deref());
            let dialed = watched.dialed.as_ref().map(|(borrowable, _)| {
                (borrowable.clone(), observed.iter().flat_map(|o| borrowable.dialed_by(o)).collect())
            });
            if live != watched.live || dialed != watched.dialed {
                watched.live = live;
                watched.dialed = dialed;
                changed.push(channel.clone());
            }
        }
        changed
    }

    /// Reads every consulted node each `period` and asks for the reconcile of each object whose
    /// instances changed. Runs until a trigger's receiver is gone.
    pub async fn run(&self, period: Duration, triggers: Triggers) {
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
            for watcher in self.changed(&listed) {
                tracing::info!(?watcher, "live instances changed; reconciling");
                if !triggers.send(watcher) {
                    return;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Watcher, Watched>> {
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
        assert_eq!(watch.changed(&restarted), vec![Watcher::Channel(channel.clone())]);
        assert!(watch.changed(&restarted).is_empty(), "the same change triggers once");
        let gone = HashMap::from([(("http://n:1".to_owned(), 0), node_with(&[]))]);
        assert_eq!(watch.changed(&gone), vec![Watcher::Channel(channel)], "a member going offline is news too");
    }

    #[test]
    fn a_subscription_is_triggered_by_its_far_nodes_instances_not_by_its_own_link() {
        let watch = MemberWatch::default();
        let sub = ObjectRef::new("bob").within("apps");
        let bob = SlimName::parse("org/ns/bob").expect("name");
        let old = BTreeSet::from([OLD.to_owned()]);
        let far = FarView { endpoint: "http://far:1", pool: NodePool::default(), name: &bob, link_id: "ours" };
        watch.record_subscription(sub.clone(), far, old, None);
        let listed = |observed: Arc<Observed>| HashMap::from([(("http://far:1".to_owned(), 0), observed)]);
        assert!(watch.changed(&listed(node_with(&[&format!("org/ns/bob/{OLD}")]))).is_empty());
        let mut looped = (*node_with(&[&format!("org/ns/bob/{OLD}"), &format!("org/ns/bob/{NEW}")])).clone();
        let new_key = SlimName::parse(&format!("org/ns/bob/{NEW}")).expect("name").key();
        looped.routes.insert((new_key, "ours".to_owned()));
        assert!(watch.changed(&listed(Arc::new(looped))).is_empty(), "reached back over our own link: not news");
        let restarted = listed(node_with(&[&format!("org/ns/bob/{NEW}")]));
        assert_eq!(watch.changed(&restarted), vec![Watcher::Subscription(sub.clone())]);
        watch.forget_subscription(&sub);
        assert!(watch.nodes().is_empty());
    }

    #[test]
    fn a_subscription_is_triggered_when_its_far_node_dials_another_link_or_drops_one() {
        let watch = MemberWatch::default();
        let sub = ObjectRef::new("bob").within("apps");
        let bob = SlimName::parse("org/ns/bob").expect("name");
        let link =
            crate::slim::LinkConfig { link_id: "l-z".into(), config_data: r#"{"connection_type":"remote"}"#.into() };
        let borrowable = Borrowable::of(&link).expect("a remote link");
        let dialed = Some((borrowable, BTreeSet::from(["l-b".to_owned()])));
        let far = FarView { endpoint: "http://far:1", pool: NodePool::default(), name: &bob, link_id: "ours" };
        watch.record_subscription(sub.clone(), far, BTreeSet::new(), dialed);
        let far = |links: &[&str]| {
            let observed = Observed {
                dialed: links.iter().map(|l| (l.to_string(), "remote".to_owned())).collect(),
                ..Default::default()
            };
            HashMap::from([(("http://far:1".to_owned(), 0), Arc::new(observed))])
        };
        assert!(watch.changed(&far(&["l-b"])).is_empty());
        assert_eq!(watch.changed(&far(&[])), vec![Watcher::Subscription(sub.clone())], "the borrowed link went");
        assert_eq!(watch.changed(&far(&["l-c"])), vec![Watcher::Subscription(sub)], "a link to borrow came");
        assert!(watch.changed(&far(&["l-c", "l-zz"])).is_empty(), "a link with a higher id than ours is not news");
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
