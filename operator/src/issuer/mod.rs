//! The operator as the SPIFFE issuer of pods that chose `identity-source: kubernetes` (the way
//! istiod issues certificates to istio-agent): the agent in the pod sends a CSR or asks for a
//! JWT-SVID with a projected service-account token; the API server vouches for the token
//! (TokenReview) and the pod it is bound to is checked; the pod's service account becomes
//! `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
//!
//! - [`keys`]: the key set and its rotation (pure);
//! - [`authority`]: signing with it (no IO);
//! - [`review`]: who is asking (TokenReview, the pod);
//! - [`store`]: the keys in a Secret (created once, rotated by the leader, read by all);
//! - [`server`]: the HTTPS endpoints (every replica);
//! - [`ca_config_map`]: the serving CA, published to the namespaces of injected pods.

pub mod authority;
pub mod ca_config_map;
pub mod keys;
pub mod review;
pub mod server;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use kube::Client;
use tokio::sync::{mpsc, watch};

use crate::admin::Gate;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::webhook::CertStore;

/// Everything the issuer is configured with (flags / chart values).
#[derive(Clone, Debug)]
pub struct IssuerSettings {
    pub addr: SocketAddr,
    pub keys: store::KeyStore,
    /// The audience the agents' tokens must carry.
    pub audience: String,
    /// The ConfigMap (in each app namespace) with the serving CA.
    pub ca_config_map: String,
    /// Per pod (per token): requests a second, and the burst.
    pub rate: f64,
    pub burst: u32,
    /// How often agents fetch the bundle again, seconds.
    pub refresh_hint: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("issuer server on {addr}: {source}")]
    Serve { addr: SocketAddr, source: std::io::Error },
    #[error("issuer {0} stopped unexpectedly")]
    TaskEnded(&'static str),
}

/// Serves until `shutdown`: the keys loop, the CA ConfigMaps, the HTTPS server (with the
/// webhook's serving certificate, from `certs`). `gate` opens once keys are loaded.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    settings: IssuerSettings,
    client: Client,
    metrics: Arc<Metrics>,
    leadership: watch::Receiver<Leadership>,
    certs: Arc<CertStore>,
    namespaces: mpsc::UnboundedReceiver<String>,
    gate: Arc<Gate>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), IssuerError> {
    let (authority_tx, authority_rx) = watch::channel(None);
    let keys = settings.keys.clone().run(client.clone(), leadership, authority_tx, gate, metrics.clone());
    let config_maps = ca_config_map::run(client.clone(), settings.ca_config_map.clone(), certs.ca(), namespaces);
    let state = server::IssuerState {
        authority: authority_rx,
        reviewer: review::Reviewer { client, audience: settings.audience.clone() },
        limiter: Arc::new(server::RateLimiter::new(settings.rate, settings.burst)),
        metrics,
        refresh_hint: settings.refresh_hint,
    };
    let limits = crate::serve::Limits::ISSUER;
    let server = crate::webhook::serve_tls(settings.addr, server::router(state), certs, limits, shutdown);
    tokio::select! {
        result = server => result.map_err(|source| IssuerError::Serve { addr: settings.addr, source }),
        () = keys => Err(IssuerError::TaskEnded("key store")),
        () = config_maps => Err(IssuerError::TaskEnded("CA ConfigMap publisher")),
    }
}
