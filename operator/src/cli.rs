//! Command line: `slim-operator run` and `slim-operator crds`, and the settings each part is
//! built from (the parts are wired in [`crate::app`]).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::app::RunError;
use crate::controller;
use crate::issuer::IssuerSettings;
use crate::issuer::keys::Policy;
use crate::issuer::store::KeyStore;
use crate::telemetry::LogFormat;
use crate::webhook::certs::SelfManaged;
use crate::webhook::inject::IssuerInjection;
use crate::webhook::run::{CertSource, WebhookSettings};
use crate::webhook::{InjectorConfig, SocketSource};

#[derive(Parser, Debug)]
#[command(name = "slim-operator", version, about = "Kubernetes operator for SLIM")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controllers and the admin server against the cluster (kubeconfig inferred as
    /// kubectl does: KUBECONFIG, ~/.kube/config, then in-cluster).
    Run(Box<RunArgs>),
    /// Print every CRD as multi-document YAML.
    Crds,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Address of the admin server (/livez, /readyz, /metrics).
    #[arg(long, env = "SLIM_OPERATOR_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,

    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "SLIM_OPERATOR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Period of the drift check of every object (e.g. 300s, 5m).
    #[arg(long, env = "SLIM_OPERATOR_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// How long deletion retries an unreachable node before releasing the finalizer.
    #[arg(long, env = "SLIM_OPERATOR_CLEANUP_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub cleanup_timeout: Duration,

    /// Reconciles running at once (0: unbounded).
    #[arg(long, env = "SLIM_OPERATOR_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,

    /// Deadline of a SLIM node's ack to a configuration command (route acks can take ~30 s).
    #[arg(long, env = "SLIM_OPERATOR_NODE_TIMEOUT", default_value = "40s", value_parser = parse_duration)]
    pub node_timeout: Duration,

    /// Channel manager for SlimChannels that name none, e.g. http://slim-channel-manager.slim.svc:10356.
    #[arg(long, env = "SLIM_OPERATOR_CHANNEL_MANAGER")]
    pub channel_manager: Option<String>,

    /// Reconcile the Subscriptions and SlimChannels of this namespace only (and watch only its
    /// Pods), for a namespace-scoped install; empty: every namespace.
    #[arg(long, env = "SLIM_OPERATOR_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Restart a channel manager that lost its SLIM node for good (its invites fail with "no
    /// matching found") by deleting its Pod, found from its endpoint (a Pod IP or a Service).
    #[arg(long, env = "SLIM_OPERATOR_HEAL_CHANNEL_MANAGER")]
    pub heal_channel_manager: bool,

    /// Invites and removals in flight at one channel manager (0: unbounded); the others wait their
    /// turn. The manager serves a channel's operations one at a time: with hundreds of channels at
    /// once, an unbounded operator outruns its answers and every invite times out.
    #[arg(long, env = "SLIM_OPERATOR_CHANNEL_MANAGER_IN_FLIGHT", default_value_t = crate::engine::channel::DEFAULT_IN_FLIGHT)]
    pub channel_manager_in_flight: usize,

    /// SLIM node Pods (in each SlimChannel's namespace) consulted for live members when a
    /// SlimChannel has no spec.nodes: an equality selector, "" for none.
    #[arg(long, env = "SLIM_OPERATOR_DEFAULT_NODE_SELECTOR", default_value = controller::DEFAULT_NODE_SELECTOR)]
    pub default_node_selector: String,
    /// Controller endpoints consulted as well when a SlimChannel has no spec.nodes (comma-separated).
    #[arg(long, env = "SLIM_OPERATOR_DEFAULT_NODE_ENDPOINTS", value_delimiter = ',')]
    pub default_node_endpoints: Vec<String>,
    /// Period of the shared read of every consulted node's routes that notices restarted members.
    #[arg(long, env = "SLIM_OPERATOR_MEMBER_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub member_poll_interval: Duration,

    /// CA bundle (PEM file, e.g. a mounted Secret) for `https://` node and channel-manager
    /// endpoints whose `tls` says nothing; without it, the system roots.
    #[arg(long, env = "SLIM_OPERATOR_CONTROL_TLS_CA_FILE")]
    pub control_tls_ca_file: Option<std::path::PathBuf>,

    /// Client certificate and key (PEM files) presented on those connections (mutual TLS).
    #[arg(long, env = "SLIM_OPERATOR_CONTROL_TLS_CLIENT_CERT_FILE", requires = "control_tls_client_key_file")]
    pub control_tls_client_cert_file: Option<std::path::PathBuf>,
    #[arg(long, env = "SLIM_OPERATOR_CONTROL_TLS_CLIENT_KEY_FILE", requires = "control_tls_client_cert_file")]
    pub control_tls_client_key_file: Option<std::path::PathBuf>,

    /// SPIFFE mode by default: `https://` endpoints whose `tls` says nothing are authorised as
    /// members of this trust domain, with the operator's X.509-SVID as client certificate.
    #[arg(long, env = "SLIM_OPERATOR_CONTROL_TLS_SPIFFE_TRUST_DOMAIN", requires = "spiffe_endpoint_socket")]
    pub control_tls_spiffe_trust_domain: Option<String>,

    /// The operator's SPIFFE Workload API socket (`unix:///path` or a path): its X.509-SVID and
    /// trust bundle for SPIFFE mode (`tls.spiffe`).
    #[arg(long, env = "SLIM_OPERATOR_SPIFFE_ENDPOINT_SOCKET")]
    pub spiffe_endpoint_socket: Option<String>,
    /// Name of this replica for events and the leader Lease (the Pod name, from the downward API).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Reconcile only while holding the Lease `slim-operator-leader` in --namespace (required when
    /// running more than one replica; every replica serves the webhook either way).
    #[arg(long, env = "SLIM_OPERATOR_LEADER_ELECTION")]
    pub leader_election: bool,

    /// How long followers wait, on their own clocks, for the leader's next renewal.
    #[arg(long, env = "SLIM_OPERATOR_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// The leader stops reconciling this long after the start of its last successful renewal
    /// (shorter than --lease-duration, so it has stopped before anyone may take over).
    #[arg(long, env = "SLIM_OPERATOR_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub lease_renew_deadline: Duration,
    /// Pause between two attempts to renew or acquire the Lease.
    #[arg(long, env = "SLIM_OPERATOR_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub lease_retry_period: Duration,

    /// The operator's namespace (never injected into; holds the webhook Secret).
    #[arg(long, env = "POD_NAMESPACE", default_value = "slim-system")]
    pub namespace: String,

    #[command(flatten)]
    pub webhook: WebhookArgs,

    #[command(flatten)]
    pub issuer: IssuerArgs,
}

/// The SPIFFE issuer for pods with `identity-source: kubernetes`.
#[derive(Args, Debug, Clone)]
pub struct IssuerArgs {
    /// Issue SPIFFE identities to injected pods with identity source `kubernetes` (served on
    /// --issuer-addr with the webhook's certificate, so the webhook must be on).
    #[arg(long, env = "SLIM_OPERATOR_ISSUER")]
    pub issuer: bool,
    #[arg(long, env = "SLIM_OPERATOR_ISSUER_ADDR", default_value = "0.0.0.0:8444")]
    pub issuer_addr: SocketAddr,
    /// The address injected agents reach the issuer at; default
    /// `https://<webhook service>.<namespace>.svc:<port of --issuer-addr>`.
    #[arg(long, env = "SLIM_OPERATOR_ISSUER_URL")]
    pub issuer_url: Option<String>,
    #[arg(long, env = "SLIM_OPERATOR_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The audience of the agents' projected tokens (sent to the issuer only).
    #[arg(long, env = "SLIM_OPERATOR_ISSUER_AUDIENCE", default_value = "slim-operator")]
    pub issuer_audience: String,
    /// Secret (in --namespace) with the issuer's CA and JWT keys.
    #[arg(long, env = "SLIM_OPERATOR_ISSUER_SECRET", default_value = "slim-operator-issuer")]
    pub issuer_secret: String,
    /// ConfigMap written in the namespaces of injected pods with the issuer's serving CA.
    #[arg(long, env = "SLIM_OPERATOR_ISSUER_CA_CONFIG_MAP", default_value = "slim-identity-issuer-ca")]
    pub issuer_ca_config_map: String,
    #[arg(long, env = "SLIM_OPERATOR_ISSUER_X509_TTL", default_value = "1h", value_parser = parse_duration)]
    pub issuer_x509_ttl: Duration,
    /// JWT-SVID lifetime (at least 60 s: SLIM refreshes its token first after 30 s).
    #[arg(long, env = "SLIM_OPERATOR_ISSUER_JWT_TTL", default_value = "5m", value_parser = parse_duration)]
    pub issuer_jwt_ttl: Duration,
    #[arg(long, env = "SLIM_OPERATOR_ISSUER_CA_ROTATION", default_value = "8760h", value_parser = parse_duration)]
    pub issuer_ca_rotation: Duration,
    #[arg(long, env = "SLIM_OPERATOR_ISSUER_JWT_KEY_ROTATION", default_value = "24h", value_parser = parse_duration)]
    pub issuer_jwt_key_rotation: Duration,
    /// Requests a second per pod (token), and the burst allowed.
    #[arg(long, env = "SLIM_OPERATOR_ISSUER_RATE", default_value_t = 5.0)]
    pub issuer_rate: f64,
    #[arg(long, env = "SLIM_OPERATOR_ISSUER_BURST", default_value_t = 20)]
    pub issuer_burst: u32,
    /// How often agents fetch the bundle again.
    #[arg(long, env = "SLIM_OPERATOR_ISSUER_BUNDLE_REFRESH", default_value = "30s", value_parser = parse_duration)]
    pub issuer_bundle_refresh: Duration,
}

/// The sidecar injection webhook.
#[derive(Args, Debug, Clone)]
pub struct WebhookArgs {
    /// Do not serve the injection webhook.
    #[arg(long, env = "SLIM_OPERATOR_DISABLE_WEBHOOK")]
    pub disable_webhook: bool,

    /// Address of the webhook's HTTPS server (`POST /mutate`).
    #[arg(long, env = "SLIM_OPERATOR_WEBHOOK_ADDR", default_value = "0.0.0.0:8443")]
    pub webhook_addr: SocketAddr,

    /// `self-managed`: the operator issues its certificate, keeps it in a Secret and publishes the
    /// CA in the webhook configuration; `files`: tls.crt/tls.key mounted in --webhook-cert-dir
    /// (cert-manager), reloaded on change.
    #[arg(long, env = "SLIM_OPERATOR_WEBHOOK_CERT_MODE", value_enum, default_value = "self-managed")]
    pub webhook_cert_mode: CertMode,

    #[arg(long, env = "SLIM_OPERATOR_WEBHOOK_CERT_DIR", default_value = "/tls")]
    pub webhook_cert_dir: std::path::PathBuf,

    /// Secret for the self-managed certificate (in --namespace).
    #[arg(long, env = "SLIM_OPERATOR_WEBHOOK_SECRET", default_value = "slim-operator-webhook-tls")]
    pub webhook_secret: String,

    /// Service in front of the webhook (its DNS names go into the certificate).
    #[arg(long, env = "SLIM_OPERATOR_WEBHOOK_SERVICE", default_value = "slim-operator-webhook")]
    pub webhook_service: String,

    /// MutatingWebhookConfiguration whose caBundle the operator keeps current.
    #[arg(long, env = "SLIM_OPERATOR_WEBHOOK_CONFIGURATION", default_value = "slim-operator")]
    pub webhook_configuration: String,

    /// Image of the injected slim-identity-agent.
    #[arg(long, env = "SLIM_OPERATOR_SIDECAR_IMAGE", default_value = concat!("ghcr.io/agntcy/slim-identity-agent:", env!("CARGO_PKG_VERSION")))]
    pub sidecar_image: String,

    #[arg(long, env = "SLIM_OPERATOR_SIDECAR_IMAGE_PULL_POLICY")]
    pub sidecar_image_pull_policy: Option<String>,

    /// How the SPIRE agent socket reaches pods: `csi` (SPIFFE CSI driver) or `host-path`.
    #[arg(long, env = "SLIM_OPERATOR_SPIRE_SOCKET", value_enum, default_value = "csi")]
    pub spire_socket: SocketMode,

    #[arg(long, env = "SLIM_OPERATOR_SPIRE_CSI_DRIVER", default_value = "csi.spiffe.io")]
    pub spire_csi_driver: String,

    /// Node directory holding the socket (host-path mode).
    #[arg(long, env = "SLIM_OPERATOR_SPIRE_HOST_PATH", default_value = "/run/spire/agent-sockets")]
    pub spire_host_path: String,

    /// Socket file name inside that directory.
    #[arg(long, env = "SLIM_OPERATOR_SPIRE_SOCKET_FILE", default_value = "api.sock")]
    pub spire_socket_file: String,

    /// JWT audiences when a pod names none (comma-separated).
    #[arg(long, env = "SLIM_OPERATOR_DEFAULT_AUDIENCES", default_value = "slim", value_delimiter = ',')]
    pub default_audiences: Vec<String>,

    /// JWT bundle format when a pod names none: `jwks` (SLIM loads it directly) or `spiffe-helper`.
    #[arg(long, env = "SLIM_OPERATOR_DEFAULT_JWT_BUNDLE_FORMAT", default_value = "jwks")]
    pub default_jwt_bundle_format: String,

    /// Where injected agents get identities when neither the pod (annotation) nor its namespace
    /// (label) `slim.agntcy.org/identity-source` says: `spiffe` (SPIRE's Workload API) or
    /// `kubernetes` (a projected service-account token; no SPIRE needed).
    #[arg(long, env = "SLIM_OPERATOR_DEFAULT_IDENTITY_SOURCE", default_value = "spiffe")]
    pub default_identity_source: crate::webhook::inject::Source,

    /// With identity source `spiffe`, whether injected agents serve the SPIFFE Workload API to
    /// the app containers when the pod's `slim.agntcy.org/workload-api` annotation does not say.
    #[arg(long, env = "SLIM_OPERATOR_DEFAULT_WORKLOAD_API", default_value_t = true, action = clap::ArgAction::Set)]
    pub default_workload_api: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CertMode {
    SelfManaged,
    Files,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketMode {
    Csi,
    HostPath,
}

impl RunArgs {
    /// The issuer's address as injected agents reach it.
    fn issuer_url(&self) -> String {
        self.issuer.issuer_url.clone().unwrap_or_else(|| {
            format!(
                "https://{}.{}.svc:{}",
                self.webhook.webhook_service,
                self.namespace,
                self.issuer.issuer_addr.port()
            )
        })
    }

    /// The issuer's settings, or `None` when it is off.
    pub fn issuer_settings(&self) -> Result<Option<IssuerSettings>, RunError> {
        let i = &self.issuer;
        if !i.issuer {
            return Ok(None);
        }
        if self.webhook.disable_webhook {
            return Err(RunError::Issuer(
                "--issuer serves with the webhook's certificate: the webhook must be on".into(),
            ));
        }
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let policy = Policy {
            x509_ttl: secs(i.issuer_x509_ttl),
            jwt_ttl: secs(i.issuer_jwt_ttl),
            ca_rotation: secs(i.issuer_ca_rotation),
            jwt_rotation: secs(i.issuer_jwt_key_rotation),
        };
        policy.validate().map_err(RunError::Issuer)?;
        if i.trust_domain.is_empty() || i.trust_domain.contains(['/', ':']) {
            return Err(RunError::Issuer(format!("--trust-domain {:?} is not a trust domain name", i.trust_domain)));
        }
        Ok(Some(IssuerSettings {
            addr: i.issuer_addr,
            keys: KeyStore {
                namespace: self.namespace.clone(),
                secret: i.issuer_secret.clone(),
                trust_domain: i.trust_domain.clone(),
                policy,
                jwt_issuer: self.issuer_url(),
            },
            audience: i.issuer_audience.clone(),
            ca_config_map: i.issuer_ca_config_map.clone(),
            rate: i.issuer_rate,
            burst: i.issuer_burst,
            refresh_hint: i.issuer_bundle_refresh.as_secs().max(1),
        }))
    }

    /// The webhook's settings, or `None` when it is disabled.
    pub fn webhook_settings(&self) -> Option<WebhookSettings> {
        let w = &self.webhook;
        if w.disable_webhook {
            return None;
        }
        let mut injector = InjectorConfig {
            image: w.sidecar_image.clone(),
            image_pull_policy: w.sidecar_image_pull_policy.clone(),
            socket: match w.spire_socket {
                SocketMode::Csi => SocketSource::Csi { driver: w.spire_csi_driver.clone() },
                SocketMode::HostPath => SocketSource::HostPath { path: w.spire_host_path.clone() },
            },
            socket_file: w.spire_socket_file.clone(),
            audiences: w.default_audiences.clone(),
            jwt_bundle_format: w.default_jwt_bundle_format.clone(),
            identity_source: w.default_identity_source,
            workload_api: w.default_workload_api,
            issuer: self.issuer.issuer.then(|| IssuerInjection {
                url: self.issuer_url(),
                audience: self.issuer.issuer_audience.clone(),
                ca_config_map: self.issuer.issuer_ca_config_map.clone(),
            }),
            ..Default::default()
        };
        injector.excluded_namespaces.push(self.namespace.clone());
        let certs = match w.webhook_cert_mode {
            CertMode::SelfManaged => CertSource::SelfManaged(SelfManaged {
                namespace: self.namespace.clone(),
                secret: w.webhook_secret.clone(),
                service: w.webhook_service.clone(),
                webhook_configuration: w.webhook_configuration.clone(),
            }),
            CertMode::Files => CertSource::Files { dir: w.webhook_cert_dir.clone() },
        };
        Some(WebhookSettings { addr: w.webhook_addr, certs, injector })
    }
}

impl Default for RunArgs {
    fn default() -> Self {
        Self::parse_from_empty()
    }
}

impl RunArgs {
    fn parse_from_empty() -> Self {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: RunArgs,
        }
        Wrapper::parse_from(["slim-operator"]).args
    }
}

/// Parses a duration as humantime does (`500ms`, `30s`, `5m`, `2h`, `1h 30m`) or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    match text.parse::<u64>() {
        Ok(seconds) => Ok(Duration::from_secs(seconds)),
        Err(_) => {
            humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration like 30s, 5m or 2h: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn control_tls_flags_go_together() {
        let parse = |extra: &[&str]| Cli::try_parse_from(["slim-operator", "run"].iter().chain(extra));
        assert!(parse(&["--control-tls-client-cert-file", "/c.crt"]).is_err(), "a certificate needs its key");
        assert!(parse(&["--control-tls-spiffe-trust-domain", "example.org"]).is_err(), "SPIFFE needs the socket");
        let ok = parse(&[
            "--control-tls-client-cert-file=/c.crt",
            "--control-tls-client-key-file=/c.key",
            "--control-tls-ca-file=/ca.crt",
            "--spiffe-endpoint-socket=unix:///run/spire/api.sock",
            "--control-tls-spiffe-trust-domain=example.org",
        ]);
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn run_defaults_are_documented_values() {
        let args = RunArgs::default();
        assert_eq!(args.admin_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(args.resync_interval, Duration::from_secs(300));
        assert_eq!(args.cleanup_timeout, Duration::from_secs(120));
    }
}
