//! The identity agent's files consumed by real SLIM apps (PyPI `slim-bindings`, SLIM 3.4.6): the
//! agent binary, fed by the fake Workload API (ES256 and RS256 keys, 6 s tokens with `iss`, as a
//! SPIRE server with `jwt_issuer` issues them), writes `/svids` for two workloads; each app uses
//! SLIM's own static-JWT provider over its `jwt_svid.token` and SLIM's own JWKS verifier over its
//! `key.jwt`. Nothing in the apps reads or checks the files.
//!
//! What SLIM 3.4.6 does with them, measured here:
//! - the JWKS as the Workload API sends it (no `alg`) is refused: "no suitable key found in JWKS";
//! - sessions still cannot start: SLIM signs session control messages with the identity
//!   provider's own key and checks that signature against a `pubkey` claim in the token, and its
//!   `static_jwt` provider has no key (`MlsNotSupported`), so the receiver refuses every discovery
//!   request ("token invalid"). That is SLIM's, not the files': when a SLIM release lets
//!   `static_jwt` identities open sessions, this test expects the replies instead;
//! - "token invalid" is also what SLIM says for a wrong audience or an expired token, so the
//!   session refusal cannot show that the files pass SLIM's verifier. A SLIM node whose data plane
//!   authenticates apps with the same verifier shows it: it admits an app presenting the agent's
//!   token over the agent's `key.jwt` (RS256 after the signing-key rotation), and refuses the same
//!   token over the Workload API's JWKS.

use std::path::Path;
use std::time::Duration;

use slim_e2e::identity::{assert_identity_accepted, exchange, jwks_kids, node_jwt_auth, node_rejections};
use slim_e2e::{KillOnDrop, SlimApp, SlimNode, wait_for, workspace_binary};
use slim_identity_agent::workload::fake::{AgentState, FakeAgent, SigningKey};

const TRUST_DOMAIN: &str = "example.org";

/// Starts `slim-identity-agent` for the workload with `hint`, writing into `svids`.
fn start_agent(socket: &Path, svids: &Path, hint: &str) -> KillOnDrop {
    std::fs::create_dir_all(svids).expect("svids dir");
    let config = svids.with_extension("yaml");
    std::fs::write(
        &config,
        format!(
            "agent_address: {}\ncert_dir: {}\nhint: {hint}\ndaemon_mode: true\n\
             jwt_svids: [{{jwt_audience: slim, jwt_svid_file_name: jwt_svid.token}}]\n\
             jwt_bundle_file_name: key.jwt\njwt_bundle_format: jwks\njwt_bundle_file_mode: \"0644\"\n\
             jwt_svid_write_mode: in-place\n",
            socket.display(),
            svids.display()
        ),
    )
    .expect("config");
    let child =
        std::process::Command::new(workspace_binary("slim-identity-agent", "SLIM_IDENTITY_AGENT_BIN").expect("agent"))
            .arg("-config")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the agent");
    KillOnDrop(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slim_apps_accept_the_agents_files_and_refuse_the_workload_apis_jwks() {
    slim_e2e::init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let mut state = AgentState::new(TRUST_DOMAIN);
    // The RS256 key is published ahead of use (as SPIRE prepares its next key); ES256 signs first.
    state.jwt_keys = vec![SigningKey::rs256("key-rs256"), SigningKey::es256("key-es256")];
    state.jwt_ttl = Duration::from_secs(6);
    state.jwt_issuer = Some(format!("https://oidc.{TRUST_DOMAIN}"));
    state.issue(&format!("spiffe://{TRUST_DOMAIN}/ns/apps/sa/alice"), "alice");
    state.issue(&format!("spiffe://{TRUST_DOMAIN}/ns/apps/sa/bob"), "bob");
    let fake = FakeAgent::start(&socket, state).await.expect("fake Workload API");

    let (alice_svids, bob_svids) = (dir.path().join("alice"), dir.path().join("bob"));
    let _agents = [start_agent(&socket, &alice_svids, "alice"), start_agent(&socket, &bob_svids, "bob")];
    for svids in [&alice_svids, &bob_svids] {
        wait_for("the agent's files", Duration::from_secs(30), async || {
            (svids.join("jwt_svid.token").is_file() && jwks_kids(svids).len() == 2).then_some(())
        })
        .await;
        // Only the kids are read here; whether the keys are usable is for SLIM to say, below.
        let mut kids: Vec<String> = jwks_kids(svids).into_iter().map(|(kid, _)| kid).collect();
        kids.sort();
        assert_eq!(kids, ["key-es256", "key-rs256"]);
        assert!(std::fs::symlink_metadata(svids.join("jwt_svid.token")).expect("token").is_file(), "in place");
    }
    let node = SlimNode::start("node-identity").expect("node");

    // The JWKS as the Workload API sent it (no alg): SLIM uses none of its keys.
    let raw = dir.path().join("raw");
    std::fs::create_dir_all(&raw).expect("dir");
    std::fs::copy(bob_svids.join("jwt_svid.token"), raw.join("jwt_svid.token")).expect("token");
    std::fs::write(raw.join("key.jwt"), fake.read(|s| s.jwks())).expect("raw jwks");
    let (replies, refused) = tokio::task::block_in_place(|| exchange(&node, &alice_svids, &raw, 3));
    assert_eq!(replies, 0, "a JWKS without alg must not work in SLIM");
    assert!(
        refused.iter().any(|r| r.contains("no suitable key found in JWKS")),
        "SLIM's refusal of the raw Workload API JWKS: {refused:?}"
    );

    // The agent's files: accepted, with the ES256 key.
    let (replies, refused) = tokio::task::block_in_place(|| exchange(&node, &alice_svids, &bob_svids, 4));
    assert_identity_accepted(replies, &refused, "ES256");

    // Signing-key rotation: RS256 signs from now on, then the ES256 key is dropped. The tokens the
    // agents write follow (a 6 s token is refreshed every ~3 s), and SLIM still accepts them.
    fake.update(|s| s.jwt_keys.reverse());
    let rs256_token = |svids: &Path| {
        let token = std::fs::read_to_string(svids.join("jwt_svid.token")).unwrap_or_default();
        token.split('.').next().and_then(base64_json).is_some_and(|h| h["kid"] == "key-rs256")
    };
    wait_for("RS256-signed tokens", Duration::from_secs(20), async || {
        (rs256_token(&alice_svids) && rs256_token(&bob_svids)).then_some(())
    })
    .await;
    fake.update(|s| s.jwt_keys.retain(|k| k.kid == "key-rs256"));
    wait_for("the old key dropped from key.jwt", Duration::from_secs(20), async || {
        (jwks_kids(&alice_svids).len() == 1 && jwks_kids(&bob_svids).len() == 1).then_some(())
    })
    .await;
    let (replies, refused) = tokio::task::block_in_place(|| exchange(&node, &alice_svids, &bob_svids, 4));
    assert_identity_accepted(replies, &refused, "RS256 after the rotation");

    // SLIM's verifier where its answer shows: nodes that authenticate apps on their data plane.
    let issuer = format!("https://oidc.{TRUST_DOMAIN}");
    let token = alice_svids.join("jwt_svid.token");
    let guarded =
        SlimNode::start_with_data_auth("node-guarded", &node_jwt_auth(&bob_svids.join("key.jwt"), "slim", &issuer))
            .expect("node");
    tokio::task::block_in_place(|| SlimApp::listen_with_token(&guarded, "org/ns/alice", &token))
        .expect("SLIM's verifier admits the agent's token over the agent's key.jwt");
    assert_eq!(node_rejections(&guarded), 0, "{}", guarded.log());
    let raw_node = SlimNode::start_with_data_auth("node-raw", &node_jwt_auth(&raw.join("key.jwt"), "slim", &issuer))
        .expect("node");
    let refused = tokio::task::block_in_place(|| SlimApp::refused_with_token(&raw_node, "org/ns/alice", &token));
    assert!(refused.is_err(), "the Workload API's JWKS (no alg) must not admit anyone");
    assert!(node_rejections(&raw_node) > 0, "refused by the node's JWT verifier: {}", raw_node.log());
}

fn base64_json(segment: &str) -> Option<serde_json::Value> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(segment).ok()?;
    serde_json::from_slice(&bytes).ok()
}
