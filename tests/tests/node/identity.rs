//! Identities from the operator: its own X.509-SVID to reach nodes, and the issuer's SPIFFE
//! identities for injected pods' SLIM sessions.

use super::*;

/// The operator as a Pod in SPIFFE mode: its X.509-SVID from the SPIRE socket the chart mounts,
/// node Pods picked by selector whose controllers take their SVIDs from SLIM's own `spire` source.
#[tokio::test]
async fn the_operator_pod_reaches_nodes_with_its_x509_svid() {
    let (node, client) = installed().await;
    images::ensure_slim(node).expect("SLIM images");
    let _turn = SERIAL.lock().await;
    let ns = node.namespace(&client, "slim-spiffe").await.expect("namespace");

    // One trust domain: the operator's SVID on the chart's socket, the nodes' on another.
    let mut node_state = AgentState::new(TRUST_DOMAIN);
    let mut operator_state = AgentState::new(TRUST_DOMAIN);
    operator_state.authority = node_state.authority.clone();
    let node_id = format!("spiffe://{TRUST_DOMAIN}/slim-node");
    node_state.issue(&node_id, "");
    operator_state.issue(&format!("spiffe://{TRUST_DOMAIN}/ns/{RELEASE_NAMESPACE}/sa/slim-slim-operator"), "");
    let sockets = [spire_dir(node).join("node.sock"), spire_dir(node).join("api.sock")];
    let _node_agent = FakeAgent::start(&sockets[0], node_state).await.expect("the nodes' Workload API");
    let _operator_agent = FakeAgent::start(&sockets[1], operator_state).await.expect("the operator's Workload API");
    sockets.iter().for_each(|s| make_world_writable(s));

    let started = Instant::now();
    let _spiffe = SpiffeOperator::enable(node);
    println!("helm upgrade to SPIFFE mode, operator Pods rolled and Ready in {:.1}s", started.elapsed().as_secs_f64());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    start_slim_nodes(node, &pods, "slim-spiffe", Controller::Spiffe).await;
    let cases = [
        ("by-trust-domain", serde_json::json!({"spiffe": {"trustDomain": TRUST_DOMAIN}}), "True", "RoutesInstalled"),
        ("by-id", serde_json::json!({"spiffe": {"id": node_id}}), "True", "RoutesInstalled"),
        (
            "impostor",
            serde_json::json!({"spiffe": {"id": format!("spiffe://{TRUST_DOMAIN}/impostor")}}),
            "False",
            "TlsUnexpectedServerIdentity",
        ),
    ];
    expect_ready(&client, &ns, "slim-spiffe", &cases).await;
}

/// Identity without SPIRE that opens SLIM sessions: two injected app Pods with
/// `identity-source: kubernetes` get their SPIFFE identities from the operator Pods (the real
/// kubelet projects the token for the issuer's audience and the issuer's CA ConfigMap) and open a
/// new session every second through a SLIM node Pod; the leader Pod is deleted mid-run.
#[tokio::test]
async fn injected_pods_open_slim_sessions_with_the_operators_spiffe_identities() {
    let (node, client) = installed().await;
    images::ensure_slim(node).expect("SLIM images");
    let _turn = SERIAL.lock().await;
    let started = Instant::now();
    let _issuer = IssuerOn::enable(node);
    println!("helm upgrade with the issuer: operator Pods rolled and Ready in {:.1}s", started.elapsed().as_secs_f64());
    let ns = node.namespace(&client, "issued").await.expect("namespace");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let labels = serde_json::json!({"metadata": {"labels": {
        "slim.agntcy.org/inject-identity": "true", "slim.agntcy.org/identity-source": "kubernetes"}}});
    namespaces.patch(&ns, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(labels)).await.expect("labels");
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &ns);
    for name in ["alice", "bob"] {
        let account = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("account");
        accounts.create(&PostParams::default(), &account).await.expect("service account");
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    start_slim_nodes(node, &pods, "slim-issued", Controller::Plain).await;

    let endpoint = format!("http://slim-issued-0.slim-issued.{ns}.svc:46357");
    let identity_app = "/opt/python/bin/python3 /harness/slim_identity_app.py";
    let app = |name: &str, script: String| {
        let mut pod = injected_app(name, &script);
        pod.spec.as_mut().expect("spec").service_account_name = Some(name.to_owned());
        pod
    };
    let bob = app("bob", format!("{identity_app} listen {endpoint} org/ns/bob spire:"));
    pods.create(&PostParams::default(), &bob).await.expect("bob");
    let seconds: u32 = 60;
    let alice =
        app("alice", format!("{identity_app} send {endpoint} org/ns/alice spire: org/ns/bob {seconds}; sleep 3600"));
    pods.create(&PostParams::default(), &alice).await.expect("alice");
    wait_log_for(&pods, "alice", "app", "reply 5 ", Duration::from_secs(120)).await;
    println!("issuer: alice's 5th session {:.1}s after the upgrade", started.elapsed().as_secs_f64());

    // The leader Pod goes; the other replica issues on (every replica does) and takes the lease.
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let lease = leases.get("slim-operator-leader").await.expect("lease");
    let leader = lease.spec.and_then(|s| s.holder_identity).expect("a leader");
    let operators: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    operators.delete(&leader, &DeleteParams::default()).await.expect("delete the leader");
    println!("issuer: leader {leader} deleted mid-run");

    let log = wait_log_for(&pods, "alice", "app", "done ", Duration::from_secs(u64::from(seconds) + 120)).await;
    let replies = log.lines().filter(|l| l.starts_with("reply ")).count();
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error ")).collect();
    println!("issuer: alice -> bob with the operator's SPIFFE identities: {replies} sessions, {} failed", errors.len());
    assert!(replies >= 50 && errors.is_empty(), "sessions between injected apps: {log}");
    for name in ["alice", "bob"] {
        let agent = container_log(&pods, name, "slim-identity-agent").await;
        let id = format!("X.509-SVID issued spiffe_id=spiffe://cluster.local/ns/{ns}/sa/{name}");
        assert!(agent.contains(&id), "{name}'s agent: {agent}");
        let pod = pods.get(name).await.expect("pod");
        let app = &pod.spec.as_ref().expect("spec").containers[0];
        let mounts: Vec<&str> = app.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
        assert!(mounts.contains(&"/run/slim-identity"), "{name}'s app mounts the agent's socket: {mounts:?}");
        assert!(!mounts.iter().any(|m| m.contains("slim.agntcy.org")), "{name}'s app sees no issuer token: {mounts:?}");
    }
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(maps.get_opt("slim-identity-issuer-ca").await.expect("read").is_some(), "the issuer's CA published");
}
