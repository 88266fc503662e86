//! The mutating webhook's HTTP surface: `POST /mutate` (AdmissionReview v1), served over TLS with
//! a certificate that can be swapped while running.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{debug, info, warn};

use super::inject::{Decision, InjectorConfig, decide};
use crate::metrics::Metrics;
use crate::serve::Limits;

/// Labels of a namespace by name (from a cache in production).
pub type NamespaceLabels = Arc<dyn Fn(&str) -> Option<BTreeMap<String, String>> + Send + Sync>;

#[derive(Clone)]
pub struct WebhookState {
    pub config: Arc<InjectorConfig>,
    pub namespaces: NamespaceLabels,
    pub metrics: Arc<Metrics>,
    /// With the issuer: the namespace of every injected pod, which needs the issuer's CA
    /// ConfigMap (`issuer::ca_config_map`).
    pub issuer_namespaces: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

pub fn router(state: WebhookState) -> Router {
    Router::new().route("/mutate", post(mutate)).route("/healthz", get(|| async { "ok" })).with_state(state)
}

async fn mutate(State(state): State<WebhookState>, body: Bytes) -> Json<AdmissionReview<DynamicObject>> {
    let start = Instant::now();
    let (result, response) = review(&state, &body);
    state.metrics.webhook_review(result, start.elapsed());
    Json(response.into_review())
}

/// Answers one AdmissionReview body; never panics on bad input.
fn review(state: &WebhookState, body: &[u8]) -> (&'static str, AdmissionResponse) {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => {
            warn!(%error, "malformed AdmissionReview");
            return ("invalid", AdmissionResponse::invalid(format!("malformed AdmissionReview: {error}")));
        }
    };
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(_) => return ("invalid", AdmissionResponse::invalid("AdmissionReview has no request")),
    };
    let response = AdmissionResponse::from(&request);
    let Some(pod) = request.object.as_ref().filter(|_| request.operation == Operation::Create) else {
        return ("skipped", response);
    };
    let namespace = request.namespace.clone().or_else(|| pod.metadata.namespace.clone()).unwrap_or_default();
    let pod_name = pod.metadata.name.clone().or_else(|| pod.metadata.generate_name.clone()).unwrap_or_default();
    let labels = (state.namespaces)(&namespace);
    match decide(pod, &namespace, labels.as_ref(), &state.config) {
        Decision::Skip(reason) => {
            debug!(%namespace, pod = %pod_name, reason, "not injected");
            ("skipped", response)
        }
        Decision::Refuse(message) => {
            info!(%namespace, pod = %pod_name, %message, "injection refused");
            ("refused", response.deny(format!("slim identity injection: {message}")))
        }
        Decision::Inject(patch) => match response.with_patch(patch) {
            Ok(response) => {
                info!(%namespace, pod = %pod_name, "identity sidecar injected");
                if let Some(namespaces) = state.issuer_namespaces.as_ref().filter(|_| !request.dry_run) {
                    let _ = namespaces.send(namespace.clone());
                }
                ("injected", response)
            }
            Err(error) => ("invalid", AdmissionResponse::invalid(format!("building the patch: {error}"))),
        },
    }
}

/// The serving certificate, replaceable while connections keep being accepted.
#[derive(Default)]
pub struct CertStore {
    current: RwLock<Option<Arc<CertifiedKey>>>,
    /// Where the serving certificate's expiry is published, when set.
    metrics: Option<Arc<Metrics>>,
    /// The CA that signed it (PEM), when known: what clients of the issuer trust.
    ca: tokio::sync::watch::Sender<Option<String>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").field("loaded", &self.is_loaded()).finish_non_exhaustive()
    }
}

impl CertStore {
    /// A store that publishes the serving certificate's expiry (`certificate="webhook"`).
    pub fn with_metrics(metrics: Arc<Metrics>) -> Self {
        Self { metrics: Some(metrics), ..Default::default() }
    }

    /// Records the CA of the serving certificate (unchanged: nobody is woken).
    pub fn set_ca(&self, pem: &str) {
        self.ca.send_if_modified(|held| {
            let changed = held.as_deref() != Some(pem);
            if changed {
                *held = Some(pem.to_owned());
            }
            changed
        });
    }

    /// The CA, now and as it changes.
    pub fn ca(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.ca.subscribe()
    }

    pub fn set(&self, key: Arc<CertifiedKey>) {
        let not_after = key.end_entity_cert().ok().and_then(|der| {
            x509_parser::parse_x509_certificate(der).ok().map(|(_, cert)| cert.validity().not_after.timestamp())
        });
        if let (Some(metrics), Some(not_after)) = (&self.metrics, not_after) {
            metrics.certificate_expires("webhook", not_after);
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
    }

    pub fn is_loaded(&self) -> bool {
        self.current.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Serves `router` over TLS on `addr` with `limits` until `shutdown` resolves.
pub async fn serve_tls(
    addr: SocketAddr,
    router: Router,
    certs: Arc<CertStore>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_tls_on(listener, router, certs, limits, shutdown).await
}

/// Serves `router` over TLS on an already bound listener until `shutdown` resolves.
pub async fn serve_tls_on(
    listener: tokio::net::TcpListener,
    router: Router,
    certs: Arc<CertStore>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let acceptor = crate::serve::tls_acceptor(certs).map_err(std::io::Error::other)?;
    crate::serve::serve(listener, router, Some(acceptor), limits, shutdown).await
}
