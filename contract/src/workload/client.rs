//! Workload API client over the agent's Unix socket. Every request carries the
//! `workload.spiffe.io: true` header the specification requires.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::codegen::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status, Streaming};

use super::pb;
use super::pb::spiffe_workload_api_client::SpiffeWorkloadApiClient;

/// Adds the security header.
#[derive(Clone, Copy, Debug, Default)]
pub struct SecurityHeader;

impl Interceptor for SecurityHeader {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("workload.spiffe.io", tonic::metadata::MetadataValue::from_static("true"));
        Ok(request)
    }
}

/// How a Workload API call failed, as the specification tells clients to treat it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    /// Retry with backoff: the agent is not there (yet), or the stream broke.
    #[error("SPIRE agent socket {socket}: {reason}")]
    Unavailable { socket: PathBuf, reason: String },
    /// Retry with backoff: no identity issued to this workload (yet).
    #[error("no identity issued yet (PermissionDenied): {0}")]
    PermissionDenied(String),
    /// Do not retry: the request is wrong (or the security header was refused).
    #[error("the Workload API refused the request (InvalidArgument): {0}")]
    InvalidArgument(String),
    #[error("Workload API error {code:?}: {message}")]
    Other { code: Code, message: String },
}

impl WorkloadError {
    pub fn from_status(socket: &Path, status: &Status) -> Self {
        match status.code() {
            Code::PermissionDenied => Self::PermissionDenied(status.message().to_owned()),
            Code::InvalidArgument => Self::InvalidArgument(status.message().to_owned()),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Internal => {
                Self::Unavailable { socket: socket.to_owned(), reason: status.message().to_owned() }
            }
            code => Self::Other { code, message: status.message().to_owned() },
        }
    }

    /// InvalidArgument ends the agent; everything else is retried.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::InvalidArgument(_))
    }
}

#[derive(Clone)]
pub struct WorkloadClient {
    socket: PathBuf,
    inner: SpiffeWorkloadApiClient<InterceptedService<Channel, SecurityHeader>>,
}

impl WorkloadClient {
    /// Connects to the agent socket; a missing socket is reported with its path.
    pub async fn connect(socket: &Path) -> Result<Self, WorkloadError> {
        if !socket.exists() {
            return Err(WorkloadError::Unavailable {
                socket: socket.to_owned(),
                reason: "does not exist (is the SPIRE agent running, and the socket mounted?)".into(),
            });
        }
        let path = socket.to_owned();
        // The URI is ignored: the connector dials the socket.
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await
            .map_err(|e| WorkloadError::Unavailable {
                socket: socket.to_owned(),
                reason: slim_k8s_common::error_chain(&e),
            })?;
        Ok(Self {
            socket: socket.to_owned(),
            inner: SpiffeWorkloadApiClient::with_interceptor(channel, SecurityHeader),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn x509_svids(&self) -> Result<Streaming<pb::X509svidResponse>, WorkloadError> {
        let mut inner = self.inner.clone();
        inner
            .fetch_x509svid(pb::X509svidRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| WorkloadError::from_status(&self.socket, &s))
    }

    pub async fn jwt_bundles(&self) -> Result<Streaming<pb::JwtBundlesResponse>, WorkloadError> {
        let mut inner = self.inner.clone();
        inner
            .fetch_jwt_bundles(pb::JwtBundlesRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| WorkloadError::from_status(&self.socket, &s))
    }

    pub async fn jwt_svids(&self, audiences: &[String]) -> Result<Vec<pb::Jwtsvid>, WorkloadError> {
        self.jwt_svids_of(audiences, "").await
    }

    /// JWT-SVIDs for `audiences`, of `spiffe_id` only when it is not empty.
    pub async fn jwt_svids_of(&self, audiences: &[String], spiffe_id: &str) -> Result<Vec<pb::Jwtsvid>, WorkloadError> {
        let mut inner = self.inner.clone();
        let request = pb::JwtsvidRequest { audience: audiences.to_vec(), spiffe_id: spiffe_id.to_owned() };
        inner
            .fetch_jwtsvid(request)
            .await
            .map(|r| r.into_inner().svids)
            .map_err(|s| WorkloadError::from_status(&self.socket, &s))
    }
}
