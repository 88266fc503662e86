//! The injection webhook served in this process, as tests and benchmarks run it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use slim_operator::metrics::Metrics;
use slim_operator::serve::Limits;
use slim_operator::webhook::{CertStore, InjectorConfig, WebhookState, certs, router, serve_tls_on};

/// Serves the webhook with the default injector config (every namespace unlabelled) on a free
/// port of 127.0.0.1, with a certificate for `names` from a new CA; returns where, and that CA.
pub async fn serve(names: &[String]) -> (SocketAddr, certs::TlsMaterial) {
    let material = certs::generate(names, None).expect("certificates");
    let store = Arc::new(CertStore::default());
    store.set(certs::certified_key(&material.cert_pem, &material.key_pem).expect("key"));
    let state = WebhookState {
        config: Arc::new(InjectorConfig::default()),
        namespaces: Arc::new(|_| Some(BTreeMap::new())),
        metrics: Arc::new(Metrics::new()),
        issuer_namespaces: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve_tls_on(listener, router(state), store, Limits::WEBHOOK, std::future::pending()));
    (addr, material)
}
