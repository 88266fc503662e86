//! The Workload API the agent serves to its own pod, on a Unix socket in the pod's shared volume.
//!
//! SLIM's `spire` identity provider and verifier need a Workload API (its JWT-SVIDs carry the
//! app's own public key in a `slim-claims:` audience; see the README). The agent serves one from
//! what it holds, the way Istio's agent serves SDS to its proxy:
//! - the streams (X.509-SVIDs, X.509 bundles, JWT bundles) from the agent's latest state, so an
//!   app keeps its identity while the upstream (the SPIRE agent) restarts: the full state on
//!   connect and on every change, `PermissionDenied` while the agent holds nothing;
//! - FetchJWTSVID from a [`JwtSvidIssuer`] (per request: every app key asks for other audiences);
//! - ValidateJWTSVID against the JWT bundles the agent holds.
//!
//! Every call must carry `workload.spiffe.io: true` (`InvalidArgument` otherwise), as the
//! specification says.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::pb;
use super::pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use crate::svid::jwt::{self, JwtBundles};

/// The socket's default path in an injected pod (the directory is the shared volume).
pub use slim_identity_contract::paths::WORKLOAD_API_SOCKET as DEFAULT_SOCKET;
pub use slim_identity_contract::workload::audiences::{MAX_AUDIENCE_BYTES, MAX_AUDIENCES};

/// What the agent holds and serves: the latest upstream state (`None`: nothing, or withdrawn).
#[derive(Clone)]
pub struct Served {
    x509: watch::Sender<Option<pb::X509svidResponse>>,
    bundles: watch::Sender<Option<pb::JwtBundlesResponse>>,
    /// Serve only the SVIDs with this hint (the agent's `hint`), when set.
    hint: String,
}

impl Served {
    pub fn new(hint: &str) -> Self {
        Self { x509: watch::channel(None).0, bundles: watch::channel(None).0, hint: hint.to_owned() }
    }

    /// A new X.509 state from upstream (kept to the hinted SVID). Unchanged state wakes nobody.
    pub fn set_x509(&self, response: Option<pb::X509svidResponse>) {
        let response = response.and_then(|r| select_hinted(r, &self.hint));
        self.x509.send_if_modified(|held| replace_if_changed(held, response));
    }

    pub fn set_bundles(&self, response: Option<pb::JwtBundlesResponse>) {
        self.bundles.send_if_modified(|held| replace_if_changed(held, response));
    }

    /// Whether an app connecting now gets an X.509-SVID and JWT bundles (readiness).
    pub fn complete(&self) -> bool {
        self.x509.borrow().is_some() && self.bundles.borrow().is_some()
    }

    /// The JWT bundles held, by trust domain name.
    pub fn jwt_bundles(&self) -> Option<JwtBundles> {
        self.bundles.borrow().clone().map(crate::agent::bundles_of)
    }

    /// Waits until the state is [`Served::complete`].
    pub async fn wait_complete(&self) {
        let mut x509 = self.x509.subscribe();
        let mut bundles = self.bundles.subscribe();
        while !self.complete() {
            tokio::select! {
                _ = x509.changed() => {}
                _ = bundles.changed() => {}
            }
        }
    }
}

fn replace_if_changed<T: PartialEq>(held: &mut Option<T>, new: Option<T>) -> bool {
    if *held == new {
        return false;
    }
    *held = new;
    true
}

/// The response with only the hinted SVID (all of them without a hint); `None` when the hint
/// matches none.
fn select_hinted(mut response: pb::X509svidResponse, hint: &str) -> Option<pb::X509svidResponse> {
    if !hint.is_empty() {
        response.svids.retain(|svid| svid.hint == hint);
    }
    (!response.svids.is_empty()).then_some(response)
}

/// Where FetchJWTSVID gets its tokens.
#[tonic::async_trait]
pub trait JwtSvidIssuer: Send + Sync + 'static {
    /// JWT-SVIDs for `audiences` (passed through unchanged), of `spiffe_id` when not empty.
    async fn fetch(&self, audiences: Vec<String>, spiffe_id: String) -> Result<Vec<pb::Jwtsvid>, Status>;
}

/// Forwards FetchJWTSVID to the upstream Workload API (a SPIRE agent), keeping the hinted SVID.
pub struct Upstream {
    pub socket: PathBuf,
    pub hint: String,
}

#[tonic::async_trait]
impl JwtSvidIssuer for Upstream {
    async fn fetch(&self, audiences: Vec<String>, spiffe_id: String) -> Result<Vec<pb::Jwtsvid>, Status> {
        let unreachable = |error: super::WorkloadError| match error {
            super::WorkloadError::PermissionDenied(message) => Status::permission_denied(message),
            super::WorkloadError::InvalidArgument(message) => Status::invalid_argument(message),
            other => Status::unavailable(format!("the upstream Workload API cannot issue JWT-SVIDs now: {other}")),
        };
        let client = super::WorkloadClient::connect(&self.socket).await.map_err(unreachable)?;
        let mut svids = client.jwt_svids_of(&audiences, &spiffe_id).await.map_err(unreachable)?;
        if !self.hint.is_empty() {
            svids.retain(|svid| svid.hint == self.hint);
        }
        Ok(svids)
    }
}

/// The gRPC service.
struct Service {
    served: Served,
    issuer: Arc<dyn JwtSvidIssuer>,
}

type Pushes<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The specification's security header: `InvalidArgument` without it.
pub(crate) fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    match request.metadata().get("workload.spiffe.io").and_then(|v| v.to_str().ok()) {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument("security header missing from request")),
    }
}

fn no_identity() -> Status {
    Status::permission_denied("no identity issued (the agent holds no SVID for this workload yet)")
}

/// The held state rendered by `render`: now, then on every change that changes what is sent;
/// `PermissionDenied` (and the end of the stream) when the state is withdrawn or never came.
fn pushes<S, T>(held: watch::Receiver<Option<S>>, render: fn(&S) -> T) -> Pushes<T>
where
    S: Send + Sync + 'static,
    T: Clone + PartialEq + Send + 'static,
{
    let stream = futures::stream::unfold((Some(held), None::<T>), move |(held, last)| async move {
        let mut held = held?;
        loop {
            let next = held.borrow_and_update().as_ref().map(render);
            match next {
                None => return Some((Err(no_identity()), (None, last))),
                Some(value) if last.as_ref() != Some(&value) => {
                    return Some((Ok(value.clone()), (Some(held), Some(value))));
                }
                Some(_) => {}
            }
            if held.changed().await.is_err() {
                return Some((Err(Status::unavailable("the agent is stopping")), (None, last)));
            }
        }
    });
    Box::pin(stream)
}

/// The X.509 bundles of an X.509-SVID state: the SVID's trust domain and the federated ones.
pub fn x509_bundles(response: &pb::X509svidResponse) -> pb::X509BundlesResponse {
    let mut bundles: BTreeMap<String, Vec<u8>> =
        response.federated_bundles.iter().map(|(td, der)| (td.clone(), der.clone())).collect();
    if let Some(svid) = response.svids.first()
        && let Some(td) = crate::svid::x509::trust_domain_of(&svid.spiffe_id)
    {
        bundles.insert(format!("spiffe://{td}"), svid.bundle.clone());
    }
    pb::X509BundlesResponse { crl: response.crl.clone(), bundles: bundles.into_iter().collect() }
}

/// Refuses audience lists no app needs (the contract's rule, as the Workload API answers it).
pub fn check_audiences(audiences: &[String]) -> Result<(), Status> {
    slim_identity_contract::workload::audiences::check(audiences).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Service {
    type FetchX509SVIDStream = Pushes<pb::X509svidResponse>;
    type FetchJWTBundlesStream = Pushes<pb::JwtBundlesResponse>;
    type FetchX509BundlesStream = Pushes<pb::X509BundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        Ok(Response::new(pushes(self.served.x509.subscribe(), Clone::clone)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        Ok(Response::new(pushes(self.served.x509.subscribe(), x509_bundles)))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        Ok(Response::new(pushes(self.served.bundles.subscribe(), Clone::clone)))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        check_header(&request)?;
        let request = request.into_inner();
        check_audiences(&request.audience)?;
        if self.served.x509.borrow().is_none() {
            return Err(no_identity());
        }
        let svids = self.issuer.fetch(request.audience, request.spiffe_id).await.inspect_err(|status| {
            warn!(code = ?status.code(), message = status.message(), "FetchJWTSVID for the app failed");
        })?;
        if svids.is_empty() {
            return Err(no_identity());
        }
        debug!(svids = svids.len(), "FetchJWTSVID served");
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let request = request.into_inner();
        if request.audience.is_empty() || request.svid.is_empty() {
            return Err(Status::invalid_argument("audience and svid must be specified"));
        }
        let bundles = self.served.jwt_bundles().ok_or_else(no_identity)?;
        validate(&request, &bundles).map(Response::new)
    }
}

/// ValidateJWTSVID's answer: the token checked against `bundles` for the request's audience
/// (`InvalidArgument` with the reason otherwise), its SPIFFE ID and claims.
pub(crate) fn validate(
    request: &pb::ValidateJwtsvidRequest,
    bundles: &JwtBundles,
) -> Result<pb::ValidateJwtsvidResponse, Status> {
    let now = crate::agent::unix_now();
    let valid = jwt::validate(&request.svid, bundles, std::slice::from_ref(&request.audience), now, 0)
        .map_err(|error| Status::invalid_argument(error.to_string()))?;
    let claims = jwt::unverified_claims::<serde_json::Map<String, serde_json::Value>>(&request.svid)
        .map(|c| json_struct(&c))
        .ok();
    Ok(pb::ValidateJwtsvidResponse { spiffe_id: valid.spiffe_id, claims })
}

/// A JSON object as a protobuf `Struct` (ValidateJWTSVID's claims).
fn json_struct(object: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct { fields: object.iter().map(|(k, v)| (k.clone(), json_value(v))).collect() }
}

fn json_value(value: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => {
            Kind::ListValue(prost_types::ListValue { values: items.iter().map(json_value).collect() })
        }
        serde_json::Value::Object(object) => Kind::StructValue(json_struct(object)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Binds the socket (replacing a stale one, creating its directory) and returns the server, to
/// be run by the caller's supervisor. The socket is `0666` so the app's user can connect: what
/// keeps it in the pod is the directory, a pod-local volume.
pub fn bind(
    socket: &Path,
    served: Served,
    issuer: Arc<dyn JwtSvidIssuer>,
) -> std::io::Result<impl Future<Output = Result<(), tonic::transport::Error>> + use<>> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(socket) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
    info!(socket = %socket.display(), "serving the Workload API to the pod");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let service = SpiffeWorkloadApiServer::new(Service { served, issuer });
    Ok(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming))
}

// The tests use the fake upstream, which only exists with the `dev` feature.
#[cfg(all(test, feature = "dev"))]
mod tests;
