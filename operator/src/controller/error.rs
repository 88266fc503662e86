//! Why a reconcile failed: one variant per cause, each cause said once.

use kube::runtime::finalizer;

use crate::plan::SelectorError;
use crate::slim::{CmError, NameError};
use crate::tls::control::TlsFailure;

/// Reconcile failures. `reason()` is the PascalCase label used for metrics and Warning events.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(kube::Error),
    /// A failed apply or cleanup reads as its own cause; the finalizer's bookkeeping errors keep
    /// kube's wording.
    #[error("{}", finalizer_message(.0))]
    Finalizer(Box<finalizer::Error<Error>>),
    #[error("object has no namespace")]
    MissingNamespace,
    #[error("spec.name: {0}")]
    InvalidName(NameError),
    #[error("spec.nodes.selector: {0}")]
    InvalidSelector(SelectorError),
    #[error("Secret {name}: {reason}")]
    Secret { name: String, reason: String },
    #[error("{summary}")]
    NodeUnreachable { summary: String, tls: Option<TlsFailure> },
    #[error("{0}")]
    RouteRejected(String),
    #[error("deletion waits for {0} node(s) to confirm the route is removed")]
    CleanupPending(usize),
    #[error("no channel manager: set spec.channelManager.endpoint or run the operator with --channel-manager")]
    NoChannelManager,
    #[error("{0}")]
    ChannelManager(CmError),
    #[error("deleting the channel: {0}")]
    ChannelCleanupPending(CmError),
    #[error("mlsEnabled changed on a live channel; the operator refuses to recreate it")]
    MlsChangeRefused,
    #[error("control TLS: {0}")]
    ControlTls(String),
    #[error(
        "no running Pod found behind the channel manager endpoint {0} (a Pod IP, or a Service with a selector, in this cluster)"
    )]
    ManagerNotInCluster(String),
}

fn finalizer_message(error: &finalizer::Error<Error>) -> String {
    match error {
        finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => inner.to_string(),
        other => format!("finalizer: {other}"),
    }
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApiError",
            Error::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.reason(),
                _ => "FinalizerError",
            },
            Error::MissingNamespace => "MissingNamespace",
            Error::InvalidName(_) => "InvalidName",
            Error::InvalidSelector(_) => "InvalidSelector",
            Error::Secret { .. } => "SecretUnavailable",
            Error::NodeUnreachable { tls, .. } => tls.map_or("NodeUnreachable", TlsFailure::reason),
            Error::RouteRejected(_) => "RouteRejected",
            Error::CleanupPending(_) => "CleanupPending",
            Error::NoChannelManager => "NoChannelManager",
            Error::ChannelManager(CmError::Refused { .. }) => "ChannelManagerRefused",
            Error::ChannelManager(error) => error.tls_failure().map_or("ChannelManagerUnavailable", TlsFailure::reason),
            Error::ChannelCleanupPending(_) => "CleanupPending",
            Error::MlsChangeRefused => "MlsChangeRefused",
            Error::ControlTls(_) => "ControlTlsInvalid",
            Error::ManagerNotInCluster(_) => "ChannelManagerNotInCluster",
        }
    }
}
