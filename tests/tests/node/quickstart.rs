//! `examples/` applied as a user would, and run.

use super::*;

/// The quickstart (`examples/00`–`05`, then `07`) applied as a user would, only the app's image name changed
/// (`registry.example/your-slim-app:1.0` stands for the user's own app; here a real SLIM app that
/// reads the example's environment). SLIM's images carry the examples' own names.
#[tokio::test]
async fn the_quickstart_runs_as_written() {
    let (node, client) = installed().await;
    images::ensure_slim(node).expect("SLIM images");
    let _turn = SERIAL.lock().await;
    // "SPIRE" registers the quickstart's workloads.
    let socket = spire_dir(node).join("api.sock");
    // One SPIFFE ID per service account, each caller attested by its Pod (as SPIRE's k8s
    // workload attestor does, and as examples/06 registers them): SLIM derives an app's instance
    // id from its identity, so the channel manager and its members need identities of their own.
    let mut state = AgentState::new(TRUST_DOMAIN);
    for account in ["default", "dave", "slim-channel-manager"] {
        state.issue(&format!("spiffe://{TRUST_DOMAIN}/ns/slim/sa/{account}"), "");
    }
    let accounts = pod_accounts(&client, "slim");
    state.attestor = Some(std::sync::Arc::new(move |pid| {
        let pod = pod_of_process(pid)?;
        let account = accounts.lock().unwrap_or_else(|p| p.into_inner()).get(&pod).cloned()?;
        Some(format!("spiffe://{TRUST_DOMAIN}/ns/slim/sa/{account}"))
    }));
    let _agent = FakeAgent::start(&socket, state).await.expect("fake Workload API");
    make_world_writable(&socket);

    let example = |file: &str| std::fs::read_to_string(repo_path("examples").join(file)).expect("example");
    let started = Instant::now();
    kubectl_apply(node, &example("00-namespace.yaml"));
    node.prepare_namespace(&client, "slim").await.expect("namespace ready for Pods");
    // The channel manager's Secret, as the example's header says to create it.
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "slim-channel-manager"},
        "stringData": {"passphrase": "quickstart-passphrase-0123456789"}
    }))
    .expect("secret");
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), "slim")
        .create(&PostParams::default(), &secret)
        .await
        .expect("channel manager secret");
    for file in ["01-slim-nodes.yaml", "02-channel-manager.yaml", "03-subscriptions.yaml", "04-slimchannel.yaml"] {
        kubectl_apply(node, &example(file));
    }
    kubectl_apply(node, &example("05-app.yaml").replace("registry.example/your-slim-app:1.0", images::SLIM_APP));

    let pods: Api<Pod> = Api::namespaced(client.clone(), "slim");
    wait_slim_nodes(&pods, "slim").await;
    for name in ["bob-via-slim-1", "alice-via-slim-0", "gateway-everywhere"] {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !subscription_ready(&client, "slim", name).await {
            let condition = ready_condition(&client, "slim", name).await;
            assert!(Instant::now() < deadline, "Subscription {name} not Ready after 90 s: {condition:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    println!("quickstart: nodes and Subscriptions Ready {:.1}s after the first apply", started.elapsed().as_secs_f64());

    // Two injected app Pods with SLIM's `spire` identity on the socket the webhook mounted: bob on
    // slim-1 (also a team-chat member), alice on slim-0 opening sessions to him over 03's routes.
    let identity_app = "/opt/python/bin/python3 /harness/slim_identity_app.py";
    let bob =
        injected_app("bob", &format!("{identity_app} listen http://slim-1.slim.slim.svc:46357 org/ns/bob spire:"));
    pods.create(&PostParams::default(), &bob).await.expect("bob");
    let alice =
        format!("{identity_app} send http://slim-0.slim.slim.svc:46357 org/ns/alice spire: org/ns/bob 20; sleep 3600");
    pods.create(&PostParams::default(), &injected_app("alice", &alice)).await.expect("alice");
    let log = wait_log_for(&pods, "alice", "app", "done ", Duration::from_secs(120)).await;
    let replies = log.lines().filter(|l| l.starts_with("reply ")).count();
    let first = log.lines().position(|l| l.starts_with("reply ")).unwrap_or(usize::MAX);
    let failed_after_first = log.lines().skip(first).filter(|l| l.starts_with("error ")).collect::<Vec<_>>();
    println!("quickstart: alice -> bob (injected, spire identity on the agent's socket): {replies} sessions");
    assert!(replies >= 10 && failed_after_first.is_empty(), "sessions between injected apps: {log}");
    for name in ["alice", "bob"] {
        let pod = pods.get(name).await.expect("app pod");
        let app = &pod.spec.as_ref().expect("spec").containers[0];
        let mounts: Vec<&str> = app.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
        assert!(!mounts.iter().any(|m| m.contains("spire")), "no SPIRE volume in {name}'s app: {mounts:?}");
        assert!(mounts.contains(&"/run/slim-identity"), "{name} mounts the agent's socket: {mounts:?}");
    }

    // dave: injected (the namespace's label), its identity written before its first line, then
    // invited into team-chat by the channel manager the SlimChannel names.
    let dave = slim_e2e::wait_for("dave's Pod Ready", Duration::from_secs(90), async || {
        let list = pods.list(&ListParams::default().labels("app=dave")).await.ok()?;
        list.items.into_iter().find(node::pod_ready)
    })
    .await;
    let injected = dave
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == "slim-identity-agent"));
    assert!(injected, "dave got the agent");
    let dave_name = dave.name_any();
    let log = wait_log(&pods, &dave_name, "app", "joined").await;
    assert!(
        log.lines().next().is_some_and(|l| l.starts_with(&format!("identity spiffe://{TRUST_DOMAIN}/ns/slim/sa/dave"))),
        "dave's first line reads the injected identity: {log}"
    );
    let log = if log.contains("joined") {
        log
    } else {
        wait_log_for(&pods, &dave_name, "app", "joined", Duration::from_secs(60)).await
    };
    if !log.contains("joined") {
        let channels: Api<slim_operator::api::SlimChannel> = Api::namespaced(client.clone(), "slim");
        let status = channels.get("team-chat").await.ok().and_then(|c| c.status);
        let managers = pods.list(&ListParams::default().labels("app.kubernetes.io/name=slim-channel-manager")).await;
        for manager in managers.map(|l| l.items).unwrap_or_default() {
            let log = container_log(&pods, &manager.name_any(), "channel-manager").await;
            let agent = container_log(&pods, &manager.name_any(), "slim-identity-agent").await;
            println!("channel manager {}: {log}\nits agent: {agent}", manager.name_any());
        }
        println!("team-chat status: {status:?}");
    }
    assert!(log.contains("joined"), "dave invited into team-chat: {log}");
    let bob_log = wait_log(&pods, "bob", "app", "received hello from org/ns/dave").await;
    assert!(
        bob_log.contains("received hello from org/ns/dave"),
        "dave's message crossed the MLS channel (manager and members on agent sockets): {bob_log}"
    );
    let channels: Api<slim_operator::api::SlimChannel> = Api::namespaced(client.clone(), "slim");
    let channel =
        slim_e2e::wait_for("team-chat's status with dave and bob joined", Duration::from_secs(30), async || {
            let channel = channels.get("team-chat").await.ok()?;
            let status = channel.status.as_ref()?;
            let joined = |name: &str| status.participants.iter().any(|p| p.name == name && p.joined);
            (joined("org/ns/dave") && joined("org/ns/bob")).then_some(channel)
        })
        .await;
    let status = channel.status.as_ref().expect("status");
    let dave_status = status.participants.iter().find(|p| p.name == "org/ns/dave").expect("dave listed");
    assert_eq!(dave_status.pod.as_deref(), Some(dave_name.as_str()), "dave joined as his Pod");
    let carol = status.participants.iter().find(|p| p.name == "org/ns/carol").expect("carol listed");
    assert!(!carol.joined && carol.message.as_deref().is_some_and(|m| m.starts_with("offline")), "{carol:?}");
    println!("quickstart: dave joined team-chat {:.1}s after the first apply", started.elapsed().as_secs_f64());

    // dave's Deployment rolled as `kubectl rollout restart` rolls it: each new Pod's app is back in
    // team-chat (its hello reaches bob), and how long after it connected.
    let rolls = std::env::var("SLIM_NODE_ROLLS").ok().and_then(|n| n.parse().ok()).unwrap_or(2);
    let mut waits = Vec::new();
    for roll in 1..=rolls {
        let wait = roll_dave(node, &client, &pods, roll).await;
        println!("quickstart: roll {roll}: dave's new instance joined {:.2}s after it connected", wait.as_secs_f64());
        waits.push(wait);
    }
    waits.sort();
    let at =
        |q: f64| waits.get(((waits.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied().unwrap_or_default();
    println!(
        "quickstart: {rolls} rolls of dave's Deployment, new instance connect -> joined p50 {:.2}s p95 {:.2}s max {:.2}s",
        at(0.5).as_secs_f64(),
        at(0.95).as_secs_f64(),
        waits.last().copied().unwrap_or_default().as_secs_f64()
    );
    let (from_connect, from_crash) = crash_dave(node, &client, &pods).await;
    println!(
        "quickstart: dave's app crashed (SIGKILL) and was restarted by the kubelet: joined {:.2}s after it connected, {:.2}s after the crash",
        from_connect.as_secs_f64(),
        from_crash.as_secs_f64()
    );

    // Identity without SPIRE (examples/07): the real kubelet projects the audience-bound token,
    // the agent checks it against the cluster's keys (fetched through the `kubernetes` Service
    // with the Pod's own token) before the app's first line reads it.
    let erin_app =
        example("07-app-kubernetes-identity.yaml").replace("registry.example/your-slim-app:1.0", images::SLIM_APP);
    kubectl_apply(node, &erin_app);
    let erin = slim_e2e::wait_for("erin's Pod Ready", Duration::from_secs(90), async || {
        let list = pods.list(&ListParams::default().labels("app=erin")).await.ok()?;
        list.items.into_iter().find(node::pod_ready)
    })
    .await;
    let volumes = erin.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default();
    assert!(volumes.iter().all(|v| v.host_path.is_none() && v.csi.is_none()), "no SPIRE socket: {volumes:?}");
    let log = wait_log(&pods, &erin.name_any(), "app", "instance").await;
    assert!(
        log.lines().next().is_some_and(|l| l.starts_with("identity system:serviceaccount:slim:erin keys")),
        "erin's first line reads the kubelet-projected token the agent checked: {log}"
    );
    let agent_log = container_log(&pods, &erin.name_any(), "slim-identity-agent").await;
    assert!(!agent_log.contains("not written"), "the agent took the kubelet's token: {agent_log}");
    println!(
        "quickstart: erin (no SPIRE) Ready {:.1}s after the first apply; team-chat status {:?}",
        started.elapsed().as_secs_f64(),
        channel.status
    );
}

/// One `kubectl rollout restart deployment/dave`: waits until the new Pod's app has joined
/// team-chat, its hello has reached bob (the `roll`-th after the first), and team-chat's status
/// names the new Pod; returns the time from the new app's connect (its "instance" line) to its
/// join ("joined"), both as the kubelet stamped them.
async fn roll_dave(node: &Node, client: &Client, pods: &Api<Pod>, roll: usize) -> Duration {
    let dave_pods = ListParams::default().labels("app=dave");
    let before: Vec<String> =
        pods.list(&dave_pods).await.expect("dave's Pods").items.iter().map(ResourceExt::name_any).collect();
    let kubeconfig = node.plane.admin_kubeconfig.clone();
    slim_e2e::kubectl(
        &["-n", "slim", "rollout", "restart", "deployment/dave"],
        &[("KUBECONFIG", kubeconfig.as_path())],
    )
    .unwrap_or_else(|e| panic!("kubectl rollout restart: {e}"));
    let new = slim_e2e::wait_for("dave's new Pod Ready", Duration::from_secs(90), async || {
        let list = pods.list(&dave_pods).await.ok()?;
        list.items.into_iter().find(|p| !before.contains(&p.name_any()) && node::pod_ready(p))
    })
    .await
    .name_any();
    let trail = status_trail(client, "org/ns/dave");
    let log = wait_log_for(pods, &new, "app", "joined", Duration::from_secs(60)).await;
    trail.abort();
    if !log.contains("joined") {
        let channels: Api<slim_operator::api::SlimChannel> = Api::namespaced(client.clone(), "slim");
        let status = channels.get("team-chat").await.ok().and_then(|c| c.status);
        println!("roll {roll}: dave's new Pod {new} did not join: {log}\nteam-chat status: {status:?}");
    }
    assert!(log.contains("joined"), "roll {roll}: dave's new Pod {new} invited into team-chat: {log}");
    let greeted = wait_for_count(pods, "bob", "received hello from org/ns/dave", roll + 1).await;
    assert!(greeted, "roll {roll}: the new dave's hello reached bob over the channel");
    let channels: Api<slim_operator::api::SlimChannel> = Api::namespaced(client.clone(), "slim");
    slim_e2e::wait_for("team-chat's status naming dave's new Pod", Duration::from_secs(30), async || {
        let status = channels.get("team-chat").await.ok()?.status?;
        status.participants.into_iter().find(|p| p.name == "org/ns/dave" && p.joined && p.pod.as_deref() == Some(&new))
    })
    .await;
    connect_to_join(pods, &new).await
}

/// The time from the app's connect (its "instance" line) to its join ("joined") in `pod`'s
/// current app container, as the kubelet stamped them.
async fn connect_to_join(pods: &Api<Pod>, pod: &str) -> Duration {
    let params = LogParams { container: Some("app".into()), timestamps: true, ..Default::default() };
    let stamped = pods.logs(pod, &params).await.expect("the app's log with timestamps");
    let at = |word: &str| {
        stamped.lines().find_map(|line| {
            let (stamp, text) = line.split_once(' ')?;
            text.starts_with(word).then(|| stamp.parse::<k8s_openapi::jiff::Timestamp>().ok()).flatten()
        })
    };
    let (Some(connected), Some(joined)) = (at("instance "), at("joined ")) else {
        panic!("no stamped connect and join in {pod}'s log: {stamped}")
    };
    Duration::try_from(joined.duration_since(connected)).unwrap_or_default()
}

/// Waits until `pod`'s app log holds `needle` at least `count` times (60 s).
async fn wait_for_count(pods: &Api<Pod>, pod: &str, needle: &str, count: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if container_log(pods, pod, "app").await.matches(needle).count() >= count {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// Prints each new state team-chat's status gives `member`, with the seconds since it started
/// following, until aborted (what a roll went through).
fn status_trail(client: &Client, member: &'static str) -> tokio::task::JoinHandle<()> {
    let channels: Api<slim_operator::api::SlimChannel> = Api::namespaced(client.clone(), "slim");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "slim");
    tokio::spawn(async move {
        let started = Instant::now();
        let (mut last, mut last_pods) = (None, Vec::new());
        loop {
            let status = channels.get("team-chat").await.ok().and_then(|c| c.status);
            let state = status
                .and_then(|s| s.participants.into_iter().find(|p| p.name == member))
                .map(|p| (p.joined, p.pod, p.message));
            let list = pods.list(&ListParams::default().labels("app=dave")).await.map(|l| l.items).unwrap_or_default();
            let pods_now: Vec<String> = list.iter().map(pod_state).collect();
            if state.is_some() && (&state, &pods_now) != (&last, &last_pods) {
                println!("  {:5.1}s {member}: {state:?} pods {pods_now:?}", started.elapsed().as_secs_f64());
                last = state;
                last_pods = pods_now;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

/// A member Pod as the trail shows it: its name, whether it terminates, and its app's state.
fn pod_state(pod: &Pod) -> String {
    let terminating = if pod.metadata.deletion_timestamp.is_some() { " terminating" } else { "" };
    let app = pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|c| c.first());
    let state = app.and_then(|c| c.state.as_ref()).map_or("none", |s| {
        if s.running.is_some() {
            "running"
        } else if s.terminated.is_some() {
            "terminated"
        } else {
            "waiting"
        }
    });
    format!("{}{terminating} app {state}", pod.name_any())
}

/// Kills dave's app container (a crash): the kubelet restarts it in its Pod and the new process,
/// under the instance id of the old one, is invited again. Returns the time from its connect, and
/// from the crash, until it joined (the kubelet's log timestamps, and the test's clock).
async fn crash_dave(node: &Node, client: &Client, pods: &Api<Pod>) -> (Duration, Duration) {
    let dave = pods.list(&ListParams::default().labels("app=dave")).await.expect("dave's Pods").items;
    let dave = dave.into_iter().find(node::pod_ready).expect("dave's Pod Ready");
    let name = dave.name_any();
    let app = |pod: &Pod| {
        let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.clone()).unwrap_or_default();
        statuses.into_iter().find(|c| c.name == "app").map(|c| (c.container_id, c.restart_count))
    };
    let Some((Some(container), restarts)) = app(&dave) else { panic!("dave's app container: {dave:?}") };
    let greeted = container_log(pods, "bob", "app").await.matches("received hello from org/ns/dave").count();
    let trail = status_trail(client, "org/ns/dave");
    let crashed = Instant::now();
    node.kill_container(&container).expect("kill dave's app");
    slim_e2e::wait_for("dave's app restarted by the kubelet", Duration::from_secs(60), async || {
        let pod = pods.get(&name).await.ok()?;
        app(&pod).filter(|(_, count)| *count > restarts).map(|_| ())
    })
    .await;
    let log = wait_log_for(pods, &name, "app", "joined", Duration::from_secs(60)).await;
    let from_crash = crashed.elapsed();
    trail.abort();
    assert!(log.contains("joined"), "dave's restarted app invited into team-chat again: {log}");
    assert!(
        wait_for_count(pods, "bob", "received hello from org/ns/dave", greeted + 1).await,
        "the restarted dave's hello reached bob over the channel"
    );
    (connect_to_join(pods, &name).await, from_crash)
}
