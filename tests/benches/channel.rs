//! Benchmark: reconcile a channel of 50 participants, some offline, on the real channel manager.
//!
//!   cargo bench -p slim-e2e --bench channel [-- --online 40 --offline 10]
//!
//! Prints the time until every online participant is in the channel (the offline ones must not
//! hold them up), the syncs and RPCs it took, and what an offline participant costs.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use slim_e2e::{ChannelManager, SlimApp, SlimNode};
use slim_operator::engine::{ChannelEngine, ChannelReport, ChannelSync};
use slim_operator::plan::channel::live_instances;
use slim_operator::slim::{ChannelManagerClient, NodePool};
use tokio::sync::Notify;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let online = arg("--online", 40);
    let offline = arg("--offline", 10);
    let node = SlimNode::start("bench-node").expect("node");
    let cm = ChannelManager::start(&node).expect("channel manager");
    println!("participants: {online} online + {offline} offline, 1 real SLIM node, real channel manager 3.4.6");

    let started = Instant::now();
    let mut apps = Vec::new();
    for i in 0..online {
        apps.push(SlimApp::member(&node, &format!("org/bench/member-{i}")).expect("member"));
    }
    println!("started {online} member apps in {:.1} s (not measured below)", started.elapsed().as_secs_f64());

    let desired: BTreeSet<String> = (0..online)
        .map(|i| format!("org/bench/member-{i}"))
        .chain((0..offline).map(|i| format!("org/bench/offline-{i}")))
        .collect();
    let manager = ChannelManagerClient::new(&cm.endpoint()).expect("client");
    let engine = ChannelEngine::default();
    let pool = NodePool::default();
    let done = Arc::new(Notify::new());
    let node_client = pool.node(&node.controller_endpoint());
    node_client.snapshot(Duration::ZERO).await.expect("node reachable");

    let start = Instant::now();
    let (calls_before, messages_before) = (manager.stats().calls.load(Relaxed), node_client.stats().rpcs.load(Relaxed));
    let mut syncs = 0;
    let mut report = ChannelReport::default();
    let joined = |r: &ChannelReport| r.members.iter().filter(|m| m.joined).count();
    while start.elapsed() < Duration::from_secs(120) {
        let observed = node_client.snapshot(Duration::from_secs(2)).await.expect("listing");
        let live = live_instances(&desired, [observed.as_ref()]);
        let notify = done.clone();
        report = engine
            .sync(ChannelSync {
                manager: &manager,
                channel: "org/bench/channel",
                mls_enabled: true,
                desired: &desired,
                managed_before: &desired,
                live: Some(&live),
                on_done: Arc::new(move || notify.notify_one()),
            })
            .await
            .expect("sync");
        syncs += 1;
        if joined(&report) == online {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), done.notified()).await;
    }
    let elapsed = start.elapsed();
    let calls = manager.stats().calls.load(Relaxed) - calls_before;
    let messages = node_client.stats().rpcs.load(Relaxed) - messages_before;
    println!(
        "time to Ready for the online participants: {:>8.1} ms  ({} of {online} joined)",
        elapsed.as_secs_f64() * 1e3,
        joined(&report)
    );
    println!("  syncs: {syncs}, channel manager RPCs: {calls}, node control messages: {messages}");
    let offline_members: Vec<_> = report.members.iter().filter(|m| m.name.contains("offline")).collect();
    let waiting = offline_members.iter().filter(|m| m.message.as_deref().unwrap_or("").starts_with("offline")).count();
    println!(
        "  offline participants reported offline (not invited, so nobody waits ~11 s for them): {waiting} of {offline}"
    );
    assert_eq!(joined(&report), online, "every online participant joined");
}
