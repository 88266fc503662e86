//! What real SLIM apps make of identity files: two `slim-bindings` apps (SLIM's own static-JWT
//! provider over `jwt_svid.token`, SLIM's own JWKS verifier over `key.jwt`) try to talk, and
//! what the receiver logged about the identity it was shown is read back.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client, ResourceExt};

use crate::{SlimApp, SlimNode};

/// `(kid, alg)` of every key in the workload's `key.jwt`.
pub fn jwks_kids(svids: &Path) -> Vec<(String, String)> {
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
pub fn refusals(output: &str) -> Vec<String> {
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
pub fn exchange(node: &SlimNode, sender_svids: &Path, listener_svids: &Path, seconds: u32) -> (usize, Vec<String>) {
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
pub fn assert_identity_accepted(replies: usize, refusals: &[String], attempts: &str) {
    if replies > 0 {
        return;
    }
    assert!(!refusals.is_empty(), "no reply and no refusal logged: {attempts}");
    for refusal in refusals {
        assert_eq!(refusal, "auth error: token invalid", "SLIM refused the agent's identity: {refusals:?}");
    }
}

/// A projected volume laid out as the kubelet writes one (its `AtomicWriter`): the files in a
/// timestamped directory, `..data` pointing at it, each file a symlink through `..data`; an
/// update writes a new directory and renames a fresh `..data` over the old one.
pub struct ProjectedVolume {
    pub dir: std::path::PathBuf,
    writes: u32,
}

impl ProjectedVolume {
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_owned(), writes: 0 })
    }

    /// The volume's path for `name`.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }

    /// Publishes `files` (name, content) in one swap, as the kubelet does on a rotation.
    pub fn write(&mut self, files: &[(&str, &[u8])]) -> std::io::Result<()> {
        self.writes += 1;
        let version = format!("..2026_12_02_00_00_00.{:09}", self.writes);
        let version_dir = self.dir.join(&version);
        std::fs::create_dir(&version_dir)?;
        for (name, content) in files {
            std::fs::write(version_dir.join(name), content)?;
        }
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&version, &tmp)?;
        std::fs::rename(&tmp, self.dir.join("..data"))?;
        for (name, _) in files {
            let link = self.dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(name), &link)?;
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old))?;
        }
        Ok(())
    }
}

/// SLIM's server `auth` (a YAML flow mapping) that admits apps whose token SLIM's own JWT
/// verifier accepts over the JWKS file `jwks`, for `audience` and `issuer`.
pub fn node_jwt_auth(jwks: &Path, audience: &str, issuer: &str) -> String {
    // `algorithm` is only a default: each JWKS key is used with its own `alg`.
    format!(
        "{{type: jwt, claims: {{audience: [{audience}], issuer: \"{issuer}\"}}, \
         key: {{type: decoding, algorithm: ES256, format: jwks, key: {{file: \"{}\"}}}}}}",
        jwks.display()
    )
}

/// How many app connections the node's JWT middleware has refused so far (its log).
pub fn node_rejections(node: &SlimNode) -> usize {
    node.log().matches("ValidateJwt: async get_claims also failed").count()
}

/// `slim-identity-agent dev` serving its Workload API on `dir/agent.sock` (its files in
/// `dir/svids`), once the socket exists; killed on drop.
pub async fn dev_agent(dir: &Path) -> (crate::KillOnDrop, std::path::PathBuf) {
    let socket = dir.join("agent.sock");
    let binary = crate::workspace_binary("slim-identity-agent", "SLIM_IDENTITY_AGENT_BIN").expect("agent binary");
    let child = std::process::Command::new(binary)
        .args(["dev", "--health-port", "0", "--dir"])
        .arg(dir.join("svids"))
        .arg("--workload-api-socket")
        .arg(&socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("dev agent");
    let agent = crate::KillOnDrop(child);
    crate::wait_for("the dev agent's socket", Duration::from_secs(30), async || socket.exists().then_some(())).await;
    (agent, socket)
}

/// A token of `account` for `audiences` (empty: the API server's own), bound to `pod` if given.
pub async fn mint(client: &Client, namespace: &str, account: &str, audiences: &[&str], pod: Option<&Pod>) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
            expiration_seconds: Some(3600),
            bound_object_ref: pod.map(|p| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(p.name_any()),
                uid: p.uid(),
            }),
        },
        ..Default::default()
    };
    let created =
        accounts.create_token_request(account, &PostParams::default(), &request).await.expect("token request");
    created.status.expect("token status").token
}

/// A service account and a Pod object running as it (never scheduled: the token binds to it).
pub async fn workload(client: &Client, namespace: &str, name: &str) -> Pod {
    workload_with(client, namespace, name, &[]).await
}

/// [`workload`] with pod annotations.
pub async fn workload_with(client: &Client, namespace: &str, name: &str, annotations: &[(&str, &str)]) -> Pod {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let account =
        ServiceAccount { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() };
    accounts.create(&PostParams::default(), &account).await.expect("service account");
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(format!("{name}-0")),
            annotations: Some(annotations.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(name.into()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("example.invalid/app".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    pods.create(&PostParams::default(), &pod).await.expect("pod")
}
