//! Serving HTTP to clients the operator does not control: the API server's webhook calls, agents
//! asking the identity issuer, scrapers of the admin port. One accept loop for all three, so each
//! gets the same defences: a TLS handshake deadline, a deadline for a request's headers (a client
//! that opens connections and never finishes a request is closed, not kept), a deadline for the
//! whole request (a body trickled in byte by byte), and a body limit read before any parsing.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tracing::{debug, info, warn};

/// What one server accepts from a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A TLS handshake not finished by then is dropped.
    pub handshake_timeout: Duration,
    /// A request's headers (HTTP/1) not received by then close the connection; also how long an
    /// idle keep-alive connection waits for its next request.
    pub header_timeout: Duration,
    /// A request (body included) not read and answered by then gets `408 Request Timeout`.
    pub request_timeout: Duration,
    /// Larger bodies get `413 Payload Too Large` before anything parses them.
    pub body_limit: usize,
}

impl Limits {
    /// The admission webhook: the API server sends AdmissionReviews of at most ~3 MiB (its request
    /// size limit) and gives up on a webhook after its own timeout (10 s by default, 30 s at most).
    pub const WEBHOOK: Limits = Limits {
        handshake_timeout: Duration::from_secs(10),
        header_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
        body_limit: 4 * 1024 * 1024,
    };

    /// The identity issuer: CSRs and JWT-SVID requests are a few KiB.
    pub const ISSUER: Limits = Limits { body_limit: 64 * 1024, ..Limits::WEBHOOK };

    /// The admin port (`/metrics`, probes): GETs without bodies.
    pub const ADMIN: Limits = Limits { body_limit: 16 * 1024, ..Limits::WEBHOOK };

    /// `router` with the body limit and the request deadline.
    pub fn apply(&self, router: Router) -> Router {
        router.layer(axum::middleware::from_fn_with_state(*self, guard)).layer(DefaultBodyLimit::max(self.body_limit))
    }
}

// Checked when compiled: the API server sends at most ~3 MiB and waits at most 30 s.
const _: () = assert!(Limits::WEBHOOK.body_limit > 3 * 1024 * 1024 && Limits::WEBHOOK.request_timeout.as_secs() >= 30);

/// Refuses a body announced larger than the limit at once (`413`, nothing read), and answers
/// `408` for a request (its body included: extractors read it inside `next`) that takes longer
/// than the deadline.
async fn guard(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    let announced = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|length| length > limits.body_limit as u64) {
        let message = format!("bodies are at most {} bytes", limits.body_limit);
        return (StatusCode::PAYLOAD_TOO_LARGE, message).into_response();
    }
    let deadline = limits.request_timeout;
    match tokio::time::timeout(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            (StatusCode::REQUEST_TIMEOUT, format!("the request was not complete within {deadline:?}")).into_response()
        }
    }
}

/// Serves `router` on `listener` (over TLS when `tls` is given) with `limits`, until `shutdown`
/// resolves. Each connection is served on its own task: one slow client holds up no other.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let router = limits.apply(router);
    info!(addr = %listener.local_addr()?, tls = tls.is_some(), "listening");
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accept failed");
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let tls = tls.clone();
        tokio::spawn(async move {
            let Some(tls) = tls else {
                return serve_connection(TokioIo::new(stream), service, limits, peer).await;
            };
            match tokio::time::timeout(limits.handshake_timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(TokioIo::new(stream), service, limits, peer).await,
                Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => debug!(%peer, "TLS handshake not finished in time"),
            }
        });
    }
}

async fn serve_connection<I>(io: I, service: TowerToHyperService<Router>, limits: Limits, peer: std::net::SocketAddr)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    // HTTP/2: a peer that stops answering pings is dropped.
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(limits.header_timeout);
    if let Err(error) = builder.serve_connection(io, service).await {
        debug!(%peer, %error, "connection ended with an error");
    }
}

/// A TLS acceptor over `certs` (swapped while running), offering HTTP/2 and HTTP/1.1.
pub fn tls_acceptor(
    certs: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<tokio_rustls::TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

#[cfg(test)]
mod tests;
