//! Sidecar injection, decided and built as a JSON patch. Pure: a Pod (and its namespace's labels)
//! in, a decision out.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    CSIVolumeSource, Capabilities, ConfigMapProjection, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, HostPathVolumeSource, KeyToPath, ObjectFieldSelector, Pod, Probe,
    ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection,
    Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};
use slim_identity_contract::config::{
    Config as AgentConfig, HealthChecks, IdentitySource, IssuerSource, JwtBundleFormat, JwtSvidConfig,
    KUBERNETES_TOKEN_DIR, KubernetesSource, WriteMode,
};
use slim_identity_contract::env::{CONFIG_ENV_FLAG, POD_NAME_ENV, POD_NAMESPACE_ENV, POD_UID_ENV, SERVICE_ACCOUNT_ENV};
use std::path::Path;

/// Opt-in key: pod annotation or label, or namespace label. `"true"` injects, `"false"` opts out.
pub const INJECT: &str = "slim.agntcy.org/inject-identity";
/// Marker set on injected pods; its presence makes re-invocation a no-op.
pub const INJECTED: &str = "slim.agntcy.org/identity-injected";
/// Set on injected pods: the identity source the agent was configured with (the issuer serves
/// only pods whose agent uses `kubernetes`).
pub const INJECTED_SOURCE: &str = "slim.agntcy.org/injected-identity-source";
/// Name of the injected container.
pub const CONTAINER_NAME: &str = "slim-identity-agent";
/// Environment variable that carries the agent's generated config (YAML).
pub const CONFIG_ENV: &str = "SLIM_IDENTITY_AGENT_CONFIG";

/// Per-pod settings (annotations under `slim.agntcy.org/`).
pub mod annotation {
    pub const JWT_AUDIENCES: &str = "slim.agntcy.org/jwt-audiences";
    pub const JWT_SVID_FILE_NAMES: &str = "slim.agntcy.org/jwt-svid-file-names";
    pub const JWT_BUNDLE_FILE_NAME: &str = "slim.agntcy.org/jwt-bundle-file-name";
    pub const JWT_BUNDLE_FORMAT: &str = "slim.agntcy.org/jwt-bundle-format";
    pub const JWT_SVID_WRITE_MODE: &str = "slim.agntcy.org/jwt-svid-write-mode";
    pub const X509: &str = "slim.agntcy.org/x509";
    pub const SVID_FILE_NAME: &str = "slim.agntcy.org/svid-file-name";
    pub const SVID_KEY_FILE_NAME: &str = "slim.agntcy.org/svid-key-file-name";
    pub const SVID_BUNDLE_FILE_NAME: &str = "slim.agntcy.org/svid-bundle-file-name";
    pub const KEY_FILE_MODE: &str = "slim.agntcy.org/key-file-mode";
    pub const MOUNT_PATH: &str = "slim.agntcy.org/svid-mount-path";
    pub const CONTAINERS: &str = "slim.agntcy.org/svid-containers";
    pub const CPU_REQUEST: &str = "slim.agntcy.org/sidecar-cpu-request";
    pub const MEMORY_REQUEST: &str = "slim.agntcy.org/sidecar-memory-request";
    pub const MEMORY_LIMIT: &str = "slim.agntcy.org/sidecar-memory-limit";
    pub const HEALTH_PORT: &str = "slim.agntcy.org/sidecar-health-port";
    /// `spiffe` (SPIRE's Workload API) or `kubernetes` (a projected service-account token); also
    /// a namespace label, the namespace's default.
    pub const IDENTITY_SOURCE: &str = "slim.agntcy.org/identity-source";
    /// `kubernetes` source: the token's audience (default: the one JWT audience).
    pub const TOKEN_AUDIENCE: &str = "slim.agntcy.org/token-audience";
    /// `kubernetes` source: the token's lifetime in seconds (600 to 86400; default 3600); the
    /// kubelet renews it at 80 % of that.
    pub const TOKEN_EXPIRATION_SECONDS: &str = "slim.agntcy.org/token-expiration-seconds";
    /// `"true"`: the agent serves the SPIFFE Workload API to the app containers (SLIM's `spire`
    /// identity); the default for the `spiffe` source. `"false"`: files only.
    pub const WORKLOAD_API: &str = "slim.agntcy.org/workload-api";
}

/// In the agent's token volume: the token for the issuer's audience, and the issuer's CA.
const ISSUER_TOKEN_FILE: &str = "issuer-token";
const ISSUER_CA_FILE: &str = "issuer-ca.crt";

/// Where the agent's Workload API socket directory is mounted, in the agent and the apps.
pub const WORKLOAD_API_DIR: &str = "/run/slim-identity";
/// The socket in it (where the agent serves it by default).
pub use slim_identity_contract::paths::WORKLOAD_API_SOCKET;
/// The variable SPIFFE clients (SLIM's `spire` provider among them) find the socket by.
pub const SPIFFE_ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";

/// How the SPIRE agent socket reaches the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSource {
    /// A CSI ephemeral volume (SPIFFE CSI driver, `csi.spiffe.io`).
    Csi { driver: String },
    /// A directory on the node.
    HostPath { path: String },
}

/// Operator-wide injection settings (flags / chart values).
#[derive(Clone, Debug, PartialEq)]
pub struct InjectorConfig {
    pub image: String,
    pub image_pull_policy: Option<String>,
    pub socket: SocketSource,
    /// Where the socket directory is mounted in the sidecar, and the socket file in it.
    pub socket_dir: String,
    pub socket_file: String,
    pub mount_path: String,
    pub audiences: Vec<String>,
    pub jwt_bundle_format: String,
    pub cpu_request: String,
    pub memory_request: String,
    pub memory_limit: String,
    pub health_port: u16,
    /// UID the sidecar runs as when the pod sets none.
    pub run_as_user: i64,
    /// Never injected into (the operator's own namespace is added at start-up).
    pub excluded_namespaces: Vec<String>,
    /// Where identities come from when neither the pod nor its namespace says.
    pub identity_source: Source,
    /// Serve the Workload API to the apps (identity source `spiffe`) when the pod does not say.
    pub workload_api: bool,
    /// The operator's SPIFFE issuer, when on: pods with identity source `kubernetes` get their
    /// SPIFFE identities from it, served on the Workload API socket.
    pub issuer: Option<IssuerInjection>,
}

/// How injected agents reach the operator's issuer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuerInjection {
    pub url: String,
    /// The audience of the token the agent sends it.
    pub audience: String,
    /// The ConfigMap (in the pod's namespace) with the issuer's serving CA.
    pub ca_config_map: String,
}

/// Where the agent gets the pod's identity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Source {
    /// SPIRE's Workload API socket.
    #[default]
    Spiffe,
    /// The pod's projected service-account token (no SPIRE).
    Kubernetes,
}

impl std::str::FromStr for Source {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "spiffe" => Ok(Source::Spiffe),
            "kubernetes" => Ok(Source::Kubernetes),
            other => Err(format!("{other:?} is not spiffe or kubernetes")),
        }
    }
}

/// The projected token of the `kubernetes` source.
#[derive(Clone, Debug, PartialEq)]
struct ProjectedToken {
    audience: String,
    expiration_seconds: i64,
}

impl Default for InjectorConfig {
    fn default() -> Self {
        Self {
            image: "ghcr.io/agntcy/slim-identity-agent:latest".into(),
            image_pull_policy: None,
            socket: SocketSource::Csi { driver: "csi.spiffe.io".into() },
            socket_dir: "/run/spire/agent-sockets".into(),
            socket_file: "api.sock".into(),
            mount_path: "/svids".into(),
            audiences: vec!["slim".into()],
            jwt_bundle_format: "jwks".into(),
            cpu_request: "10m".into(),
            memory_request: "16Mi".into(),
            memory_limit: "64Mi".into(),
            health_port: 8081,
            run_as_user: 65532,
            excluded_namespaces: vec!["kube-system".into(), "kube-public".into(), "kube-node-lease".into()],
            identity_source: Source::Spiffe,
            workload_api: true,
            issuer: None,
        }
    }
}

/// The outcome for one pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Leave the pod alone (why).
    Skip(&'static str),
    /// Inject with this patch.
    Inject(Patch),
    /// The pod asks for injection with settings that cannot work: refuse it with this message.
    Refuse(String),
}

/// Decides for `pod` in `namespace` (whose labels are `namespace_labels`).
pub fn decide(
    pod: &Pod,
    namespace: &str,
    namespace_labels: Option<&BTreeMap<String, String>>,
    config: &InjectorConfig,
) -> Decision {
    if config.excluded_namespaces.iter().any(|n| n == namespace) {
        return Decision::Skip("namespace excluded from injection");
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let pod_says = [annotations.get(INJECT), labels.get(INJECT)];
    if pod_says.iter().flatten().any(|v| v.as_str() == "false") {
        return Decision::Skip("pod opted out");
    }
    let pod_opts_in = pod_says.iter().flatten().any(|v| v.as_str() == "true");
    let namespace_opts_in = namespace_labels.and_then(|l| l.get(INJECT)).is_some_and(|v| v == "true");
    if !(pod_opts_in || namespace_opts_in) {
        return Decision::Skip("not opted in");
    }
    if annotations.contains_key(INJECTED) || all_containers(pod).any(|c| c.name == CONTAINER_NAME) {
        return Decision::Skip("already injected");
    }
    let namespace_source = namespace_labels.and_then(|l| l.get(annotation::IDENTITY_SOURCE)).map(String::as_str);
    match Settings::read(&annotations, namespace_source, pod, config) {
        Ok(settings) => match build_patch(pod, &settings, config) {
            Ok(patch) => Decision::Inject(patch),
            Err(message) => Decision::Refuse(message),
        },
        Err(message) => Decision::Refuse(message),
    }
}

fn all_containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    pod.spec.iter().flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()))
}

/// Settings resolved from annotations and operator defaults.
#[derive(Clone, Debug, PartialEq)]
struct Settings {
    /// `Some` for the `kubernetes` source.
    token: Option<ProjectedToken>,
    jwt: Vec<(String, String)>,
    jwt_bundle_file: String,
    jwt_bundle_format: JwtBundleFormat,
    jwt_svid_write_mode: WriteMode,
    x509: Option<(String, String, String)>,
    key_file_mode: u32,
    mount_path: String,
    containers: Vec<usize>,
    resources: ResourceRequirements,
    health_port: u16,
    /// Serve the Workload API to the app containers.
    workload_api: bool,
    /// Identities from the operator's issuer (identity source `kubernetes` with the Workload API).
    issuer: Option<IssuerInjection>,
}

/// A pod's `slim.agntcy.org/` annotations, trimmed; empty values count as unset.
struct Annotations<'a>(&'a BTreeMap<String, String>);

impl<'a> Annotations<'a> {
    fn get(&self, key: &str) -> Option<&'a str> {
        self.0.get(key).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// A comma-separated list.
    fn list(&self, key: &str) -> Option<Vec<String>> {
        self.get(key).map(|v| v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, String> {
        match self.get(key) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(other) => Err(format!("{key}: {other:?} is not true or false")),
        }
    }
}

impl Settings {
    fn read(
        annotations: &BTreeMap<String, String>,
        namespace_source: Option<&str>,
        pod: &Pod,
        config: &InjectorConfig,
    ) -> Result<Self, String> {
        let a = Annotations(annotations);
        let source = match a.get(annotation::IDENTITY_SOURCE).or(namespace_source) {
            None => config.identity_source,
            Some(value) => value.parse().map_err(|e| format!("{}: {e}", annotation::IDENTITY_SOURCE))?,
        };
        let mut audiences = a.list(annotation::JWT_AUDIENCES).unwrap_or_else(|| config.audiences.clone());
        let token = match source {
            Source::Spiffe => None,
            Source::Kubernetes => {
                let token = projected_token_settings(&a, &audiences)?;
                audiences = vec![token.audience.clone()];
                Some(token)
            }
        };
        let files = jwt_file_names(&a, &audiences)?;
        let jwt_bundle_file = a.get(annotation::JWT_BUNDLE_FILE_NAME).unwrap_or("key.jwt").to_owned();
        check_file_name(annotation::JWT_BUNDLE_FILE_NAME, &jwt_bundle_file)?;
        let mount_path = mount_path(&a, config)?;
        let settings = Self {
            jwt_bundle_format: jwt_bundle_format(&a, token.is_some(), config)?,
            jwt_svid_write_mode: jwt_svid_write_mode(&a)?,
            x509: x509_file_names(&a, token.is_some())?,
            key_file_mode: key_file_mode(&a)?,
            containers: selected_containers(&a, pod, &mount_path)?,
            resources: resources(&a, config)?,
            health_port: health_port(&a, pod, config)?,
            workload_api: workload_api(&a, token.is_some(), config)?,
            issuer: None,
            token,
            jwt: audiences.into_iter().zip(files).collect(),
            jwt_bundle_file,
            mount_path,
        };
        let issuer = (settings.token.is_some() && settings.workload_api).then(|| config.issuer.clone()).flatten();
        Ok(Self { issuer, ..settings })
    }
}

/// The `kubernetes` source's projected token: one audience, a lifetime the API server accepts.
fn projected_token_settings(a: &Annotations<'_>, audiences: &[String]) -> Result<ProjectedToken, String> {
    let audience = match (a.get(annotation::TOKEN_AUDIENCE), audiences) {
        (Some(audience), _) => audience.to_owned(),
        (None, [one]) => one.clone(),
        (None, _) => {
            return Err(format!(
                "identity source kubernetes projects one token: name its audience with {}",
                annotation::TOKEN_AUDIENCE
            ));
        }
    };
    let expiration_seconds = match a.get(annotation::TOKEN_EXPIRATION_SECONDS) {
        None => 3600,
        // The API server's bounds for projected tokens.
        Some(value) => value.parse::<i64>().ok().filter(|s| (600..=86_400).contains(s)).ok_or_else(|| {
            format!("{}: {value:?} is not a number of seconds from 600 to 86400", annotation::TOKEN_EXPIRATION_SECONDS)
        })?,
    };
    Ok(ProjectedToken { audience, expiration_seconds })
}

/// One JWT-SVID file per audience.
fn jwt_file_names(a: &Annotations<'_>, audiences: &[String]) -> Result<Vec<String>, String> {
    if audiences.is_empty() {
        return Err(format!("{}: at least one audience is needed", annotation::JWT_AUDIENCES));
    }
    let files = match a.list(annotation::JWT_SVID_FILE_NAMES) {
        Some(files) if files.len() != audiences.len() => {
            return Err(format!(
                "{} has {} names for {} audiences in {}",
                annotation::JWT_SVID_FILE_NAMES,
                files.len(),
                audiences.len(),
                annotation::JWT_AUDIENCES
            ));
        }
        Some(files) => files,
        None if audiences.len() == 1 => vec!["jwt_svid.token".to_owned()],
        None => audiences.iter().map(|a| format!("jwt_svid-{}.token", file_safe(a))).collect(),
    };
    for file in &files {
        check_file_name(annotation::JWT_SVID_FILE_NAMES, file)?;
    }
    Ok(files)
}

fn jwt_bundle_format(
    a: &Annotations<'_>,
    kubernetes: bool,
    config: &InjectorConfig,
) -> Result<JwtBundleFormat, String> {
    // The cluster's keys have no trust domain to key a spiffe-helper map by.
    let default_format = if kubernetes { "jwks" } else { config.jwt_bundle_format.as_str() };
    match a.get(annotation::JWT_BUNDLE_FORMAT).unwrap_or(default_format) {
        "jwks" => Ok(JwtBundleFormat::Jwks),
        "spiffe-helper" if kubernetes => {
            Err(format!("{}: identity source kubernetes writes a plain JWKS", annotation::JWT_BUNDLE_FORMAT))
        }
        "spiffe-helper" => Ok(JwtBundleFormat::SpiffeHelper),
        other => Err(format!("{}: {other:?} is not jwks or spiffe-helper", annotation::JWT_BUNDLE_FORMAT)),
    }
}

/// In place by default: SLIM's static_jwt provider only notices data writes to its token file,
/// never the atomic swap (README, "Why JWT-SVID files are written in place").
fn jwt_svid_write_mode(a: &Annotations<'_>) -> Result<WriteMode, String> {
    match a.get(annotation::JWT_SVID_WRITE_MODE).unwrap_or("in-place") {
        "in-place" => Ok(WriteMode::InPlace),
        "atomic" => Ok(WriteMode::Swap),
        other => Err(format!("{}: {other:?} is not in-place or atomic", annotation::JWT_SVID_WRITE_MODE)),
    }
}

fn x509_file_names(a: &Annotations<'_>, kubernetes: bool) -> Result<Option<(String, String, String)>, String> {
    match a.bool(annotation::X509)? {
        Some(true) if kubernetes => {
            Err(format!("{}: X.509-SVIDs need SPIRE; identity source kubernetes gives JWTs only", annotation::X509))
        }
        None if kubernetes => Ok(None),
        Some(false) => Ok(None),
        None | Some(true) => {
            let names = (
                a.get(annotation::SVID_FILE_NAME).unwrap_or("tls.crt").to_owned(),
                a.get(annotation::SVID_KEY_FILE_NAME).unwrap_or("tls.key").to_owned(),
                a.get(annotation::SVID_BUNDLE_FILE_NAME).unwrap_or("svid_bundle.pem").to_owned(),
            );
            for name in [&names.0, &names.1, &names.2] {
                check_file_name("X.509 file names", name)?;
            }
            Ok(Some(names))
        }
    }
}

fn key_file_mode(a: &Annotations<'_>) -> Result<u32, String> {
    let mode = a.get(annotation::KEY_FILE_MODE).unwrap_or("0644");
    Some(mode)
        .filter(|m| m.len() == 4 && m.starts_with('0'))
        .and_then(|m| u32::from_str_radix(m, 8).ok())
        .ok_or_else(|| format!("{}: {mode:?} is not an octal mode like 0640", annotation::KEY_FILE_MODE))
}

fn mount_path(a: &Annotations<'_>, config: &InjectorConfig) -> Result<String, String> {
    let mount_path = a.get(annotation::MOUNT_PATH).unwrap_or(&config.mount_path).trim_end_matches('/').to_owned();
    if !mount_path.starts_with('/') || mount_path.len() < 2 {
        return Err(format!("{}: {mount_path:?} is not an absolute path", annotation::MOUNT_PATH));
    }
    Ok(mount_path)
}

/// The containers that get the outputs (all by default), none of which mounts `mount_path` yet.
fn selected_containers(a: &Annotations<'_>, pod: &Pod, mount_path: &str) -> Result<Vec<usize>, String> {
    let containers = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
    let selected: Vec<usize> = match a.list(annotation::CONTAINERS) {
        None => (0..containers.len()).collect(),
        Some(names) => names
            .iter()
            .map(|name| {
                containers
                    .iter()
                    .position(|c| &c.name == name)
                    .ok_or_else(|| format!("{}: the pod has no container {name:?}", annotation::CONTAINERS))
            })
            .collect::<Result<_, _>>()?,
    };
    for &i in &selected {
        let container = &containers[i];
        if container.volume_mounts.iter().flatten().any(|m| m.mount_path.trim_end_matches('/') == mount_path) {
            return Err(format!(
                "container {:?} already mounts {mount_path}; choose another path with {}",
                container.name,
                annotation::MOUNT_PATH
            ));
        }
    }
    Ok(selected)
}

fn resources(a: &Annotations<'_>, config: &InjectorConfig) -> Result<ResourceRequirements, String> {
    let quantity = |key: &str, default: &str| -> Result<Quantity, String> {
        let value = a.get(key).unwrap_or(default);
        if value.chars().next().is_some_and(|c| c.is_ascii_digit())
            && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
        {
            Ok(Quantity(value.to_owned()))
        } else {
            Err(format!("{key}: {value:?} is not a quantity like 10m or 64Mi"))
        }
    };
    Ok(ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), quantity(annotation::CPU_REQUEST, &config.cpu_request)?),
            ("memory".to_owned(), quantity(annotation::MEMORY_REQUEST, &config.memory_request)?),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            quantity(annotation::MEMORY_LIMIT, &config.memory_limit)?,
        )])),
        ..Default::default()
    })
}

fn health_port(a: &Annotations<'_>, pod: &Pod, config: &InjectorConfig) -> Result<u16, String> {
    match a.get(annotation::HEALTH_PORT) {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{}: {port:?} is not a port", annotation::HEALTH_PORT)),
        None => Ok(free_port(pod, config.health_port)),
    }
}

/// Whether the agent serves the Workload API to the apps (only SPIFFE identities can be served).
fn workload_api(a: &Annotations<'_>, kubernetes: bool, config: &InjectorConfig) -> Result<bool, String> {
    match (a.bool(annotation::WORKLOAD_API)?, kubernetes) {
        (None, false) => Ok(config.workload_api),
        (Some(true), false) => Ok(true),
        (Some(false), _) => Ok(false),
        // Identity source kubernetes has SPIFFE identities only from the operator's issuer.
        (None, true) => Ok(config.issuer.is_some()),
        (Some(true), true) if config.issuer.is_some() => Ok(true),
        (Some(true), true) => Err(format!(
            "{}: the Workload API serves SPIFFE identities; with identity source kubernetes they come from the operator's issuer, which is off (chart value identityIssuer.enabled)",
            annotation::WORKLOAD_API
        )),
    }
}

fn check_file_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty() && !name.starts_with('.') && !name.contains('/') && name.len() <= 128;
    if ok { Ok(()) } else { Err(format!("{what}: {name:?} is not a plain file name")) }
}

/// An audience as a file-name part.
fn file_safe(audience: &str) -> String {
    audience.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// The first port from `preferred` that no container of the pod declares.
fn free_port(pod: &Pod, preferred: u16) -> u16 {
    let used: Vec<i32> = all_containers(pod).flat_map(|c| c.ports.iter().flatten()).map(|p| p.container_port).collect();
    (preferred..preferred.saturating_add(100)).find(|p| !used.contains(&i32::from(*p))).unwrap_or(preferred)
}

/// A volume name not used by the pod yet.
fn unique_volume_name(pod: &Pod, base: &str) -> String {
    let taken: Vec<&str> = pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()).map(|v| v.name.as_str()).collect();
    std::iter::once(base.to_owned())
        .chain((1..).map(|i| format!("{base}-{i}")))
        .find(|name| !taken.contains(&name.as_str()))
        .unwrap_or_else(|| base.to_owned())
}

/// The agent's config (spiffe-helper keys, YAML).
/// The agent's own typed config for this pod, as the YAML its `-config-env` reads.
fn agent_config(settings: &Settings, config: &InjectorConfig) -> Result<String, String> {
    let agent = AgentConfig {
        agent_address: match settings.token {
            None => format!("{}/{}", config.socket_dir, config.socket_file),
            Some(_) => String::new(),
        },
        identity_source: match settings.token {
            None => IdentitySource::Spiffe,
            Some(_) => IdentitySource::Kubernetes(KubernetesSource {
                issuer: settings.issuer.as_ref().map(|issuer| {
                    Box::new(IssuerSource {
                        url: issuer.url.clone(),
                        token_file: Path::new(KUBERNETES_TOKEN_DIR).join(ISSUER_TOKEN_FILE),
                        ca_file: Path::new(KUBERNETES_TOKEN_DIR).join(ISSUER_CA_FILE),
                        server_name: String::new(),
                    })
                }),
                ..KubernetesSource::default()
            }),
        },
        cert_dir: settings.mount_path.clone().into(),
        daemon_mode: true,
        x509: settings.x509.clone(),
        jwt_bundle_file_name: settings.jwt_bundle_file.clone(),
        jwt_bundle_format: settings.jwt_bundle_format,
        jwt_svid_write_mode: settings.jwt_svid_write_mode,
        jwt_svids: settings
            .jwt
            .iter()
            .map(|(audience, file)| JwtSvidConfig {
                audience: audience.clone(),
                extra_audiences: Vec::new(),
                file_name: file.clone(),
            })
            .collect(),
        // The volume is private to the pod, so 0644 is the default (0600 only works when the app
        // runs as the sidecar's user).
        cert_file_mode: 0o644,
        key_file_mode: settings.key_file_mode,
        jwt_svid_file_mode: settings.key_file_mode,
        jwt_bundle_file_mode: 0o644,
        health_checks: HealthChecks {
            listener_enabled: true,
            bind_port: settings.health_port,
            liveness_path: "/live".into(),
            readiness_path: "/ready".into(),
        },
        workload_api_socket: settings.workload_api.then(|| WORKLOAD_API_SOCKET.into()),
        ..Default::default()
    };
    agent.to_yaml().map_err(|error| format!("rendering the agent config: {error}"))
}

/// The volumes injected and how each container mounts them.
struct Volumes {
    all: Vec<Volume>,
    /// The agent's: the output directory, its identity source, the socket directory.
    agent_mounts: Vec<VolumeMount>,
    /// The agent's environment for its identity source.
    agent_env: Vec<EnvVar>,
    /// Each app container's: the output directory (read-only), the socket directory.
    app_mounts: Vec<VolumeMount>,
}

fn volumes(pod: &Pod, settings: &Settings, config: &InjectorConfig) -> Volumes {
    let svids = unique_volume_name(pod, "slim-svids");
    let in_memory = |name: &str, size: &str| Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity(size.into())),
        }),
        ..Default::default()
    };
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..Default::default()
    };
    let (identity_volume, identity_mount, agent_env) = identity_source(pod, settings, config);
    let mut all = vec![in_memory(&svids, "16Mi"), identity_volume];
    let mut agent_mounts = vec![mount(&svids, &settings.mount_path, false), identity_mount];
    let mut app_mounts = vec![mount(&svids, &settings.mount_path, true)];
    if settings.workload_api {
        // Pod-local: the socket is reachable from this pod's containers only.
        let socket = unique_volume_name(pod, "slim-identity-socket");
        all.push(in_memory(&socket, "1Mi"));
        agent_mounts.push(mount(&socket, WORKLOAD_API_DIR, false));
        app_mounts.push(mount(&socket, WORKLOAD_API_DIR, true));
    }
    Volumes { all, agent_mounts, agent_env, app_mounts }
}

/// What the agent reads its identity from: SPIRE's socket, or a projected token (with the pod's
/// own name, namespace and UID, since it accepts only a token bound to its pod).
fn identity_source(pod: &Pod, settings: &Settings, config: &InjectorConfig) -> (Volume, VolumeMount, Vec<EnvVar>) {
    match &settings.token {
        None => {
            let name = unique_volume_name(pod, "slim-spire-agent-socket");
            let volume = match &config.socket {
                SocketSource::Csi { driver } => Volume {
                    name: name.clone(),
                    csi: Some(CSIVolumeSource { driver: driver.clone(), read_only: Some(true), ..Default::default() }),
                    ..Default::default()
                },
                SocketSource::HostPath { path } => Volume {
                    name: name.clone(),
                    host_path: Some(HostPathVolumeSource { path: path.clone(), type_: Some("Directory".into()) }),
                    ..Default::default()
                },
            };
            let mount = VolumeMount {
                name,
                mount_path: config.socket_dir.clone(),
                read_only: Some(true),
                ..Default::default()
            };
            let socket = format!("unix://{}/{}", config.socket_dir, config.socket_file);
            (volume, mount, vec![env(SPIFFE_ENDPOINT_SOCKET, &socket)])
        }
        Some(token) => {
            let name = unique_volume_name(pod, "slim-service-account-token");
            let projected = projected_token(token, settings.issuer.as_ref());
            let volume = Volume { name: name.clone(), projected: Some(projected), ..Default::default() };
            let mount = VolumeMount {
                name,
                mount_path: KUBERNETES_TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            };
            let field = |name: &str, path: &str| EnvVar {
                name: name.to_owned(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector { field_path: path.to_owned(), ..Default::default() }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let mut env = vec![
                field(POD_NAME_ENV, "metadata.name"),
                field(POD_NAMESPACE_ENV, "metadata.namespace"),
                field(POD_UID_ENV, "metadata.uid"),
            ];
            if settings.issuer.is_some() {
                env.push(field(SERVICE_ACCOUNT_ENV, "spec.serviceAccountName"));
            }
            (volume, mount, env)
        }
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value.to_owned()), ..Default::default() }
}

/// The agent as a native sidecar: started before the app containers, which wait for its startup
/// probe (every output file written, and the Workload API socket serving when there is one).
fn agent_container(
    pod: &Pod,
    settings: &Settings,
    config: &InjectorConfig,
    volumes: &Volumes,
) -> Result<Container, String> {
    let pod_sets_user =
        pod.spec.as_ref().and_then(|s| s.security_context.as_ref()).and_then(|c| c.run_as_user).is_some();
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(settings.health_port)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let agent_config = env(CONFIG_ENV, &agent_config(settings, config)?);
    Ok(Container {
        name: CONTAINER_NAME.to_owned(),
        image: Some(config.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        restart_policy: Some("Always".to_owned()),
        args: Some(vec![CONFIG_ENV_FLAG.to_owned(), CONFIG_ENV.to_owned()]),
        env: Some(std::iter::once(agent_config).chain(volumes.agent_env.iter().cloned()).collect()),
        ports: Some(vec![ContainerPort {
            name: Some("identity-health".to_owned()),
            container_port: i32::from(settings.health_port),
            ..Default::default()
        }]),
        startup_probe: Some(probe("/ready", 1, 300)),
        liveness_probe: Some(probe("/live", 10, 3)),
        readiness_probe: Some(probe("/ready", 5, 2)),
        resources: Some(settings.resources.clone()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: (!pod_sets_user).then_some(config.run_as_user),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), ..Default::default() }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".to_owned(), ..Default::default() }),
            ..Default::default()
        }),
        volume_mounts: Some(volumes.agent_mounts.clone()),
        ..Default::default()
    })
}

/// Appends `items` to the list at `path`, or creates the list when `exists` is false.
fn append(ops: &mut Vec<PatchOperation>, path: &[&str], exists: bool, items: &[Value]) {
    let mut add = |tokens: Vec<&str>, value: Value| {
        ops.push(PatchOperation::Add(AddOperation { path: PointerBuf::from_tokens(tokens), value }));
    };
    if exists {
        for item in items {
            add(path.iter().copied().chain(["-"]).collect(), item.clone());
        }
    } else {
        add(path.to_vec(), Value::Array(items.to_vec()));
    }
}

/// Each selected app container mounts the outputs (and the socket directory) and, with the
/// Workload API, finds the socket by `SPIFFE_ENDPOINT_SOCKET` (unless it sets its own).
fn app_patches(pod: &Pod, settings: &Settings, volumes: &Volumes, ops: &mut Vec<PatchOperation>) -> Result<(), String> {
    let mounts = volumes.app_mounts.iter().map(to_value).collect::<Result<Vec<_>, _>>()?;
    let socket_env = to_value(&env(SPIFFE_ENDPOINT_SOCKET, &format!("unix://{WORKLOAD_API_SOCKET}")))?;
    let containers = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
    for &i in &settings.containers {
        let Some(container) = containers.get(i) else { continue };
        let index = i.to_string();
        append(ops, &["spec", "containers", &index, "volumeMounts"], container.volume_mounts.is_some(), &mounts);
        let sets_its_own = container.env.iter().flatten().any(|e| e.name == SPIFFE_ENDPOINT_SOCKET);
        if settings.workload_api && !sets_its_own {
            append(
                ops,
                &["spec", "containers", &index, "env"],
                container.env.is_some(),
                std::slice::from_ref(&socket_env),
            );
        }
    }
    Ok(())
}

fn build_patch(pod: &Pod, settings: &Settings, config: &InjectorConfig) -> Result<Patch, String> {
    let volumes = volumes(pod, settings, config);
    let sidecar = agent_container(pod, settings, config, &volumes)?;
    let spec = pod.spec.as_ref();
    let mut ops = Vec::new();
    let version = json!(env!("CARGO_PKG_VERSION"));
    let source = json!(if settings.token.is_some() { "kubernetes" } else { "spiffe" });
    match &pod.metadata.annotations {
        Some(_) => {
            for (key, value) in [(INJECTED, version), (INJECTED_SOURCE, source)] {
                let path = PointerBuf::from_tokens(["metadata", "annotations", key]);
                ops.push(PatchOperation::Add(AddOperation { path, value }));
            }
        }
        None => ops.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations"]),
            value: json!({INJECTED: version, INJECTED_SOURCE: source}),
        })),
    }
    let volume_values = volumes.all.iter().map(to_value).collect::<Result<Vec<_>, _>>()?;
    append(&mut ops, &["spec", "volumes"], spec.and_then(|s| s.volumes.as_ref()).is_some(), &volume_values);
    // First among the init containers, so later init containers have the identity too.
    let sidecar = to_value(&sidecar)?;
    match spec.and_then(|s| s.init_containers.as_ref()) {
        Some(_) => ops.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["spec", "initContainers", "0"]),
            value: sidecar,
        })),
        None => append(&mut ops, &["spec", "initContainers"], false, &[sidecar]),
    }
    app_patches(pod, settings, &volumes, &mut ops)?;
    Ok(Patch(ops))
}

/// The `kubernetes` source's volume: the audience-bound token the agent writes, a token for the
/// API server's OIDC endpoints (its default audience), and the cluster's CA, all rotated by the
/// kubelet; with the issuer, a token for the issuer's audience and the issuer's CA. Mounted in
/// the agent only: the app sees the token through `/svids`, after checks, and never the issuer's.
fn projected_token(token: &ProjectedToken, issuer: Option<&IssuerInjection>) -> ProjectedVolumeSource {
    let token_source = |audience: Option<String>, path: &str| VolumeProjection {
        service_account_token: Some(ServiceAccountTokenProjection {
            audience,
            expiration_seconds: Some(token.expiration_seconds),
            path: path.to_owned(),
        }),
        ..Default::default()
    };
    let config_map = |name: &str, path: &str| VolumeProjection {
        config_map: Some(ConfigMapProjection {
            name: name.to_owned(),
            items: Some(vec![KeyToPath { key: "ca.crt".to_owned(), path: path.to_owned(), mode: None }]),
            optional: None,
        }),
        ..Default::default()
    };
    let mut sources = vec![
        token_source(Some(token.audience.clone()), "token"),
        token_source(None, "api-token"),
        config_map("kube-root-ca.crt", "ca.crt"),
    ];
    if let Some(issuer) = issuer {
        sources.push(token_source(Some(issuer.audience.clone()), ISSUER_TOKEN_FILE));
        sources.push(config_map(&issuer.ca_config_map, ISSUER_CA_FILE));
    }
    ProjectedVolumeSource { sources: Some(sources), default_mode: None }
}

fn to_value<T: serde::Serialize>(value: &T) -> Result<Value, String> {
    serde_json::to_value(value).map_err(|error| format!("rendering the patch: {error}"))
}
