//! Running the webhook inside `slim-operator run`: certificates, the namespace cache, the server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use tracing::warn;

use super::certs::{Mounted, SelfManaged};
use super::inject::InjectorConfig;
use super::server::{CertStore, WebhookState, router, serve_tls};
use crate::admin::Gate;
use crate::metrics::Metrics;

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    SelfManaged(SelfManaged),
    Files { dir: PathBuf },
}

#[derive(Clone, Debug)]
pub struct WebhookSettings {
    pub addr: SocketAddr,
    pub certs: CertSource,
    pub injector: InjectorConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook server on {addr}: {source}")]
    Serve { addr: SocketAddr, source: std::io::Error },
    #[error("webhook {0} stopped unexpectedly")]
    TaskEnded(&'static str),
}

/// Serves until `shutdown`. `certificate` opens once a serving certificate is loaded (and, when
/// self-managed, its CA is published), `namespaces` once the namespace cache is synced; each says
/// what is missing while closed. Nothing missing in the cluster (the namespace, the Secret, the
/// webhook configuration, the mounted files) ends this: it is retried with backoff until it appears.
pub async fn run(
    settings: WebhookSettings,
    client: Client,
    metrics: Arc<Metrics>,
    gates: WebhookGates,
    store: Arc<CertStore>,
    issuer_namespaces: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), WebhookError> {
    let certificates = {
        let (client, store, gate) = (client.clone(), store.clone(), gates.certificate.clone());
        async move {
            match settings.certs.clone() {
                CertSource::SelfManaged(manager) => manager.run(client, store, gate).await,
                CertSource::Files { dir } => {
                    Mounted { cert: dir.join("tls.crt"), key: dir.join("tls.key") }.run(store, gate).await
                }
            }
        }
    };

    // Namespace labels (opt-in by namespace), from a metadata-only cache.
    let (reader, writer) = reflector::store();
    // kube 5: an Api over PartialObjectMeta makes metadata-only requests.
    let namespace_gate = gates.namespaces.clone();
    let namespaces = watcher(Api::<PartialObjectMeta<Namespace>>::all(client), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .for_each(move |event| {
            match event {
                Ok(watcher::Event::InitDone) => namespace_gate.open(),
                Ok(_) => {}
                Err(error) => {
                    warn!(%error, "namespace watch failed; retrying");
                    namespace_gate.close(format!("webhook: namespace cache: {error}"));
                }
            }
            futures::future::ready(())
        });
    let cache = reader.clone();
    let labels = Arc::new(move |name: &str| -> Option<BTreeMap<String, String>> {
        cache.get(&reflector::ObjectRef::new(name)).map(|ns| ns.labels().clone())
    });

    let state = WebhookState { config: Arc::new(settings.injector), namespaces: labels, metrics, issuer_namespaces };
    let server = serve_tls(settings.addr, router(state), store, crate::serve::Limits::WEBHOOK, shutdown);
    // The certificate and namespace loops run for as long as the server does.
    tokio::select! {
        result = server => result.map_err(|source| WebhookError::Serve { addr: settings.addr, source }),
        () = certificates => Err(WebhookError::TaskEnded("certificate manager")),
        () = namespaces => Err(WebhookError::TaskEnded("namespace cache")),
    }
}

/// The webhook's readiness gates.
#[derive(Clone, Debug)]
pub struct WebhookGates {
    pub certificate: Arc<Gate>,
    pub namespaces: Arc<Gate>,
}

impl Default for WebhookGates {
    fn default() -> Self {
        Self {
            certificate: Gate::closed("webhook: no serving certificate yet"),
            namespaces: Gate::closed("webhook: namespace cache not synced"),
        }
    }
}
