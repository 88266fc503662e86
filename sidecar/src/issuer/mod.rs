//! `identity_source: kubernetes` with an issuer: SPIFFE identities from `slim-operator`, served
//! to the pod on the Workload API socket (SLIM's `spire` provider and verifier need them).
//!
//! The agent authenticates with a projected service-account token whose audience names the
//! issuer (a token it sends nowhere else), over TLS checked against the issuer's CA (a ConfigMap
//! the operator keeps current). Three things follow from the issuer, each in its own task:
//! - the bundle, polled at the issuer's hint: served as the JWT bundles and inside the X.509 state;
//! - the X.509-SVID, from a CSR (the key never leaves the pod), renewed at half its life;
//! - JWT-SVIDs per request of the app ([`IssuedJwt`]), audiences unchanged.
//!
//! While the issuer cannot be reached the agent keeps serving what it holds (an X.509-SVID is
//! withdrawn only once expired), and retries with backoff.

pub use slim_identity_contract::issuer_api as api;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use slim_k8s_common::backoff::Backoff;
use tokio::sync::watch;
use tonic::Status;
use tracing::{debug, info, warn};

use crate::agent::unix_now;
use crate::config::IssuerSource;
use crate::health::Health;
use crate::workload::pb;
use crate::workload::server::{JwtSvidIssuer, Served};

/// Why a call to the issuer failed, from the issuer's answer or the connection.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// The issuer answered with a refusal (HTTP status, `Status.reason`, message).
    #[error("the issuer refused ({code} {reason}): {message}")]
    Refused { code: u16, reason: String, message: String },
    #[error("the issuer cannot be reached: {0}")]
    Unreachable(String),
    #[error("issuer client: {0}")]
    Setup(String),
    #[error("the issuer's answer: {0}")]
    Answer(String),
}

impl IssuerError {
    fn of(error: kube::Error) -> Self {
        match error {
            kube::Error::Api(status) => IssuerError::Refused {
                code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
            },
            other => IssuerError::Unreachable(slim_k8s_common::error_chain(&other)),
        }
    }

    /// The Workload API status an app sees for this failure.
    fn to_status(&self) -> Status {
        match self {
            IssuerError::Refused { code: 400 | 413, message, .. } => Status::invalid_argument(message.clone()),
            IssuerError::Refused { code: 401 | 403, reason, message } => {
                Status::permission_denied(format!("{reason}: {message}"))
            }
            IssuerError::Refused { code: 429, message, .. } => Status::resource_exhausted(message.clone()),
            other => Status::unavailable(format!("the issuer cannot issue JWT-SVIDs now: {other}")),
        }
    }
}

/// A client of the issuer. The connection is rebuilt after a failure (the issuer's CA file may
/// have been rotated in between).
pub struct IssuerClient {
    source: IssuerSource,
    client: Mutex<Option<kube::Client>>,
}

impl IssuerClient {
    pub fn new(source: &IssuerSource) -> Result<Self, IssuerError> {
        let this = Self { source: source.clone(), client: Mutex::new(None) };
        this.client()?;
        Ok(this)
    }

    fn client(&self) -> Result<kube::Client, IssuerError> {
        let mut held = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = held.as_ref() {
            return Ok(client.clone());
        }
        let client = connect(&self.source)?;
        *held = Some(client.clone());
        Ok(client)
    }

    async fn call<T: serde::de::DeserializeOwned>(&self, request: http::Request<Vec<u8>>) -> Result<T, IssuerError> {
        let result = self.client()?.request(request).await.map_err(IssuerError::of);
        if matches!(result, Err(IssuerError::Unreachable(_))) {
            *self.client.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        result
    }

    pub async fn bundle(&self) -> Result<api::Bundle, IssuerError> {
        let request = http::Request::get(api::BUNDLE_PATH).body(Vec::new());
        self.call(request.map_err(|e| IssuerError::Setup(e.to_string()))?).await
    }

    pub async fn x509_svid(&self, csr_der: &[u8]) -> Result<api::X509SvidResponse, IssuerError> {
        self.post(api::X509_SVID_PATH, &api::X509SvidRequest { csr: STANDARD.encode(csr_der) }).await
    }

    pub async fn jwt_svid(&self, audiences: Vec<String>) -> Result<api::JwtSvidResponse, IssuerError> {
        self.post(api::JWT_SVID_PATH, &api::JwtSvidRequest { audiences }).await
    }

    async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, IssuerError> {
        let body = serde_json::to_vec(body).map_err(|e| IssuerError::Setup(e.to_string()))?;
        let request = http::Request::post(path).header(http::header::CONTENT_TYPE, "application/json").body(body);
        self.call(request.map_err(|e| IssuerError::Setup(e.to_string()))?).await
    }
}

/// A kube client of the issuer: its CA, its TLS name, the projected token (re-read as the
/// kubelet rotates it).
fn connect(source: &IssuerSource) -> Result<kube::Client, IssuerError> {
    let uri: http::Uri =
        source.url.parse().map_err(|e| IssuerError::Setup(format!("issuer URL {:?}: {e}", source.url)))?;
    let ders = crate::kubernetes::read_ca_file(&source.ca_file).map_err(|e| IssuerError::Setup(e.to_string()))?;
    let mut config = kube::Config::new(uri);
    config.root_cert = Some(ders);
    config.tls_server_name = (!source.server_name.is_empty()).then(|| source.server_name.clone());
    config.auth_info.token_file = Some(source.token_file.to_string_lossy().into_owned());
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(15));
    kube::Client::try_from(config).map_err(|e| IssuerError::Setup(slim_k8s_common::error_chain(&e)))
}

/// The bundle as the Workload API's JWT bundles.
pub fn jwt_bundles_of(bundle: &api::Bundle) -> Result<pb::JwtBundlesResponse, IssuerError> {
    let jwks = serde_json::to_vec(&bundle.jwt_authorities).map_err(|e| IssuerError::Answer(e.to_string()))?;
    Ok(pb::JwtBundlesResponse { bundles: [(format!("spiffe://{}", bundle.trust_domain), jwks)].into() })
}

/// The CA certificates, concatenated DER (the Workload API's bundle field).
pub fn x509_bundle_of(bundle: &api::Bundle) -> Result<Vec<u8>, IssuerError> {
    let mut der = Vec::new();
    for authority in &bundle.x509_authorities {
        der.extend(STANDARD.decode(authority).map_err(|e| IssuerError::Answer(format!("x509_authorities: {e}")))?);
    }
    Ok(der)
}

/// Polls the bundle forever at the issuer's hint; a change is served at once.
pub async fn bundle_loop(
    client: Arc<IssuerClient>,
    served: Served,
    bundles: watch::Sender<Option<api::Bundle>>,
    health: Health,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let wait = match client.bundle().await.and_then(|b| jwt_bundles_of(&b).map(|jwt| (b, jwt))) {
            Ok((bundle, jwt)) => {
                health.connected();
                backoff.reset();
                served.set_bundles(Some(jwt));
                let hint = Duration::from_secs(bundle.refresh_hint_seconds.clamp(5, 300));
                bundles.send_if_modified(|held| {
                    let changed = held.as_ref() != Some(&bundle);
                    if changed {
                        info!(sequence = bundle.sequence, trust_domain = %bundle.trust_domain, "issuer bundle updated");
                        *held = Some(bundle);
                    }
                    changed
                });
                hint
            }
            Err(error) => {
                health.disconnected();
                let delay = backoff.next_delay();
                warn!(%error, retry_in = ?delay, "issuer bundle not refreshed; serving the one held");
                delay
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Who this pod is, for its CSR.
#[derive(Clone, Debug)]
pub struct PodIdentity {
    pub namespace: String,
    pub service_account: String,
}

impl PodIdentity {
    /// From the downward API variables the injector sets.
    pub fn from_env() -> Result<Self, IssuerError> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| IssuerError::Setup(format!("{name} is not set (the injector sets it)")))
        };
        Ok(Self {
            namespace: var(crate::kubernetes::POD_NAMESPACE_ENV)?,
            service_account: var(api::SERVICE_ACCOUNT_ENV)?,
        })
    }
}

/// A fresh P-256 key and a CSR for `spiffe_id` (DER of both).
pub fn key_and_csr(spiffe_id: &str) -> Result<(rcgen::KeyPair, Vec<u8>), IssuerError> {
    let fail = |e: rcgen::Error| IssuerError::Setup(format!("CSR: {e}"));
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut params = rcgen::CertificateParams::default();
    let uri = spiffe_id.try_into().map_err(fail)?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params.serialize_request(&key).map_err(fail)?;
    Ok((key, csr.der().to_vec()))
}

/// An X.509-SVID held: what the issuer sent, our key (PKCS#8 DER), when it came.
struct Held {
    svid: api::X509SvidResponse,
    key: Vec<u8>,
    received_at: i64,
}

impl Held {
    /// Half its life after it came (spiffe-helper's rule).
    fn renewal_time(&self) -> i64 {
        self.received_at + (self.svid.expires_at - self.received_at) / 2
    }
}

/// Keeps an X.509-SVID served: requested once the trust domain is known, renewed at half its
/// life, re-served when the bundle changes, withdrawn only once expired.
pub async fn x509_loop(
    client: Arc<IssuerClient>,
    pod: PodIdentity,
    served: Served,
    mut bundles: watch::Receiver<Option<api::Bundle>>,
) {
    let Ok(first) = bundles.wait_for(Option::is_some).await.map(|b| b.clone()) else { return };
    let trust_domain = first.map(|b| b.trust_domain).unwrap_or_default();
    let spiffe_id = api::spiffe_id(&trust_domain, &pod.namespace, &pod.service_account);
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut held: Option<Held> = None;
    loop {
        if held.as_ref().is_none_or(|h| unix_now() >= h.renewal_time()) {
            match request_svid(&client, &spiffe_id).await {
                Ok(issued) => {
                    info!(%spiffe_id, expires_at = issued.svid.expires_at, "X.509-SVID issued");
                    backoff.reset();
                    held = Some(issued);
                }
                Err(error) => warn!(%error, "X.509-SVID not renewed; serving the one held while it is valid"),
            }
        }
        if held.as_ref().is_some_and(|h| h.svid.expires_at <= unix_now()) {
            warn!(%spiffe_id, "the X.509-SVID held has expired: withdrawn");
            held = None;
        }
        serve_x509(&served, held.as_ref(), bundles.borrow().as_ref());
        let wait = match held.as_ref() {
            Some(h) if h.renewal_time() > unix_now() => Duration::from_secs((h.renewal_time() - unix_now()) as u64),
            _ => backoff.next_delay(),
        };
        debug!(next = ?wait, "X.509-SVID loop");
        let _ = tokio::time::timeout(wait, bundles.changed()).await;
    }
}

async fn request_svid(client: &IssuerClient, spiffe_id: &str) -> Result<Held, IssuerError> {
    let (key, csr) = key_and_csr(spiffe_id)?;
    let svid = client.x509_svid(&csr).await?;
    if svid.spiffe_id != spiffe_id {
        return Err(IssuerError::Answer(format!("asked for {spiffe_id}, got {}", svid.spiffe_id)));
    }
    Ok(Held { svid, key: key.serialize_der(), received_at: unix_now() })
}

fn serve_x509(served: &Served, held: Option<&Held>, bundle: Option<&api::Bundle>) {
    let response = held.zip(bundle).and_then(|(held, bundle)| {
        let mut chain = Vec::new();
        for der in &held.svid.chain {
            chain.extend(STANDARD.decode(der).ok()?);
        }
        Some(pb::X509svidResponse {
            svids: vec![pb::X509svid {
                spiffe_id: held.svid.spiffe_id.clone(),
                x509_svid: chain,
                x509_svid_key: held.key.clone(),
                bundle: x509_bundle_of(bundle).ok()?,
                hint: String::new(),
            }],
            ..Default::default()
        })
    });
    served.set_x509(response);
}

/// FetchJWTSVID answered by the issuer.
pub struct IssuedJwt {
    pub client: Arc<IssuerClient>,
}

#[tonic::async_trait]
impl JwtSvidIssuer for IssuedJwt {
    async fn fetch(&self, audiences: Vec<String>, spiffe_id: String) -> Result<Vec<pb::Jwtsvid>, Status> {
        let issued = self.client.jwt_svid(audiences).await.map_err(|error| {
            warn!(%error, "JWT-SVID not issued");
            error.to_status()
        })?;
        if !spiffe_id.is_empty() && spiffe_id != issued.spiffe_id {
            return Err(Status::permission_denied(format!("this pod is {}, not {spiffe_id}", issued.spiffe_id)));
        }
        Ok(vec![pb::Jwtsvid { spiffe_id: issued.spiffe_id, svid: issued.token, hint: String::new() }])
    }
}
