//! The identity agent's files consumed by real SLIM apps (PyPI `slim-bindings`, SLIM 3.4.6): the
//! agent binary, fed by the fake Workload API (ES256 and RS256 keys, 6 s tokens with `iss`, as a
//! SPIRE server with `jwt_issuer` issues them), writes `/svids` for two workloads; each app uses
//! SLIM's own static-JWT provider over its `jwt_svid.token` and SLIM's own JWKS verifier over its
//! `key.jwt`. Nothing in the apps reads or checks the files.
//!
//! What SLIM 3.4.6 does with them, measured here:
//! - the JWKS as the Workload API sends it (no `alg`) is refused: "no suitable key found in JWKS";
//! - the agent's JWKS (with `alg`) and tokens pass SLIM's verifier, for the ES256 key and, after a
//!   signing-key rotation, for the RS256 one;
//! - sessions still cannot start: SLIM signs session control messages with the identity
//!   provider's own key and checks that signature against a `pubkey` claim in the token, and its
//!   `static_jwt` provider has no key (`MlsNotSupported`), so the receiver refuses every discovery
//!   request ("token invalid"). That is SLIM's, not the files': when a SLIM release lets
//!   `static_jwt` identities open sessions, this test expects the replies instead.

use std::path::Path;
use std::time::Duration;

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

/// `(kid, alg)` of every key in the workload's `key.jwt`.
fn jwks_kids(svids: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(svids.join("key.jwt")).unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    value["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|k| (k["kid"].as_str().unwrap_or("").to_owned(), k["alg"].as_str().unwrap_or("").to_owned()))
        .collect()
}

/// What the receiving app logged about the identities it was shown (SLIM's own log lines).
fn refusals(output: &str) -> Vec<String> {
    strip_ansi(output)
        .lines()
        .filter(|l| l.contains("identity verification failed"))
        .filter_map(|l| l.split("error=").nth(1))
        .map(|e| e.split(" msg_type=").next().unwrap_or(e).trim().to_owned())
        .collect()
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs a sender for `seconds` against a listener whose verifier reads `listener_svids`, and
/// returns (replies, the listener's refusals).
fn exchange(node: &SlimNode, sender_svids: &Path, listener_svids: &Path, seconds: u32) -> (usize, Vec<String>) {
    let mut bob = SlimApp::jwt_listener(node, "org/ns/bob", listener_svids).expect("bob");
    let mut alice = SlimApp::jwt_sender(node, "org/ns/alice", sender_svids, "org/ns/bob", seconds).expect("alice");
    let done = alice.wait_for("done", Duration::from_secs(u64::from(seconds) * 10 + 30)).expect("alice finishes");
    let replies = alice.output().lines().filter(|l| l.starts_with("reply ")).count();
    assert!(done.starts_with("done "), "{done}");
    let _ = bob.wait_for("never printed", Duration::from_millis(500));
    (replies, refusals(&bob.output()))
}

/// Either messages crossed, or SLIM's only refusal is the static-JWT signing gap (see the module
/// docs): never a key, issuer, expiry or signature problem with what the agent wrote.
fn assert_identity_accepted(replies: usize, refusals: &[String], attempts: &str) {
    if replies > 0 {
        return;
    }
    assert!(!refusals.is_empty(), "no reply and no refusal logged: {attempts}");
    for refusal in refusals {
        assert_eq!(refusal, "auth error: token invalid", "SLIM refused the agent's identity: {refusals:?}");
    }
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
}

fn base64_json(segment: &str) -> Option<serde_json::Value> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(segment).ok()?;
    serde_json::from_slice(&bytes).ok()
}
