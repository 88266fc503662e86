//! Admin HTTP server: `/livez`, `/readyz`, `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::metrics::Metrics;

/// Readiness: `Ok` when ready, else what is missing.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the admin endpoints report.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub ready: Readiness,
}

/// One readiness condition: open, or closed with the reason (what `/readyz` and the log say).
#[derive(Debug)]
pub struct Gate(std::sync::Mutex<Result<(), String>>);

impl Gate {
    /// A closed gate, with the reason it starts closed.
    pub fn closed(reason: impl Into<String>) -> Arc<Self> {
        Arc::new(Self(std::sync::Mutex::new(Err(reason.into()))))
    }

    pub fn open(&self) {
        *self.lock() = Ok(());
    }

    pub fn close(&self, reason: impl Into<String>) {
        *self.lock() = Err(reason.into());
    }

    pub fn state(&self) -> Result<(), String> {
        self.lock().clone()
    }

    pub fn is_open(&self) -> bool {
        self.lock().is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Result<(), String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Ready when every gate is open; otherwise says why each closed one is closed.
pub fn all_gates(gates: Vec<Arc<Gate>>) -> Readiness {
    Arc::new(move || {
        let reasons: Vec<String> = gates.iter().filter_map(|g| g.state().err()).collect();
        if reasons.is_empty() { Ok(()) } else { Err(reasons.join("; ")) }
    })
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> Response {
    match (state.ready)() {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(missing) => (StatusCode::SERVICE_UNAVAILABLE, missing).into_response(),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed").into_response(),
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    state: AdminState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "admin server listening");
    crate::serve::serve(listener, router(state), None, crate::serve::Limits::ADMIN, shutdown).await
}
