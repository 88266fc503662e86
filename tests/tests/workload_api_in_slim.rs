//! Real SLIM apps (PyPI `slim-bindings` 3.3.8) open sessions with the identity the agent serves
//! on its Workload API socket: SLIM's own `spire` provider and verifier, each app on its agent's
//! socket, the agent binary fed by the fake Workload API standing in for SPIRE. Nothing here
//! checks an identity: SLIM does, and a session that completes is the proof.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use slim_e2e::{Groups, KillOnDrop, SlimApp, SlimNode, spire_identity, wait_for, workspace_binary};
use slim_identity_agent::workload::WorkloadClient;
use slim_identity_agent::workload::fake::{AgentState, FakeAgent, SigningKey};

const TD: &str = "example.org";

/// One pod's agent: its socket (and files, for the negative control).
struct Agent {
    socket: PathBuf,
    svids: PathBuf,
    _process: KillOnDrop,
}

/// Starts `slim-identity-agent` for the workload with `hint` against `upstream`, serving the
/// Workload API in `dir/<hint>/` and writing its files there; returns once the socket serves.
async fn start_agent(upstream: &Path, dir: &Path, hint: &str) -> Agent {
    let home = dir.join(hint);
    let svids = home.join("svids");
    std::fs::create_dir_all(&svids).expect("svids dir");
    let socket = home.join("run/agent.sock");
    let config = home.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "agent_address: {}\ncert_dir: {}\nhint: {hint}\nworkload_api_socket: {}\n\
             jwt_svids: [{{jwt_audience: slim, jwt_svid_file_name: jwt_svid.token}}]\n\
             jwt_bundle_file_name: key.jwt\njwt_bundle_format: jwks\njwt_bundle_file_mode: \"0644\"\n\
             jwt_svid_write_mode: in-place\n",
            upstream.display(),
            svids.display(),
            socket.display()
        ),
    )
    .expect("config");
    let log = std::fs::File::create(home.join("agent.log")).expect("log");
    let child =
        std::process::Command::new(workspace_binary("slim-identity-agent", "SLIM_IDENTITY_AGENT_BIN").expect("agent"))
            .arg("-config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the agent");
    let agent = Agent { socket, svids, _process: KillOnDrop(child) };
    wait_for("the agent's socket to serve an X.509-SVID", Duration::from_secs(30), async || {
        serves(&agent.socket).await
    })
    .await;
    agent
}

async fn serves(socket: &Path) -> Option<()> {
    let client = WorkloadClient::connect(socket).await.ok()?;
    client.x509_svids().await.ok()?.message().await.ok()?.map(|_| ())
}

/// The fake SPIRE agent with alice and bob, 40 s JWT-SVIDs (SLIM refreshes first at 30 s).
async fn upstream(dir: &Path) -> FakeAgent {
    upstream_of(dir, &["alice", "bob"]).await
}

async fn upstream_of(dir: &Path, names: &[&str]) -> FakeAgent {
    let mut state = AgentState::new(TD);
    state.jwt_ttl = Duration::from_secs(40);
    // As a SPIRE server with `jwt_issuer` (SLIM's JWT verifier, in the negative control, needs it).
    state.jwt_issuer = Some(format!("https://oidc.{TD}"));
    for name in names {
        state.issue(&format!("spiffe://{TD}/ns/apps/sa/{name}"), name);
    }
    FakeAgent::start(&dir.join("spire-agent.sock"), state).await.expect("fake Workload API")
}

/// `(ok, failures)` of a sender's `reply`/`error` lines, or a moderator's `group <n> ok|error`.
fn outcomes(app: &SlimApp) -> (usize, Vec<String>) {
    let output = app.output();
    let ok = output.lines().filter(|l| l.starts_with("reply ") || (l.starts_with("group ") && l.ends_with(" ok")));
    let failed = output.lines().filter(|l| l.starts_with("error ") || l.contains(" error "));
    (ok.count(), failed.map(str::to_owned).collect())
}

/// `(message number, echoes)` of a one-group moderator's lines.
fn echoes(app: &SlimApp) -> Vec<(u32, u32)> {
    app.output()
        .lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("message ")?.split(' ');
            let n = words.next()?.parse().ok()?;
            (words.next()? == "echoes").then_some(())?;
            Some((n, words.next()?.parse().ok()?))
        })
        .collect()
}

async fn sleep_until(start: Instant, at: u64) {
    tokio::time::sleep_until((start + Duration::from_secs(at)).into()).await;
}

/// Runs a blocking wait for an app's last line on a thread of its own.
async fn finished(mut app: SlimApp, seconds: u32) -> SlimApp {
    tokio::task::spawn_blocking(move || {
        let line = app.wait_for("done ", Duration::from_secs(u64::from(seconds) + 90));
        assert!(line.is_ok(), "{line:?}");
        app
    })
    .await
    .expect("joined")
}

/// A new point-to-point session every second for 110 s, a new MLS group every 2 s and one group
/// session without MLS, across a signing-key rotation and a 10 s upstream outage: every one
/// succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_hold_across_a_key_rotation_and_an_upstream_outage() {
    slim_e2e::init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spire = upstream(dir.path()).await;
    let alice = start_agent(&spire.socket, dir.path(), "alice").await;
    let bob = start_agent(&spire.socket, dir.path(), "bob").await;
    let node = SlimNode::start("node-workload-api").expect("node");
    let (alice_id, bob_id) = (spire_identity(&alice.socket), spire_identity(&bob.socket));

    let seconds = 110;
    let _bob = SlimApp::identity_listener(&node, "org/ns/bob", &bob_id).expect("bob");
    let _member = SlimApp::identity_listener(&node, "org/ns/member", &bob_id).expect("member");
    let start = Instant::now();
    let sender = SlimApp::identity_sender(&node, "org/ns/alice", &alice_id, "org/ns/bob", seconds).expect("alice");
    let mls = Groups::New { channel: "org/ns/mls-group", mls: true };
    let mls_groups =
        SlimApp::identity_moderator(&node, "org/ns/mls-moderator", &alice_id, mls, &["org/ns/member"], seconds)
            .expect("MLS moderator");
    let plain = Groups::One { channel: "org/ns/plain-group", mls: false };
    let plain_group =
        SlimApp::identity_moderator(&node, "org/ns/moderator", &alice_id, plain, &["org/ns/member"], seconds)
            .expect("group moderator");
    let runs = tokio::spawn(async move {
        (finished(sender, seconds).await, finished(mls_groups, seconds).await, finished(plain_group, seconds).await)
    });

    // The rotation: a new key published at 30 s, signing from 45 s; the old one kept until every
    // token it signed has expired (45 + 40 s), then dropped. The upstream down from 55 to 65 s.
    sleep_until(start, 30).await;
    spire.update(|s| s.jwt_keys.insert(0, SigningKey::es256("key-2")));
    sleep_until(start, 45).await;
    spire.update(|s| s.jwt_keys.reverse());
    sleep_until(start, 55).await;
    spire.pause();
    sleep_until(start, 65).await;
    spire.resume().expect("upstream back");
    sleep_until(start, 90).await;
    spire.update(|s| s.jwt_keys.retain(|k| k.kid == "key-2"));
    let (sender, mls_groups, plain_group) = runs.await.expect("apps");

    let (sessions, failed) = outcomes(&sender);
    println!("point-to-point: {sessions} sessions, {} failed", failed.len());
    assert!(sessions >= 100 && failed.is_empty(), "every session succeeds: {failed:?}\n{}", sender.output());
    let (groups, failed) = outcomes(&mls_groups);
    println!("new MLS groups: {groups} ok, {} failed", failed.len());
    assert!(groups >= 45 && failed.is_empty(), "every MLS group works: {failed:?}\n{}", mls_groups.output());
    let messages = echoes(&plain_group);
    let lost: Vec<_> = messages.iter().filter(|(_, echoes)| *echoes != 1).collect();
    println!("one group without MLS: {} messages, {} without their echo", messages.len(), lost.len());
    assert!(messages.len() >= 100 && lost.is_empty(), "{lost:?}\n{}", plain_group.output());

    // SLIM's provider asked for its key-carrying audience, through the agent.
    let audiences = spire.read(|s| s.jwt_audiences.clone());
    let with_key = audiences.iter().filter(|a| a.iter().any(|a| a.starts_with("slim-claims:"))).count();
    println!("upstream FetchJWTSVID calls: {}, with a slim-claims audience: {with_key}", audiences.len());
    assert!(with_key >= 2, "{audiences:?}");
}

/// Negative controls, each failing as it must: a key rotation the bundle stream withholds (the
/// apps' verifiers never learn the new `kid`), and SLIM's `static_jwt` identity over the agent's
/// files (no signing key: SLIM refuses every session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_controls_fail_as_they_must() {
    slim_e2e::init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let spire = upstream(dir.path()).await;
    let alice = start_agent(&spire.socket, dir.path(), "alice").await;
    let bob = start_agent(&spire.socket, dir.path(), "bob").await;
    let node = SlimNode::start("node-negative").expect("node");

    // The agent's files with SLIM's static_jwt provider: no session.
    wait_for("the agent's files", Duration::from_secs(30), async || {
        (alice.svids.join("jwt_svid.token").is_file() && bob.svids.join("key.jwt").is_file()).then_some(())
    })
    .await;
    let (replies, refused) =
        tokio::task::block_in_place(|| slim_e2e::identity::exchange(&node, &alice.svids, &bob.svids, 4));
    println!("static_jwt over files: {replies} replies, refusals {refused:?}");
    assert_eq!(replies, 0, "static_jwt identities cannot open sessions in SLIM 3.4.6");
    // Refused for the signing gap, not for anything in the files (issuer, key, audience, expiry).
    assert!(!refused.is_empty() && refused.iter().all(|r| r == "auth error: token invalid"), "{refused:?}");

    // The stream withholds a rotation: the new key signs, the apps' bundles never have it.
    spire.update(|s| {
        s.frozen_jwks = Some(s.jwks());
        s.jwt_keys.push(SigningKey::es256("key-withheld"));
    });
    let _bob = SlimApp::identity_listener(&node, "org/ns/bob", &spire_identity(&bob.socket)).expect("bob");
    let mut alice_app =
        SlimApp::identity_sender(&node, "org/ns/alice", &spire_identity(&alice.socket), "org/ns/bob", 5)
            .expect("alice");
    tokio::task::block_in_place(|| alice_app.wait_for("done ", Duration::from_secs(120))).expect("alice finishes");
    let (sessions, failed) = outcomes(&alice_app);
    println!("withheld key: {sessions} sessions, {} refused", failed.len());
    assert_eq!(sessions, 0, "tokens with a kid the verifier does not know must be refused: {}", alice_app.output());
    assert!(!failed.is_empty());
}

/// `slim-identity-agent dev --workload-api-socket`: SLIM apps get sessions with no SPIRE and no
/// fake at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_mode_serves_slim_apps_without_spire() {
    slim_e2e::init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_agent, socket) = slim_e2e::identity::dev_agent(dir.path()).await;
    wait_for("the dev agent's socket to serve", Duration::from_secs(30), async || serves(&socket).await).await;
    let node = SlimNode::start("node-dev").expect("node");
    let identity = spire_identity(&socket);
    let _bob = SlimApp::identity_listener(&node, "org/ns/bob", &identity).expect("bob");
    let mut alice = SlimApp::identity_sender(&node, "org/ns/alice", &identity, "org/ns/bob", 8).expect("alice");
    tokio::task::block_in_place(|| alice.wait_for("done ", Duration::from_secs(90))).expect("alice finishes");
    let (sessions, failed) = outcomes(&alice);
    println!("dev mode: {sessions} sessions, {} failed", failed.len());
    assert!(sessions >= 6 && failed.is_empty(), "{}", alice.output());
}

/// What SLIM 3.4.6 does not do, pinned: ONE long-lived MLS group stops delivering once a member's
/// join-time token has expired (SLIM keeps it as the member's MLS credential and never refreshes
/// it). When a SLIM release fixes that, this test fails: update the README's "Limits".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_mls_group_stops_when_the_join_time_token_expires() {
    slim_e2e::init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let spire = upstream(dir.path()).await;
    spire.update(|s| s.jwt_ttl = Duration::from_secs(45));
    let alice = start_agent(&spire.socket, dir.path(), "alice").await;
    let bob = start_agent(&spire.socket, dir.path(), "bob").await;
    let node = SlimNode::start("node-mls-expiry").expect("node");
    let _member = SlimApp::identity_listener(&node, "org/ns/member", &spire_identity(&bob.socket)).expect("member");
    let group = Groups::One { channel: "org/ns/long-mls", mls: true };
    let moderator = SlimApp::identity_moderator(
        &node,
        "org/ns/moderator",
        &spire_identity(&alice.socket),
        group,
        &["org/ns/member"],
        90,
    )
    .expect("moderator");
    let moderator = finished(moderator, 90).await;
    let messages = echoes(&moderator);
    let first_lost = messages.iter().position(|(_, e)| *e == 0).unwrap_or(messages.len());
    println!(
        "one MLS group, 45 s tokens: {} messages (1 a second while delivered), delivered until #{first_lost}, none after",
        messages.len()
    );
    assert!(first_lost >= 20, "delivers while the join-time tokens are valid: {messages:?}");
    assert!(
        first_lost < messages.len().saturating_sub(5) && messages[first_lost..].iter().all(|(_, e)| *e == 0),
        "SLIM 3.4.6 stops delivering once a join-time token expires; if this now delivers, SLIM refreshes MLS \
         credentials: update the README. {messages:?}"
    );
}

/// The mission's group case: a `SlimChannel` with `mlsEnabled: true` on the real API server,
/// whose channel manager (3.4.6) and members all take SLIM's `spire` identity from their agents'
/// sockets: the operator creates the channel, members join, messages cross.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mls_slim_channel_whose_manager_and_members_use_agent_sockets() {
    use kube::api::{Api, DeleteParams, PostParams};
    use slim_operator::api::SlimChannel;
    slim_e2e::init_logging();
    let plane = slim_e2e::control_plane::shared();
    let client = plane.client().await.expect("admin client");
    slim_e2e::control_plane::install_crds(&client).await.expect("CRDs");
    let namespace = plane.namespace(&client, "spire-channel").await.expect("namespace");

    let dir = tempfile::tempdir().expect("tempdir");
    let spire = upstream_of(dir.path(), &["manager", "bob", "carol"]).await;
    spire.update(|s| s.jwt_ttl = Duration::from_secs(300));
    let manager_agent = start_agent(&spire.socket, dir.path(), "manager").await;
    let bob_agent = start_agent(&spire.socket, dir.path(), "bob").await;
    let carol_agent = start_agent(&spire.socket, dir.path(), "carol").await;
    let node = SlimNode::start("node-spire-channel").expect("node");
    let auth = format!("{{type: spire, socket_path: \"{}\", jwt_audiences: [slim]}}", manager_agent.socket.display());
    let manager = slim_e2e::ChannelManager::start_with_auth(&node, &auth).expect("channel manager on its agent");
    let mut bob = SlimApp::identity_listener(&node, "org/ns/bob", &spire_identity(&bob_agent.socket)).expect("bob");
    let mut carol =
        SlimApp::identity_listener(&node, "org/ns/carol", &spire_identity(&carol_agent.socket)).expect("carol");

    let config = slim_operator::controller::ControllerConfig {
        resync_interval: Duration::from_secs(5),
        channel_manager: Some(manager.endpoint()),
        ..Default::default()
    };
    let (stop, controllers) = slim_e2e::operator::run_in_process(
        &client,
        slim_operator::slim::NodePool::default(),
        Default::default(),
        config,
        "spire-channel",
    );
    let channels: Api<SlimChannel> = Api::namespaced(client.clone(), &namespace);
    let channel: SlimChannel = serde_json::from_value(serde_json::json!({
        "apiVersion": "slim.agntcy.org/v1alpha1", "kind": "SlimChannel",
        "metadata": {"name": "team"},
        "spec": {
            "name": "org/ns/team", "mlsEnabled": true,
            "participants": ["org/ns/bob", "org/ns/carol"],
            "nodes": {"endpoints": [node.controller_endpoint()]},
        }
    }))
    .expect("channel");
    let started = Instant::now();
    channels.create(&PostParams::default(), &channel).await.expect("create");
    wait_for("both members joined", Duration::from_secs(90), async || {
        let status = channels.get("team").await.ok()?.status?;
        (status.joined == 2 && status.desired == 2).then_some(())
    })
    .await;
    println!("MLS SlimChannel on spire identities: both joined {:?} after the apply", started.elapsed());
    tokio::task::block_in_place(|| {
        bob.wait_for("joined", Duration::from_secs(10)).expect("bob invited");
        carol.wait_for("joined", Duration::from_secs(10)).expect("carol invited");
        bob.publish("hello over MLS").expect("publish");
        carol.wait_for("received hello over MLS", Duration::from_secs(15)).expect("carol received bob's message");
        bob.wait_for("received echo:hello over MLS", Duration::from_secs(15)).expect("and bob carol's reply");
    });

    channels.delete("team", &DeleteParams::default()).await.expect("delete");
    wait_for("SlimChannel gone", Duration::from_secs(60), async || {
        channels.get_opt("team").await.ok().filter(Option::is_none)
    })
    .await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controllers).await;
}
