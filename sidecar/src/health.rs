//! Health endpoints in spiffe-helper's JSON shape. Ready only once every configured output is
//! written and current; not live when a write failed or the agent connection has been down too
//! long (a restart is then the cure).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::time::Instant;

use crate::workload::server::Served;

/// A file's state, as spiffe-helper names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteStatus {
    Unwritten,
    Written,
    Failed,
}

impl WriteStatus {
    fn as_str(self) -> &'static str {
        match self {
            WriteStatus::Unwritten => "unwritten",
            WriteStatus::Written => "written",
            WriteStatus::Failed => "failed",
        }
    }
}

#[derive(Debug)]
struct Inner {
    x509: Option<WriteStatus>,
    /// JWT-SVID files and the JWT bundle file, by path, with the expiry of what was written.
    jwt: BTreeMap<String, (WriteStatus, Option<i64>)>,
    x509_expiry: Option<i64>,
    /// The Workload API answered last at…; `None` while never connected.
    last_contact: Option<Instant>,
    down_since: Option<Instant>,
}

/// Shared health state.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Mutex<Inner>>,
    /// The Workload API served to the pod (its socket), when it is: ready needs it complete.
    served: Option<(String, Served)>,
    /// Not live after this long without the Workload API.
    pub liveness_grace: Duration,
}

impl Health {
    /// Tracks the X.509 output (when `x509`) and the given JWT file paths.
    pub fn new(x509: bool, jwt_files: impl IntoIterator<Item = String>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                x509: x509.then_some(WriteStatus::Unwritten),
                jwt: jwt_files.into_iter().map(|f| (f, (WriteStatus::Unwritten, None))).collect(),
                x509_expiry: None,
                last_contact: None,
                down_since: Some(Instant::now()),
            })),
            served: None,
            liveness_grace: Duration::from_secs(120),
        }
    }

    /// Readiness also waits for the Workload API served on `socket` to hold an X.509-SVID and
    /// JWT bundles (what an app's SPIFFE client asks for first).
    pub fn serving(mut self, socket: &std::path::Path, served: Served) -> Self {
        self.served = Some((socket.display().to_string(), served));
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn x509(&self, status: WriteStatus, expiry: Option<i64>) {
        let mut inner = self.lock();
        inner.x509 = Some(status);
        if expiry.is_some() {
            inner.x509_expiry = expiry;
        }
    }

    pub fn jwt(&self, path: &str, status: WriteStatus, expiry: Option<i64>) {
        let mut inner = self.lock();
        let entry = inner.jwt.entry(path.to_owned()).or_insert((WriteStatus::Unwritten, None));
        entry.0 = status;
        if expiry.is_some() {
            entry.1 = expiry;
        }
    }

    pub fn connected(&self) {
        let mut inner = self.lock();
        inner.last_contact = Some(Instant::now());
        inner.down_since = None;
    }

    pub fn disconnected(&self) {
        let mut inner = self.lock();
        if inner.down_since.is_none() {
            inner.down_since = Some(Instant::now());
        }
    }

    /// Every configured output written, and nothing written has expired (`now` in Unix seconds).
    pub fn ready(&self, now: i64) -> bool {
        if self.served.as_ref().is_some_and(|(_, served)| !served.complete()) {
            return false;
        }
        let inner = self.lock();
        let configured = inner.x509.is_some() || !inner.jwt.is_empty() || self.served.is_some();
        let x509_ok = inner.x509.is_none_or(|s| s == WriteStatus::Written) && inner.x509_expiry.is_none_or(|e| e > now);
        let jwt_ok = inner.jwt.values().all(|(s, e)| *s == WriteStatus::Written && e.is_none_or(|e| e > now));
        configured && x509_ok && jwt_ok
    }

    /// No failed write, and the Workload API not lost for longer than the grace period.
    pub fn live(&self) -> bool {
        let inner = self.lock();
        let failed =
            inner.x509 == Some(WriteStatus::Failed) || inner.jwt.values().any(|(s, _)| *s == WriteStatus::Failed);
        let lost = inner.down_since.is_some_and(|since| since.elapsed() > self.liveness_grace);
        !failed && !lost
    }

    /// spiffe-helper's body.
    pub fn body(&self, ok: bool) -> serde_json::Value {
        let inner = self.lock();
        let mut statuses = serde_json::Map::new();
        if let Some(x509) = inner.x509 {
            statuses.insert("x509_write_status".into(), json!(x509.as_str()));
        }
        if !inner.jwt.is_empty() {
            let jwt: serde_json::Map<String, serde_json::Value> =
                inner.jwt.iter().map(|(path, (s, _))| (path.clone(), json!(s.as_str()))).collect();
            statuses.insert("jwt_write_status".into(), serde_json::Value::Object(jwt));
        }
        let mut health = json!({"file_write_statuses": statuses});
        if let Some((socket, served)) = &self.served {
            health["workload_api"] = json!({
                "socket": socket,
                "status": if served.complete() { "serving" } else { "waiting for an X.509-SVID and JWT bundles" },
            });
        }
        json!({"status": if ok { "OK" } else { "Service Unavailable" }, "health": health})
    }
}

pub fn router(health: Health, liveness_path: &str, readiness_path: &str) -> Router {
    Router::new().route(liveness_path, get(live)).route(readiness_path, get(ready)).with_state(health)
}

fn answer(health: &Health, ok: bool) -> Response {
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(health.body(ok))).into_response()
}

async fn live(State(health): State<Health>) -> Response {
    let ok = health.live();
    answer(&health, ok)
}

async fn ready(State(health): State<Health>) -> Response {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let ok = health.ready(now);
    answer(&health, ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_only_when_everything_is_written_and_fresh() {
        let health = Health::new(true, ["/svids/jwt.token".to_owned(), "/svids/key.jwt".to_owned()]);
        assert!(!health.ready(100));
        health.x509(WriteStatus::Written, Some(1000));
        health.jwt("/svids/jwt.token", WriteStatus::Written, Some(1000));
        assert!(!health.ready(100), "the bundle is not written yet");
        health.jwt("/svids/key.jwt", WriteStatus::Written, None);
        assert!(health.ready(100));
        assert!(!health.ready(2000), "what was written has expired");
        let body = health.body(true);
        assert_eq!(body["status"], "OK");
        assert_eq!(body["health"]["file_write_statuses"]["x509_write_status"], "written");
        assert_eq!(body["health"]["file_write_statuses"]["jwt_write_status"]["/svids/key.jwt"], "written");
    }

    #[tokio::test]
    async fn nothing_configured_is_never_ready() {
        let health = Health::new(false, Vec::new());
        assert!(!health.ready(0), "spiffe-helper #423: healthy with no outputs");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_agent_connection_ends_liveness_after_the_grace() {
        let health = Health::new(true, Vec::new());
        health.connected();
        assert!(health.live());
        health.disconnected();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(health.live(), "within the grace period");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!health.live());
        health.connected();
        assert!(health.live());
        health.x509(WriteStatus::Failed, None);
        assert!(!health.live());
    }
}
