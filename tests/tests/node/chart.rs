//! The chart in Pods: the API server calls its webhook, the injected agent holds the app until
//! its identity is written, a second replica takes over from a deleted leader.

use super::*;

#[tokio::test]
async fn the_chart_runs_in_pods_and_the_api_server_calls_its_webhook() {
    let (node, client) = installed().await;
    let _turn = SERIAL.lock().await;

    println!(
        "the node (control plane, containerd, kubelet, scheduler, kube-proxy, DNS) Ready in {:.1}s",
        node.ready_after.as_secs_f64()
    );
    let operators = operator_pods(&client).await;
    assert_eq!(operators.len(), 2, "two replicas");
    for pod in &operators {
        assert!(node::pod_ready(pod), "{} Ready", pod.name_any());
        let ip = node::pod_ip(pod).expect("pod IP");
        let (code, body) = http_get(ip, 8080, "/metrics");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("slim_operator_"), "{body}");
        // In-cluster config, the chart's RBAC: the operator reads and writes through its ServiceAccount.
        let (code, body) = http_get(ip, 8080, "/readyz");
        assert_eq!(code, 200, "{body}");
    }

    // The operator published its CA in the webhook configuration the chart created.
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = webhooks.get("slim-slim-operator").await.expect("webhook configuration");
    let ca = config.webhooks.as_ref().and_then(|w| w.first()).and_then(|w| w.client_config.ca_bundle.clone());
    assert!(ca.is_some_and(|ca| !ca.0.is_empty()), "caBundle published");

    // The API server calls it for a new Pod that asks for identity.
    let ns = node.namespace(&client, "webhook").await.expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let before = webhook_reviews(&client).await;
    let pod = app_pod("asks", serde_json::json!({"slim.agntcy.org/inject-identity": "true"}), "sleep 1");
    let created = pods.create(&PostParams::default(), &pod).await.expect("create through the webhook");
    let init = created.spec.as_ref().and_then(|s| s.init_containers.clone()).unwrap_or_default();
    assert!(
        init.iter().any(|c| c.name == "slim-identity-agent" && c.restart_policy.as_deref() == Some("Always")),
        "the agent injected as a native sidecar: {init:?}"
    );
    let after = webhook_reviews(&client).await;
    assert!(after >= before + 1.0, "the operator Pods counted the review: {before} -> {after}");
    pods.delete("asks", &DeleteParams::default()).await.expect("delete");
}

#[tokio::test]
async fn the_injected_agent_holds_the_app_until_its_identity_is_written() {
    let (node, client) = installed().await;
    let _turn = SERIAL.lock().await;
    let ns = node.namespace(&client, "identity").await.expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    // "SPIRE" on the node, with nothing registered yet: the Workload API says PermissionDenied.
    let socket = spire_dir(node).join("api.sock");
    let agent = FakeAgent::start(&socket, AgentState::new(TRUST_DOMAIN)).await.expect("fake Workload API");
    make_world_writable(&socket);

    // The app's first line reads its token and verifies it against the bundle.
    let script = "slim-identity-agent verify --bundle /svids/key.jwt --audience slim /svids/jwt_svid.token \
                  && echo app-started && sleep 3600";
    let pod = app_pod(
        "app",
        serde_json::json!({"slim.agntcy.org/inject-identity": "true", "slim.agntcy.org/jwt-audiences": "slim"}),
        script,
    );
    pods.create(&PostParams::default(), &pod).await.expect("create");

    // The agent runs but cannot start (its startup probe waits on /svids): the app stays waiting.
    let agent_running = |pod: &Pod| {
        container_status(pod, "slim-identity-agent", true)
            .is_some_and(|s| s.state.as_ref().and_then(|s| s.running.as_ref()).is_some())
    };
    node::wait_pod(&pods, "app", Duration::from_secs(60), "the agent running", agent_running).await.expect("agent");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pod = pods.get("app").await.expect("pod");
    let agent_status = container_status(&pod, "slim-identity-agent", true).expect("agent status");
    assert_eq!(agent_status.started, Some(false), "the agent's startup probe holds: {agent_status:?}");
    let app_waiting = container_status(&pod, "app", false)
        .and_then(|s| s.state.as_ref()?.waiting.as_ref()?.reason.clone())
        .unwrap_or_default();
    assert_eq!(app_waiting, "PodInitializing", "the app has not started");
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
    assert_eq!(phase, "Pending", "the Pod stays in Init (kubectl: Init:0/1)");
    let log = container_log(&pods, "app", "slim-identity-agent").await;
    println!("agent without an identity:\n{}", log.lines().take(4).collect::<Vec<_>>().join("\n"));
    assert!(
        log.contains("PermissionDenied") || log.contains("permission denied") || log.contains("no identity"),
        "the agent says why: {log}"
    );

    // Registered: the agent writes the files, its probe passes, the app starts and verifies them.
    let registered = Instant::now();
    let spiffe_id = format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/default");
    agent.update(|state| state.issue(&spiffe_id, ""));
    let pod = node::wait_pod(&pods, "app", Duration::from_secs(60), "Ready", node::pod_ready).await.expect("ready");
    println!("identity registered -> app Ready in {:.1}s", registered.elapsed().as_secs_f64());
    let agent_started = started_at(&pod, "slim-identity-agent", true);
    let app_started = started_at(&pod, "app", false);
    assert!(app_started >= agent_started, "the app started after the agent: {agent_started:?} / {app_started:?}");
    let log = wait_log(&pods, "app", "app", "app-started").await;
    println!("app log:\n{log}");
    assert!(
        log.lines().next().is_some_and(|first| first.contains(&spiffe_id)),
        "the first line is the verified identity: {log}"
    );
    pods.delete("app", &DeleteParams::default()).await.expect("delete");
}

#[tokio::test]
async fn a_second_replica_takes_over_when_the_leader_pod_is_deleted() {
    let (node, client) = installed().await;
    let _turn = SERIAL.lock().await;
    let ns = node.namespace(&client, "leader").await.expect("namespace");
    let subscriptions: Api<slim_operator::api::Subscription> = Api::namespaced(client.clone(), &ns);
    subscriptions.create(&PostParams::default(), &unreachable_subscription(&ns, "before")).await.expect("create");
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let holder = |lease: &Lease| lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).unwrap_or_default();
    let leader = slim_e2e::wait_for("a leader", Duration::from_secs(30), async || {
        leases.get_opt("slim-operator-leader").await.ok().flatten().map(|l| holder(&l)).filter(|h| !h.is_empty())
    })
    .await;
    // The leader has written the first object (its finalizer at least).
    slim_e2e::wait_for("the finalizer", Duration::from_secs(30), async || {
        subscriptions.get("before").await.ok().filter(|s| !s.finalizers().is_empty())
    })
    .await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let deleted = Instant::now();
    pods.delete(&leader, &DeleteParams::default()).await.expect("delete the leader");
    let lease = slim_e2e::wait_for("a new leader", Duration::from_secs(20), async || {
        leases
            .get_opt("slim-operator-leader")
            .await
            .ok()
            .flatten()
            .filter(|l| !holder(l).is_empty() && holder(l) != leader)
    })
    .await;
    let took = deleted.elapsed();
    let successor = holder(&lease);
    println!("leader {leader} deleted -> {successor} leads after {:.1}s", took.as_secs_f64());
    assert!(took < Duration::from_secs(15), "within the lease duration (15 s): {took:?}");

    // The new leader reconciles: a new object gets its finalizer.
    subscriptions.create(&PostParams::default(), &unreachable_subscription(&ns, "after")).await.expect("create");
    slim_e2e::wait_for("the new leader's finalizer", Duration::from_secs(30), async || {
        subscriptions.get("after").await.ok().filter(|s| !s.finalizers().is_empty())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Who wrote what, from the API server's audit log (bound tokens name their Pod): the old
    // leader only before the new one acquired the Lease, the new one only after.
    let acquired = lease
        .spec
        .as_ref()
        .and_then(|s| s.acquire_time.as_ref())
        .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .expect("acquireTime");
    let writes: Vec<_> = node
        .plane
        .audited()
        .expect("audit log")
        .into_iter()
        .filter(|w| w.namespace == ns && w.resource == "subscriptions" && !w.pod.is_empty())
        .filter(|w| matches!(w.verb.as_str(), "create" | "update" | "patch" | "delete"))
        .collect();
    let by = |pod: &str| writes.iter().filter(|w| w.pod == pod).collect::<Vec<_>>();
    let (old, new) = (by(&leader), by(&successor));
    assert!(!old.is_empty() && !new.is_empty(), "both leaders wrote in turn: {writes:?}");
    assert_eq!(old.len() + new.len(), writes.len(), "no third writer: {writes:?}");
    assert!(
        old.iter().all(|w| w.at <= acquired),
        "the old leader stopped writing before the takeover ({acquired}): {old:?}"
    );
    assert!(new.iter().all(|w| w.at >= acquired), "the new leader wrote nothing before it led ({acquired}): {new:?}");
    println!(
        "writes to Subscriptions: {} by {leader} before {acquired}, {} by {successor} after",
        old.len(),
        new.len()
    );

    for name in ["before", "after"] {
        subscriptions.delete(name, &DeleteParams::default()).await.expect("delete");
    }
}
