//! The real `slim-operator` binary on the real API server: authenticated as the chart's
//! ServiceAccount (a token from the TokenRequest API) with exactly the chart's RBAC, configured
//! with the chart Deployment's environment. Every verb the operator needs must be granted by the
//! chart: a missing one fails these tests.

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use slim_e2e::chart_install::{Chart, ChartInstall, apply_rbac, install_as_the_chart, kubeconfig_for, render};
use slim_e2e::control_plane::{self, install_crds};
use slim_e2e::operator::{OperatorProcess, chart_environment};
use slim_e2e::{ChannelManager, SlimApp, SlimNode, init_logging, wait_for};
use slim_operator::api::{SlimChannel, Subscription};
use slim_operator::slim::{ChannelManagerClient, NodePool};

/// `plane` with the CRDs, and an admin client.
async fn setup(plane: &'static control_plane::ControlPlane) -> (&'static control_plane::ControlPlane, Client) {
    let admin = plane.client().await.expect("admin client");
    install_crds(&admin).await.expect("CRDs");
    (plane, admin)
}

fn ready(sub: &Subscription) -> bool {
    sub.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_works_with_exactly_the_charts_rbac() {
    init_logging();
    // Its own API server: an operator over every namespace would reconcile the other test's objects.
    let (plane, admin) = setup(control_plane::dedicated()).await;
    binary_works(&admin, install_as_the_chart(plane, &admin, &[]).await).await;
}

/// `watchNamespace`: the same, with rights on the CRs, Pods, Secrets and events in the apps
/// namespace only; an object in another namespace is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_works_namespace_scoped_with_exactly_the_charts_rbac() {
    init_logging();
    let (plane, admin) = setup(control_plane::shared()).await;
    let install = slim_e2e::chart_install::install_namespace_scoped(plane, &admin).await;
    let elsewhere = plane.namespace(&admin, "elsewhere").await.expect("namespace");
    let node = SlimNode::start("node-elsewhere").expect("node");
    let others: Api<Subscription> = Api::namespaced(admin.clone(), &elsewhere);
    others.create(&PostParams::default(), &subscription("other", &node, &node)).await.expect("create");
    binary_works(&admin, install).await;
    let other = others.get("other").await.expect("other");
    assert!(
        other.status.is_none() && other.finalizers().is_empty(),
        "touched outside the watched namespace: {other:?}"
    );
}

/// The operator binary as the chart runs it, with exactly the chart's RBAC: Ready, its webhook
/// certificate and Lease in place, a Subscription and a SlimChannel reconciled and cleaned up, no
/// call forbidden.
async fn binary_works(admin: &Client, install: ChartInstall) {
    let ChartInstall { operator_ns, apps_ns, chart, kubeconfig, pod_name, mut env, .. } = install;

    let a = SlimNode::start("node-a").expect("node a");
    let b = SlimNode::start("node-b").expect("node b");
    let cm = ChannelManager::start(&a).expect("channel manager");
    let mut bob = SlimApp::member(&a, "org/ns/bob").expect("bob");
    let mut carol = SlimApp::member(&a, "org/ns/carol").expect("carol");

    env.push(("SLIM_OPERATOR_CHANNEL_MANAGER".into(), cm.endpoint()));
    let mut operator = OperatorProcess::start(&kubeconfig, &env).expect("operator");

    // Ready: caches synced as leader, webhook certificate in place.
    operator.wait_readyz(200, Duration::from_secs(60)).expect("/readyz turns 200");
    let (status, metrics) = operator.get("/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("slim_operator_"), "{metrics}");

    let secret_name = env.iter().find(|(k, _)| k == "SLIM_OPERATOR_WEBHOOK_SECRET").map(|(_, v)| v.clone());
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &operator_ns);
    let admin = admin.clone();
    let tls =
        secrets.get(&secret_name.expect("the chart names the webhook Secret")).await.expect("webhook Secret written");
    assert!(tls.data.as_ref().is_some_and(|d| d.contains_key("tls.crt") && d.contains_key("ca.crt")));
    let configuration = Api::<MutatingWebhookConfiguration>::all(admin.clone())
        .get(&chart.webhooks[0].name_any())
        .await
        .expect("webhook configuration");
    for webhook in configuration.webhooks.iter().flatten() {
        assert!(webhook.client_config.ca_bundle.as_ref().is_some_and(|b| !b.0.is_empty()), "caBundle is published");
    }
    let lease = Api::<Lease>::namespaced(admin.clone(), &operator_ns).get("slim-operator-leader").await.expect("lease");
    assert_eq!(lease.spec.and_then(|s| s.holder_identity), Some(pod_name));

    // A Subscription and a SlimChannel, created by a user (admin), reconciled by the operator.
    let subs: Api<Subscription> = Api::namespaced(admin.clone(), &apps_ns);
    let sub: Subscription = serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription",
        "metadata": {"name": "bob"},
        "spec": {"name": "org/ns/bob", "nodes": {"endpoints": [b.controller_endpoint()]}, "link": {"endpoint": a.data_endpoint()}}
    }))
    .expect("subscription");
    subs.create(&PostParams::default(), &sub).await.expect("create Subscription");
    let channels: Api<SlimChannel> = Api::namespaced(admin.clone(), &apps_ns);
    let channel: SlimChannel = serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "SlimChannel",
        "metadata": {"name": "team"},
        "spec": {"name": "org/ns/team", "participants": ["org/ns/bob", "org/ns/carol"], "nodes": {"endpoints": [a.controller_endpoint()]}}
    }))
    .expect("channel");
    channels.create(&PostParams::default(), &channel).await.expect("create SlimChannel");

    wait_for("Subscription Ready", Duration::from_secs(60), async || subs.get("bob").await.ok().filter(ready)).await;
    wait_for("both members joined", Duration::from_secs(90), async || {
        channels.get("team").await.ok().filter(|c| c.status.as_ref().is_some_and(|s| s.joined == 2))
    })
    .await;
    bob.wait_for("joined", Duration::from_secs(10)).expect("bob joined");
    carol.wait_for("joined", Duration::from_secs(10)).expect("carol joined");

    // Deletes clean up: the route off node b, the channel out of the manager.
    subs.delete("bob", &DeleteParams::default()).await.expect("delete Subscription");
    channels.delete("team", &DeleteParams::default()).await.expect("delete SlimChannel");
    wait_for("Subscription gone", Duration::from_secs(60), async || {
        subs.get_opt("bob").await.ok().filter(Option::is_none)
    })
    .await;
    wait_for("SlimChannel gone", Duration::from_secs(90), async || {
        channels.get_opt("team").await.ok().filter(Option::is_none)
    })
    .await;
    let observed = NodePool::default().node(&b.controller_endpoint()).snapshot(Duration::ZERO).await.expect("routes");
    assert!(observed.routes.is_empty(), "routes left on node b: {observed:?}");
    let manager = ChannelManagerClient::new(&cm.endpoint()).expect("client");
    assert!(!manager.list_channels().await.expect("channels").contains(&"org/ns/team".to_owned()));

    let log = operator.log();
    assert!(!log.to_lowercase().contains("forbidden"), "a call was forbidden by the chart's RBAC:\n{log}");
    let exit = operator.terminate(Duration::from_secs(20)).expect("exits on SIGTERM");
    assert!(exit.success(), "{exit:?}\n{}", operator.log());
}

fn subscription(name: &str, node: &SlimNode, link_to: &SlimNode) -> Subscription {
    serde_json::from_value(json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription",
        "metadata": {"name": name},
        "spec": {"name": format!("org/ns/{name}"), "nodes": {"endpoints": [node.controller_endpoint()]}, "link": {"endpoint": link_to.data_endpoint()}}
    }))
    .expect("subscription")
}

/// Started before its namespace and its webhook configuration exist, the operator reconciles
/// anyway, says in `/readyz` what is missing, and turns ready once they appear; a watch that
/// breaks turns it unready until the API answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_against_a_half_ready_cluster() {
    init_logging();
    let (plane, admin) = setup(control_plane::dedicated()).await;
    let apps_ns = plane.namespace(&admin, "apps").await.expect("namespace");
    let operator_ns = format!("later-{}", &apps_ns[apps_ns.len() - 8..]);
    let configuration = format!("slim-operator-{operator_ns}");
    let a = SlimNode::start("node-a").expect("node a");
    let b = SlimNode::start("node-b").expect("node b");
    let env = vec![
        ("POD_NAMESPACE".to_owned(), operator_ns.clone()),
        ("SLIM_OPERATOR_WEBHOOK_CONFIGURATION".to_owned(), configuration.clone()),
    ];
    let operator = OperatorProcess::start(&plane.admin_kubeconfig, &env).expect("operator");

    // Missing namespace: not ready, and /readyz says why; the controllers work regardless.
    let why = operator.wait_readyz(503, Duration::from_secs(30)).expect("/readyz answers");
    let subs: Api<Subscription> = Api::namespaced(admin.clone(), &apps_ns);
    subs.create(&PostParams::default(), &subscription("early", &a, &b)).await.expect("create");
    wait_for("Subscription Ready while the webhook waits", Duration::from_secs(60), async || {
        subs.get("early").await.ok().filter(ready)
    })
    .await;
    let missing_namespace = format!("namespaces \"{operator_ns}\" not found");
    let why = if why.contains(&missing_namespace) { why } else { operator.get("/readyz").expect("readyz").1 };
    assert!(why.contains(&missing_namespace), "{why}");

    // The namespace appears: next, the webhook configuration is what is missing.
    plane.create_namespace(&admin, &operator_ns).await.expect("namespace");
    wait_for("readyz names the webhook configuration", Duration::from_secs(30), async || {
        let (status, body) = operator.get("/readyz").ok()?;
        (status == 503 && body.contains(&format!("MutatingWebhookConfiguration {configuration} not found")))
            .then_some(())
    })
    .await;
    let webhook: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": configuration},
        "webhooks": [{
            "name": "identity.slim.agntcy.org", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Ignore", "clientConfig": {"url": format!("https://127.0.0.1:{}/mutate", operator.webhook.port())},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "nothing-here"}},
        }]
    }))
    .expect("webhook configuration");
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    configurations.create(&PostParams::default(), &webhook).await.expect("create webhook configuration");
    operator.wait_readyz(200, Duration::from_secs(30)).expect("ready once everything exists");
    let published = configurations.get(&configuration).await.expect("get");
    assert!(published.webhooks.iter().flatten().all(|w| w.client_config.ca_bundle.is_some()), "caBundle published");

    // The Subscription kind disappears (its watch breaks): unready with the cause, then ready
    // again once the CRD is back.
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(admin.clone());
    subs.delete("early", &DeleteParams::default()).await.expect("delete");
    wait_for("Subscription gone", Duration::from_secs(60), async || {
        subs.get_opt("early").await.ok().filter(Option::is_none)
    })
    .await;
    crds.delete("subscriptions.slim.agntcy.org", &DeleteParams::default()).await.expect("delete CRD");
    let why = operator.wait_readyz(503, Duration::from_secs(60)).expect("unready while the watch fails");
    assert!(why.contains("Subscription cache"), "{why}");
    install_crds(&admin).await.expect("CRDs again");
    operator.wait_readyz(200, Duration::from_secs(60)).expect("ready again");
    let log = operator.log();
    assert!(log.contains("retrying"), "the log says what is retried:\n{log}");
}

/// Another ServiceAccount with exactly the chart's grants (its bindings copied), so a second
/// replica writes as a user of its own and the audit log tells the two apart.
async fn second_identity(client: &Client, namespace: &str, chart: &Chart, name: &str) -> String {
    let pp = PostParams::default();
    let mut sa = chart.service_accounts.first().expect("the chart has a ServiceAccount").clone();
    sa.metadata = kube::api::ObjectMeta { name: Some(name.to_owned()), ..Default::default() };
    Api::<ServiceAccount>::namespaced(client.clone(), namespace).create(&pp, &sa).await.expect("ServiceAccount");
    let rebind = |subjects: &mut Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        for subject in subjects.iter_mut().flatten() {
            if subject.kind == "ServiceAccount" {
                subject.name = name.to_owned();
            }
        }
    };
    for binding in &chart.cluster_role_bindings {
        let mut copy = binding.clone();
        copy.metadata =
            kube::api::ObjectMeta { name: Some(format!("{}-{name}", binding.name_any())), ..Default::default() };
        rebind(&mut copy.subjects);
        Api::<ClusterRoleBinding>::all(client.clone()).create(&pp, &copy).await.expect("ClusterRoleBinding");
    }
    for binding in &chart.role_bindings {
        let mut copy = binding.clone();
        copy.metadata =
            kube::api::ObjectMeta { name: Some(format!("{}-{name}", binding.name_any())), ..Default::default() };
        rebind(&mut copy.subjects);
        Api::<RoleBinding>::namespaced(client.clone(), namespace).create(&pp, &copy).await.expect("RoleBinding");
    }
    name.to_owned()
}

fn holder(lease: Option<Lease>) -> Option<String> {
    lease.and_then(|l| l.spec).and_then(|s| s.holder_identity)
}

/// Two replicas with leader election, each as its own ServiceAccount. The leader is frozen
/// (SIGSTOP: every call it would make hangs); the other takes the Lease over and reconciles; the
/// frozen one, thawed, must not write anything: its renew deadline has passed. The API server's
/// audit log is the judge of who wrote what, and when.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_both_write() {
    init_logging();
    let (plane, admin) = setup(control_plane::dedicated()).await;
    let operator_ns = plane.namespace(&admin, "slim-ha").await.expect("namespace");
    let apps_ns = plane.namespace(&admin, "apps").await.expect("namespace");
    let release = format!("ha-{}", &operator_ns[operator_ns.len() - 8..]);
    let chart = render(&release, &operator_ns, &[]);
    let first_sa = apply_rbac(&admin, &operator_ns, &chart).await;
    let second_sa = second_identity(&admin, &operator_ns, &chart, "replica-b").await;
    let a_node = SlimNode::start("node-a").expect("node a");
    let b_node = SlimNode::start("node-b").expect("node b");

    let mut env = chart_environment(chart.deployment.as_ref().expect("the chart has a Deployment"));
    env.retain(|(k, _)| !k.starts_with("SLIM_OPERATOR_LEASE") && k != "SLIM_OPERATOR_LEADER_ELECTION");
    env.extend(slim_e2e::operator::fast_election_env(&operator_ns));
    let start = |service_account: &str, pod: &str| {
        let service_account = service_account.to_owned();
        let (env, pod) = (env.clone(), pod.to_owned());
        let admin = admin.clone();
        let operator_ns = operator_ns.clone();
        async move {
            let kubeconfig = kubeconfig_for(plane, &admin, &operator_ns, &service_account, &pod).await;
            let mut env = env;
            env.push(("POD_NAME".into(), pod));
            OperatorProcess::start(&kubeconfig, &env).expect("operator")
        }
    };
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &operator_ns);
    let mut first = start(&first_sa, "replica-a").await;
    first.wait_readyz(200, Duration::from_secs(60)).expect("a ready");
    wait_for("a leads", Duration::from_secs(30), async || {
        (holder(leases.get_opt("slim-operator-leader").await.ok()?).as_deref() == Some("replica-a")).then_some(())
    })
    .await;
    let mut second = start(&second_sa, "replica-b").await;
    second.wait_readyz(200, Duration::from_secs(60)).expect("b ready as a follower");

    let subs: Api<Subscription> = Api::namespaced(admin.clone(), &apps_ns);
    let pp = PostParams::default();
    subs.create(&pp, &subscription("s1", &b_node, &a_node)).await.expect("create s1");
    wait_for("s1 Ready (by a)", Duration::from_secs(60), async || subs.get("s1").await.ok().filter(ready)).await;

    // Freeze the leader: b takes over once the Lease has stayed unchanged for 6 s as it sees it.
    let pid = |p: &OperatorProcess| nix::unistd::Pid::from_raw(p.pid() as i32);
    nix::sys::signal::kill(pid(&first), nix::sys::signal::SIGSTOP).expect("SIGSTOP");
    wait_for("b takes the Lease over", Duration::from_secs(30), async || {
        (holder(leases.get_opt("slim-operator-leader").await.ok()?).as_deref() == Some("replica-b")).then_some(())
    })
    .await;
    subs.create(&pp, &subscription("s2", &b_node, &a_node)).await.expect("create s2");
    wait_for("s2 Ready (by b)", Duration::from_secs(60), async || subs.get("s2").await.ok().filter(ready)).await;

    // Thaw the old leader: it must find its deadline passed and write nothing at all.
    nix::sys::signal::kill(pid(&first), nix::sys::signal::SIGCONT).expect("SIGCONT");
    subs.create(&pp, &subscription("s3", &b_node, &a_node)).await.expect("create s3");
    wait_for("s3 Ready (by b)", Duration::from_secs(60), async || subs.get("s3").await.ok().filter(ready)).await;
    let s1: Subscription = subs.get("s1").await.expect("s1");
    let mut changed = s1.clone();
    changed.metadata.labels.get_or_insert_default().insert("touched".into(), "yes".into());
    subs.replace("s1", &pp, &changed).await.expect("touch s1");
    tokio::time::sleep(Duration::from_secs(5)).await;

    let a_user = format!("system:serviceaccount:{operator_ns}:{first_sa}");
    let b_user = format!("system:serviceaccount:{operator_ns}:{second_sa}");
    let writes: Vec<_> = plane
        .audited()
        .expect("audit log")
        .into_iter()
        .filter(|w| matches!(w.verb.as_str(), "create" | "update" | "patch" | "delete"))
        .collect();
    let takeover = writes
        .iter()
        .find(|w| w.user == b_user && w.resource == "leases" && w.code < 300)
        .map(|w| w.at.clone())
        .expect("b wrote the Lease");
    let a_after: Vec<_> = writes.iter().filter(|w| w.user == a_user && w.at >= takeover).collect();
    assert!(a_after.is_empty(), "the old leader wrote after the takeover at {takeover}: {a_after:#?}");
    let a_before = writes.iter().filter(|w| w.user == a_user && w.resource == "subscriptions").count();
    assert!(a_before > 0, "a reconciled s1 while it led");
    for name in ["s2", "s3"] {
        assert!(
            writes.iter().any(|w| w.user == b_user && w.resource == "subscriptions" && w.name == name),
            "b wrote {name}"
        );
        assert!(!writes.iter().any(|w| w.user == a_user && w.name == name), "a never touched {name}");
    }
    let log = first.log();
    assert!(log.contains("stepping down") || log.contains("lost the lease"), "a says it stopped leading:\n{log}");
    assert!(second.log().contains("became leader"));
    assert!(first.terminate(Duration::from_secs(20)).is_some_and(|s| s.success()), "{}", first.log());
    assert!(second.terminate(Duration::from_secs(20)).is_some_and(|s| s.success()), "{}", second.log());
}

/// The binary in SPIFFE mode, as the chart's `controlTls.spiffe` configures it: its X.509-SVID
/// from a Workload API socket, SPIFFE by default for `https://` nodes (trust domain example.org);
/// a node that takes its own SVID from SLIM's `spire` source gets its route; a Subscription that
/// wants another SPIFFE ID for the same node is refused with its own reason, the other unharmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reaches_nodes_with_its_x509_svid() {
    use slim_e2e::pki::SpiffeNode;
    init_logging();
    let (plane, admin) = setup(control_plane::dedicated()).await;
    let ChartInstall { operator_ns, apps_ns, service_account, kubeconfig, mut env, .. } =
        install_as_the_chart(plane, &admin, &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let node_id = "spiffe://example.org/ns/slim/sa/slim";
    let operator_id = format!("spiffe://example.org/ns/{operator_ns}/sa/{service_account}");
    let spiffe = SpiffeNode::start(dir.path(), "node-spiffe", node_id, &operator_id).await;
    let node = &spiffe.node;
    let target = SlimNode::start("node-target").expect("target");

    env.push(("SLIM_OPERATOR_SPIFFE_ENDPOINT_SOCKET".into(), format!("unix://{}", spiffe.operator_socket.display())));
    env.push(("SLIM_OPERATOR_CONTROL_TLS_SPIFFE_TRUST_DOMAIN".into(), "example.org".into()));
    // carol's node is never reachable with her setting: her deletion gives up after this.
    env.push(("SLIM_OPERATOR_CLEANUP_TIMEOUT".into(), "5s".into()));
    let mut operator = OperatorProcess::start(&kubeconfig, &env).expect("operator");
    operator.wait_readyz(200, Duration::from_secs(60)).expect("/readyz turns 200");

    let subs: Api<Subscription> = Api::namespaced(admin.clone(), &apps_ns);
    let create = |name: &str, tls: Option<serde_json::Value>| {
        let mut nodes = json!({"endpoints": [node.controller_endpoint()]});
        if let Some(tls) = tls {
            nodes["tls"] = tls;
        }
        serde_json::from_value::<Subscription>(json!({
            "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "Subscription", "metadata": {"name": name},
            "spec": {"name": format!("org/ns/{name}"), "nodes": nodes, "link": {"endpoint": target.data_endpoint()}}
        }))
        .expect("subscription")
    };
    subs.create(&PostParams::default(), &create("bob", None)).await.expect("create");
    let wrong = json!({"spiffe": {"id": "spiffe://example.org/ns/slim/sa/impostor"}});
    subs.create(&PostParams::default(), &create("carol", Some(wrong))).await.expect("create");
    wait_for("bob Ready over SPIFFE mTLS", Duration::from_secs(60), async || subs.get("bob").await.ok().filter(ready))
        .await;
    let reason = |sub: &Subscription| {
        sub.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    let (why, message) = wait_for("carol refused", Duration::from_secs(60), async || {
        reason(&subs.get("carol").await.ok()?).filter(|(r, _)| r != "Reconciling")
    })
    .await;
    assert_eq!(why, "TlsUnexpectedServerIdentity", "{message}");
    assert!(message.contains(node_id) && message.contains("impostor"), "{message}");
    assert!(subs.get("bob").await.ok().is_some_and(|s| ready(&s)), "bob unharmed by carol's setting");

    // Deleted while the operator runs: their finalizers must not outlive this test (a CRD with
    // objects left stays Terminating, and the tests after this one delete it).
    for name in ["bob", "carol"] {
        subs.delete(name, &DeleteParams::default()).await.expect("delete");
    }
    wait_for("both Subscriptions gone", Duration::from_secs(90), async || {
        subs.list(&Default::default()).await.ok().filter(|l| l.items.is_empty())
    })
    .await;
    let log = operator.log();
    assert!(log.contains("operator X.509-SVID"), "the SVID stream: {log}");
    let exit = operator.terminate(Duration::from_secs(20)).expect("exits on SIGTERM");
    assert!(exit.success(), "{exit:?}\n{}", operator.log());
}
