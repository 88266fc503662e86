//! The channel engine against the real SLIM channel manager on a real node, with real SLIM apps
//! as participants: they get invited, exchange a message, leave when removed, are re-invited
//! after a restart, are handed over to their successor while leaving, and an offline participant
//! does not hold up the others.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use slim_e2e::{ChannelManager, SlimApp, SlimNode, init_logging};
use slim_operator::engine::{ChannelEngine, ChannelReport, ChannelSync};
use slim_operator::plan::channel::{LiveInstances, live_instances};
use slim_operator::slim::{ChannelManagerClient, NodePool};
use tokio::sync::Notify;

const CHANNEL: &str = "org/ns/team-chat";

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|n| n.to_string()).collect()
}

/// Live instances of `desired` on `node`, as the controller reads them.
async fn live(pool: &NodePool, node: &SlimNode, desired: &BTreeSet<String>) -> LiveInstances {
    let observed = pool.node(&node.controller_endpoint()).snapshot(Duration::ZERO).await.expect("node listing");
    live_instances(desired, [observed.as_ref()], None)
}

struct Harness {
    engine: ChannelEngine,
    manager: ChannelManagerClient,
    pool: NodePool,
    done: Arc<Notify>,
    /// Consult the node for live instances (as with `spec.nodes`), or not.
    watch_nodes: bool,
    /// Names whose Pod is terminating.
    leaving: BTreeSet<String>,
}

impl Harness {
    /// A fresh engine on `cm`, consulting the node, no Pod terminating.
    fn new(cm: &ChannelManager) -> Self {
        Self {
            engine: ChannelEngine::default(),
            manager: ChannelManagerClient::new(&cm.endpoint()).expect("client"),
            pool: NodePool::default(),
            done: Arc::new(Notify::new()),
            watch_nodes: true,
            leaving: BTreeSet::new(),
        }
    }

    /// Syncs until `until` holds, waking on finished operations (as the controller does).
    async fn converge(
        &self,
        node: &SlimNode,
        desired: &BTreeSet<String>,
        managed_before: &BTreeSet<String>,
        timeout: Duration,
        until: impl Fn(&ChannelReport) -> bool,
    ) -> ChannelReport {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        while tokio::time::Instant::now() < deadline {
            let live = if self.watch_nodes { Some(live(&self.pool, node, desired).await) } else { None };
            let done = self.done.clone();
            let report = self
                .engine
                .sync(ChannelSync {
                    manager: &self.manager,
                    channel: CHANNEL,
                    mls_enabled: true,
                    desired,
                    managed_before,
                    live: live.as_ref(),
                    leaving: &self.leaving,
                    incarnations: &Default::default(),
                    on_done: Arc::new(move || done.notify_one()),
                })
                .await
                .expect("sync");
            if until(&report) {
                return report;
            }
            last = Some(report);
            let _ = tokio::time::timeout(Duration::from_millis(500), self.done.notified()).await;
        }
        panic!("did not converge: {last:?}");
    }
}

fn joined(report: &ChannelReport, name: &str) -> bool {
    report.members.iter().any(|m| m.name == name && m.joined)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_lifecycle_with_real_participants() {
    init_logging();
    let node = SlimNode::start("node-a").expect("node");
    let cm = ChannelManager::start(&node).expect("channel manager");
    let h = Harness::new(&cm);
    let mut bob = SlimApp::member(&node, "org/ns/bob").expect("bob");
    let mut carol = SlimApp::member(&node, "org/ns/carol").expect("carol");

    // Created, both invited and in.
    let both = names(&["org/ns/bob", "org/ns/carol"]);
    let first = h.converge(&node, &both, &names(&[]), Duration::from_secs(60), |_| true).await;
    assert!(first.created, "the channel was missing and is created");
    let report = h
        .converge(&node, &both, &both, Duration::from_secs(60), |r| {
            joined(r, "org/ns/bob") && joined(r, "org/ns/carol")
        })
        .await;
    assert!(!report.busy);
    assert!(h.manager.list_channels().await.expect("channels").contains(&CHANNEL.to_string()));

    // A message published by one member reaches the other.
    bob.wait_for("joined", Duration::from_secs(10)).expect("bob got the invite");
    carol.wait_for("joined", Duration::from_secs(10)).expect("carol got the invite");
    bob.publish("hello team").expect("publish");
    carol.wait_for("received hello team", Duration::from_secs(15)).expect("carol received bob's message");

    // Carol is no longer desired: she is removed and her session ends.
    let only_bob = names(&["org/ns/bob"]);
    h.converge(&node, &only_bob, &both, Duration::from_secs(60), |r| r.leaving.is_empty() && !r.busy).await;
    let listed = h.manager.list_participants(CHANNEL).await.expect("list");
    assert!(listed.iter().all(|m| !m.starts_with("org/ns/carol/")), "{listed:?}");
    carol.wait_for("closed", Duration::from_secs(10)).expect("carol's session closed");

    // Bob restarts (a new instance): the dead one is replaced and the new one joins.
    let old_instance = bob.instance.clone();
    drop(bob);
    let mut bob = SlimApp::member(&node, "org/ns/bob").expect("bob again");
    assert_ne!(bob.instance, old_instance);
    let report = h
        .converge(&node, &only_bob, &only_bob, Duration::from_secs(90), |r| {
            r.members.iter().any(|m| m.joined && m.instance.as_deref().is_some_and(|i| i.ends_with(&bob.instance)))
        })
        .await;
    assert!(joined(&report, "org/ns/bob"));
    bob.wait_for("joined", Duration::from_secs(10)).expect("the new bob got the invite");

    // Delete: the channel is gone.
    h.engine.delete(&h.manager, CHANNEL).await.expect("delete");
    assert!(!h.manager.list_channels().await.expect("channels").contains(&CHANNEL.to_string()));
    h.engine.delete(&h.manager, CHANNEL).await.expect("deleting again is done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_participant_does_not_delay_the_others() {
    init_logging();
    let node = SlimNode::start("node-a").expect("node");
    let cm = ChannelManager::start(&node).expect("channel manager");
    let mut h = Harness::new(&cm);
    let _erin = SlimApp::member(&node, "org/ns/erin").expect("erin");
    let desired = names(&["org/ns/dave", "org/ns/erin"]);

    // Nodes known: dave (offline) is not invited, so erin joins at once.
    let start = tokio::time::Instant::now();
    let report = h.converge(&node, &desired, &desired, Duration::from_secs(30), |r| joined(r, "org/ns/erin")).await;
    let erin_in = start.elapsed();
    assert!(erin_in < Duration::from_secs(8), "erin joined after {erin_in:?}: held up by dave's ~11 s invite?");
    let dave = report.members.iter().find(|m| m.name == "org/ns/dave").expect("dave");
    assert!(!dave.joined);
    assert!(dave.message.as_deref().unwrap_or("").starts_with("offline"), "{dave:?}");

    // Dave connects: he is invited and joins.
    let mut dave_app = SlimApp::member(&node, "org/ns/dave").expect("dave");
    h.converge(&node, &desired, &desired, Duration::from_secs(30), |r| joined(r, "org/ns/dave")).await;
    dave_app.wait_for("joined", Duration::from_secs(10)).expect("dave got the invite");

    // Without node information (no spec.nodes) an offline participant's invite fails after ~11 s;
    // it stays out with the reason and is retried with backoff.
    h.watch_nodes = false;
    let with_frank = names(&["org/ns/dave", "org/ns/erin", "org/ns/frank"]);
    let report = h
        .converge(&node, &with_frank, &with_frank, Duration::from_secs(40), |r| {
            r.members.iter().any(|m| m.name == "org/ns/frank" && m.message.as_deref().unwrap_or("").contains("failed"))
        })
        .await;
    assert!(report.retry_in.is_some(), "failed invites are retried with backoff");
    assert!(joined(&report, "org/ns/erin") && joined(&report, "org/ns/dave"));
}

/// A member whose Pod terminates while its successor is connected: the leaving instance is removed
/// while it still answers (no ~11 s removal of a dead instance), the successor is invited once the
/// leaving one has disconnected (the manager invites a name, which the node may deliver to any
/// connected instance), and it joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_member_is_handed_over_to_its_successor() {
    init_logging();
    let node = SlimNode::start("node-a").expect("node");
    let cm = ChannelManager::start(&node).expect("channel manager");
    let mut h = Harness::new(&cm);
    let bob = names(&["org/ns/bob"]);
    let mut old = SlimApp::member(&node, "org/ns/bob").expect("bob");
    h.converge(&node, &bob, &bob, Duration::from_secs(60), |r| joined(r, "org/ns/bob")).await;
    old.wait_for("joined", Duration::from_secs(10)).expect("bob got the invite");

    // The successor connects, then the old Pod terminates: the old instance is removed while alive.
    let mut new = SlimApp::member(&node, "org/ns/bob").expect("bob's successor");
    h.leaving = bob.clone();
    let start = tokio::time::Instant::now();
    let report = h
        .converge(&node, &bob, &bob, Duration::from_secs(30), |r| {
            r.members.iter().any(|m| m.message.as_deref().unwrap_or("").starts_with("handing over: invited once"))
        })
        .await;
    let removed = start.elapsed();
    assert!(removed < Duration::from_secs(5), "a live instance's removal took {removed:?}");
    old.wait_for("closed", Duration::from_secs(10)).expect("the leaving instance was told");
    let listed = h.manager.list_participants(CHANNEL).await.expect("list");
    assert!(listed.iter().all(|m| !m.starts_with("org/ns/bob/")), "{listed:?}");
    // Held while the leaving instance is still connected.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report_again = h.converge(&node, &bob, &bob, Duration::from_secs(5), |_| true).await;
    assert_eq!(report_again.members, report.members, "no invite while the leaving instance is connected");

    // It exits: its successor is invited and joins.
    let exited = tokio::time::Instant::now();
    drop(old);
    h.converge(&node, &bob, &bob, Duration::from_secs(30), |r| {
        r.members.iter().any(|m| m.joined && m.instance.as_deref().is_some_and(|i| i.ends_with(&new.instance)))
    })
    .await;
    let joined_after = exited.elapsed();
    new.wait_for("joined", Duration::from_secs(10)).expect("the successor got the invite");
    assert!(joined_after < Duration::from_secs(5), "the successor joined {joined_after:?} after the old one exited");
    println!("hand-over: leaving instance removed in {removed:?}, successor joined {joined_after:?} after it exited");
}

/// The 3.4.6 manager takes participant names as `org/ns/name` only: an instance cannot be
/// invited by its full name (so a restarted member's successor cannot be invited while the dead
/// instance is still being removed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_are_invited_by_name_not_by_instance() {
    init_logging();
    let node = SlimNode::start("node-a").expect("node");
    let cm = ChannelManager::start(&node).expect("channel manager");
    let manager = ChannelManagerClient::new(&cm.endpoint()).expect("client");
    let bob = SlimApp::member(&node, "org/ns/bob").expect("bob");
    manager.create_channel(CHANNEL, false).await.expect("channel");
    let full_name = format!("org/ns/bob/{}", bob.instance);
    let refused = manager.add_participant(CHANNEL, &full_name).await.expect_err("an instance name is refused");
    assert!(refused.to_string().contains("invalid participant name"), "{refused}");
    manager.add_participant(CHANNEL, "org/ns/bob").await.expect("the name is invited");
}
