//! The issuer's HTTPS surface (every replica serves it; no leadership needed): the bundle for
//! anyone, SVIDs for authenticated pods, each issuance and refusal logged and counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;
use sha2::{Digest, Sha256};
use slim_identity_contract::issuer_api as api;
use tokio::sync::watch;
use tracing::{info, warn};

use super::authority::{Authority, SignError};
use super::review::{Caller, Refusal, Reviewer};
use crate::metrics::Metrics;

/// Everything a request needs.
#[derive(Clone)]
pub struct IssuerState {
    pub authority: watch::Receiver<Option<Arc<Authority>>>,
    pub reviewer: Reviewer,
    pub limiter: Arc<RateLimiter>,
    pub metrics: Arc<Metrics>,
    /// How often agents fetch the bundle again (seconds).
    pub refresh_hint: u64,
}

pub fn router(state: IssuerState) -> Router {
    Router::new()
        .route(api::BUNDLE_PATH, get(bundle))
        .route(api::SPIFFE_BUNDLE_PATH, get(spiffe_bundle))
        .route(api::X509_SVID_PATH, post(x509_svid))
        .route(api::JWT_SVID_PATH, post(jwt_svid))
        .with_state(state)
}

/// A request that was not served: the HTTP status, the reason it is counted under, the message.
/// Answered as a Kubernetes `Status` (what the agent's client parses).
#[derive(Debug)]
pub struct Failure {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl Failure {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into() }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "IssuerUnavailable", message)
    }
}

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Self {
        let code = match refusal {
            Refusal::NoToken | Refusal::NotAuthenticated { .. } => StatusCode::UNAUTHORIZED,
            _ => StatusCode::FORBIDDEN,
        };
        Self::new(code, refusal.reason(), refusal.to_string())
    }
}

impl From<SignError> for Failure {
    fn from(error: SignError) -> Self {
        match error {
            SignError::BadCsr(_) => Self::new(StatusCode::BAD_REQUEST, "BadCsr", error.to_string()),
            SignError::WrongSpiffeId { .. } => Self::new(StatusCode::FORBIDDEN, "WrongSpiffeId", error.to_string()),
            SignError::BadAudiences(_) => Self::new(StatusCode::BAD_REQUEST, "BadAudiences", error.to_string()),
            SignError::Keys(_) => Self::unavailable(error.to_string()),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "code": self.code.as_u16(), "reason": self.reason, "message": self.message,
        });
        (self.code, Json(body)).into_response()
    }
}

fn authority(state: &IssuerState) -> Result<Arc<Authority>, Failure> {
    state.authority.borrow().clone().ok_or_else(|| Failure::unavailable("the issuer's keys are not loaded yet"))
}

async fn bundle(State(state): State<IssuerState>) -> Result<Json<api::Bundle>, Failure> {
    Ok(Json(authority(&state)?.bundle(state.refresh_hint)?))
}

async fn spiffe_bundle(State(state): State<IssuerState>) -> Result<Json<serde_json::Value>, Failure> {
    Ok(Json(authority(&state)?.spiffe_bundle(state.refresh_hint)?))
}

async fn x509_svid(
    State(state): State<IssuerState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<api::X509SvidResponse>, Failure> {
    issue(&state, &headers, &body, "x509", |authority, spiffe_id, request: api::X509SvidRequest| {
        let csr = STANDARD
            .decode(request.csr)
            .map_err(|e| Failure::new(StatusCode::BAD_REQUEST, "BadCsr", format!("csr: {e}")))?;
        let (chain, expires_at) = authority.sign_csr(&csr, spiffe_id, slim_k8s_common::unix_now())?;
        let chain = chain.iter().map(|d| STANDARD.encode(d)).collect();
        Ok((api::X509SvidResponse { spiffe_id: spiffe_id.to_owned(), chain, expires_at }, expires_at))
    })
    .await
}

async fn jwt_svid(
    State(state): State<IssuerState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<api::JwtSvidResponse>, Failure> {
    issue(&state, &headers, &body, "jwt", |authority, spiffe_id, request: api::JwtSvidRequest| {
        let (token, expires_at) = authority.mint_jwt(spiffe_id, &request.audiences, slim_k8s_common::unix_now())?;
        Ok((api::JwtSvidResponse { spiffe_id: spiffe_id.to_owned(), token, expires_at }, expires_at))
    })
    .await
}

/// One SVID request: the caller authenticated, the body parsed, `sign` run for the caller's
/// SPIFFE ID; the outcome logged (never the token) and counted.
async fn issue<Request, Response>(
    state: &IssuerState,
    headers: &HeaderMap,
    body: &[u8],
    kind: &'static str,
    sign: impl FnOnce(&Authority, &str, Request) -> Result<(Response, i64), Failure>,
) -> Result<Json<Response>, Failure>
where
    Request: serde::de::DeserializeOwned,
{
    let start = Instant::now();
    let result: Result<_, Failure> = async {
        let caller = authenticate(state, headers).await?;
        let request: Request = parse(body)?;
        let authority = authority(state)?;
        let spiffe_id = api::spiffe_id(&authority.set.trust_domain, &caller.namespace, &caller.service_account);
        let (response, expires_at) = sign(&authority, &spiffe_id, request)?;
        info!(kind, %spiffe_id, pod = %caller.pod, namespace = %caller.namespace, expires_at, "SVID issued");
        Ok(response)
    }
    .await;
    state.metrics.issuer_outcome(kind, result.as_ref().err().map(|f| f.reason), start.elapsed());
    result.map(Json).inspect_err(log_refusal)
}

fn log_refusal(failure: &Failure) {
    warn!(reason = failure.reason, code = failure.code.as_u16(), message = %failure.message, "SVID not issued");
}

/// Bodies are small; anything else is refused before it is read into a type.
const MAX_BODY: usize = 64 * 1024;

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    if body.len() > MAX_BODY {
        return Err(Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "TooLarge",
            format!("bodies are at most {MAX_BODY} bytes"),
        ));
    }
    serde_json::from_slice(body).map_err(|e| Failure::new(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()))
}

/// The bearer token, rate-limited (per token: a pod holds one at a time) before the API server
/// is asked about it, then reviewed.
async fn authenticate(state: &IssuerState, headers: &HeaderMap) -> Result<Caller, Failure> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(Refusal::NoToken)?;
    let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    if !state.limiter.allow(key, Instant::now()) {
        return Err(Failure::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RateLimited",
            "too many requests from this pod; retry later",
        ));
    }
    let start = Instant::now();
    let reviewed = state.reviewer.review(token).await;
    state.metrics.issuer_review(start.elapsed());
    match reviewed {
        Ok(Ok(caller)) => Ok(caller),
        Ok(Err(refusal)) => Err(refusal.into()),
        Err(unavailable) => Err(Failure::unavailable(format!("cannot check the token now: {unavailable}"))),
    }
}

/// A token bucket per key: `rate` a second, up to `burst`; idle buckets are forgotten.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<[u8; 32], (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u32) -> Self {
        Self { rate, burst: f64::from(burst), buckets: Mutex::default() }
    }

    pub fn allow(&self, key: [u8; 32], now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 100_000 {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = buckets.entry(key).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_rate_limiter_allows_a_burst_then_the_rate_per_key() {
        let limiter = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        let allowed = (0..5).filter(|_| limiter.allow([1; 32], t0)).count();
        assert_eq!(allowed, 3);
        assert!(limiter.allow([2; 32], t0), "another pod has its own bucket");
        assert!(!limiter.allow([1; 32], t0 + Duration::from_millis(400)));
        assert!(limiter.allow([1; 32], t0 + Duration::from_millis(600)));
    }

    #[test]
    fn refusals_answer_as_kubernetes_statuses_with_their_reason() {
        let failure: Failure = Refusal::PodGone { namespace: "a".into(), pod: "b".into() }.into();
        assert_eq!((failure.code, failure.reason), (StatusCode::FORBIDDEN, "PodGone"));
        let failure: Failure = SignError::BadAudiences("17 audiences".into()).into();
        assert_eq!((failure.code, failure.reason), (StatusCode::BAD_REQUEST, "BadAudiences"));
        let failure: Failure = Refusal::NoToken.into();
        assert_eq!(failure.code, StatusCode::UNAUTHORIZED);
    }
}
