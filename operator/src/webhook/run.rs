//! Running the webhook inside `slim-operator run`: certificates, the namespace cache, the server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use tracing::info;

use super::certs::{CertError, Mounted, SelfManaged};
use super::inject::InjectorConfig;
use super::server::{CertStore, WebhookState, router, serve_tls};
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
    #[error("webhook certificate: {0}")]
    Certs(#[from] CertError),
    #[error("webhook server on {addr}: {source}")]
    Serve { addr: SocketAddr, source: std::io::Error },
}

/// Serves until `shutdown`; `ready` turns true once a certificate is loaded and the namespace
/// cache is synced.
pub async fn run(
    settings: WebhookSettings,
    client: Client,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), WebhookError> {
    let store = Arc::new(CertStore::default());
    match settings.certs.clone() {
        CertSource::SelfManaged(manager) => {
            // The first issue happens before serving; later rotations in the background.
            manager.sync(&client, &store).await?;
            tokio::spawn(manager.run(client.clone(), store.clone()));
        }
        CertSource::Files { dir } => {
            let mounted = Mounted { cert: dir.join("tls.crt"), key: dir.join("tls.key") };
            let loaded = mounted.load(&store).await?;
            tokio::spawn(mounted.watch(store.clone(), loaded));
        }
    }

    // Namespace labels (opt-in by namespace), from a metadata-only cache.
    let (reader, writer) = reflector::store();
    // kube 5: an Api over PartialObjectMeta makes metadata-only requests.
    let namespaces = watcher(Api::<PartialObjectMeta<Namespace>>::all(client), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(namespaces);
    let cache = reader.clone();
    let labels = Arc::new(move |name: &str| -> Option<BTreeMap<String, String>> {
        cache.state().into_iter().find(|ns| ns.name_any() == name).map(|ns| ns.labels().clone())
    });
    let gate = ready.clone();
    let loaded = store.clone();
    tokio::spawn(async move {
        if reader.wait_until_ready().await.is_ok() && loaded.is_loaded() {
            gate.store(true, Ordering::SeqCst);
            info!("webhook ready");
        }
    });

    let state = WebhookState { config: Arc::new(settings.injector), namespaces: labels, metrics };
    serve_tls(settings.addr, router(state), store, shutdown)
        .await
        .map_err(|source| WebhookError::Serve { addr: settings.addr, source })
}
