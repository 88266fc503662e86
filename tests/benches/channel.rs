//! Benchmark: reconcile a channel of 50 participants, some offline, on the real channel manager.
//!
//!   cargo bench -p slim-e2e --bench channel [-- --online 40 --offline 10]
//!
//! Prints the time until every online participant is in the channel (the offline ones must not
//! hold them up), the syncs and RPCs it took, and what an offline participant costs.
//!
//!   cargo bench -p slim-e2e --bench channel -- --rejoin [--channels 20 --members 10 --restarts 10 --in-flight 32 --no-mls]
//!
//!   cargo bench -p slim-e2e --bench channel -- --handover [--channels 4 --members 5 --rolls 10 --linger-ms 1000]
//!
//! Members rolled as a Deployment rolls them: each member is a Pod picked by the channels'
//! `participantSelector`; a roll starts the new member (its Pod Running), then deletes the old Pod,
//! whose app goes on answering for `--linger-ms` (its termination) before it exits. Prints p50/p95
//! of the time from the new instance's connect, and from the old Pod's deletion, until the new
//! instance is in every channel. `--linger-ms 0` is an old app that dies the moment its Pod is
//! deleted (what a crash costs).
//!
//!   cargo bench -p slim-e2e --bench channel -- --handover --crash [--backoff-ms 1000] [--no-pod-signal]
//!
//! Members that crash in their Pod: a roll kills the member's app, reports its container
//! terminated (as the kubelet does), starts it again `--backoff-ms` later (the kubelet's restart
//! delay) and reports it running with one restart more. Prints p50/p95 of the time from the new
//! instance's connect, and from the crash, until it is in every channel. `--no-pod-signal` leaves
//! the Pod's status alone (a member the operator knows only by its instances).
//!
//! Restarted members: the controllers (default flags) on the real API server, `--channels`
//! SlimChannels of the same `--members` member apps spread over 2 real nodes (manager on node-a,
//! one peer link from node-b). Each restart kills one member and starts it again; prints p50/p95
//! of the time until it is back in every channel, and the control-plane cost per minute when
//! nothing changes (node control messages, channel manager RPCs).

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
    if std::env::args().any(|a| a == "--rejoin") {
        return rejoin().await;
    }
    if std::env::args().any(|a| a == "--handover") {
        return handover::run().await;
    }
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
        let live = live_instances(&desired, [observed.as_ref()], None);
        let notify = done.clone();
        report = engine
            .sync(ChannelSync {
                manager: &manager,
                channel: "org/bench/channel",
                mls_enabled: true,
                desired: &desired,
                managed_before: &desired,
                live: Some(&live),
                leaving: &BTreeSet::new(),
                incarnations: &Default::default(),
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

async fn rejoin() {
    use kube::api::{Api, PostParams};
    use serde_json::json;
    use slim_e2e::control_plane::{self, install_crds};
    use slim_operator::api::{SlimChannel, Subscription};
    use slim_operator::controller::ControllerConfig;
    use slim_operator::slim::ChannelManagerPool;

    let (channel_count, member_count, restarts) = (arg("--channels", 20), arg("--members", 10), arg("--restarts", 10));
    let plane = control_plane::shared();
    let client = plane.client().await.expect("admin client");
    install_crds(&client).await.expect("CRDs");
    let namespace = plane.namespace(&client, "rejoin").await.expect("namespace");
    let node_a = SlimNode::start("node-a").expect("node a");
    let node_b = SlimNode::start("node-b").expect("node b");
    let cm = ChannelManager::start(&node_a).expect("channel manager");
    println!(
        "{channel_count} channels x {member_count} members on 2 real nodes, real channel manager 3.4.6, controllers with default flags, {restarts} restarts"
    );
    let in_flight = arg("--in-flight", slim_operator::engine::channel::DEFAULT_IN_FLIGHT);
    let mls = !std::env::args().any(|a| a == "--no-mls");
    println!(
        "operations in flight at the manager: at most {in_flight} (0: unbounded); MLS {}",
        if mls { "on" } else { "off" }
    );
    let nodes = NodePool::default();
    let managers = ChannelManagerPool::default();
    let config = ControllerConfig {
        channel_manager: Some(cm.endpoint()),
        channel_manager_in_flight: in_flight,
        ..Default::default()
    };
    let (stop, controllers) =
        slim_e2e::operator::run_in_process(&client, nodes.clone(), managers.clone(), config, "bench");

    // Members alternate between the nodes; one peer link from node-b to node-a carries names both
    // ways (a Subscription per name on node-a the invites and the channels' traffic must reach).
    let name = |i: usize| format!("org/bench/member-{i}");
    let node_of = |i: usize| if i.is_multiple_of(2) { &node_a } else { &node_b };
    let mut members: Vec<SlimApp> =
        (0..member_count).map(|i| SlimApp::member(node_of(i), &name(i)).expect("member")).collect();
    let subs: Api<Subscription> = Api::namespaced(client.clone(), &namespace);
    let on_a =
        (0..member_count).step_by(2).map(name).chain((0..channel_count).map(|c| format!("org/bench/channel-{c}")));
    for (i, slim_name) in on_a.enumerate() {
        let sub: Subscription = serde_json::from_value(json!({
            "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription", "metadata": {"name": format!("via-a-{i}")},
            "spec": {"name": slim_name, "nodes": {"endpoints": [node_b.controller_endpoint()]},
                     "link": {"endpoint": node_a.data_endpoint(), "connectionType": "peer"}}
        }))
        .expect("subscription");
        subs.create(&PostParams::default(), &sub).await.expect("create");
    }
    let channels: Api<SlimChannel> = Api::namespaced(client.clone(), &namespace);
    let participants: Vec<String> = (0..member_count).map(name).collect();
    for c in 0..channel_count {
        let channel: SlimChannel = serde_json::from_value(json!({
            "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "SlimChannel", "metadata": {"name": format!("channel-{c}")},
            "spec": {"name": format!("org/bench/channel-{c}"), "participants": participants, "mlsEnabled": mls,
                     "nodes": {"endpoints": [node_a.controller_endpoint(), node_b.controller_endpoint()]}}
        }))
        .expect("channel");
        channels.create(&PostParams::default(), &channel).await.expect("create");
    }
    let started = Instant::now();
    let all_joined = async || {
        let list = channels.list(&Default::default()).await.ok()?;
        let full =
            list.items.iter().filter(|c| c.status.as_ref().is_some_and(|s| s.joined as usize == member_count)).count();
        (full == channel_count).then_some(())
    };
    slim_e2e::wait_for("every member in every channel", Duration::from_secs(1800), all_joined).await;
    println!("all {channel_count} channels full after {:.1} s", started.elapsed().as_secs_f64());
    let status_writes = plane
        .audited()
        .map(|requests| {
            requests
                .iter()
                .filter(|r| r.resource == "slimchannels" && r.subresource == "status" && r.verb == "patch")
                .count()
        })
        .unwrap_or_default();
    let peak_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or_default();
    println!(
        "  {status_writes} SlimChannel status writes ({:.1} per channel); bench process (controllers in it) RSS peak {} MiB",
        status_writes as f64 / channel_count as f64,
        peak_kib / 1024
    );

    // Idle: nothing changes for a minute.
    let node_messages = || nodes.clients().iter().map(|c| c.stats().rpcs.load(Relaxed)).sum::<u64>();
    let manager_calls = || managers.clients().iter().map(|c| c.stats().calls.load(Relaxed)).sum::<u64>();
    let (m0, c0) = (node_messages(), manager_calls());
    tokio::time::sleep(Duration::from_secs(60)).await;
    println!(
        "idle cost per minute: {} node control messages, {} channel manager RPCs ({channel_count} channels)",
        node_messages() - m0,
        manager_calls() - c0
    );

    // Restarts: one member at a time; back = in every channel again (its joined count full).
    let mut times = Vec::new();
    for r in 0..restarts {
        let i = r % member_count;
        let restarted = Instant::now();
        drop(std::mem::replace(&mut members[i], SlimApp::member(node_of(i), &name(i)).expect("member again")));
        let instance = members[i].instance.clone();
        slim_e2e::wait_for("the restarted member in every channel", Duration::from_secs(600), async || {
            let list = channels.list(&Default::default()).await.ok()?;
            let back = list.items.iter().filter(|c| {
                c.status.as_ref().is_some_and(|s| {
                    s.participants.iter().any(|p| {
                        p.name == name(i) && p.joined && p.instance.as_deref().is_some_and(|x| x.ends_with(&instance))
                    })
                })
            });
            (back.count() == channel_count).then_some(())
        })
        .await;
        let took = restarted.elapsed();
        println!("  restart {r}: {} back in {channel_count} channels after {:.1} s", name(i), took.as_secs_f64());
        times.push(took.as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
    if times.is_empty() {
        let _ = stop.send(());
        return;
    }
    println!(
        "result: rejoin p50 {:.1} s, p95 {:.1} s over {} restarts (target p95 < 5 s)",
        pick(0.5),
        pick(0.95),
        times.len()
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controllers).await;
}

mod handover {
    use std::time::{Duration, Instant};

    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
    use serde_json::json;
    use slim_e2e::control_plane::{self, install_crds};
    use slim_e2e::{ChannelManager, SlimApp, SlimNode};
    use slim_operator::api::SlimChannel;
    use slim_operator::controller::ControllerConfig;

    use super::arg;

    /// Holds a deleted member Pod terminating (no kubelet here to finish its deletion) until the
    /// bench releases it. (A Pod bound to a node that does not exist would do the same, but the
    /// controller manager's Pod garbage collector deletes those within a minute.)
    const HOLD: &str = "bench.slim.agntcy.org/terminating";

    /// A member's Pod as the kubelet would report it Running.
    async fn running_pod(pods: &Api<Pod>, pod: &str, member: &str) {
        let object: Pod = serde_json::from_value(json!({
            "metadata": {"name": pod, "labels": {"app": "bench-member"}, "annotations": {"slim.agntcy.org/name": member},
                         "finalizers": [HOLD]},
            "spec": {"containers": [{"name": "app", "image": "example/member:1"}]}
        }))
        .expect("pod");
        pods.create(&PostParams::default(), &object).await.expect("create pod");
        let status = json!({"status": {"phase": "Running", "podIP": "127.0.0.1"}});
        pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(status)).await.expect("pod status");
    }

    /// The member's app container as the kubelet reports it: running or terminated, after
    /// `restarts` restarts.
    async fn app_state(pods: &Api<Pod>, pod: &str, restarts: i32, running: bool) {
        let state = if running { json!({"running": {}}) } else { json!({"terminated": {"exitCode": 137}}) };
        let status = json!({"status": {"containerStatuses": [{"name": "app", "image": "example/member:1",
            "imageID": "", "ready": running, "restartCount": restarts, "state": state}]}});
        pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(status)).await.expect("container status");
    }

    /// Kills member `i`'s app and starts it again in its Pod after `backoff` (reported as the
    /// kubelet would when `pod_signal`); returns the seconds from the new instance's connect and
    /// from the crash until it is in every channel.
    async fn crash(member: Member<'_>, restarts: i32, backoff: Duration, pod_signal: bool) -> (f64, f64) {
        let Member { node, pods, channels, channel_count, name, slot } = member;
        let pod = slot.1.clone();
        let crashed = Instant::now();
        slot.0.kill();
        if pod_signal {
            app_state(pods, &pod, restarts - 1, false).await;
        }
        tokio::time::sleep(backoff).await;
        slot.0 = SlimApp::member(node, name).expect("restarted member");
        let connected = Instant::now();
        if pod_signal {
            app_state(pods, &pod, restarts, true).await;
        }
        let instance = slot.0.instance.clone();
        slim_e2e::wait_for("the restarted instance in every channel", Duration::from_secs(120), async || {
            in_every_channel(channels, channel_count, name, &instance).await
        })
        .await;
        (connected.elapsed().as_secs_f64(), crashed.elapsed().as_secs_f64())
    }

    /// One member of the bench and where it is.
    struct Member<'a> {
        node: &'a SlimNode,
        pods: &'a Api<Pod>,
        channels: &'a Api<SlimChannel>,
        channel_count: usize,
        name: &'a str,
        slot: &'a mut (SlimApp, String),
    }

    /// Whether every channel lists `member` joined with `instance`.
    async fn in_every_channel(channels: &Api<SlimChannel>, count: usize, member: &str, instance: &str) -> Option<()> {
        let list = channels.list(&Default::default()).await.ok()?;
        let joined = list.items.iter().filter(|c| {
            c.status.as_ref().is_some_and(|s| {
                s.participants.iter().any(|p| {
                    p.name == member && p.joined && p.instance.as_deref().is_some_and(|x| x.ends_with(instance))
                })
            })
        });
        (joined.count() == count).then_some(())
    }

    pub async fn run() {
        let (channel_count, member_count, rolls) = (arg("--channels", 4), arg("--members", 5), arg("--rolls", 10));
        let linger = Duration::from_millis(arg("--linger-ms", 1000) as u64);
        slim_e2e::init_logging();
        let plane = control_plane::shared();
        let client = plane.client().await.expect("admin client");
        install_crds(&client).await.expect("CRDs");
        let namespace = plane.namespace(&client, "handover").await.expect("namespace");
        let node = SlimNode::start("node-a").expect("node");
        let cm = ChannelManager::start(&node).expect("channel manager");
        println!(
            "{channel_count} channels x {member_count} Pod-selected members, 1 real node, real channel manager 3.4.6, {rolls} rolls, old app lingers {} ms",
            linger.as_millis()
        );
        let config = ControllerConfig {
            channel_manager: Some(cm.endpoint()),
            default_nodes: slim_operator::api::NodeSet {
                endpoints: vec![node.controller_endpoint()],
                ..Default::default()
            },
            ..Default::default()
        };
        let (stop, controllers) =
            slim_e2e::operator::run_in_process(&client, Default::default(), Default::default(), config, "bench");

        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let name = |i: usize| format!("org/bench/member-{i}");
        let mut members = Vec::new();
        for i in 0..member_count {
            members.push((SlimApp::member(&node, &name(i)).expect("member"), format!("member-{i}-0")));
            running_pod(&pods, &format!("member-{i}-0"), &name(i)).await;
        }
        let channels: Api<SlimChannel> = Api::namespaced(client.clone(), &namespace);
        for c in 0..channel_count {
            let channel: SlimChannel = serde_json::from_value(json!({
                "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "SlimChannel", "metadata": {"name": format!("channel-{c}")},
                "spec": {"name": format!("org/bench/channel-{c}"), "participantSelector": {"matchLabels": {"app": "bench-member"}}}
            }))
            .expect("channel");
            channels.create(&PostParams::default(), &channel).await.expect("create");
        }
        let started = Instant::now();
        for (i, (app, _)) in members.iter().enumerate() {
            slim_e2e::wait_for("every member in", Duration::from_secs(600), async || {
                in_every_channel(&channels, channel_count, &name(i), &app.instance).await
            })
            .await;
        }
        println!("all {channel_count} channels full after {:.1} s", started.elapsed().as_secs_f64());

        let (mut from_connect, mut from_delete) = (Vec::new(), Vec::new());
        let crashes = std::env::args().any(|a| a == "--crash");
        let backoff = Duration::from_millis(arg("--backoff-ms", 1000) as u64);
        let pod_signal = !std::env::args().any(|a| a == "--no-pod-signal");
        if crashes && pod_signal {
            for (_, pod) in &members {
                app_state(&pods, pod, 0, true).await;
            }
        }
        for r in 0..rolls {
            let i = r % member_count;
            if crashes {
                let member_name = name(i);
                let member = Member {
                    node: &node,
                    pods: &pods,
                    channels: &channels,
                    channel_count,
                    name: &member_name,
                    slot: &mut members[i],
                };
                let (c, d) = crash(member, (r / member_count + 1) as i32, backoff, pod_signal).await;
                println!("  crash {r}: {member_name} joined {c:.1} s after its connect, {d:.1} s after the crash");
                from_connect.push(c);
                from_delete.push(d);
                continue;
            }
            let new_app = SlimApp::member(&node, &name(i)).expect("new member");
            let connected = Instant::now();
            let new_pod = format!("member-{i}-{}", r + 1);
            running_pod(&pods, &new_pod, &name(i)).await;
            // The Deployment deletes the old Pod once the new one is ready.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (old_app, old_pod) = std::mem::replace(&mut members[i], (new_app, new_pod));
            let deleted = Instant::now();
            pods.delete(&old_pod, &DeleteParams::default()).await.expect("delete old pod");
            tokio::time::sleep(linger).await;
            drop(old_app);
            let release = json!({"metadata": {"finalizers": null}});
            pods.patch(&old_pod, &PatchParams::default(), &Patch::Merge(release)).await.expect("old pod gone");
            let instance = members[i].0.instance.clone();
            slim_e2e::wait_for("the new instance in every channel", Duration::from_secs(120), async || {
                in_every_channel(&channels, channel_count, &name(i), &instance).await
            })
            .await;
            let (c, d) = (connected.elapsed().as_secs_f64(), deleted.elapsed().as_secs_f64());
            println!(
                "  roll {r}: {} joined {c:.1} s after its connect, {d:.1} s after the old Pod's deletion",
                name(i)
            );
            from_connect.push(c);
            from_delete.push(d);
        }
        let pick = |times: &mut Vec<f64>, q: f64| {
            times.sort_by(f64::total_cmp);
            times[((times.len() as f64 - 1.0) * q).round() as usize]
        };
        let event = if crashes { "crash" } else { "old Pod deleted" };
        println!(
            "result: new instance connect -> joined p50 {:.1} s, p95 {:.1} s; {event} -> joined p50 {:.1} s, p95 {:.1} s ({rolls} rolls, target p95 < 5 s)",
            pick(&mut from_connect, 0.5),
            pick(&mut from_connect, 0.95),
            pick(&mut from_delete, 0.5),
            pick(&mut from_delete, 0.95),
        );
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), controllers).await;
    }
}
