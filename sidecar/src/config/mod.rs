//! The agent's configuration: spiffe-helper's `helper.conf` keys, defaults and validation, read
//! from HCL v1 or YAML, plus a few keys of our own (marked below).

pub mod hcl;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::output::WriteMode;
use hcl::{Pos, Value};

/// spiffe-helper's default agent socket.
pub const DEFAULT_AGENT_ADDRESS: &str = "/tmp/spire-agent/public/api.sock";

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

/// Where the projected token volume the injector adds is mounted in the agent.
pub const KUBERNETES_TOKEN_DIR: &str = "/var/run/secrets/slim.agntcy.org";

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

#[derive(Clone, Debug, PartialEq, Eq)]
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
    #[error("parsing YAML config: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("{0}")]
    Invalid(String),
}

fn invalid<T>(message: impl Into<String>) -> Result<T, ConfigError> {
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
        Self::from_value(&hcl::parse(text)?)
    }

    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let yaml: serde_yaml::Value = serde_yaml::from_str(text)?;
        Self::from_value(&from_yaml(&yaml)?)
    }

    /// The YAML this config is read back from (`from_yaml(to_yaml(c)) == c` for a valid config):
    /// how the injector hands a typed config to the agent.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        let mode = |m: u32| format!("0{m:o}");
        let mut doc = serde_json::json!({
            "agent_address": self.agent_address,
            "cmd": self.cmd,
            "cmd_args": self.cmd_args,
            "pid_file_name": self.pid_file_name,
            "cert_dir": self.cert_dir.to_string_lossy(),
            "daemon_mode": self.daemon_mode,
            "add_intermediates_to_bundle": self.add_intermediates_to_bundle,
            "include_federated_domains": self.include_federated_domains,
            "omit_expired": self.omit_expired,
            "renew_signal": self.renew_signal,
            "hint": self.hint,
            "jwt_bundle_file_name": self.jwt_bundle_file_name,
            "jwt_svids": self.jwt_svids.iter().map(|svid| serde_json::json!({
                "jwt_audience": svid.audience,
                "jwt_extra_audiences": svid.extra_audiences,
                "jwt_svid_file_name": svid.file_name,
            })).collect::<Vec<_>>(),
            "cert_file_mode": mode(self.cert_file_mode),
            "key_file_mode": mode(self.key_file_mode),
            "jwt_bundle_file_mode": mode(self.jwt_bundle_file_mode),
            "jwt_svid_file_mode": mode(self.jwt_svid_file_mode),
            "health_checks": {
                "listener_enabled": self.health_checks.listener_enabled,
                "bind_port": self.health_checks.bind_port,
                "liveness_path": self.health_checks.liveness_path,
                "readiness_path": self.health_checks.readiness_path,
            },
            "jwt_bundle_format": match self.jwt_bundle_format {
                JwtBundleFormat::SpiffeHelper => "spiffe-helper",
                JwtBundleFormat::Jwks => "jwks",
            },
            "jwt_bundle_trust_domain": self.jwt_bundle_trust_domain,
            "jwt_svid_refresh_percent": self.jwt_svid_refresh_percent,
            "renew_on_jwt_update": self.renew_on_jwt_update,
            "jwt_svid_write_mode": match self.jwt_svid_write_mode {
                WriteMode::Swap => "atomic",
                WriteMode::InPlace => "in-place",
            },
            "workload_api_socket": self.workload_api_socket.as_ref().map(|p| p.to_string_lossy()).unwrap_or_default(),
        });
        if let (Some((svid, key, bundle)), Some(map)) = (&self.x509, doc.as_object_mut()) {
            map.insert("svid_file_name".into(), svid.as_str().into());
            map.insert("svid_key_file_name".into(), key.as_str().into());
            map.insert("svid_bundle_file_name".into(), bundle.as_str().into());
        }
        if let (IdentitySource::Kubernetes(k), Some(map)) = (&self.identity_source, doc.as_object_mut()) {
            map.insert("identity_source".into(), "kubernetes".into());
            map.insert("kubernetes_token_file".into(), k.token_file.to_string_lossy().into());
            map.insert("kubernetes_api_server".into(), k.api_server.as_str().into());
            map.insert("kubernetes_ca_file".into(), k.ca_file.to_string_lossy().into());
            map.insert("kubernetes_api_token_file".into(), k.api_token_file.to_string_lossy().into());
            map.insert("kubernetes_jwks_refresh_seconds".into(), k.jwks_refresh.as_secs().into());
            if let Some(issuer) = &k.issuer {
                map.insert("kubernetes_issuer_url".into(), issuer.url.as_str().into());
                map.insert("kubernetes_issuer_token_file".into(), issuer.token_file.to_string_lossy().into());
                map.insert("kubernetes_issuer_ca_file".into(), issuer.ca_file.to_string_lossy().into());
                map.insert("kubernetes_issuer_server_name".into(), issuer.server_name.as_str().into());
            }
        }
        Ok(serde_yaml::to_string(&doc)?)
    }

    fn from_value(value: &Value) -> Result<Self, ConfigError> {
        let mut top = Fields::new(value, "top-level")?;
        // `health_checks { }` (or `= { }`); written as repeated blocks, the last one wins.
        let health = match top.take("health_checks") {
            None => None,
            Some((object @ Value::Object(_), _)) => Some(Fields::new(object, "health_checks")?),
            Some((Value::List(list), pos)) => match list.last() {
                Some(object @ Value::Object(_)) => Some(Fields::new(object, "health_checks")?),
                _ => return invalid(format!("health_checks at line {pos} must be a block")),
            },
            Some((_, pos)) => return invalid(format!("health_checks at line {pos} must be a block")),
        };
        let bundle_format = top.string("jwt_bundle_format")?;
        let identity_source = identity_source(&mut top)?;
        let mut config = Config {
            agent_address: top.string("agent_address")?,
            cmd: top.string("cmd")?,
            cmd_args: top.string("cmd_args")?,
            pid_file_name: top.string("pid_file_name")?,
            cert_dir: PathBuf::from(top.string("cert_dir")?),
            daemon_mode: top.bool("daemon_mode")?.unwrap_or(true),
            add_intermediates_to_bundle: top.bool("add_intermediates_to_bundle")?.unwrap_or(false),
            include_federated_domains: top.bool("include_federated_domains")?.unwrap_or(false),
            omit_expired: top.bool("omit_expired")?.unwrap_or(false),
            renew_signal: top.string("renew_signal")?,
            hint: top.string("hint")?,
            x509: None,
            jwt_bundle_file_name: top.string("jwt_bundle_file_name")?,
            jwt_svids: Vec::new(),
            cert_file_mode: top.mode("cert_file_mode", 0o644)?,
            key_file_mode: top.mode("key_file_mode", 0o600)?,
            jwt_bundle_file_mode: top.mode("jwt_bundle_file_mode", 0o600)?,
            jwt_svid_file_mode: top.mode("jwt_svid_file_mode", 0o600)?,
            health_checks: HealthChecks {
                listener_enabled: false,
                bind_port: 8081,
                liveness_path: "/live".into(),
                readiness_path: "/ready".into(),
            },
            jwt_bundle_format: match bundle_format.as_str() {
                "" | "spiffe-helper" => JwtBundleFormat::SpiffeHelper,
                "jwks" => JwtBundleFormat::Jwks,
                other => return invalid(format!("jwt_bundle_format {other:?} is not \"spiffe-helper\" or \"jwks\"")),
            },
            jwt_bundle_trust_domain: top.string("jwt_bundle_trust_domain")?,
            jwt_svid_refresh_percent: match top.int("jwt_svid_refresh_percent")? {
                None => 50,
                Some(p) if (1..=50).contains(&p) => p as u8,
                Some(p) => return invalid(format!("jwt_svid_refresh_percent {p} must be between 1 and 50")),
            },
            renew_on_jwt_update: top.bool("renew_on_jwt_update")?.unwrap_or(false),
            jwt_svid_write_mode: match top.string("jwt_svid_write_mode")?.as_str() {
                "" | "atomic" => WriteMode::Swap,
                "in-place" => WriteMode::InPlace,
                other => return invalid(format!("jwt_svid_write_mode {other:?} is not \"atomic\" or \"in-place\"")),
            },
            identity_source,
            workload_api_socket: match top.string("workload_api_socket")?.as_str() {
                "" => None,
                raw => Some(socket_path_of(raw)?),
            },
        };
        // A service-account token has no trust domain: its bundle is the cluster's plain JWKS.
        if matches!(config.identity_source, IdentitySource::Kubernetes(_)) && bundle_format.is_empty() {
            config.jwt_bundle_format = JwtBundleFormat::Jwks;
        }
        config.x509 = x509_file_names(&mut top)?;
        if let Some((list, _)) = top.take("jwt_svids") {
            config.jwt_svids = jwt_svids(list)?;
        }
        if let Some(fields) = health {
            config.health_checks = health_checks(fields)?;
        }
        top.finish()?;
        config.validate()?;
        Ok(config)
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
        if !self.renew_signal.is_empty() && crate::hooks::parse_signal(&self.renew_signal).is_none() {
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

/// `svid_file_name`, `svid_key_file_name`, `svid_bundle_file_name`: all three or none.
fn x509_file_names(top: &mut Fields<'_>) -> Result<Option<(String, String, String)>, ConfigError> {
    let x509 = (top.string("svid_file_name")?, top.string("svid_key_file_name")?, top.string("svid_bundle_file_name")?);
    match [&x509.0, &x509.1, &x509.2].iter().filter(|s| !s.is_empty()).count() {
        0 => Ok(None),
        3 => Ok(Some(x509)),
        _ => {
            invalid("all or none of 'svid_file_name', 'svid_key_file_name', 'svid_bundle_file_name' must be specified")
        }
    }
}

/// The `jwt_svids` entries (a list of objects, or one object).
fn jwt_svids(list: &Value) -> Result<Vec<JwtSvidConfig>, ConfigError> {
    let entries: Vec<&Value> = match list {
        Value::List(entries) => entries.iter().collect(),
        object @ Value::Object(_) => vec![object],
        _ => return invalid("jwt_svids must be a list of objects"),
    };
    let mut svids = Vec::new();
    for entry in entries {
        let mut fields = Fields::new(entry, "jwt_svids")?;
        let svid = JwtSvidConfig {
            audience: fields.string("jwt_audience")?,
            extra_audiences: fields.strings("jwt_extra_audiences")?,
            file_name: fields.string("jwt_svid_file_name")?,
        };
        fields.finish()?;
        if svid.file_name.is_empty() {
            return invalid("'jwt_file_name' is required in 'jwt_svids'");
        }
        if svid.audience.is_empty() {
            return invalid("'jwt_audience' is required in 'jwt_svids'");
        }
        svids.push(svid);
    }
    Ok(svids)
}

/// `health_checks { }`: spiffe-helper applies the defaults only when the listener is on.
fn health_checks(mut fields: Fields<'_>) -> Result<HealthChecks, ConfigError> {
    let enabled = fields.bool("listener_enabled")?.unwrap_or(false);
    let port = fields.int("bind_port")?;
    let liveness = fields.string("liveness_path")?;
    let readiness = fields.string("readiness_path")?;
    fields.finish()?;
    if let Some(port) = port.filter(|p| *p < 0) {
        return invalid(format!("health_checks.bind_port {port} must not be negative"));
    }
    let mut health = Config::default().health_checks;
    health.listener_enabled = enabled;
    if enabled {
        if let Some(port) = port.filter(|p| *p > 0) {
            health.bind_port =
                u16::try_from(port).map_err(|_| ConfigError::Invalid(format!("bind_port {port} is not a port")))?;
        }
        if !liveness.is_empty() {
            health.liveness_path = liveness;
        }
        if !readiness.is_empty() {
            health.readiness_path = readiness;
        }
    }
    Ok(health)
}

/// `identity_source` and the `kubernetes_*` keys (which only go with `kubernetes`).
fn identity_source(top: &mut Fields<'_>) -> Result<IdentitySource, ConfigError> {
    let source = top.string("identity_source")?;
    let defaults = KubernetesSource::default();
    let path = |value: String, default: PathBuf| if value.is_empty() { default } else { PathBuf::from(value) };
    let token_file = top.string("kubernetes_token_file")?;
    let api_server = top.string("kubernetes_api_server")?;
    let ca_file = top.string("kubernetes_ca_file")?;
    let api_token_file = top.string("kubernetes_api_token_file")?;
    let refresh = top.int("kubernetes_jwks_refresh_seconds")?;
    let issuer = issuer_source(top)?;
    let any_set = [&token_file, &api_server, &ca_file, &api_token_file].iter().any(|v| !v.is_empty())
        || refresh.is_some()
        || issuer.is_some();
    match source.as_str() {
        "" | "spiffe" if any_set => invalid("the kubernetes_* keys need identity_source: kubernetes"),
        "" | "spiffe" => Ok(IdentitySource::Spiffe),
        "kubernetes" => {
            if !api_server.is_empty() && !api_server.starts_with("https://") {
                return invalid(format!("kubernetes_api_server {api_server:?} must be an https:// URL"));
            }
            let jwks_refresh = match refresh {
                None => defaults.jwks_refresh,
                Some(s) if s >= 10 => Duration::from_secs(s as u64),
                Some(s) => return invalid(format!("kubernetes_jwks_refresh_seconds {s} must be at least 10")),
            };
            Ok(IdentitySource::Kubernetes(KubernetesSource {
                token_file: path(token_file, defaults.token_file),
                api_server,
                ca_file: path(ca_file, defaults.ca_file),
                api_token_file: path(api_token_file, defaults.api_token_file),
                jwks_refresh,
                issuer,
            }))
        }
        other => invalid(format!("identity_source {other:?} is not \"spiffe\" or \"kubernetes\"")),
    }
}

/// The `kubernetes_issuer_*` keys: all of URL, token and CA, or none.
fn issuer_source(top: &mut Fields<'_>) -> Result<Option<Box<IssuerSource>>, ConfigError> {
    let url = top.string("kubernetes_issuer_url")?;
    let token_file = top.string("kubernetes_issuer_token_file")?;
    let ca_file = top.string("kubernetes_issuer_ca_file")?;
    let server_name = top.string("kubernetes_issuer_server_name")?;
    if url.is_empty() {
        if [&token_file, &ca_file, &server_name].iter().any(|v| !v.is_empty()) {
            return invalid("the kubernetes_issuer_* keys need kubernetes_issuer_url");
        }
        return Ok(None);
    }
    if !url.starts_with("https://") {
        return invalid(format!("kubernetes_issuer_url {url:?} must be an https:// URL"));
    }
    if token_file.is_empty() || ca_file.is_empty() {
        return invalid("kubernetes_issuer_url needs kubernetes_issuer_token_file and kubernetes_issuer_ca_file");
    }
    Ok(Some(Box::new(IssuerSource { url, token_file: token_file.into(), ca_file: ca_file.into(), server_name })))
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

/// The keys of one object, consumed as they are read; what is left is unknown.
struct Fields<'a> {
    scope: &'static str,
    items: Vec<(&'a str, &'a Value, Pos)>,
}

impl<'a> Fields<'a> {
    fn new(value: &'a Value, scope: &'static str) -> Result<Self, ConfigError> {
        match value {
            Value::Object(items) => {
                Ok(Self { scope, items: items.iter().map(|(k, v, p)| (k.as_str(), v, *p)).collect() })
            }
            _ => invalid(format!("{scope}: expected an object")),
        }
    }

    fn take(&mut self, key: &str) -> Option<(&'a Value, Pos)> {
        let index = self.items.iter().position(|(k, _, _)| *k == key)?;
        let (_, value, pos) = self.items.remove(index);
        Some((value, pos))
    }

    fn string(&mut self, key: &str) -> Result<String, ConfigError> {
        match self.take(key) {
            None => Ok(String::new()),
            Some((Value::Str(s), _)) => Ok(s.clone()),
            Some((_, pos)) => invalid(format!("{key} at line {pos} must be a string")),
        }
    }

    fn strings(&mut self, key: &str) -> Result<Vec<String>, ConfigError> {
        match self.take(key) {
            None => Ok(Vec::new()),
            Some((Value::List(list), pos)) => list
                .iter()
                .map(|v| match v {
                    Value::Str(s) => Ok(s.clone()),
                    _ => invalid(format!("{key} at line {pos} must be a list of strings")),
                })
                .collect(),
            Some((_, pos)) => invalid(format!("{key} at line {pos} must be a list of strings")),
        }
    }

    fn bool(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some((Value::Bool(b), _)) => Ok(Some(*b)),
            Some((_, pos)) => invalid(format!("{key} at line {pos} must be true or false")),
        }
    }

    fn int(&mut self, key: &str) -> Result<Option<i64>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some((Value::Int(i), _)) => Ok(Some(*i)),
            Some((_, pos)) => invalid(format!("{key} at line {pos} must be an integer")),
        }
    }

    /// A file mode: an integer (`0600` in HCL is octal) or an octal string (`"0600"` in YAML).
    /// Negative is an error, 0 means the default.
    fn mode(&mut self, key: &str, default: u32) -> Result<u32, ConfigError> {
        let mode = match self.take(key) {
            None => 0,
            Some((Value::Int(i), _)) => *i,
            Some((Value::Str(s), pos)) => {
                hcl::parse_int(s.trim()).filter(|_| s.trim().starts_with('0')).ok_or_else(|| {
                    ConfigError::Invalid(format!("{key} at line {pos}: {s:?} is not an octal mode like \"0600\""))
                })?
            }
            Some((_, pos)) => return invalid(format!("{key} at line {pos} must be a file mode")),
        };
        match mode {
            m if m < 0 => invalid(format!("{key} {m} must not be negative")),
            0 => Ok(default),
            m if m > 0o7777 => invalid(format!("{key} {m:o} is not a file mode")),
            m => Ok(m as u32),
        }
    }

    /// Every key left is unknown: spiffe-helper refuses them, and so do we.
    fn finish(self) -> Result<(), ConfigError> {
        match self.items.first() {
            None => Ok(()),
            Some((key, _, pos)) => invalid(format!("unknown {} config key {key:?} at line {pos}", self.scope)),
        }
    }
}

/// YAML into the HCL value model (positions are not known for YAML: reported as 0:0).
fn from_yaml(value: &serde_yaml::Value) -> Result<Value, ConfigError> {
    use serde_yaml::Value as Y;
    Ok(match value {
        Y::Null => Value::Object(Vec::new()),
        Y::Bool(b) => Value::Bool(*b),
        Y::Number(n) => Value::Int(n.as_i64().ok_or_else(|| ConfigError::Invalid(format!("{n} is not an integer")))?),
        Y::String(s) => Value::Str(s.clone()),
        Y::Sequence(items) => Value::List(items.iter().map(from_yaml).collect::<Result<_, _>>()?),
        Y::Mapping(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = k.as_str().ok_or_else(|| ConfigError::Invalid("config keys must be strings".into()))?;
                    Ok((key.to_owned(), from_yaml(v)?, Pos::default()))
                })
                .collect::<Result<_, ConfigError>>()?,
        ),
        Y::Tagged(tagged) => from_yaml(&tagged.value)?,
    })
}

#[cfg(test)]
mod tests;
