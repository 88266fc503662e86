//! The config file's keys, as serde reads and writes them: one list of keys for HCL (through
//! [`super::de`]), YAML, and the YAML the injector writes. What the keys mean, their defaults and
//! which combinations are valid is [`Config`]'s business: [`File`] only says how they are spelled.

use std::path::PathBuf;
use std::time::Duration;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::{
    Config, ConfigError, HealthChecks, IdentitySource, IssuerSource, JwtBundleFormat, JwtSvidConfig, KubernetesSource,
    WriteMode, invalid, socket_path_of,
};

/// spiffe-helper's `helper.conf` keys, then ours. Empty strings and absent values are unset (and
/// not written).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct File {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub agent_address: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cmd: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cmd_args: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pid_file_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cert_dir: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daemon_mode: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add_intermediates_to_bundle: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_federated_domains: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub omit_expired: Option<bool>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub renew_signal: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hint: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub svid_file_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub svid_key_file_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub svid_bundle_file_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub jwt_bundle_file_name: String,
    #[serde(deserialize_with = "one_or_many")]
    pub jwt_svids: Vec<JwtSvidFile>,
    pub cert_file_mode: Mode,
    pub key_file_mode: Mode,
    pub jwt_bundle_file_mode: Mode,
    pub jwt_svid_file_mode: Mode,
    #[serde(deserialize_with = "last_block", skip_serializing_if = "Option::is_none")]
    pub health_checks: Option<HealthFile>,
    // Ours:
    #[serde(skip_serializing_if = "String::is_empty")]
    pub jwt_bundle_format: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub jwt_bundle_trust_domain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_svid_refresh_percent: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renew_on_jwt_update: Option<bool>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub jwt_svid_write_mode: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub workload_api_socket: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub identity_source: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kubernetes_token_file: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kubernetes_api_server: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kubernetes_ca_file: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kubernetes_api_token_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes_jwks_refresh_seconds: Option<i64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kubernetes_issuer_url: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kubernetes_issuer_token_file: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kubernetes_issuer_ca_file: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kubernetes_issuer_server_name: String,
}

/// One `jwt_svids` entry.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSvidFile {
    pub jwt_audience: String,
    pub jwt_extra_audiences: Vec<String>,
    pub jwt_svid_file_name: String,
}

/// `health_checks { }`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener_enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind_port: Option<i64>,
    pub liveness_path: String,
    pub readiness_path: String,
}

/// A file mode: an integer (`0600` in HCL is octal) or an octal string (`"0600"`, as YAML keeps
/// it); 0 (or absent) means the default. Written as an octal string.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mode(pub u32);

impl Mode {
    fn or(self, default: u32) -> u32 {
        if self.0 == 0 { default } else { self.0 }
    }
}

impl Serialize for Mode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("0{:o}", self.0))
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ModeVisitor;
        impl Visitor<'_> for ModeVisitor {
            type Value = Mode;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a file mode like 0600 or \"0600\"")
            }
            fn visit_i64<E: de::Error>(self, mode: i64) -> Result<Mode, E> {
                match mode {
                    m if m < 0 => Err(E::custom(format!("{m} must not be negative"))),
                    m if m > 0o7777 => Err(E::custom(format!("{m:o} is not a file mode"))),
                    m => Ok(Mode(m as u32)),
                }
            }
            fn visit_u64<E: de::Error>(self, mode: u64) -> Result<Mode, E> {
                self.visit_i64(i64::try_from(mode).unwrap_or(i64::MAX))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Mode, E> {
                let mode = super::hcl::parse_int(text.trim()).filter(|_| text.trim().starts_with('0'));
                let mode = mode.ok_or_else(|| E::custom(format!("{text:?} is not an octal mode like \"0600\"")))?;
                self.visit_i64(mode)
            }
        }
        deserializer.deserialize_any(ModeVisitor)
    }
}

/// `jwt_svids`: a list of objects, or one object (one `jwt_svids { }` block in HCL).
fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<JwtSvidFile>, D::Error> {
    struct Entries;
    impl<'de> Visitor<'de> for Entries {
        type Value = Vec<JwtSvidFile>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of objects, or one object")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Vec::deserialize(SeqAccessDeserializer::new(seq))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            Ok(vec![JwtSvidFile::deserialize(MapAccessDeserializer::new(map))?])
        }
    }
    deserializer.deserialize_any(Entries)
}

/// `health_checks { }` (or `= { }`); written as repeated blocks, the last one wins.
fn last_block<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<HealthFile>, D::Error> {
    struct Blocks;
    impl<'de> Visitor<'de> for Blocks {
        type Value = Option<HealthFile>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a block")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            let blocks: Vec<HealthFile> = Vec::deserialize(SeqAccessDeserializer::new(seq))?;
            blocks.into_iter().last().map(Some).ok_or_else(|| de::Error::invalid_length(0, &self))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            HealthFile::deserialize(MapAccessDeserializer::new(map)).map(Some)
        }
    }
    deserializer.deserialize_any(Blocks)
}

/// The keys' meaning: defaults, the typed model, and the rules between keys (then [`Config::validate`]).
impl TryFrom<File> for Config {
    type Error = ConfigError;

    fn try_from(file: File) -> Result<Self, ConfigError> {
        let defaults = Config::default();
        let identity_source = identity_source(&file)?;
        let mut config = Config {
            x509: x509_file_names(&file)?,
            jwt_svids: file.jwt_svids.into_iter().map(JwtSvidConfig::try_from).collect::<Result<_, _>>()?,
            health_checks: file.health_checks.map(health_checks).transpose()?.unwrap_or(defaults.health_checks),
            jwt_bundle_format: match file.jwt_bundle_format.as_str() {
                "" | "spiffe-helper" => JwtBundleFormat::SpiffeHelper,
                "jwks" => JwtBundleFormat::Jwks,
                other => return invalid(format!("jwt_bundle_format {other:?} is not \"spiffe-helper\" or \"jwks\"")),
            },
            jwt_svid_refresh_percent: match file.jwt_svid_refresh_percent {
                None => defaults.jwt_svid_refresh_percent,
                Some(p) if (1..=50).contains(&p) => p as u8,
                Some(p) => return invalid(format!("jwt_svid_refresh_percent {p} must be between 1 and 50")),
            },
            jwt_svid_write_mode: match file.jwt_svid_write_mode.as_str() {
                "" | "atomic" => WriteMode::Swap,
                "in-place" => WriteMode::InPlace,
                other => return invalid(format!("jwt_svid_write_mode {other:?} is not \"atomic\" or \"in-place\"")),
            },
            workload_api_socket: match file.workload_api_socket.as_str() {
                "" => None,
                raw => Some(socket_path_of(raw)?),
            },
            identity_source,
            agent_address: file.agent_address,
            cmd: file.cmd,
            cmd_args: file.cmd_args,
            pid_file_name: file.pid_file_name,
            cert_dir: PathBuf::from(file.cert_dir),
            daemon_mode: file.daemon_mode.unwrap_or(defaults.daemon_mode),
            add_intermediates_to_bundle: file.add_intermediates_to_bundle.unwrap_or(false),
            include_federated_domains: file.include_federated_domains.unwrap_or(false),
            omit_expired: file.omit_expired.unwrap_or(false),
            renew_signal: file.renew_signal,
            hint: file.hint,
            jwt_bundle_file_name: file.jwt_bundle_file_name,
            cert_file_mode: file.cert_file_mode.or(defaults.cert_file_mode),
            key_file_mode: file.key_file_mode.or(defaults.key_file_mode),
            jwt_bundle_file_mode: file.jwt_bundle_file_mode.or(defaults.jwt_bundle_file_mode),
            jwt_svid_file_mode: file.jwt_svid_file_mode.or(defaults.jwt_svid_file_mode),
            jwt_bundle_trust_domain: file.jwt_bundle_trust_domain,
            renew_on_jwt_update: file.renew_on_jwt_update.unwrap_or(false),
        };
        // A service-account token has no trust domain: its bundle is the cluster's plain JWKS.
        if matches!(config.identity_source, IdentitySource::Kubernetes(_)) && file.jwt_bundle_format.is_empty() {
            config.jwt_bundle_format = JwtBundleFormat::Jwks;
        }
        config.validate()?;
        Ok(config)
    }
}

/// The keys that read back as `config` (`Config::try_from(File::from(c)) == c` for a valid one).
impl From<Config> for File {
    fn from(config: Config) -> Self {
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let (svid_file_name, svid_key_file_name, svid_bundle_file_name) = config.x509.unwrap_or_default();
        let mut file = File {
            agent_address: config.agent_address,
            cmd: config.cmd,
            cmd_args: config.cmd_args,
            pid_file_name: config.pid_file_name,
            cert_dir: path(config.cert_dir),
            daemon_mode: Some(config.daemon_mode),
            add_intermediates_to_bundle: Some(config.add_intermediates_to_bundle),
            include_federated_domains: Some(config.include_federated_domains),
            omit_expired: Some(config.omit_expired),
            renew_signal: config.renew_signal,
            hint: config.hint,
            svid_file_name,
            svid_key_file_name,
            svid_bundle_file_name,
            jwt_bundle_file_name: config.jwt_bundle_file_name,
            jwt_svids: config.jwt_svids.into_iter().map(JwtSvidFile::from).collect(),
            cert_file_mode: Mode(config.cert_file_mode),
            key_file_mode: Mode(config.key_file_mode),
            jwt_bundle_file_mode: Mode(config.jwt_bundle_file_mode),
            jwt_svid_file_mode: Mode(config.jwt_svid_file_mode),
            health_checks: Some(HealthFile::from(config.health_checks)),
            jwt_bundle_format: match config.jwt_bundle_format {
                JwtBundleFormat::SpiffeHelper => "spiffe-helper",
                JwtBundleFormat::Jwks => "jwks",
            }
            .to_owned(),
            jwt_bundle_trust_domain: config.jwt_bundle_trust_domain,
            jwt_svid_refresh_percent: Some(i64::from(config.jwt_svid_refresh_percent)),
            renew_on_jwt_update: Some(config.renew_on_jwt_update),
            jwt_svid_write_mode: match config.jwt_svid_write_mode {
                WriteMode::Swap => "atomic",
                WriteMode::InPlace => "in-place",
            }
            .to_owned(),
            workload_api_socket: config.workload_api_socket.map(path).unwrap_or_default(),
            ..File::default()
        };
        if let IdentitySource::Kubernetes(source) = config.identity_source {
            file.kubernetes(source);
        }
        file
    }
}

impl File {
    /// `identity_source: kubernetes` and its keys.
    fn kubernetes(&mut self, source: KubernetesSource) {
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        self.identity_source = "kubernetes".into();
        self.kubernetes_token_file = path(source.token_file);
        self.kubernetes_api_server = source.api_server;
        self.kubernetes_ca_file = path(source.ca_file);
        self.kubernetes_api_token_file = path(source.api_token_file);
        self.kubernetes_jwks_refresh_seconds = i64::try_from(source.jwks_refresh.as_secs()).ok();
        if let Some(issuer) = source.issuer {
            self.kubernetes_issuer_url = issuer.url;
            self.kubernetes_issuer_token_file = path(issuer.token_file);
            self.kubernetes_issuer_ca_file = path(issuer.ca_file);
            self.kubernetes_issuer_server_name = issuer.server_name;
        }
    }
}

impl TryFrom<JwtSvidFile> for JwtSvidConfig {
    type Error = ConfigError;

    fn try_from(entry: JwtSvidFile) -> Result<Self, ConfigError> {
        if entry.jwt_svid_file_name.is_empty() {
            return invalid("'jwt_file_name' is required in 'jwt_svids'");
        }
        if entry.jwt_audience.is_empty() {
            return invalid("'jwt_audience' is required in 'jwt_svids'");
        }
        Ok(JwtSvidConfig {
            audience: entry.jwt_audience,
            extra_audiences: entry.jwt_extra_audiences,
            file_name: entry.jwt_svid_file_name,
        })
    }
}

impl From<JwtSvidConfig> for JwtSvidFile {
    fn from(svid: JwtSvidConfig) -> Self {
        Self {
            jwt_audience: svid.audience,
            jwt_extra_audiences: svid.extra_audiences,
            jwt_svid_file_name: svid.file_name,
        }
    }
}

impl From<HealthChecks> for HealthFile {
    fn from(health: HealthChecks) -> Self {
        Self {
            listener_enabled: Some(health.listener_enabled),
            bind_port: Some(i64::from(health.bind_port)),
            liveness_path: health.liveness_path,
            readiness_path: health.readiness_path,
        }
    }
}

/// `svid_file_name`, `svid_key_file_name`, `svid_bundle_file_name`: all three or none.
fn x509_file_names(file: &File) -> Result<Option<(String, String, String)>, ConfigError> {
    let names = [&file.svid_file_name, &file.svid_key_file_name, &file.svid_bundle_file_name];
    match names.iter().filter(|s| !s.is_empty()).count() {
        0 => Ok(None),
        3 => Ok(Some((names[0].clone(), names[1].clone(), names[2].clone()))),
        _ => {
            invalid("all or none of 'svid_file_name', 'svid_key_file_name', 'svid_bundle_file_name' must be specified")
        }
    }
}

/// `health_checks { }`: spiffe-helper applies the defaults only when the listener is on.
fn health_checks(block: HealthFile) -> Result<HealthChecks, ConfigError> {
    let enabled = block.listener_enabled.unwrap_or(false);
    if let Some(port) = block.bind_port.filter(|p| *p < 0) {
        return invalid(format!("health_checks.bind_port {port} must not be negative"));
    }
    let mut health = Config::default().health_checks;
    health.listener_enabled = enabled;
    if enabled {
        if let Some(port) = block.bind_port.filter(|p| *p > 0) {
            health.bind_port =
                u16::try_from(port).map_err(|_| ConfigError::Invalid(format!("bind_port {port} is not a port")))?;
        }
        if !block.liveness_path.is_empty() {
            health.liveness_path = block.liveness_path;
        }
        if !block.readiness_path.is_empty() {
            health.readiness_path = block.readiness_path;
        }
    }
    Ok(health)
}

/// `identity_source` and the `kubernetes_*` keys (which only go with `kubernetes`).
fn identity_source(file: &File) -> Result<IdentitySource, ConfigError> {
    let issuer = issuer_source(file)?;
    let set = [
        &file.kubernetes_token_file,
        &file.kubernetes_api_server,
        &file.kubernetes_ca_file,
        &file.kubernetes_api_token_file,
    ];
    let any_set =
        set.iter().any(|v| !v.is_empty()) || file.kubernetes_jwks_refresh_seconds.is_some() || issuer.is_some();
    match file.identity_source.as_str() {
        "" | "spiffe" if any_set => invalid("the kubernetes_* keys need identity_source: kubernetes"),
        "" | "spiffe" => Ok(IdentitySource::Spiffe),
        "kubernetes" => kubernetes_source(file, issuer).map(IdentitySource::Kubernetes),
        other => invalid(format!("identity_source {other:?} is not \"spiffe\" or \"kubernetes\"")),
    }
}

fn kubernetes_source(file: &File, issuer: Option<Box<IssuerSource>>) -> Result<KubernetesSource, ConfigError> {
    let defaults = KubernetesSource::default();
    let path = |value: &str, default: PathBuf| if value.is_empty() { default } else { PathBuf::from(value) };
    let api_server = file.kubernetes_api_server.clone();
    if !api_server.is_empty() && !api_server.starts_with("https://") {
        return invalid(format!("kubernetes_api_server {api_server:?} must be an https:// URL"));
    }
    let jwks_refresh = match file.kubernetes_jwks_refresh_seconds {
        None => defaults.jwks_refresh,
        Some(s) if s >= 10 => Duration::from_secs(s as u64),
        Some(s) => return invalid(format!("kubernetes_jwks_refresh_seconds {s} must be at least 10")),
    };
    Ok(KubernetesSource {
        token_file: path(&file.kubernetes_token_file, defaults.token_file),
        api_server,
        ca_file: path(&file.kubernetes_ca_file, defaults.ca_file),
        api_token_file: path(&file.kubernetes_api_token_file, defaults.api_token_file),
        jwks_refresh,
        issuer,
    })
}

/// The `kubernetes_issuer_*` keys: all of URL, token and CA, or none.
fn issuer_source(file: &File) -> Result<Option<Box<IssuerSource>>, ConfigError> {
    let url = &file.kubernetes_issuer_url;
    let others =
        [&file.kubernetes_issuer_token_file, &file.kubernetes_issuer_ca_file, &file.kubernetes_issuer_server_name];
    if url.is_empty() {
        if others.iter().any(|v| !v.is_empty()) {
            return invalid("the kubernetes_issuer_* keys need kubernetes_issuer_url");
        }
        return Ok(None);
    }
    if !url.starts_with("https://") {
        return invalid(format!("kubernetes_issuer_url {url:?} must be an https:// URL"));
    }
    if file.kubernetes_issuer_token_file.is_empty() || file.kubernetes_issuer_ca_file.is_empty() {
        return invalid("kubernetes_issuer_url needs kubernetes_issuer_token_file and kubernetes_issuer_ca_file");
    }
    Ok(Some(Box::new(IssuerSource {
        url: url.clone(),
        token_file: file.kubernetes_issuer_token_file.clone().into(),
        ca_file: file.kubernetes_issuer_ca_file.clone().into(),
        server_name: file.kubernetes_issuer_server_name.clone(),
    })))
}
