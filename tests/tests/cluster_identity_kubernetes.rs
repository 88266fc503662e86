//! Identity without SPIRE, on the real API server: service-account tokens minted through the
//! TokenRequest API (audience `slim`, bound to a Pod object) are what the kubelet would project;
//! the agent binary (`identity_source: kubernetes`) validates and writes them with the cluster's
//! JWKS, fetched from the API server's own OIDC endpoints with a token of the same service
//! account and no extra RBAC; `verify` accepts them and refuses other audiences; a projected
//! rotation is followed; and real SLIM apps (`slim-bindings`) verify each other's tokens.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use slim_e2e::control_plane::{self, SERVICE_ACCOUNT_ISSUER};
use slim_e2e::identity::{ProjectedVolume, jwks_kids, mint, node_jwt_auth, node_rejections, workload};
use slim_e2e::{KillOnDrop, SlimApp, SlimNode, free_port, wait_for, workspace_binary};

struct Agent {
    _process: KillOnDrop,
    log: PathBuf,
    svids: PathBuf,
    health_port: u16,
}

impl Agent {
    /// The agent binary reading `volume` (token, api-token, ca.crt) for `pod`, writing `svids`.
    fn start(server: &str, volume: &ProjectedVolume, pod: &Pod, svids: &Path) -> Self {
        std::fs::create_dir_all(svids).expect("svids");
        let health_port = free_port().expect("port");
        let config = svids.with_extension("yaml");
        std::fs::write(
            &config,
            format!(
                "identity_source: kubernetes\nkubernetes_api_server: {server}\n\
                 kubernetes_token_file: {}\nkubernetes_ca_file: {}\nkubernetes_api_token_file: {}\n\
                 cert_dir: {}\njwt_svids: [{{jwt_audience: slim, jwt_svid_file_name: jwt_svid.token}}]\n\
                 jwt_bundle_file_name: key.jwt\njwt_bundle_file_mode: \"0644\"\njwt_svid_write_mode: in-place\n\
                 health_checks: {{listener_enabled: true, bind_port: {health_port}}}\n",
                volume.path("token").display(),
                volume.path("ca.crt").display(),
                volume.path("api-token").display(),
                svids.display(),
            ),
        )
        .expect("config");
        let log = svids.with_extension("log");
        let child = Command::new(workspace_binary("slim-identity-agent", "SLIM_IDENTITY_AGENT_BIN").expect("agent"))
            .arg("-config")
            .arg(&config)
            .env("SLIM_POD_NAME", pod.name_any())
            .env("SLIM_POD_NAMESPACE", pod.namespace().unwrap_or_default())
            .env("SLIM_POD_UID", pod.uid().unwrap_or_default())
            .env("RUST_LOG", "slim_identity_agent=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start the agent");
        Self { _process: KillOnDrop(child), log, svids: svids.to_owned(), health_port }
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.svids.join("jwt_svid.token")).unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /ready` of the agent's health listener: the status code.
    fn ready(&self) -> u16 {
        use std::io::{Read, Write};
        let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", self.health_port)) else { return 0 };
        let _ = tcp.write_all(b"GET /ready HTTP/1.0\r\nHost: agent\r\n\r\n");
        let mut answer = String::new();
        let _ = tcp.read_to_string(&mut answer);
        answer.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0)
    }
}

/// `slim-identity-agent verify`: (exit code, stdout, stderr).
fn verify(svids: &Path, token: &Path, audience: &str) -> (i32, String, String) {
    let out = Command::new(workspace_binary("slim-identity-agent", "SLIM_IDENTITY_AGENT_BIN").expect("agent"))
        .args(["verify", "--bundle"])
        .arg(svids.join("key.jwt"))
        .args(["--audience", audience])
        .arg(token)
        .output()
        .expect("verify");
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_are_slim_identities_without_spire() {
    slim_e2e::init_logging();
    let plane = control_plane::shared();
    let client = plane.client().await.expect("client");
    let namespace = plane.namespace(&client, "sa-identity").await.expect("namespace");
    let dir = tempfile::tempdir().expect("tempdir");
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1?}] {what}", t0.elapsed());

    let mut agents = Vec::new();
    let mut volumes = Vec::new();
    let mut pods = Vec::new();
    for name in ["alice", "bob"] {
        let pod = workload(&client, &namespace, name).await;
        let token = mint(&client, &namespace, name, &["slim"], Some(&pod)).await;
        // What the injector projects beside it: a token for the API server, and its CA.
        let api_token = mint(&client, &namespace, name, &[], Some(&pod)).await;
        let mut volume = ProjectedVolume::new(&dir.path().join(format!("{name}-volume"))).expect("volume");
        volume
            .write(&[
                ("token", token.as_bytes()),
                ("api-token", api_token.as_bytes()),
                ("ca.crt", plane.ca_pem.as_bytes()),
            ])
            .expect("project");
        let agent = Agent::start(&plane.server, &volume, &pod, &dir.path().join(name));
        wait_for("the agent's files", Duration::from_secs(30), async || {
            (agent.token() == token && !jwks_kids(&agent.svids).is_empty()).then_some(())
        })
        .await;
        wait_for("the agent ready", Duration::from_secs(10), async || (agent.ready() == 200).then_some(())).await;
        agents.push(agent);
        volumes.push(volume);
        pods.push(pod);
    }
    phase("agents ready");
    let (alice, bob) = (&agents[0], &agents[1]);

    // The bundle is the cluster's JWKS, every key with its alg; the token's kid is in it.
    let kids = jwks_kids(&alice.svids);
    assert!(kids.iter().all(|(_, alg)| !alg.is_empty()), "every key has an alg: {kids:?}");
    let kid = header(&alice.token())["kid"].as_str().unwrap_or_default().to_owned();
    assert!(kids.iter().any(|(k, _)| *k == kid), "the token's kid {kid} in {kids:?}");
    let log = alice.log();
    assert!(log.contains(&format!("issuer={SERVICE_ACCOUNT_ISSUER}")), "{log}");
    assert!(!log.contains(&alice.token()), "the agent must never log a token");

    // One-shot mode (`-daemon-mode=false`): the same files, written once, exit 0.
    let once = dir.path().join("once");
    std::fs::create_dir_all(&once).expect("dir");
    let config = std::fs::read_to_string(alice.svids.with_extension("yaml")).expect("config");
    let config =
        config.replace(&format!("cert_dir: {}", alice.svids.display()), &format!("cert_dir: {}", once.display()));
    let once_config = once.with_extension("yaml");
    std::fs::write(&once_config, config).expect("config");
    let status = Command::new(workspace_binary("slim-identity-agent", "SLIM_IDENTITY_AGENT_BIN").expect("agent"))
        .args(["-daemon-mode=false", "-config"])
        .arg(&once_config)
        .env("SLIM_POD_NAME", "alice-0")
        .stderr(Stdio::null())
        .status()
        .expect("one-shot agent");
    assert!(status.success(), "one-shot mode: {status}");
    assert_eq!(std::fs::read_to_string(once.join("jwt_svid.token")).ok(), Some(alice.token()));
    assert_eq!(jwks_kids(&once), kids);
    phase("bundle checked");
    // `verify` accepts it for `slim` and says who it is; another audience is refused.
    let alice_file = alice.svids.join("jwt_svid.token");
    let (code, subject, details) = verify(&alice.svids, &alice_file, "slim");
    assert_eq!((code, subject.as_str()), (0, format!("system:serviceaccount:{namespace}:alice").as_str()), "{details}");
    assert!(details.contains("pod alice-0") && details.contains(SERVICE_ACCOUNT_ISSUER), "{details}");
    let (code, _, error) = verify(&alice.svids, &alice_file, "other");
    assert_eq!(code, 1, "{error}");
    assert!(error.contains("include none of the expected [\"other\"]"), "{error}");
    let other = mint(&client, &namespace, "alice", &["other"], Some(&pods[0])).await;
    let other_file = dir.path().join("other.token");
    std::fs::write(&other_file, &other).expect("token");
    let (code, _, error) = verify(&alice.svids, &other_file, "slim");
    assert_eq!(code, 1, "{error}");
    assert!(error.contains("audiences [\"other\"] include none of the expected [\"slim\"]"), "{error}");

    phase("verify checked");
    // The agent writes nothing it would not accept: a token of another audience, then bob's
    // token (bound to bob's pod), projected into alice's volume, are refused, the last good
    // token stays.
    let written = alice.token();
    let api_token = std::fs::read(volumes[0].path("api-token")).expect("api token");
    let bob_token = bob.token();
    for (token, reason) in [
        (other.as_str(), "include none of the expected [\"slim\"]"),
        (bob_token.as_str(), "the token is bound to pod bob-0"),
    ] {
        volumes[0]
            .write(&[("token", token.as_bytes()), ("api-token", &api_token), ("ca.crt", plane.ca_pem.as_bytes())])
            .expect("project");
        wait_for(reason, Duration::from_secs(10), async || alice.log().contains(reason).then_some(())).await;
        assert_eq!(alice.token(), written, "a refused token is never written");
    }

    phase("refusals checked");
    // A rotation, as the kubelet does it: a new token in a new directory, one symlink swap.
    let rotated = mint(&client, &namespace, "alice", &["slim"], Some(&pods[0])).await;
    assert_ne!(rotated, written);
    let started = Instant::now();
    volumes[0]
        .write(&[("token", rotated.as_bytes()), ("api-token", &api_token), ("ca.crt", plane.ca_pem.as_bytes())])
        .expect("project");
    wait_for("the rotated token", Duration::from_secs(10), async || (alice.token() == rotated).then_some(())).await;
    eprintln!("rotation picked up in {:?}", started.elapsed());
    assert!(std::fs::symlink_metadata(&alice_file).expect("token").is_file(), "written in place, for SLIM's watcher");

    phase("rotation checked");
    // Real SLIM: a node whose data plane admits only apps presenting a token SLIM's own JWT
    // verifier accepts over the agent's key.jwt (issuer and audience checked); the apps present
    // their agent-written token files with SLIM's static-JWT client auth.
    let jwks = alice.svids.join("key.jwt");
    let node_auth = |audience: &str| node_jwt_auth(&jwks, audience, SERVICE_ACCOUNT_ISSUER);
    let mut node = SlimNode::start_with_data_auth("node-sa-identity", &node_auth("slim")).expect("node");
    let bob_file = bob.svids.join("jwt_svid.token");
    let mut bob_app = tokio::task::block_in_place(|| SlimApp::listen_with_token(&node, "org/ns/bob", &bob_file))
        .expect("bob admitted with his service-account token");
    let reply = tokio::task::block_in_place(|| say(&node, &alice_file, "hello"));
    assert_eq!(reply, "reply echo:hello");
    phase("first exchange");
    // Control: the same node refuses a token of another audience, and one it has no key for.
    for (token, what) in [(&other_file, "another audience"), (&dir.path().join("forged.token"), "an unknown key")] {
        if !token.exists() {
            std::fs::write(token, forged(&alice.token())).expect("forged token");
        }
        let rejected_before = node_rejections(&node);
        let refused = tokio::task::block_in_place(|| SlimApp::refused_with_token(&node, "org/ns/mallory", token));
        let Err(error) = refused else { panic!("SLIM admitted {what}") };
        let said = error.to_string();
        let refusal = said.lines().find(|l| l.starts_with("refused")).unwrap_or_default().to_owned();
        eprintln!("SLIM on {what}: {refusal}");
        assert!(refusal.contains("link negotiation"), "{what}: {error}");
        // The node's own JWT middleware said no (not some other connection failure).
        assert!(node_rejections(&node) > rejected_before, "{what}: the node logged no JWT rejection: {}", node.log());
    }

    phase("refused by SLIM");
    // Audience rollover: both pods get tokens for `slim` and `slim-v2` (the agents write them in
    // place), then the node restarts requiring `slim-v2`. Bob's app, running all along, is only
    // admitted again if it presents the token its file holds now.
    let before_rollover = alice.token();
    for (volume, (pod, name)) in volumes.iter_mut().zip(pods.iter().zip(["alice", "bob"])) {
        let token = mint(&client, &namespace, name, &["slim", "slim-v2"], Some(pod)).await;
        let api_token = std::fs::read(volume.path("api-token")).expect("api token");
        volume
            .write(&[("token", token.as_bytes()), ("api-token", &api_token), ("ca.crt", plane.ca_pem.as_bytes())])
            .expect("project");
        let agent = if name == "alice" { alice } else { bob };
        wait_for("the rolled-over token", Duration::from_secs(10), async || (agent.token() == token).then_some(()))
            .await;
    }
    phase("tokens rolled over");
    node.set_data_auth(&node_auth("slim-v2")).expect("config");
    tokio::task::block_in_place(|| node.restart()).expect("node restart");
    // Bob's app dials the restarted node again on its own schedule (slower under load): alice's
    // session can only reach him once the node routes his name again. SLIM (3.3/3.4) re-dials a
    // broken connection once, and gives up for good when that call meets the node while it is
    // still starting ("unable to reconnect"): then bob's app is started again, reading the same
    // rotated token file (what a restarted container does).
    let pool = slim_operator::slim::NodePool::default();
    let bob_name = slim_operator::slim::SlimName::parse("org/ns/bob").expect("name");
    let bob_back = async || {
        let listed = pool.node(&node.controller_endpoint()).snapshot(Duration::ZERO).await.ok()?;
        listed.instances_of(&bob_name).next().map(|_| ())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while bob_back().await.is_none() {
        if Instant::now() > deadline {
            let output = bob_app.output();
            let tail: Vec<&str> = output.lines().rev().take(5).collect();
            eprintln!(
                "bob's app did not reconnect within 30 s: started again (a new app must be admitted with the rotated token); its last lines: {tail:?}"
            );
            bob_app = tokio::task::block_in_place(|| SlimApp::listen_with_token(&node, "org/ns/bob", &bob_file))
                .expect("bob admitted with his rotated token");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_for("bob's app on the restarted node", Duration::from_secs(30), bob_back).await;
    let reply = tokio::task::block_in_place(|| say(&node, &alice_file, "hello again"));
    assert_eq!(reply, "reply echo:hello again", "bob's live app presents its rotated token");
    phase("exchange after the node restart");
    let old = dir.path().join("old.token");
    std::fs::write(&old, before_rollover).expect("old token");
    let rejected_before = node_rejections(&node);
    let refused = tokio::task::block_in_place(|| SlimApp::refused_with_token(&node, "org/ns/carol", &old));
    assert!(refused.is_err_and(|e| e.to_string().contains("refused")), "the node must refuse a token without slim-v2");
    assert!(node_rejections(&node) > rejected_before, "the node's JWT middleware refused it");
    drop(bob_app);
}

/// Alice, authenticated with `token`, says `message` to bob: the line she printed (`reply …`).
fn say(node: &SlimNode, token: &Path, message: &str) -> String {
    let mut alice =
        SlimApp::sender_with_token(node, "org/ns/alice", token, "org/ns/bob", message).expect("alice admitted");
    alice.go().expect("go");
    match alice.wait_for("reply", Duration::from_secs(60)) {
        Ok(line) => line,
        Err(error) => panic!("no reply to {message:?}: {error}"),
    }
}

/// `token` with its signature replaced by another key's: same kid, nothing verifies it.
fn forged(token: &str) -> String {
    let key = slim_identity_agent::workload::fake::SigningKey::es256("forged");
    let mut claims: serde_json::Value = {
        use base64::Engine;
        let payload = token.split('.').nth(1).unwrap_or_default();
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap_or_default())
            .unwrap_or_default()
    };
    claims["jti"] = serde_json::json!("forged");
    key.sign(&claims)
}

fn header(token: &str) -> serde_json::Value {
    use base64::Engine;
    let segment = token.split('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(segment).unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or_default()
}
