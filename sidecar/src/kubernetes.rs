//! `identity_source: kubernetes`: the pod's projected service-account token as its JWT identity,
//! the cluster's JWKS as the bundle. Nothing here needs SPIRE.
//!
//! Two tasks feed the agent's writer: one keeps the cluster's keys (the API server's OIDC
//! discovery document and JWKS, fetched with a token the API server accepts), the other follows
//! the projected token file, which the kubelet replaces by swapping its volume's `..data`
//! symlink: a directory watch sees that, so nothing is read while nothing changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use slim_k8s_common::backoff::Backoff;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, info, warn};

use crate::agent::{AgentError, Update, unix_now};
use crate::config::{JwtSvidConfig, KubernetesSource};
use crate::health::Health;
use crate::svid::jwt::JwtError;
use crate::svid::kubernetes::{self, BUNDLE_KEY, Expected, ServiceAccountToken};

/// The OIDC paths every API server serves (`ServiceAccountIssuerDiscovery`, GA since 1.21).
const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
const JWKS_PATH: &str = "/openid/v1/jwks";

/// Environment variables the injector sets from the downward API: the token must be bound to
/// this pod, in this namespace.
pub use slim_identity_contract::env::{POD_NAME_ENV, POD_NAMESPACE_ENV, POD_UID_ENV};

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error(
        "no API server: kubernetes_api_server is empty and KUBERNETES_SERVICE_HOST / KUBERNETES_SERVICE_PORT are not set"
    )]
    NoApiServer,
    #[error("API server URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("CA file {0}: no PEM certificate in it")]
    NoCertificate(PathBuf),
    #[error("API client: {0}")]
    Client(kube::Error),
    #[error("GET {path}: {error}")]
    Request { path: &'static str, error: kube::Error },
    #[error("GET {path}: {reason}")]
    Document { path: &'static str, reason: String },
}

/// The cluster's signing keys, as its issuer publishes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterKeys {
    pub issuer: String,
    pub jwks: Vec<u8>,
}

/// Reads the API server's OIDC endpoints (RBAC: `system:service-account-issuer-discovery`, which
/// Kubernetes binds to every service account by default).
pub struct OidcClient {
    client: kube::Client,
}

impl OidcClient {
    /// A client of `source.api_server` (or the in-cluster address), trusting `source.ca_file` and
    /// authenticating with `source.api_token_file`; both files are re-read as they rotate.
    pub fn new(source: &KubernetesSource) -> Result<Self, KubernetesError> {
        let url = match source.api_server.as_str() {
            "" => in_cluster_url()?,
            url => url.to_owned(),
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| KubernetesError::Url { url: url.clone(), reason: e.to_string() })?;
        let ders = read_ca_file(&source.ca_file)?;
        let mut config = kube::Config::new(uri);
        config.root_cert = Some(ders);
        config.root_cert_file = Some(source.ca_file.clone());
        config.auth_info.token_file = Some(source.api_token_file.to_string_lossy().into_owned());
        config.connect_timeout = Some(Duration::from_secs(5));
        config.read_timeout = Some(Duration::from_secs(10));
        let client = kube::Client::try_from(config).map_err(KubernetesError::Client)?;
        Ok(Self { client })
    }

    /// The issuer (from the discovery document) and its JWKS.
    pub async fn keys(&self) -> Result<ClusterKeys, KubernetesError> {
        let discovery: serde_json::Value = self.get_json(DISCOVERY_PATH).await?;
        let issuer = discovery["issuer"]
            .as_str()
            .filter(|i| !i.is_empty())
            .ok_or(KubernetesError::Document { path: DISCOVERY_PATH, reason: "no issuer".into() })?
            .to_owned();
        // The discovery document's `jwks_uri` may name an address outside the cluster
        // (--service-account-jwks-uri); the API server always serves the keys itself.
        let jwks: serde_json::Value = self.get_json(JWKS_PATH).await?;
        if !jwks["keys"].is_array() {
            return Err(KubernetesError::Document { path: JWKS_PATH, reason: "no \"keys\" list".into() });
        }
        let jwks = serde_json::to_vec(&jwks)
            .map_err(|e| KubernetesError::Document { path: JWKS_PATH, reason: e.to_string() })?;
        Ok(ClusterKeys { issuer, jwks })
    }

    async fn get_json(&self, path: &'static str) -> Result<serde_json::Value, KubernetesError> {
        let request = http::Request::get(path)
            .body(Vec::new())
            .map_err(|e| KubernetesError::Document { path, reason: e.to_string() })?;
        self.client.request(request).await.map_err(|error| KubernetesError::Request { path, error })
    }
}

/// The certificates (DER) of a PEM CA bundle file; none is an error.
pub fn read_ca_file(path: &Path) -> Result<Vec<Vec<u8>>, KubernetesError> {
    let pem = std::fs::read(path).map_err(|source| KubernetesError::Read { path: path.to_owned(), source })?;
    let ders: Vec<Vec<u8>> = x509_parser::pem::Pem::iter_from_buffer(&pem)
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect();
    if ders.is_empty() {
        return Err(KubernetesError::NoCertificate(path.to_owned()));
    }
    Ok(ders)
}

/// `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT` (the kubelet sets both in every
/// container), an IPv6 host in brackets.
fn in_cluster_url() -> Result<String, KubernetesError> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok().filter(|h| !h.is_empty());
    let port = std::env::var("KUBERNETES_SERVICE_PORT").ok().filter(|p| !p.is_empty());
    match (host, port) {
        (Some(host), Some(port)) if host.contains(':') => Ok(format!("https://[{host}]:{port}")),
        (Some(host), Some(port)) => Ok(format!("https://{host}:{port}")),
        _ => Err(KubernetesError::NoApiServer),
    }
}

/// What this pod knows of itself (from the downward API), for the token's pod binding.
pub fn pod_from_env() -> Expected {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    Expected {
        namespace: var(POD_NAMESPACE_ENV),
        pod_name: var(POD_NAME_ENV),
        pod_uid: var(POD_UID_ENV),
        ..Expected::default()
    }
}

/// Keeps the cluster's keys: at start, every `refresh`, and at once (at most every 5 s) when the
/// token loop meets a `kid` it does not know. Failures are retried with backoff; the agent stops
/// being live when the API server stays out of reach (the health grace period).
pub(crate) async fn keys_loop(
    client: OidcClient,
    refresh: Duration,
    wanted: Arc<Notify>,
    keys_tx: watch::Sender<Option<ClusterKeys>>,
    tx: mpsc::Sender<Update>,
    health: Health,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let wait = match client.keys().await {
            Ok(keys) => {
                health.connected();
                backoff.reset();
                let changed = keys_tx.borrow().as_ref() != Some(&keys);
                if changed {
                    info!(issuer = %keys.issuer, "cluster JWKS fetched");
                    let bundles = [(BUNDLE_KEY.to_owned(), keys.jwks.clone())].into_iter().collect();
                    keys_tx.send_replace(Some(keys));
                    if tx.send(Update::Bundles(bundles)).await.is_err() {
                        return;
                    }
                }
                refresh
            }
            Err(error) => {
                health.disconnected();
                let delay = backoff.next_delay();
                warn!(%error, retry_in = ?delay, "cluster JWKS not fetched");
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = wanted.notified() => {
                // Asked for by an unknown kid: at most every 5 s, whatever asks.
                tokio::time::sleep(Duration::from_secs(5).min(wait)).await;
            }
        }
    }
}

/// Follows the projected token: validated against the cluster's keys and this pod, then handed
/// to the writer for every configured JWT file. A token that fails validation is not written (the
/// last good one stays) and is tried again when the file or the keys change.
pub(crate) async fn token_loop(
    source: KubernetesSource,
    entries: Vec<JwtSvidConfig>,
    pod: Expected,
    tx: mpsc::Sender<Update>,
    mut keys: watch::Receiver<Option<ClusterKeys>>,
    wanted: Arc<Notify>,
) {
    let (event_tx, mut events) = mpsc::unbounded_channel::<()>();
    let _watcher = match watch_parent(&source.token_file, event_tx) {
        Ok(watcher) => watcher,
        Err(error) => {
            let _ = tx.send(Update::Fatal(error)).await;
            return;
        }
    };
    if keys.wait_for(Option::is_some).await.is_err() {
        return;
    }
    let mut written: Option<String> = None;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let current = keys.borrow_and_update().clone();
        let retry = match current.map(|k| read_token(&source.token_file, &entries, &pod, &k)) {
            None => None,
            Some(Ok((token, valid))) => {
                backoff.reset();
                if written.as_deref() != Some(token.as_str()) {
                    if !hand_over(&token, &valid, entries.len(), &tx).await {
                        return;
                    }
                    written = Some(token);
                }
                None
            }
            Some(Err(error)) => retry_after(&error, &mut backoff, &wanted),
        };
        tokio::select! {
            event = events.recv() => {
                if event.is_none() {
                    return;
                }
                // The kubelet's swap is several events: read once.
                crate::changes::settle(&mut events, Duration::from_millis(50)).await;
                debug!("token file changed");
            }
            changed = keys.changed() => if changed.is_err() { return },
            _ = sleep_or_never(retry) => {}
        }
    }
}

/// Hands a validated token to the writer for each of the `files` JWT files; `false` once the
/// writer is gone.
async fn hand_over(token: &str, valid: &ServiceAccountToken, files: usize, tx: &mpsc::Sender<Update>) -> bool {
    info!(
        subject = %valid.subject,
        pod = valid.pod.as_ref().map(|p| p.0.as_str()).unwrap_or("-"),
        expires_in = valid.expiry - unix_now(),
        "service-account token written"
    );
    for index in 0..files {
        let update =
            Update::Jwt { index, token: token.to_owned(), expiry: valid.expiry, spiffe_id: valid.subject.clone() };
        if tx.send(update).await.is_err() {
            return false;
        }
    }
    true
}

/// When to read a token that was not written again: a token read and refused stays refused until
/// the file or the keys change (`None`: no polling); an unreadable file or a key not fetched yet
/// (the key fetch is asked for) is tried again with backoff.
fn retry_after(error: &AgentError, backoff: &mut Backoff, wanted: &Notify) -> Option<Duration> {
    let unknown_kid = matches!(error, AgentError::Jwt { error: JwtError::UnknownKid { .. }, .. });
    if unknown_kid {
        wanted.notify_one();
    }
    if unknown_kid || matches!(error, AgentError::Kubernetes(_)) {
        let delay = backoff.next_delay();
        warn!(%error, retry_in = ?delay, "service-account token not written");
        Some(delay)
    } else {
        warn!(%error, "service-account token not written; waiting for the next one");
        None
    }
}

async fn sleep_or_never(delay: Option<Duration>) {
    match delay {
        Some(delay) => tokio::time::sleep(delay).await,
        None => std::future::pending().await,
    }
}

/// Reads and validates the token for every entry's audience.
fn read_token(
    path: &Path,
    entries: &[JwtSvidConfig],
    pod: &Expected,
    keys: &ClusterKeys,
) -> Result<(String, ServiceAccountToken), AgentError> {
    let token = std::fs::read_to_string(path)
        .map_err(|source| AgentError::Kubernetes(KubernetesError::Read { path: path.to_owned(), source }))?
        .trim()
        .to_owned();
    let mut valid = None;
    for entry in entries {
        let expected = Expected { issuer: Some(keys.issuer.clone()), audiences: entry.audiences(), ..pod.clone() };
        let checked = kubernetes::validate(&token, &keys.jwks, &expected, unix_now(), 0)
            .map_err(|error| AgentError::Jwt { audience: entry.audience.clone(), error })?;
        valid = Some(checked);
    }
    let valid = valid.ok_or_else(|| AgentError::NoJwt(String::new()))?;
    Ok((token, valid))
}

/// Watches the directory holding `file` (the kubelet replaces the file by swapping a symlink in
/// it, which a watch on the file itself would not follow).
fn watch_parent(file: &Path, events: mpsc::UnboundedSender<()>) -> Result<notify::RecommendedWatcher, AgentError> {
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    crate::changes::watch(dir, notify::RecursiveMode::NonRecursive, events).map_err(|error| {
        AgentError::Kubernetes(KubernetesError::Read {
            path: dir.to_owned(),
            source: std::io::Error::other(format!("cannot watch it for token rotations: {error}")),
        })
    })
}

/// One-shot mode: the keys and the token once.
pub(crate) async fn fetch_once(
    source: &KubernetesSource,
    entries: &[JwtSvidConfig],
) -> Result<(ClusterKeys, String, ServiceAccountToken), AgentError> {
    let keys = OidcClient::new(source)?.keys().await?;
    let (token, valid) = read_token(&source.token_file, entries, &pod_from_env(), &keys)?;
    Ok((keys, token, valid))
}

#[cfg(all(test, feature = "dev"))]
mod tests {
    use super::*;
    use crate::workload::fake::SigningKey;
    use serde_json::json;

    const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

    fn token(key: &SigningKey, audience: &str, pod_uid: &str) -> String {
        static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let now = unix_now();
        key.sign(&json!({
            "jti": SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_string(),
            "iss": ISSUER, "sub": "system:serviceaccount:apps:alice", "aud": [audience],
            "iat": now, "nbf": now, "exp": now + 600,
            "kubernetes.io": {"namespace": "apps", "pod": {"name": "alice-0", "uid": pod_uid}},
        }))
    }

    /// The kubelet's way: a new directory, then one rename of `..data`.
    fn project(dir: &Path, version: u32, token: &str) {
        let name = format!("..v{version}");
        std::fs::create_dir(dir.join(&name)).expect("version dir");
        std::fs::write(dir.join(&name).join("token"), token).expect("token");
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).expect("link");
        std::fs::rename(&tmp, dir.join("..data")).expect("swap");
        if std::fs::symlink_metadata(dir.join("token")).is_err() {
            std::os::unix::fs::symlink("..data/token", dir.join("token")).expect("token link");
        }
    }

    async fn next_token(rx: &mut mpsc::Receiver<Update>, wait: Duration) -> Option<String> {
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(Update::Jwt { token, .. })) => Some(token),
            Ok(Some(Update::Fatal(error))) => panic!("fatal: {error}"),
            _ => None,
        }
    }

    #[tokio::test]
    async fn the_token_loop_follows_the_kubelets_swaps_and_writes_only_valid_tokens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SigningKey::es256("cluster-1");
        let jwks = serde_json::to_vec(&json!({"keys": [key.jwk()]})).expect("jwks");
        let first = token(&key, "slim", "uid-1");
        project(dir.path(), 1, &first);
        let source = KubernetesSource { token_file: dir.path().join("token"), ..KubernetesSource::default() };
        let entries = vec![JwtSvidConfig { audience: "slim".into(), extra_audiences: vec![], file_name: "t".into() }];
        let pod = Expected { pod_uid: Some("uid-1".into()), ..Expected::default() };
        let (tx, mut rx) = mpsc::channel(8);
        let (keys_tx, keys_rx) = watch::channel(None);
        let wanted = Arc::new(Notify::new());
        let task = tokio::spawn(token_loop(source, entries, pod, tx, keys_rx, wanted.clone()));

        // Nothing is written before the cluster's keys are known.
        assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv()).await.is_err());
        keys_tx.send_replace(Some(ClusterKeys { issuer: ISSUER.into(), jwks: jwks.clone() }));
        assert_eq!(next_token(&mut rx, Duration::from_secs(5)).await.as_deref(), Some(first.as_str()));

        // A rotation by swap is seen and written.
        let second = token(&key, "slim", "uid-1");
        assert_ne!(first, second);
        project(dir.path(), 2, &second);
        assert_eq!(next_token(&mut rx, Duration::from_secs(5)).await.as_deref(), Some(second.as_str()));

        // Another pod's token and another audience's are not written.
        project(dir.path(), 3, &token(&key, "slim", "uid-2"));
        project(dir.path(), 4, &token(&key, "other", "uid-1"));
        assert_eq!(next_token(&mut rx, Duration::from_secs(1)).await, None, "an invalid token must not be written");

        // A token signed by a key the agent does not know yet asks for the keys, and is written
        // once they arrive.
        let new_key = SigningKey::es256("cluster-2");
        let third = token(&new_key, "slim", "uid-1");
        project(dir.path(), 5, &third);
        tokio::time::timeout(Duration::from_secs(5), wanted.notified()).await.expect("the keys are asked for");
        let both = serde_json::to_vec(&json!({"keys": [key.jwk(), new_key.jwk()]})).expect("jwks");
        keys_tx.send_replace(Some(ClusterKeys { issuer: ISSUER.into(), jwks: both }));
        assert_eq!(next_token(&mut rx, Duration::from_secs(5)).await.as_deref(), Some(third.as_str()));
        task.abort();
    }
}
