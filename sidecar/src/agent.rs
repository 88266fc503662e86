//! The agent: daemon mode (streams, refreshes, file watching, health) and one-shot mode.
//!
//! Daemon mode runs one task per source (the X.509 stream, the JWT bundle stream, one refresh
//! loop per JWT-SVID) and the file watcher; they all send updates to a single writer, which owns
//! the output directory, so every version it writes holds a consistent set of files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use slim_k8s_common::backoff::Backoff;
use slim_k8s_common::supervise::{Supervisor, TaskFailure};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::{Config, ConfigError, IdentitySource, JwtBundleFormat, JwtSvidConfig, refresh_after};
use crate::health::{Health, WriteStatus};
use crate::hooks::Hooks;
use crate::output::{FileContent, OutputDir, OutputError};
use crate::svid::jwt::{self, JwtBundles, JwtError};
use crate::svid::x509::{self, X509Files, X509Options};
use crate::workload::pb;
use crate::workload::server::{self, Served, Upstream};
use crate::workload::{WorkloadClient, WorkloadError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Output(#[from] OutputError),
    #[error("{0}")]
    Workload(#[from] WorkloadError),
    #[error("X.509-SVID: {0}")]
    X509(#[from] x509::X509Error),
    // `error`, not `source`: thiserror would make a field named `source` the cause as well, and
    // the message already says it.
    #[error("JWT-SVID for audience {audience:?}: {error}")]
    Jwt { audience: String, error: JwtError },
    #[error("JWT bundle of {trust_domain:?}: {error}")]
    JwtBundle { trust_domain: String, error: JwtError },
    #[error("JWT-SVID for audience {0:?}: the Workload API returned none (or none with the hint)")]
    NoJwt(String),
    #[error("health listener on port {port}: {source}")]
    Health { port: u16, source: std::io::Error },
    #[error("serving the Workload API on {socket}: {source}")]
    Serve { socket: PathBuf, source: std::io::Error },
    /// A stream loop, the file watcher or the health listener stopped: the agent must not look
    /// alive without it.
    #[error("{0}")]
    Task(TaskFailure),
    #[error("dev mode: {0}")]
    Dev(String),
    #[error("{0}")]
    Kubernetes(#[from] crate::kubernetes::KubernetesError),
    #[error("{0}")]
    Issuer(#[from] crate::issuer::IssuerError),
}

pub use slim_k8s_common::unix_now;

pub(crate) enum Update {
    X509(X509Files),
    Bundles(JwtBundles),
    Jwt { index: usize, token: String, expiry: i64, spiffe_id: String },
    CheckFiles,
    Fatal(AgentError),
}

/// Owns the output directory and the latest of everything.
struct Writer {
    config: Config,
    out: OutputDir,
    health: Health,
    hooks: Hooks,
    x509: Option<X509Files>,
    bundles: Option<JwtBundles>,
    jwts: Vec<Option<(String, i64)>>,
    own_trust_domain: Option<String>,
}

impl Writer {
    fn path(&self, name: &str) -> String {
        self.config.cert_dir.join(name).to_string_lossy().into_owned()
    }

    /// Every file we can write now.
    fn files(&self) -> Result<Vec<(String, FileContent)>, AgentError> {
        let c = &self.config;
        let mut files = Vec::new();
        if let (Some((svid, key, bundle)), Some(x)) = (&c.x509, &self.x509) {
            files.push((svid.clone(), FileContent::swapped(x.svid_pem.clone(), c.cert_file_mode)));
            files.push((key.clone(), FileContent::swapped(x.key_pem.clone(), c.key_file_mode)));
            files.push((bundle.clone(), FileContent::swapped(x.bundle_pem.clone(), c.cert_file_mode)));
        }
        if let (false, Some(bundles)) = (c.jwt_bundle_file_name.is_empty(), &self.bundles) {
            let bytes = match c.jwt_bundle_format {
                JwtBundleFormat::SpiffeHelper => Some(jwt::spiffe_helper_bundle(bundles)),
                JwtBundleFormat::Jwks => {
                    let domain = Some(c.jwt_bundle_trust_domain.clone())
                        .filter(|d| !d.is_empty())
                        .or(self.own_trust_domain.clone());
                    match domain {
                        // Our trust domain is not known before the first SVID: wait for it.
                        None => None,
                        Some(domain) => Some(
                            jwt::jwks_bundle(bundles, &domain)
                                .map_err(|error| AgentError::JwtBundle { trust_domain: domain.clone(), error })?,
                        ),
                    }
                }
            };
            if let Some(bytes) = bytes {
                files.push((c.jwt_bundle_file_name.clone(), FileContent::swapped(bytes, c.jwt_bundle_file_mode)));
            }
        }
        for (entry, token) in c.jwt_svids.iter().zip(&self.jwts) {
            if let Some((token, _)) = token {
                files.push((
                    entry.file_name.clone(),
                    FileContent {
                        bytes: token.clone().into_bytes(),
                        mode: c.jwt_svid_file_mode,
                        write: c.jwt_svid_write_mode,
                    },
                ));
            }
        }
        Ok(files)
    }

    async fn apply(&mut self, update: Update) -> Result<(), AgentError> {
        let renews_hooks = match update {
            Update::Fatal(error) => return Err(error),
            Update::CheckFiles => {
                if self.out.restore_if_tampered()? {
                    warn!(dir = %self.config.cert_dir.display(), "output files were changed or deleted; restored");
                }
                return Ok(());
            }
            Update::X509(files) => {
                self.own_trust_domain = x509::trust_domain_of(&files.spiffe_id).map(str::to_owned);
                self.x509 = Some(files);
                true
            }
            Update::Bundles(bundles) => {
                self.bundles = Some(bundles);
                self.config.renew_on_jwt_update
            }
            Update::Jwt { index, token, expiry, spiffe_id } => {
                if self.own_trust_domain.is_none() {
                    self.own_trust_domain = x509::trust_domain_of(&spiffe_id).map(str::to_owned);
                }
                if let Some(slot) = self.jwts.get_mut(index) {
                    *slot = Some((token, expiry));
                }
                self.config.renew_on_jwt_update
            }
        };
        let files = self.files()?;
        let bundle_written = files.iter().any(|(name, _)| *name == self.config.jwt_bundle_file_name);
        match self.out.update(files) {
            Ok(changed) => {
                self.record_health(bundle_written);
                if changed {
                    debug!(version = self.out.writes(), "output files swapped");
                    if renews_hooks && !self.hooks.is_empty() {
                        self.hooks.renewed().await;
                    }
                }
                Ok(())
            }
            Err(error) => {
                warn!(%error, "writing output files failed");
                if self.config.x509.is_some() {
                    self.health.x509(WriteStatus::Failed, None);
                }
                Err(error.into())
            }
        }
    }

    /// `bundle_written`: the JWT bundle file was among what was just written (a `jwks` bundle waits
    /// for the workload's trust domain).
    fn record_health(&self, bundle_written: bool) {
        if let Some(x) = &self.x509 {
            self.health.x509(WriteStatus::Written, Some(x.not_after));
        }
        if bundle_written {
            self.health.jwt(&self.path(&self.config.jwt_bundle_file_name), WriteStatus::Written, None);
        }
        for (entry, token) in self.config.jwt_svids.iter().zip(&self.jwts) {
            if let Some((_, expiry)) = token {
                self.health.jwt(&self.path(&entry.file_name), WriteStatus::Written, Some(*expiry));
            }
        }
    }
}

fn health_for(config: &Config) -> Health {
    let path = |name: &str| config.cert_dir.join(name).to_string_lossy().into_owned();
    let mut jwt_files: Vec<String> = config.jwt_svids.iter().map(|s| path(&s.file_name)).collect();
    if !config.jwt_bundle_file_name.is_empty() {
        jwt_files.push(path(&config.jwt_bundle_file_name));
    }
    Health::new(config.x509.is_some(), jwt_files)
}

fn x509_options(config: &Config) -> X509Options {
    X509Options {
        add_intermediates_to_bundle: config.add_intermediates_to_bundle,
        include_federated_domains: config.include_federated_domains,
        omit_expired: config.omit_expired,
    }
}

/// Daemon mode: runs until `shutdown` (returns `Ok`), or a fatal error.
pub async fn run_daemon(config: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
    let out = OutputDir::new(&config.cert_dir)?;
    let served = config.workload_api_socket.as_ref().map(|_| Served::new(&config.hint));
    let mut health = health_for(&config);
    if let (Some(socket), Some(served)) = (&config.workload_api_socket, &served) {
        health = health.serving(socket, served.clone());
    }
    // Every long-lived task: the first one to end (a panic, say) ends the agent with its name.
    let mut tasks = Supervisor::new();
    if config.health_checks.listener_enabled {
        spawn_health_listener(&config, &health, &mut tasks).await?;
    }
    if !config.cmd.is_empty() && !config.daemon_mode {
        warn!("cmd is ignored when daemon_mode is false");
    }
    let (tx, rx) = mpsc::channel::<Update>(64);
    let own_trust_domain = spawn_sources(&config, served.as_ref(), &tx, &health, &mut tasks)?;
    let _watcher = watch_dir(&config.cert_dir, tx.clone(), &mut tasks);
    let mut writer = Writer {
        jwts: vec![None; config.jwt_svids.len()],
        hooks: Hooks::new(&config.cmd, &config.cmd_args, &config.renew_signal, &config.pid_file_name),
        config,
        out,
        health,
        x509: None,
        bundles: None,
        own_trust_domain,
    };
    let outcome = write_updates(&mut writer, rx, &mut tasks, shutdown).await;
    tasks.abort_all();
    writer.hooks.stop().await;
    outcome
}

/// Writes each update until `shutdown` (`Ok`), a fatal error, or the end of a task the agent
/// needs.
async fn write_updates(
    writer: &mut Writer,
    mut rx: mpsc::Receiver<Update>,
    tasks: &mut Supervisor,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    tokio::pin!(shutdown);
    loop {
        // Updates first: a loop that ended after a fatal error has already queued it.
        tokio::select! {
            biased;
            _ = &mut shutdown => {
                info!("shutting down");
                return Ok(());
            }
            update = rx.recv() => match update {
                None => return Ok(()),
                Some(update) => match writer.apply(update).await {
                    Ok(()) => {}
                    // A disk error is retried with the next update; a fatal one ends the agent.
                    Err(AgentError::Output(error)) => warn!(%error, "will retry on the next update"),
                    Err(error) => return Err(error),
                },
            },
            failure = tasks.failure() => {
                warn!(%failure, "stopping: a task the agent needs has stopped");
                return Err(AgentError::Task(failure));
            }
        }
    }
}

async fn spawn_health_listener(config: &Config, health: &Health, tasks: &mut Supervisor) -> Result<(), AgentError> {
    let port = config.health_checks.bind_port;
    let listener =
        tokio::net::TcpListener::bind(("0.0.0.0", port)).await.map_err(|source| AgentError::Health { port, source })?;
    let router = crate::health::router(
        health.clone(),
        &config.health_checks.liveness_path,
        &config.health_checks.readiness_path,
    );
    tasks.spawn("health listener", async move {
        if let Err(error) = axum::serve(listener, router).await {
            warn!(%error, port, "health listener failed");
        }
    });
    info!(port, "health listener started");
    Ok(())
}

/// The sources of the configured identity; returns the trust domain the agent's own bundle is
/// keyed by when it issues (Kubernetes source), else `None`.
fn spawn_sources(
    config: &Config,
    served: Option<&Served>,
    tx: &mpsc::Sender<Update>,
    health: &Health,
    tasks: &mut Supervisor,
) -> Result<Option<String>, AgentError> {
    match &config.identity_source {
        IdentitySource::Spiffe => {
            spawn_spiffe_sources(config, served, tx, health, tasks)?;
            Ok(None)
        }
        IdentitySource::Kubernetes(source) => {
            spawn_kubernetes_sources(source, config, tx, health, tasks)?;
            if let (Some(issuer), Some(served)) = (&source.issuer, served) {
                spawn_issuer_sources(issuer, config, served, health, tasks)?;
            }
            Ok(Some(crate::svid::kubernetes::BUNDLE_KEY.to_owned()))
        }
    }
}

/// The Workload API streams, one refresh loop per JWT-SVID, and the Workload API served to the
/// pod (from what the streams bring, JWT-SVIDs forwarded upstream).
fn spawn_spiffe_sources(
    config: &Config,
    served: Option<&Served>,
    tx: &mpsc::Sender<Update>,
    health: &Health,
    tasks: &mut Supervisor,
) -> Result<(), AgentError> {
    let socket = config.socket_path()?;
    info!(socket = %socket.display(), dir = %config.cert_dir.display(), "starting");
    let (bundles_tx, bundles_rx) = watch::channel::<Option<JwtBundles>>(None);
    if config.x509.is_some() || served.is_some() {
        let files = config.x509.is_some().then(|| (config.hint.clone(), x509_options(config)));
        tasks.spawn("X.509-SVID stream", x509_loop(socket.clone(), files, served.cloned(), tx.clone(), health.clone()));
    }
    if !config.jwt_svids.is_empty() || !config.jwt_bundle_file_name.is_empty() || served.is_some() {
        tasks.spawn(
            "JWT bundle stream",
            bundle_loop(socket.clone(), served.cloned(), tx.clone(), bundles_tx, health.clone()),
        );
    }
    if let Some(served) = served {
        let issuer = std::sync::Arc::new(Upstream { socket: socket.clone(), hint: config.hint.clone() });
        serve_workload_api(config, served, issuer, tasks)?;
    }
    for (index, entry) in config.jwt_svids.iter().enumerate() {
        tasks.spawn(
            "JWT-SVID refresh",
            jwt_loop(
                socket.clone(),
                entry.clone(),
                index,
                config.clone(),
                tx.clone(),
                bundles_rx.clone(),
                health.clone(),
            ),
        );
    }
    Ok(())
}

/// The cluster's keys and the projected token (`identity_source: kubernetes`).
fn spawn_kubernetes_sources(
    source: &crate::config::KubernetesSource,
    config: &Config,
    tx: &mpsc::Sender<Update>,
    health: &Health,
    tasks: &mut Supervisor,
) -> Result<(), AgentError> {
    use crate::kubernetes::{OidcClient, keys_loop, pod_from_env, token_loop};
    let client = OidcClient::new(source)?;
    info!(token = %source.token_file.display(), dir = %config.cert_dir.display(), "starting (Kubernetes service-account token)");
    let (keys_tx, keys_rx) = watch::channel(None);
    let wanted = std::sync::Arc::new(tokio::sync::Notify::new());
    tasks.spawn(
        "cluster JWKS refresh",
        keys_loop(client, source.jwks_refresh, wanted.clone(), keys_tx, tx.clone(), health.clone()),
    );
    tasks.spawn(
        "service-account token watch",
        token_loop(source.clone(), config.jwt_svids.clone(), pod_from_env(), tx.clone(), keys_rx, wanted),
    );
    Ok(())
}

/// SPIFFE identities from `slim-operator`'s issuer, served to the pod on the Workload API socket
/// (`identity_source: kubernetes` with `kubernetes_issuer_url`). The files stay as they are.
fn spawn_issuer_sources(
    source: &crate::config::IssuerSource,
    config: &Config,
    served: &Served,
    health: &Health,
    tasks: &mut Supervisor,
) -> Result<(), AgentError> {
    use crate::issuer::{IssuedJwt, IssuerClient, PodIdentity, bundle_loop, x509_loop};
    let client = std::sync::Arc::new(IssuerClient::new(source)?);
    let pod = PodIdentity::from_env()?;
    info!(issuer = %source.url, namespace = %pod.namespace, service_account = %pod.service_account, "SPIFFE identities from the issuer");
    let (bundles_tx, bundles_rx) = watch::channel(None);
    tasks.spawn("issuer bundle refresh", bundle_loop(client.clone(), served.clone(), bundles_tx, health.clone()));
    tasks.spawn("issuer X.509-SVID renewal", x509_loop(client.clone(), pod, served.clone(), bundles_rx));
    serve_workload_api(config, served, std::sync::Arc::new(IssuedJwt { client }), tasks)
}

/// Binds the pod's Workload API socket and serves it for as long as the agent runs.
fn serve_workload_api(
    config: &Config,
    served: &Served,
    issuer: std::sync::Arc<dyn server::JwtSvidIssuer>,
    tasks: &mut Supervisor,
) -> Result<(), AgentError> {
    let Some(path) = &config.workload_api_socket else { return Ok(()) };
    let server = server::bind(path, served.clone(), issuer)
        .map_err(|source| AgentError::Serve { socket: path.clone(), source })?;
    tasks.spawn("Workload API server", async move {
        if let Err(error) = server.await {
            warn!(error = %slim_k8s_common::error_chain(&error), "the Workload API server stopped");
        }
    });
    Ok(())
}

/// Watches the output directory; any change triggers a check (debounced).
fn watch_dir(dir: &Path, tx: mpsc::Sender<Update>, tasks: &mut Supervisor) -> Option<notify::RecommendedWatcher> {
    let (event_tx, mut event_rx) = mpsc::unbounded_channel::<()>();
    let watcher = crate::changes::watch(dir, notify::RecursiveMode::Recursive, event_tx)
        .map_err(|error| {
            warn!(%error, dir = %dir.display(), "cannot watch the output directory; tampering will not be repaired")
        })
        .ok()?;
    tasks.spawn("output directory watcher", async move {
        while event_rx.recv().await.is_some() {
            crate::changes::settle(&mut event_rx, Duration::from_millis(100)).await;
            if tx.send(Update::CheckFiles).await.is_err() {
                return;
            }
        }
    });
    Some(watcher)
}

/// Follows the X.509 stream forever: what it brings is served to the pod (when it is) and
/// rendered as files (when `files` names the hint and options).
async fn x509_loop(
    socket: PathBuf,
    files: Option<(String, X509Options)>,
    served: Option<Served>,
    tx: mpsc::Sender<Update>,
    health: Health,
) {
    let failed = health.clone();
    let withdrawn = served.clone();
    follow(
        socket,
        "X.509-SVID stream",
        tx,
        health,
        |client| async move { client.x509_svids().await },
        move |response| {
            if let Some(served) = &served {
                served.set_x509(Some(response.clone()));
            }
            let (hint, options) = files.as_ref()?;
            match x509::render(&response, hint, *options, unix_now()) {
                Ok(files) => Some(Update::X509(files)),
                Err(error) => {
                    warn!(%error, "X.509-SVID update skipped");
                    failed.x509(WriteStatus::Failed, None);
                    None
                }
            }
        },
        move || {
            if let Some(served) = &withdrawn {
                served.set_x509(None);
            }
        },
    )
    .await
}

/// Follows the JWT bundle stream forever; the JWT-SVID loops validate against what it brings,
/// and it is served to the pod (when it is).
async fn bundle_loop(
    socket: PathBuf,
    served: Option<Served>,
    tx: mpsc::Sender<Update>,
    bundles_tx: watch::Sender<Option<JwtBundles>>,
    health: Health,
) {
    let withdrawn = served.clone();
    follow(
        socket,
        "JWT bundle stream",
        tx,
        health,
        |client| async move { client.jwt_bundles().await },
        move |response| {
            if let Some(served) = &served {
                served.set_bundles(Some(response.clone()));
            }
            let bundles = bundles_of(response);
            bundles_tx.send_replace(Some(bundles.clone()));
            Some(Update::Bundles(bundles))
        },
        move || {
            if let Some(served) = &withdrawn {
                served.set_bundles(None);
            }
        },
    )
    .await
}

/// Keeps a Workload API stream open forever: every message becomes (at most) one update; a
/// broken stream is reopened with backoff (reset by each message); only InvalidArgument ends it.
/// `on_denied` runs when upstream says PermissionDenied (the identity is withdrawn); an
/// unreachable upstream changes nothing held.
async fn follow<T, Open, Opened>(
    socket: PathBuf,
    what: &'static str,
    tx: mpsc::Sender<Update>,
    health: Health,
    open: Open,
    mut on_message: impl FnMut(T) -> Option<Update>,
    mut on_denied: impl FnMut(),
) where
    Open: Fn(WorkloadClient) -> Opened,
    Opened: std::future::Future<Output = Result<tonic::Streaming<T>, WorkloadError>>,
{
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let result = async {
            let mut stream = open(WorkloadClient::connect(&socket).await?).await?;
            loop {
                match stream.message().await {
                    Ok(Some(message)) => {
                        health.connected();
                        backoff.reset();
                        if let Some(update) = on_message(message)
                            && tx.send(update).await.is_err()
                        {
                            return Ok(());
                        }
                    }
                    Ok(None) => {
                        return Err(WorkloadError::Unavailable {
                            socket: socket.clone(),
                            reason: "stream ended".into(),
                        });
                    }
                    Err(status) => return Err(WorkloadError::from_status(&socket, &status)),
                }
            }
        }
        .await;
        match result {
            Ok(()) => return,
            Err(error) if error.is_fatal() => {
                let _ = tx.send(Update::Fatal(error.into())).await;
                return;
            }
            Err(error) => {
                if matches!(error, WorkloadError::PermissionDenied(_)) {
                    on_denied();
                }
                health.disconnected();
                let delay = backoff.next_delay();
                warn!(%error, retry_in = ?delay, "{what}");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Bundles keyed by trust domain name (the Workload API keys them `spiffe://td`).
pub fn bundles_of(response: pb::JwtBundlesResponse) -> JwtBundles {
    response
        .bundles
        .into_iter()
        .map(|(td, jwks)| (td.strip_prefix("spiffe://").unwrap_or(&td).to_owned(), jwks))
        .collect()
}

/// Keeps one JWT-SVID fresh: fetch, validate against the current bundles, hand over, sleep until
/// the refresh point (measured on the selected SVID), retry failures with backoff.
async fn jwt_loop(
    socket: PathBuf,
    entry: JwtSvidConfig,
    index: usize,
    config: Config,
    tx: mpsc::Sender<Update>,
    mut bundles: watch::Receiver<Option<JwtBundles>>,
    health: Health,
) {
    // Like spiffe-helper's JWTSource: nothing can be validated before the first bundle.
    if bundles.wait_for(Option::is_some).await.is_err() {
        return;
    }
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let current = bundles.borrow().clone().unwrap_or_default();
        match fetch_jwt(&socket, &entry, &config.hint, &current).await {
            Ok((token, valid)) => {
                health.connected();
                backoff.reset();
                let remaining = Duration::from_secs(u64::try_from(valid.expiry - unix_now()).unwrap_or(0));
                let update = Update::Jwt { index, token, expiry: valid.expiry, spiffe_id: valid.spiffe_id };
                if tx.send(update).await.is_err() {
                    return;
                }
                let wait = refresh_after(remaining, config.jwt_svid_refresh_percent);
                debug!(audience = %entry.audience, refresh_in = ?wait, "JWT-SVID written");
                tokio::time::sleep(wait).await;
            }
            Err(AgentError::Workload(error)) if error.is_fatal() => {
                let _ = tx.send(Update::Fatal(error.into())).await;
                return;
            }
            Err(error) => {
                if matches!(error, AgentError::Workload(_)) {
                    health.disconnected();
                }
                let delay = backoff.next_delay();
                warn!(%error, retry_in = ?delay, "JWT-SVID not refreshed");
                // A bundle update (a new key) is worth an immediate retry.
                let _ = tokio::time::timeout(delay, bundles.changed()).await;
            }
        }
    }
}

/// Fetches one JWT-SVID (all its audiences), picks it by hint, and validates it.
async fn fetch_jwt(
    socket: &Path,
    entry: &JwtSvidConfig,
    hint: &str,
    bundles: &JwtBundles,
) -> Result<(String, jwt::ValidJwt), AgentError> {
    let client = WorkloadClient::connect(socket).await?;
    let svids = client.jwt_svids(&entry.audiences()).await?;
    let svid = if hint.is_empty() { svids.first() } else { svids.iter().find(|s| s.hint == hint) }
        .ok_or_else(|| AgentError::NoJwt(entry.audience.clone()))?;
    let valid = jwt::validate(&svid.svid, bundles, std::slice::from_ref(&entry.audience), unix_now(), 0)
        .map_err(|error| AgentError::Jwt { audience: entry.audience.clone(), error })?;
    if valid.issuer.is_none() {
        warn_once_no_issuer(&valid.spiffe_id);
    }
    Ok((svid.svid.clone(), valid))
}

/// SLIM's JWT verifier looks keys up by the token's `iss` and refuses a token without one, even
/// with a static JWKS; SPIRE sets `iss` only when its server has `jwt_issuer`. Said once.
fn warn_once_no_issuer(spiffe_id: &str) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        warn!(
            %spiffe_id,
            "the JWT-SVID has no iss claim: SLIM's JWT verifier refuses such tokens; set jwt_issuer in the SPIRE server's config"
        );
    }
}

/// spiffe-helper's one-shot retry of PermissionDenied: 10 steps from 10 ms, ×5, ±10 % jitter.
pub fn permission_denied_delays() -> impl Iterator<Item = Duration> {
    (0..9u32).map(|i| {
        let base = Duration::from_millis(10).mul_f64(5f64.powi(i as i32));
        base.mul_f64(1.0 + (rand::random::<f64>() - 0.5) * 0.2)
    })
}

async fn retry_denied<T, F, Fut>(mut call: F) -> Result<T, AgentError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, AgentError>>,
{
    let mut delays = permission_denied_delays();
    loop {
        match call().await {
            Err(AgentError::Workload(WorkloadError::PermissionDenied(message))) => match delays.next() {
                Some(delay) => {
                    info!(%message, retry_in = ?delay, "no identity yet");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(WorkloadError::PermissionDenied(message).into()),
            },
            other => return other,
        }
    }
}

/// The first message of a stream: one-shot mode takes the current state and stops.
async fn first_message<T>(
    socket: &Path,
    open: impl std::future::Future<Output = Result<tonic::Streaming<T>, WorkloadError>>,
) -> Result<T, AgentError> {
    let mut stream = open.await?;
    match stream.message().await {
        Ok(Some(message)) => Ok(message),
        Ok(None) => Err(WorkloadError::Unavailable { socket: socket.to_owned(), reason: "stream ended".into() }.into()),
        Err(status) => Err(WorkloadError::from_status(socket, &status).into()),
    }
}

/// One-shot mode (`daemon_mode = false`): fetch everything once, write one version, return.
pub async fn run_once(config: Config) -> Result<(), AgentError> {
    if let IdentitySource::Kubernetes(source) = &config.identity_source {
        return run_once_kubernetes(source, config.clone()).await;
    }
    let socket = config.socket_path()?;
    let client = WorkloadClient::connect(&socket).await?;
    let mut writer = Writer {
        jwts: vec![None; config.jwt_svids.len()],
        hooks: Hooks::new("", "", "", ""),
        config: config.clone(),
        out: OutputDir::new(&config.cert_dir)?,
        health: health_for(&config),
        x509: None,
        bundles: None,
        own_trust_domain: None,
    };
    if config.x509.is_some() {
        let response = retry_denied(|| first_message(&socket, client.x509_svids())).await?;
        let files = x509::render(&response, &config.hint, x509_options(&config), unix_now())?;
        writer.own_trust_domain = x509::trust_domain_of(&files.spiffe_id).map(str::to_owned);
        writer.x509 = Some(files);
    }
    if !config.jwt_svids.is_empty() || !config.jwt_bundle_file_name.is_empty() {
        let response = retry_denied(|| first_message(&socket, client.jwt_bundles())).await?;
        writer.bundles = Some(bundles_of(response));
    }
    let bundles = writer.bundles.clone().unwrap_or_default();
    let mut errors = Vec::new();
    for (index, entry) in config.jwt_svids.iter().enumerate() {
        // Extra audiences are honoured here too (spiffe-helper drops them in one-shot mode).
        match retry_denied(|| fetch_jwt(&socket, entry, &config.hint, &bundles)).await {
            Ok((token, valid)) => {
                if writer.own_trust_domain.is_none() {
                    writer.own_trust_domain = x509::trust_domain_of(&valid.spiffe_id).map(str::to_owned);
                }
                writer.jwts[index] = Some((token, valid.expiry));
            }
            Err(error) => errors.push(error),
        }
    }
    let files = writer.files()?;
    writer.out.update(files)?;
    match errors.into_iter().next() {
        None => Ok(()),
        Some(error) => Err(error),
    }
}

/// One-shot mode with `identity_source: kubernetes`.
async fn run_once_kubernetes(source: &crate::config::KubernetesSource, config: Config) -> Result<(), AgentError> {
    let (keys, token, valid) = crate::kubernetes::fetch_once(source, &config.jwt_svids).await?;
    let bundle_key = crate::svid::kubernetes::BUNDLE_KEY.to_owned();
    let mut writer = Writer {
        jwts: vec![Some((token, valid.expiry)); config.jwt_svids.len()],
        hooks: Hooks::new("", "", "", ""),
        out: OutputDir::new(&config.cert_dir)?,
        health: health_for(&config),
        x509: None,
        bundles: Some([(bundle_key.clone(), keys.jwks)].into_iter().collect()),
        own_trust_domain: Some(bundle_key),
        config,
    };
    let files = writer.files()?;
    writer.out.update(files)?;
    Ok(())
}
