//! The operator as SPIFFE issuer, on the real API server: the `slim-operator` binary runs as the
//! chart's ServiceAccount with exactly the chart's RBAC (`identityIssuer.enabled`), the agent
//! binary (`identity_source: kubernetes` with the issuer) authenticates with TokenRequest tokens
//! bound to real Pod objects, and serves what it is issued on its Workload API socket. Real SLIM
//! apps (`slim-bindings` 3.3.8, SLIM's own `spire` provider and verifier) on those sockets are the
//! proof that the identities open sessions.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use slim_e2e::chart_install::ChartInstall;
use slim_e2e::identity::{ProjectedVolume, mint, workload, workload_with};
use slim_e2e::issuer::{Installed, Issuer, start_operator};
use slim_e2e::{KillOnDrop, SlimApp, SlimNode, spire_identity, wait_for, workspace_binary};
use slim_identity_agent::issuer::IssuerError;
use slim_identity_agent::workload::WorkloadClient;
use slim_operator::issuer::authority::RealKeys;
use slim_operator::issuer::keys::{self, Policy};
use slim_operator::webhook::inject::{INJECTED, INJECTED_SOURCE};

/// The chart's issuer audience (values.yaml `identityIssuer.audience`).
const AUDIENCE: &str = "slim-operator";
/// What an injected pod carries.
const INJECTED_KUBERNETES: [(&str, &str); 2] = [(INJECTED, "0.1.0"), (INJECTED_SOURCE, "kubernetes")];

/// One pod's agent with the issuer: the projected volume (a `slim` token, an API token, the
/// cluster's CA, the issuer's token and CA), the process, its Workload API socket.
struct Agent {
    socket: PathBuf,
    log: PathBuf,
    _process: KillOnDrop,
}

impl Agent {
    /// `issuer_token` is what the agent presents; `account` the service account it believes it
    /// runs as (the pod's, unless a test lies).
    async fn start(issuer: &Issuer, pod: &Pod, issuer_token: &str, account: &str) -> Self {
        let volume = Self::volume(issuer, pod, issuer_token).await;
        Self::spawn(issuer, pod, volume, account)
    }

    /// What the kubelet would project for the agent (tokens bound to `pod`, the CAs).
    async fn volume(issuer: &Issuer, pod: &Pod, issuer_token: &str) -> ProjectedVolume {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let home = issuer.dir.path().join(format!("{}-{n}", pod.name_any()));
        let client = &issuer.admin;
        let namespace = pod.namespace().unwrap_or_default();
        let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default();
        let token = mint(client, &namespace, &sa, &["slim"], Some(pod)).await;
        let api_token = mint(client, &namespace, &sa, &[], Some(pod)).await;
        let (issuer_ca, _) = issuer.tls().await;
        let mut volume = ProjectedVolume::new(&home.join("volume")).expect("volume");
        volume
            .write(&[
                ("token", token.as_bytes()),
                ("api-token", api_token.as_bytes()),
                ("ca.crt", issuer.plane.ca_pem.as_bytes()),
                ("issuer-token", issuer_token.as_bytes()),
                ("issuer-ca.crt", issuer_ca.as_bytes()),
            ])
            .expect("project");
        volume
    }

    fn spawn(issuer: &Issuer, pod: &Pod, volume: ProjectedVolume, account: &str) -> Self {
        let (name, namespace) = (pod.name_any(), pod.namespace().unwrap_or_default());
        let home = volume.dir.parent().expect("home").to_owned();
        let server_name = format!("{}.{}.svc", issuer.env("SLIM_OPERATOR_WEBHOOK_SERVICE"), issuer.install.operator_ns);
        let socket = home.join("run/agent.sock");
        let svids = home.join("svids");
        std::fs::create_dir_all(&svids).expect("svids");
        let config = home.join("agent.yaml");
        std::fs::write(
            &config,
            format!(
                "identity_source: kubernetes\nkubernetes_api_server: {server}\n\
                 kubernetes_token_file: {v}/token\nkubernetes_ca_file: {v}/ca.crt\nkubernetes_api_token_file: {v}/api-token\n\
                 kubernetes_issuer_url: https://{addr}\nkubernetes_issuer_token_file: {v}/issuer-token\n\
                 kubernetes_issuer_ca_file: {v}/issuer-ca.crt\nkubernetes_issuer_server_name: {server_name}\n\
                 workload_api_socket: {socket}\ncert_dir: {svids}\n\
                 jwt_svids: [{{jwt_audience: slim, jwt_svid_file_name: jwt_svid.token}}]\n\
                 jwt_bundle_file_name: key.jwt\njwt_svid_write_mode: in-place\n",
                server = issuer.plane.server,
                v = volume.dir.display(),
                addr = issuer.addr,
                socket = socket.display(),
                svids = svids.display(),
            ),
        )
        .expect("config");
        let log = home.join("agent.log");
        let out = std::fs::File::create(&log).expect("log");
        let child = std::process::Command::new(
            workspace_binary("slim-identity-agent", "SLIM_IDENTITY_AGENT_BIN").expect("agent"),
        )
        .arg("-config")
        .arg(&config)
        .env("SLIM_POD_NAME", &name)
        .env("SLIM_POD_NAMESPACE", &namespace)
        .env("SLIM_POD_UID", pod.uid().unwrap_or_default())
        .env("SLIM_POD_SERVICE_ACCOUNT", account)
        .env("RUST_LOG", "info")
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("start the agent");
        Self { socket, log, _process: KillOnDrop(child) }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The X.509-SVID served on the socket, once there is one.
    async fn svid(&self) -> slim_identity_agent::workload::pb::X509svidResponse {
        wait_for("the agent's socket to serve an X.509-SVID", Duration::from_secs(30), async || {
            let client = WorkloadClient::connect(&self.socket).await.ok()?;
            client.x509_svids().await.ok()?.message().await.ok()?
        })
        .await
    }

    /// Waits for the agent to log `reason` (a refusal), returning the log.
    async fn refused_with(&self, reason: &str) -> String {
        wait_for(&format!("the agent to log {reason}"), Duration::from_secs(30), async || {
            let log = self.log();
            log.contains(reason).then_some(log)
        })
        .await
    }
}

async fn injected_workload(client: &Client, namespace: &str, name: &str) -> Pod {
    workload_with(client, namespace, name, &INJECTED_KUBERNETES).await
}

fn refusal_reason(error: IssuerError) -> String {
    match error {
        IssuerError::Refused { reason, .. } => reason,
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_issues_to_injected_pods_and_refuses_everyone_else() {
    let issuer = Issuer::start(&[]).await;
    let (client, apps) = (issuer.admin.clone(), issuer.apps().to_owned());

    // Alice: an injected pod; her agent gets an X.509-SVID from a CSR and JWT-SVIDs on request.
    let alice_pod = injected_workload(&client, &apps, "alice").await;
    let alice_token = mint(&client, &apps, "alice", &[AUDIENCE], Some(&alice_pod)).await;
    let alice = Agent::start(&issuer, &alice_pod, &alice_token, "alice").await;
    let svid = alice.svid().await;
    let alice_id = format!("spiffe://cluster.local/ns/{apps}/sa/alice");
    assert_eq!(svid.svids[0].spiffe_id, alice_id);
    let socket = WorkloadClient::connect(&alice.socket).await.expect("socket");
    let audiences = vec!["slim".to_owned(), "slim-claims:eyJwdWJrZXkiOiJCQUFBIn0".to_owned()];
    let jwt = socket.jwt_svids(&audiences).await.expect("JWT-SVID").remove(0);
    let bundles = socket.jwt_bundles().await.expect("bundles").message().await.expect("stream").expect("bundles");
    let bundles = slim_identity_agent::agent::bundles_of(bundles);
    let now = slim_identity_agent::agent::unix_now();
    let valid = slim_identity_agent::svid::jwt::validate(&jwt.svid, &bundles, &audiences[1..], now, 0).expect("valid");
    assert_eq!(valid.spiffe_id, alice_id);
    assert!(valid.expiry - now <= 300, "JWT-SVIDs live 5 min by default");
    let operator_log = issuer.operator.log();
    assert!(operator_log.contains("SVID issued"), "{operator_log}");
    assert!(!operator_log.contains(&alice_token) && !alice.log().contains(&alice_token), "tokens are never logged");

    // Refusals, each seen in the agent's log and counted by the operator under its reason.
    let other_audience = mint(&client, &apps, "alice", &["slim"], Some(&alice_pod)).await;
    let wrong_audience = Agent::start(&issuer, &alice_pod, &other_audience, "alice").await;
    eprintln!(
        "token for another audience: {}",
        last_refusal(&wrong_audience.refused_with("TokenNotAuthenticated").await)
    );

    let carol_pod = workload(&client, &apps, "carol").await;
    let carol_token = mint(&client, &apps, "carol", &[AUDIENCE], Some(&carol_pod)).await;
    let carol = Agent::start(&issuer, &carol_pod, &carol_token, "carol").await;
    eprintln!("pod without the annotation: {}", last_refusal(&carol.refused_with("PodNotInjected").await));

    // A token of alice's pod in an agent that claims to be bob's: its CSR names bob.
    let impostor = Agent::start(&issuer, &alice_pod, &alice_token, "bob").await;
    eprintln!("one pod's token for another: {}", last_refusal(&impostor.refused_with("WrongSpiffeId").await));

    let dave_pod = injected_workload(&client, &apps, "dave").await;
    let dave_token = mint(&client, &apps, "dave", &[AUDIENCE], Some(&dave_pod)).await;
    let dave_volume = Agent::volume(&issuer, &dave_pod, &dave_token).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &apps);
    pods.delete(&dave_pod.name_any(), &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .expect("delete dave");
    wait_for("dave's pod gone", Duration::from_secs(20), async || {
        pods.get_opt(&dave_pod.name_any()).await.ok().flatten().is_none().then_some(())
    })
    .await;
    let dave = Agent::spawn(&issuer, &dave_pod, dave_volume, "dave");
    eprintln!("token of a deleted pod: {}", last_refusal(&dave.refused_with("TokenNotAuthenticated").await));

    // Straight to the issuer: a CSR for another SPIFFE ID, oversized audience lists.
    let direct = issuer.client(&alice_token, "alice").await;
    let (_, csr) =
        slim_identity_agent::issuer::key_and_csr(&format!("spiffe://cluster.local/ns/{apps}/sa/admin")).expect("csr");
    assert_eq!(refusal_reason(direct.x509_svid(&csr).await.expect_err("CSR for admin")), "WrongSpiffeId");
    let many: Vec<String> = (0..17).map(|i| format!("aud-{i}")).collect();
    assert_eq!(refusal_reason(direct.jwt_svid(many).await.expect_err("17 audiences")), "BadAudiences");
    let large = vec!["x".repeat(9 * 1024)];
    assert_eq!(refusal_reason(direct.jwt_svid(large).await.expect_err("9 KiB")), "BadAudiences");
    let issued = direct.jwt_svid(vec!["slim".into()]).await.expect("alice's own JWT-SVID");
    assert_eq!(issued.spiffe_id, alice_id);
    // The agent's own Workload API refuses oversized lists before they reach the issuer.
    let status = socket.jwt_svids(&(0..17).map(|i| format!("a{i}")).collect::<Vec<_>>()).await.expect_err("17");
    eprintln!("the agent, 17 audiences: {status}");

    let metrics = issuer.metrics();
    for reason in ["TokenNotAuthenticated", "PodNotInjected", "WrongSpiffeId", "BadAudiences"] {
        assert!(metrics.contains(&format!("reason=\"{reason}\"")), "{reason} counted:\n{metrics}");
    }
    assert!(metrics.contains("slim_operator_issuer_requests_total{kind=\"x509\",result=\"issued\"}"), "{metrics}");
}

/// The last refusal an agent logged (for the test's output).
fn last_refusal(log: &str) -> String {
    log.lines().rev().find(|l| l.contains("refused")).unwrap_or_default().to_owned()
}

/// A key set whose JWT key was published `age` ago (so the leader rotates it soon), in the
/// issuer's Secret before the operator starts.
async fn seed_keys(admin: &Client, install: &ChartInstall, policy: &Policy, age: i64) {
    let now = slim_identity_agent::agent::unix_now();
    let set = keys::initial("cluster.local", policy, now - age, &mut RealKeys).expect("keys");
    let mut secret = Secret {
        data: Some(
            [(slim_operator::issuer::store::DATA_KEY.to_owned(), ByteString(serde_json::to_vec(&set).expect("json")))]
                .into(),
        ),
        ..Default::default()
    };
    let name = install.env.iter().find(|(k, _)| k == "SLIM_OPERATOR_ISSUER_SECRET").map(|(_, v)| v.clone());
    secret.metadata.name = name;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &install.operator_ns);
    secrets.create(&PostParams::default(), &secret).await.expect("seeded keys");
}

/// The issuer's key set as it is in its Secret now.
async fn key_set(issuer: &Issuer) -> keys::KeySet {
    let secrets: Api<Secret> = Api::namespaced(issuer.admin.clone(), &issuer.install.operator_ns);
    let secret = secrets.get(&issuer.env("SLIM_OPERATOR_ISSUER_SECRET")).await.expect("keys Secret");
    let data = secret.data.and_then(|d| d.get(slim_operator::issuer::store::DATA_KEY).cloned()).expect("keys.json");
    serde_json::from_slice(&data.0).expect("key set")
}

fn kid_of(token: &str) -> String {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap_or_default();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&json)
        .ok()
        .and_then(|h| h["kid"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// `(replies, failures)` of a sender.
fn outcomes(app: &SlimApp) -> (usize, Vec<String>) {
    let output = app.output();
    let ok = output.lines().filter(|l| l.starts_with("reply ")).count();
    (ok, output.lines().filter(|l| l.starts_with("error ")).map(str::to_owned).collect())
}

/// A new point-to-point session every second for 110 s between two apps whose agents get their
/// identities from the issuer, across a JWT key rotation (published t≈20 s, signing t≈80 s) and a
/// restart of the operator (t≈45 s): every session completes. A SLIM app with a key from another
/// issuer (same trust domain) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slim_sessions_hold_across_a_key_rotation_and_an_operator_restart() {
    let policy = Policy { x509_ttl: 3600, jwt_ttl: 60, ca_rotation: 365 * 86400, jwt_rotation: 150 };
    let values = ["identityIssuer.jwtTtl=60s", "identityIssuer.jwtKeyRotation=150s", "identityIssuer.bundleRefresh=5s"];
    // The Secret must be there before the operator: install the chart's RBAC first, seed, start.
    let installed = Installed::new(&values).await;
    seed_keys(&installed.admin, &installed.install, &policy, 130).await;
    let mut issuer = installed.start();
    let admin = issuer.admin.clone();
    let first_kid = key_set(&issuer).await.jwt_keys[0].id.clone();
    let apps = issuer.apps().to_owned();

    let mut agents = Vec::new();
    for name in ["alice", "bob"] {
        let pod = injected_workload(&admin, &apps, name).await;
        let token = mint(&admin, &apps, name, &[AUDIENCE], Some(&pod)).await;
        let agent = Agent::start(&issuer, &pod, &token, name).await;
        agent.svid().await;
        agents.push(agent);
    }
    let (alice, bob) = (&agents[0], &agents[1]);
    let node = SlimNode::start("node-issuer").expect("node");
    let _bob = SlimApp::identity_listener(&node, "org/ns/bob", &spire_identity(&bob.socket)).expect("bob");
    let seconds = 110;
    let start = Instant::now();
    let sender = SlimApp::identity_sender(&node, "org/ns/alice", &spire_identity(&alice.socket), "org/ns/bob", seconds)
        .expect("alice");

    tokio::time::sleep_until((start + Duration::from_secs(45)).into()).await;
    let status = issuer.operator.terminate(Duration::from_secs(20));
    eprintln!("[{:>5.1?}] operator stopped ({status:?})", start.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    issuer.operator = start_operator(&issuer.install, issuer.addr);
    issuer.operator.wait_readyz(200, Duration::from_secs(60)).expect("operator ready again");
    eprintln!("[{:>5.1?}] operator restarted", start.elapsed());

    let sender = tokio::task::spawn_blocking(move || {
        let mut sender = sender;
        let done = sender.wait_for("done ", Duration::from_secs(u64::from(seconds) + 90));
        assert!(done.is_ok(), "{done:?}");
        sender
    })
    .await
    .expect("joined");
    let (replies, failures) = outcomes(&sender);
    eprintln!("sessions over the issuer's identities: {replies} completed, {} failed", failures.len());
    assert!(replies >= 100 && failures.is_empty(), "{failures:?}\n{}", sender.output());
    drop(sender);

    // The rotation happened under the sessions: a second key signs now, the agents learnt it.
    let set = key_set(&issuer).await;
    let signing = keys::signing(&set.jwt_keys, slim_identity_agent::agent::unix_now()).expect("signing key").id.clone();
    assert_ne!(signing, first_kid, "the JWT key rotated: {set:?}");
    let socket = WorkloadClient::connect(&alice.socket).await.expect("socket");
    let token = socket.jwt_svids(&["slim".to_owned()]).await.expect("JWT-SVID").remove(0).svid;
    assert_eq!(kid_of(&token), signing, "tokens are signed by the new key");
    assert!(alice.log().contains("issuer bundle updated"), "{}", alice.log());

    // Another issuer's key (a Workload API of the same trust domain with keys of its own).
    let dir = tempfile::tempdir().expect("dir");
    let mut state = slim_identity_agent::workload::fake::AgentState::new("cluster.local");
    state.jwt_ttl = Duration::from_secs(120);
    state.issue(&format!("spiffe://cluster.local/ns/{apps}/sa/mallory"), "mallory");
    let forger = slim_identity_agent::workload::fake::FakeAgent::start(&dir.path().join("forger.sock"), state)
        .await
        .expect("another issuer");
    let mut mallory =
        SlimApp::identity_sender(&node, "org/ns/mallory", &spire_identity(&forger.socket), "org/ns/bob", 5)
            .expect("mallory");
    let done = mallory.wait_for("done ", Duration::from_secs(90));
    assert!(done.is_ok(), "{done:?}");
    let (replies, refused) = outcomes(&mallory);
    eprintln!("another issuer's identity: {replies} sessions, refusals {:?}", refused.first());
    assert_eq!(replies, 0, "{}", mallory.output());
    assert!(!refused.is_empty());
}
