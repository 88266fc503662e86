//! `slim-demo`: the whole system on one machine, all on 127.0.0.1. A real kube-apiserver and etcd
//! (from `KUBEBUILDER_ASSETS`), two real SLIM nodes, the real channel manager, `slim-operator run`
//! as a process; Subscriptions and a SlimChannel applied through the API server; two member apps on
//! different nodes exchanging messages; then a node and a member restarted, and the repair and the
//! rejoin timed. It stays up until Ctrl-C (or exits after the summary with `--once`) and stops
//! every process it started.
//!
//! Run it with `scripts/demo.sh` (which installs what it needs first).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use slim_e2e::control_plane::{self, install_crds};
use slim_e2e::operator::OperatorProcess;
use slim_e2e::{ChannelManager, HarnessError, SlimApp, SlimNode};
use slim_operator::api::{SlimChannel, Subscription};
use slim_operator::slim::{NodePool, SlimName};

const NAMESPACE: &str = "demo";

/// Prints a line stamped with the time since the demo started.
struct Clock(Instant);

impl Clock {
    fn say(&self, text: impl AsRef<str>) {
        println!("[{:6.1}s] {}", self.0.elapsed().as_secs_f64(), text.as_ref());
    }
}

#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error("{0}")]
    Harness(#[from] HarnessError),
    #[error("control plane: {0}")]
    ControlPlane(#[from] control_plane::ControlPlaneError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("bad object: {0}")]
    Object(#[from] serde_json::Error),
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let once = std::env::args().any(|a| a == "--once");
    // Ctrl-C at any point drops the run (so every process it started is stopped by its Drop).
    let code = tokio::select! {
        result = run(once) => match result {
            Ok(()) => 0,
            Err(error) => {
                println!("demo: FAILED {error}");
                1
            }
        },
        _ = tokio::signal::ctrl_c() => {
            println!("interrupted: stopping every process the demo started");
            130
        }
    };
    // Returning (not exiting from a signal) runs every Drop and the control plane's atexit stop.
    std::process::exit(code);
}

async fn run(once: bool) -> Result<(), DemoError> {
    let clock = Clock(Instant::now());
    clock.say("starting the local control plane (kube-apiserver + etcd from KUBEBUILDER_ASSETS)");
    let plane = tokio::task::spawn_blocking(control_plane::shared)
        .await
        .map_err(|e| DemoError::Timeout(Duration::ZERO, format!("control plane start panicked: {e}")))?;
    let client = plane.client().await?;
    clock.say(format!("API server ready at {}", plane.server));
    install_crds(&client).await?;
    plane.create_namespace(&client, NAMESPACE).await?;
    clock.say("CRDs installed (Subscription, SlimChannel); namespace demo created");

    let node_a = SlimNode::start("node-a")?;
    let mut node_b = SlimNode::start("node-b")?;
    clock.say(format!(
        "SLIM nodes up: node-a (data {}, controller {}), node-b (data {}, controller {})",
        node_a.data_endpoint(),
        node_a.controller_endpoint(),
        node_b.data_endpoint(),
        node_b.controller_endpoint()
    ));
    let manager = ChannelManager::start(&node_a)?;
    clock.say(format!("channel manager up on node-a, API {}", manager.endpoint()));
    let env = [
        ("POD_NAMESPACE", NAMESPACE.to_owned()),
        ("SLIM_OPERATOR_CHANNEL_MANAGER", manager.endpoint()),
        ("SLIM_OPERATOR_DISABLE_WEBHOOK", "true".to_owned()),
        ("SLIM_OPERATOR_RESYNC_INTERVAL", "5s".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let operator = OperatorProcess::start(&plane.admin_kubeconfig, &env)?;
    operator.wait_readyz(200, Duration::from_secs(60))?;
    clock.say(format!("slim-operator running, /readyz 200 on http://{}", operator.admin));

    let mut bob = SlimApp::member(&node_a, "org/ns/bob")?;
    let mut carol = SlimApp::member(&node_b, "org/ns/carol")?;
    clock.say(format!(
        "member apps connected: org/ns/bob on node-a ({}), org/ns/carol on node-b ({})",
        bob.instance, carol.instance
    ));

    // What a user applies: two Subscriptions on node-b, routing bob and the channel to node-a over
    // one `peer` link (equal link specs share it; a peer link syncs every name both ways, so the
    // invites and the channel's traffic cross too), and a SlimChannel with a member on each node.
    // One link: a second peer link back from node-a would make each node learn its own local
    // names from the other, and invites would loop.
    let subs: Api<Subscription> = Api::namespaced(client.clone(), NAMESPACE);
    for (name, slim_name, on, to) in
        [("bob-via-node-a", "org/ns/bob", &node_b, &node_a), ("team-via-node-a", "org/ns/team", &node_b, &node_a)]
    {
        let sub: Subscription = serde_json::from_value(json!({
            "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription", "metadata": {"name": name},
            "spec": {"name": slim_name, "nodes": {"endpoints": [on.controller_endpoint()]},
                     "link": {"endpoint": to.data_endpoint(), "connectionType": "peer"}}
        }))?;
        subs.create(&PostParams::default(), &sub).await?;
    }
    let channels: Api<SlimChannel> = Api::namespaced(client.clone(), NAMESPACE);
    let channel: SlimChannel = serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "SlimChannel", "metadata": {"name": "team"},
        "spec": {"name": "org/ns/team", "participants": ["org/ns/bob", "org/ns/carol"],
                 "nodes": {"endpoints": [node_a.controller_endpoint(), node_b.controller_endpoint()]}}
    }))?;
    channels.create(&PostParams::default(), &channel).await?;
    clock.say("applied: Subscription demo/bob-via-node-a, Subscription demo/team-via-node-a, SlimChannel demo/team");

    let mut table = Table::default();
    wait(&clock, Duration::from_secs(90), "every object Ready", async || {
        table.refresh(&clock, &client).await;
        table.all_ready().then_some(())
    })
    .await?;
    print_routes(&clock, &[("node-a", &node_a), ("node-b", &node_b)]).await;
    bob.wait_for("joined", Duration::from_secs(30))?;
    carol.wait_for("joined", Duration::from_secs(30))?;
    clock.say("members joined: bob and carol both accepted the channel's invite");

    let crossed = exchange(&clock, &mut bob, &mut carol, 1).await?;

    // A node restarts: it comes back empty; the operator notices and reinstalls its routes.
    clock.say("restarting node-b (it loses every route and link)");
    let started = Instant::now();
    node_b.restart()?;
    let bob_route = SlimName::parse("org/ns/bob").map_err(|e| DemoError::Timeout(Duration::ZERO, e.to_string()))?.key();
    let pool = NodePool::default();
    let node_b_client = pool.node(&node_b.controller_endpoint());
    wait(&clock, Duration::from_secs(60), "node-b's routes repaired", async || {
        let observed = node_b_client.snapshot(Duration::ZERO).await.ok()?;
        observed.routes.iter().any(|(name, _)| *name == bob_route).then_some(())
    })
    .await?;
    let repair = started.elapsed();
    clock.say(format!("node-b repaired: its route to org/ns/bob is back after {:.1}s", repair.as_secs_f64()));

    // carol's connection went with node-b: she restarts too (a new instance) and is re-invited.
    clock.say("restarting member org/ns/carol (a new instance)");
    let started = Instant::now();
    drop(carol);
    let mut carol = SlimApp::member(&node_b, "org/ns/carol")?;
    carol.wait_for("joined", Duration::from_secs(90))?;
    let rejoin = started.elapsed();
    clock.say(format!("carol is back in org/ns/team after {:.1}s (instance {})", rejoin.as_secs_f64(), carol.instance));
    let crossed_after = exchange(&clock, &mut bob, &mut carol, 2).await?;
    // The messages can cross before the channel's status says so: the summary reads it once Ready.
    wait(&clock, Duration::from_secs(30), "every object Ready again", async || {
        table.refresh(&clock, &client).await;
        table.all_ready().then_some(())
    })
    .await?;

    println!(
        "demo: OK subscriptions={} channels={} messages={}/4 node_repair={:.1}s member_rejoin={:.1}s",
        table.ready_count("Subscription"),
        table.ready_count("SlimChannel"),
        crossed + crossed_after,
        repair.as_secs_f64(),
        rejoin.as_secs_f64()
    );
    if once {
        return Ok(());
    }
    println!(
        "\nEverything keeps running. Try:\n  export KUBECONFIG={}\n  kubectl get slim -A\n  kubectl describe slimchannel -n demo team\n  kubectl edit subscription -n demo bob-via-node-a\nThe operator's log: the output of `slim-operator` is kept until exit. Ctrl-C stops it all.",
        plane.admin_kubeconfig.display()
    );
    // Until Ctrl-C (handled in main, which drops all of this).
    drop(table);
    std::future::pending::<()>().await;
    drop((operator, manager, node_a, node_b, bob, carol));
    Ok(())
}

/// bob and carol each publish once on the channel; returns how many arrived on the other side.
async fn exchange(clock: &Clock, bob: &mut SlimApp, carol: &mut SlimApp, round: u32) -> Result<u32, DemoError> {
    Ok(u32::from(deliver(clock, bob, carol, &format!("hello #{round} from bob"), "bob -> carol")?)
        + u32::from(deliver(clock, carol, bob, &format!("hello #{round} from carol"), "carol -> bob")?))
}

/// `from` publishes `text` on the channel; whether `to` received it within 20 s.
fn deliver(clock: &Clock, from: &mut SlimApp, to: &mut SlimApp, text: &str, who: &str) -> Result<bool, DemoError> {
    let sent = Instant::now();
    from.publish(text)?;
    let arrived = to.wait_for(&format!("received {text}"), Duration::from_secs(20)).is_ok();
    if arrived {
        clock.say(format!("message {who} crossed nodes in {} ms", sent.elapsed().as_millis()));
    } else {
        clock.say(format!("message {who} did NOT arrive within 20 s"));
    }
    Ok(arrived)
}

/// The routes the operator installed on each node, by the names the demo uses.
async fn print_routes(clock: &Clock, nodes: &[(&str, &SlimNode)]) {
    let pool = NodePool::default();
    let known: Vec<(String, slim_operator::slim::NameKey)> = ["org/ns/bob", "org/ns/team"]
        .into_iter()
        .filter_map(|n| SlimName::parse(n).ok().map(|name| (n.to_owned(), name.key())))
        .collect();
    for (label, node) in nodes {
        match pool.node(&node.controller_endpoint()).snapshot(Duration::ZERO).await {
            Ok(observed) => {
                let ours: Vec<String> = observed
                    .routes
                    .iter()
                    .filter_map(|(key, link)| {
                        known.iter().find(|(_, k)| k == key).map(|(n, _)| format!("{n} -> {link}"))
                    })
                    .collect();
                let synced = observed.routes.len() - ours.len();
                clock.say(format!(
                    "{label}: {} link(s); routes the operator installed: {}; {synced} more synced over the peer link (instances, the channel)",
                    observed.links.len(),
                    if ours.is_empty() { "none".to_owned() } else { ours.join(", ") }
                ));
            }
            Err(error) => clock.say(format!("{label}: route list failed: {error}")),
        }
    }
}

/// `kubectl get slim -A` as it changes: kind/name -> (Ready, reason, detail).
#[derive(Default)]
struct Table {
    rows: BTreeMap<String, (String, String, String)>,
}

impl Table {
    async fn refresh(&mut self, clock: &Clock, client: &Client) {
        let mut rows = BTreeMap::new();
        if let Ok(list) = Api::<Subscription>::namespaced(client.clone(), NAMESPACE).list(&Default::default()).await {
            for sub in list {
                let (ready, reason) = ready_of(sub.status.as_ref().map(|s| s.conditions.as_slice()));
                rows.insert(format!("Subscription {}", sub.name_any()), (ready, reason, sub.spec.name.clone()));
            }
        }
        if let Ok(list) = Api::<SlimChannel>::namespaced(client.clone(), NAMESPACE).list(&Default::default()).await {
            for ch in list {
                let (ready, reason) = ready_of(ch.status.as_ref().map(|s| s.conditions.as_slice()));
                let joined = ch.status.as_ref().map_or(0, |s| s.joined);
                let waiting: Vec<String> = ch
                    .status
                    .iter()
                    .flat_map(|s| &s.participants)
                    .filter(|p| !p.joined)
                    .map(|p| format!("{}: {}", p.name, p.message.as_deref().unwrap_or("pending")))
                    .collect();
                let mut detail = format!("{} joined {joined}/{}", ch.spec.name, ch.spec.participants.len());
                if !waiting.is_empty() {
                    detail.push_str(&format!(" ({})", waiting.join("; ")));
                }
                rows.insert(format!("SlimChannel {}", ch.name_any()), (ready, reason, detail));
            }
        }
        if rows != self.rows {
            clock.say(format!("{:<34} {:<6} {:<22} DETAIL", "KIND NAME (namespace demo)", "READY", "REASON"));
            for (key, (ready, reason, detail)) in &rows {
                println!("          {key:<34} {ready:<6} {reason:<22} {detail}");
            }
            self.rows = rows;
        }
    }

    fn all_ready(&self) -> bool {
        self.rows.len() == 3 && self.rows.values().all(|(ready, _, _)| ready == "True")
    }

    fn ready_count(&self, kind: &str) -> String {
        let of_kind: Vec<_> = self.rows.iter().filter(|(k, _)| k.starts_with(kind)).collect();
        let ready = of_kind.iter().filter(|(_, (r, _, _))| r == "True").count();
        format!("{ready}/{}", of_kind.len())
    }
}

fn ready_of(conditions: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]>) -> (String, String) {
    conditions
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map_or(("-".into(), "-".into()), |c| (c.status.clone(), c.reason.clone()))
}

async fn wait<T>(
    clock: &Clock,
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Result<T, DemoError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            clock.say(format!("gave up waiting for {what}"));
            return Err(DemoError::Timeout(timeout, what.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
