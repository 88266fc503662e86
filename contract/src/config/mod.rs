//! The agent's configuration: spiffe-helper's `helper.conf` keys, defaults and validation, read
//! from HCL v1 or YAML, plus a few keys of our own (marked below).

mod de;
mod file;
pub mod hcl;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use file::File;

pub use crate::paths::{DEFAULT_AGENT_ADDRESS, KUBERNETES_TOKEN_DIR};

/// How an output file is replaced (`jwt_svid_write_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteMode {
    /// In the next version directory, published by the `..data` swap (atomic, consistent set).
    #[default]
    Swap,
    /// A regular file rewritten in place with a single write (seen by inode watchers).
    InPlace,
}

/// A signal named as `renew_signal` takes it (`SIGHUP`, `hup`, `SIGUSR1`, ...).
pub fn parse_signal(name: &str) -> Option<nix::sys::signal::Signal> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    full.parse().ok()
}

/// How the JWT bundle file is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum JwtBundleFormat {
    /// spiffe-helper's: `{"<trust domain>": "<base64 of a JWKS>"}` for every trust domain.
    #[default]
    SpiffeHelper,
    /// A plain JWKS (`{"keys": [...]}`) of one trust domain, as SLIM's JWT verifier loads it.
    Jwks,
}

/// Where the workload's identity comes from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum IdentitySource {
    /// The SPIFFE Workload API (a SPIRE agent socket): X.509-SVIDs, JWT-SVIDs, JWT bundles.
    #[default]
    Spiffe,
    /// The pod's projected Kubernetes service-account token, and the cluster's JWKS.
    Kubernetes(KubernetesSource),
}

/// `identity_source: kubernetes`: the pod's projected service-account token, checked and written
/// as the JWT file(s); the cluster's JWKS (from the API server's OIDC endpoints) as the bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesSource {
    /// `kubernetes_token_file`: the projected token (audience-bound; the kubelet rotates it).
    pub token_file: PathBuf,
    /// `kubernetes_api_server`: the API server's URL; empty: `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
    pub api_server: String,
    /// `kubernetes_ca_file`: the CA bundle the API server's certificate is checked against.
    pub ca_file: PathBuf,
    /// `kubernetes_api_token_file`: a token the API server accepts (for its OIDC endpoints).
    pub api_token_file: PathBuf,
    /// `kubernetes_jwks_refresh_seconds`: how often the JWKS is fetched again when no unknown
    /// `kid` asked for it earlier.
    pub jwks_refresh: Duration,
    /// `kubernetes_issuer_*`: SPIFFE identities from `slim-operator`'s issuer, served on the
    /// Workload API socket (which must then be set).
    pub issuer: Option<Box<IssuerSource>>,
}

/// Where the agent gets SPIFFE identities without SPIRE: `slim-operator`'s issuer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuerSource {
    /// `kubernetes_issuer_url`: `https://` address of the issuer.
    pub url: String,
    /// `kubernetes_issuer_token_file`: a projected token whose audience is the issuer's.
    pub token_file: PathBuf,
    /// `kubernetes_issuer_ca_file`: the CA the issuer's serving certificate is checked against.
    pub ca_file: PathBuf,
    /// `kubernetes_issuer_server_name`: the name checked in that certificate (default: the
    /// URL's host).
    pub server_name: String,
}

impl Default for KubernetesSource {
    fn default() -> Self {
        let file = |name: &str| Path::new(KUBERNETES_TOKEN_DIR).join(name);
        Self {
            token_file: file("token"),
            api_server: String::new(),
            ca_file: file("ca.crt"),
            api_token_file: file("api-token"),
            jwks_refresh: Duration::from_secs(600),
            issuer: None,
        }
    }
}

/// One JWT-SVID to keep on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtSvidConfig {
    pub audience: String,
    pub extra_audiences: Vec<String>,
    pub file_name: String,
}

impl JwtSvidConfig {
    /// Every audience the token is requested (and checked) for.
    pub fn audiences(&self) -> Vec<String> {
        std::iter::once(self.audience.clone()).chain(self.extra_audiences.iter().cloned()).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthChecks {
    pub listener_enabled: bool,
    pub bind_port: u16,
    pub liveness_path: String,
    pub readiness_path: String,
}

/// The agent's settings, checked: read from a file's keys ([`File`], whose conversion holds the
/// defaults and rules between keys) and written back as them.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "File", into = "File")]
pub struct Config {
    pub agent_address: String,
    pub cmd: String,
    pub cmd_args: String,
    pub pid_file_name: String,
    pub cert_dir: PathBuf,
    pub daemon_mode: bool,
    pub add_intermediates_to_bundle: bool,
    pub include_federated_domains: bool,
    pub omit_expired: bool,
    pub renew_signal: String,
    pub hint: String,
    /// `(svid, key, bundle)` file names, or none.
    pub x509: Option<(String, String, String)>,
    pub jwt_bundle_file_name: String,
    pub jwt_svids: Vec<JwtSvidConfig>,
    pub cert_file_mode: u32,
    pub key_file_mode: u32,
    pub jwt_bundle_file_mode: u32,
    pub jwt_svid_file_mode: u32,
    pub health_checks: HealthChecks,
    // Ours:
    /// `jwt_bundle_format`: `spiffe-helper` (default) or `jwks`.
    pub jwt_bundle_format: JwtBundleFormat,
    /// `jwt_bundle_trust_domain`: the trust domain of the `jwks` file (default: the workload's own).
    pub jwt_bundle_trust_domain: String,
    /// `jwt_svid_refresh_percent`: refresh a JWT-SVID after this share of its remaining life
    /// (1..=50; 50 is spiffe-helper's half-remaining-life rule, and the latest allowed).
    pub jwt_svid_refresh_percent: u8,
    /// `renew_on_jwt_update`: also signal / run `cmd` when a JWT-SVID or the JWT bundle changes.
    pub renew_on_jwt_update: bool,
    /// `jwt_svid_write_mode`: `atomic` (default: in the version directory, published by the
    /// `..data` swap) or `in-place` (a regular file rewritten with one write, which SLIM's
    /// `static_jwt` file watcher sees; an atomic swap it never notices).
    pub jwt_svid_write_mode: WriteMode,
    /// `identity_source`: `spiffe` (default) or `kubernetes` (with the `kubernetes_*` keys).
    pub identity_source: IdentitySource,
    /// `workload_api_socket`: serve the Workload API to the pod on this Unix socket (SLIM's
    /// `spire` identity provider connects there); empty: not served.
    pub workload_api_socket: Option<PathBuf>,
}

impl Default for Config {
    /// What an empty config means (spiffe-helper's defaults); not valid by itself: it names no file.
    fn default() -> Self {
        Self {
            agent_address: String::new(),
            cmd: String::new(),
            cmd_args: String::new(),
            pid_file_name: String::new(),
            cert_dir: PathBuf::new(),
            daemon_mode: true,
            add_intermediates_to_bundle: false,
            include_federated_domains: false,
            omit_expired: false,
            renew_signal: String::new(),
            hint: String::new(),
            x509: None,
            jwt_bundle_file_name: String::new(),
            jwt_svids: Vec::new(),
            cert_file_mode: 0o644,
            key_file_mode: 0o600,
            jwt_bundle_file_mode: 0o600,
            jwt_svid_file_mode: 0o600,
            health_checks: HealthChecks {
                listener_enabled: false,
                bind_port: 8081,
                liveness_path: "/live".into(),
                readiness_path: "/ready".into(),
            },
            jwt_bundle_format: JwtBundleFormat::SpiffeHelper,
            jwt_bundle_trust_domain: String::new(),
            jwt_svid_refresh_percent: 50,
            renew_on_jwt_update: false,
            jwt_svid_write_mode: WriteMode::Swap,
            identity_source: IdentitySource::Spiffe,
            workload_api_socket: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config environment variable {0} is not set")]
    MissingEnv(String),
    #[error("parsing HCL config: {0}")]
    Hcl(#[from] hcl::ParseError),
    #[error("HCL config: {0}")]
    HclKeys(#[from] de::Error),
    #[error("parsing YAML config: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn invalid<T>(message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(message.into()))
}

impl Config {
    /// Reads `path`: YAML when it ends in `.yaml`/`.yml`, else HCL (spiffe-helper's format).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if yaml { Self::from_yaml(&text) } else { Self::from_hcl(&text) }
    }

    /// Reads YAML from an environment variable (how the injector hands the config over).
    pub fn from_env(name: &str) -> Result<Self, ConfigError> {
        let text = std::env::var(name).map_err(|_| ConfigError::MissingEnv(name.to_owned()))?;
        Self::from_yaml(&text)
    }

    pub fn from_hcl(text: &str) -> Result<Self, ConfigError> {
        let file: File = de::from_value(&hcl::parse(text)?)?;
        Self::try_from(file)
    }

    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        // An empty document is an empty config (serde_yaml reads it as no value at all).
        let file: File = if text.trim().is_empty() { File::default() } else { serde_yaml::from_str(text)? };
        Self::try_from(file)
    }

    /// The YAML this config is read back from (`from_yaml(to_yaml(c)) == c` for a valid config):
    /// how the injector hands a typed config to the agent.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        Ok(serde_yaml::to_string(self)?)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let IdentitySource::Kubernetes(source) = &self.identity_source {
            if self.x509.is_some() {
                return invalid(
                    "identity_source kubernetes writes JWTs only: X.509-SVIDs ('svid_file_name') need the SPIFFE Workload API",
                );
            }
            if self.jwt_svids.is_empty() {
                return invalid("identity_source kubernetes needs a 'jwt_svids' entry: where the token is written");
            }
            if !self.agent_address.is_empty() {
                return invalid(
                    "agent_address is the SPIRE agent's socket: identity_source kubernetes does not use one",
                );
            }
            if self.jwt_bundle_format != JwtBundleFormat::Jwks {
                return invalid(
                    "identity_source kubernetes writes the cluster's JWKS: jwt_bundle_format must be \"jwks\"",
                );
            }
            match (&self.workload_api_socket, &source.issuer) {
                (Some(_), None) => {
                    return invalid(
                        "workload_api_socket serves SPIFFE identities: identity_source kubernetes has them only from an issuer (kubernetes_issuer_url)",
                    );
                }
                (None, Some(_)) => {
                    return invalid(
                        "kubernetes_issuer_url: the issuer's identities are served on workload_api_socket, which is not set",
                    );
                }
                _ => {}
            }
        }
        if self.x509.is_none()
            && self.jwt_svids.is_empty()
            && self.jwt_bundle_file_name.is_empty()
            && self.workload_api_socket.is_none()
        {
            return invalid(
                "at least one of 'svid_file_name' (with its key and bundle), 'jwt_svids', 'jwt_bundle_file_name' or 'workload_api_socket' must be specified",
            );
        }
        if let Some(socket) = &self.workload_api_socket
            && Some(socket.as_path()) == self.socket_path().ok().as_deref()
        {
            return invalid(format!(
                "workload_api_socket {} is the upstream agent's socket: serve the pod on another path",
                socket.display()
            ));
        }
        if !self.pid_file_name.is_empty() {
            if !self.daemon_mode {
                return invalid("pid_file_name is set but daemon_mode is false: nothing would ever be signalled");
            }
            if self.renew_signal.is_empty() {
                return invalid("pid_file_name is set but renew_signal is not: which signal should the process get?");
            }
        }
        if !self.renew_signal.is_empty() && parse_signal(&self.renew_signal).is_none() {
            return invalid(format!(
                "renew_signal {:?} is not a known signal (e.g. SIGHUP, SIGUSR1)",
                self.renew_signal
            ));
        }
        Ok(())
    }

    /// The Workload API socket: `agent_address`, else `SPIFFE_ENDPOINT_SOCKET`, else the default;
    /// plain paths and `unix://` / `unix:` URIs are all accepted.
    pub fn socket_path(&self) -> Result<PathBuf, ConfigError> {
        let from_env = std::env::var("SPIFFE_ENDPOINT_SOCKET").ok().filter(|v| !v.is_empty());
        let raw = if !self.agent_address.is_empty() {
            self.agent_address.clone()
        } else {
            from_env.unwrap_or_else(|| DEFAULT_AGENT_ADDRESS.to_owned())
        };
        socket_path_of(&raw)
    }

    /// The next JWT-SVID refresh for a token with `remaining` life.
    pub fn jwt_refresh_after(&self, remaining: Duration) -> Duration {
        refresh_after(remaining, self.jwt_svid_refresh_percent)
    }
}

/// `remaining × percent / 100` plus a second (spiffe-helper's `remaining/2 + 1s` at 50 %), never
/// past half the remaining life, never less than a second.
pub fn refresh_after(remaining: Duration, percent: u8) -> Duration {
    let share = remaining.mul_f64(f64::from(percent.clamp(1, 50)) / 100.0) + Duration::from_secs(1);
    share.min(remaining / 2 + Duration::from_secs(1)).max(Duration::from_secs(1))
}

/// A socket address as a path.
pub fn socket_path_of(raw: &str) -> Result<PathBuf, ConfigError> {
    let path = if let Some(rest) = raw.strip_prefix("unix://") {
        if !rest.starts_with('/') {
            return invalid(format!("{raw:?}: a unix:// socket URI needs an absolute path and no host"));
        }
        rest
    } else if let Some(rest) = raw.strip_prefix("unix:") {
        rest
    } else if raw.starts_with("tcp:") {
        return invalid(format!("{raw:?}: TCP Workload API endpoints are not supported; use a unix socket"));
    } else {
        raw
    };
    if path.is_empty() {
        return invalid("the agent socket path is empty");
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests;
