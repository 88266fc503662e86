//! Client of the SLIM channel manager (the moderator of group channels).
//!
//! Application errors come back as `success = false` + `error_msg`, not gRPC codes; they are
//! classified here so callers can treat "already exists" and "not found" as the idempotent
//! outcomes they are.

use super::model::Unreachable;
use super::pool::ClientPool;
use super::wording::{self, Said};
use crate::tls::control::TlsSource;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::transport::Channel;

use super::pb::channel_manager::v1 as cm;
use super::pb::channel_manager::v1::channel_manager_service_client::ChannelManagerServiceClient;

/// Deadline of quick calls (create, delete, list).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of an invite: the manager takes ~11 s to fail one for an offline participant.
const INVITE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmError {
    #[error("channel manager {endpoint} unreachable: {cause}")]
    Unavailable { endpoint: String, cause: Unreachable },
    #[error("channel manager {endpoint}: {op} did not answer within {timeout:?}")]
    Timeout { endpoint: String, op: &'static str, timeout: Duration },
    #[error("channel {0} not found")]
    ChannelNotFound(String),
    #[error("channel manager refused {op}: {message}")]
    Refused { op: &'static str, message: String, said: Said },
    #[error("invalid channel manager endpoint {endpoint:?}: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
}

impl CmError {
    /// The manager itself cannot act (unreachable, or it lost its SLIM node): nothing about the
    /// participant, so retried soon rather than with a participant's growing backoff.
    pub fn manager_down(&self) -> bool {
        matches!(self, CmError::Unavailable { .. } | CmError::Refused { said: Said::NoRoute, .. })
    }

    /// The TLS failure that kept the manager unreachable, when that is the cause.
    pub fn tls_failure(&self) -> Option<crate::tls::control::TlsFailure> {
        match self {
            CmError::Unavailable { cause, .. } => cause.tls_failure(),
            _ => None,
        }
    }
}

/// Calls made, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct CmStats {
    pub calls: AtomicU64,
}

#[derive(Clone)]
pub struct ChannelManagerClient {
    endpoint: Arc<str>,
    client: ChannelManagerServiceClient<Channel>,
    stats: Arc<CmStats>,
}

impl ChannelManagerClient {
    /// A client that connects on first use (and reconnects by itself).
    pub fn new(endpoint: &str) -> Result<Self, CmError> {
        Self::with_tls(endpoint, None)
    }

    /// The same over TLS from `tls` (an `https://` endpoint): each new connection takes the
    /// material it holds then.
    pub fn with_tls(endpoint: &str, tls: Option<TlsSource>) -> Result<Self, CmError> {
        let builder = tonic::transport::Endpoint::from_shared(crate::tls::control::plain_uri(endpoint))
            .map_err(|e| CmError::BadEndpoint { endpoint: endpoint.to_owned(), reason: e.to_string() })?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let channel = match tls {
            None => builder.connect_lazy(),
            Some(tls) => builder.connect_with_connector_lazy(crate::tls::control::connector(
                move || tls.current(),
                Duration::from_secs(5),
            )),
        };
        Ok(Self {
            endpoint: endpoint.into(),
            client: ChannelManagerServiceClient::new(channel),
            stats: Arc::new(CmStats::default()),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn stats(&self) -> &CmStats {
        &self.stats
    }

    /// Creates the channel; one that already exists counts as created.
    pub async fn create_channel(&self, channel: &str, mls_enabled: bool) -> Result<(), CmError> {
        let request = cm::CreateChannelRequest { channel_name: channel.to_owned(), mls_enabled };
        let mut client = self.client.clone();
        let response = self.call("CreateChannel", CALL_TIMEOUT, client.create_channel(request)).await?;
        match command_result(&response) {
            Ok(()) => Ok(()),
            Err(message) if Said::of(&message) == Said::AlreadyExists => Ok(()),
            Err(message) => Err(classify(channel, "CreateChannel", message)),
        }
    }

    /// Deletes the channel; one that is gone counts as deleted.
    pub async fn delete_channel(&self, channel: &str) -> Result<(), CmError> {
        let request = cm::DeleteChannelRequest { channel_name: channel.to_owned() };
        let mut client = self.client.clone();
        let response = self.call("DeleteChannel", CALL_TIMEOUT, client.delete_channel(request)).await?;
        match command_result(&response) {
            Ok(()) => Ok(()),
            Err(message) if Said::of(&message) == Said::NotFound => Ok(()),
            Err(message) => Err(classify(channel, "DeleteChannel", message)),
        }
    }

    /// Invites a participant (by its name without instance). Fails after ~11 s when it is offline.
    pub async fn add_participant(&self, channel: &str, participant: &str) -> Result<(), CmError> {
        let request =
            cm::ParticipantRequest { channel_name: channel.to_owned(), participant_name: participant.to_owned() };
        let mut client = self.client.clone();
        let response = self.call("AddParticipant", INVITE_TIMEOUT, client.add_participant(request)).await?;
        command_result(&response).map_err(|message| classify(channel, "AddParticipant", message))
    }

    /// Removes a participant. A member that is gone ("not found"), or dead (the manager removes
    /// it but reports that it could not tell it: "retries exhausted"), counts as removed.
    pub async fn delete_participant(&self, channel: &str, participant: &str) -> Result<(), CmError> {
        let request =
            cm::ParticipantRequest { channel_name: channel.to_owned(), participant_name: participant.to_owned() };
        let mut client = self.client.clone();
        let response = self.call("DeleteParticipant", CALL_TIMEOUT, client.delete_participant(request)).await?;
        match command_result(&response) {
            Ok(()) => Ok(()),
            Err(message) if matches!(Said::of(&message), Said::NotFound | Said::RetriesExhausted) => Ok(()),
            Err(message) => Err(classify(channel, "DeleteParticipant", message)),
        }
    }

    /// Members as the manager lists them: instance names (`org/ns/bob/<uuid>`), the manager too.
    pub async fn list_participants(&self, channel: &str) -> Result<Vec<String>, CmError> {
        let request = cm::ListParticipantsRequest { channel_name: channel.to_owned() };
        let mut client = self.client.clone();
        let response = self.call("ListParticipants", CALL_TIMEOUT, client.list_participants(request)).await?;
        if response.success {
            Ok(response.participant_name)
        } else {
            Err(classify(channel, "ListParticipants", response.error_msg.unwrap_or_default()))
        }
    }

    /// Names of every channel the manager moderates.
    pub async fn list_channels(&self) -> Result<Vec<String>, CmError> {
        let mut client = self.client.clone();
        let response =
            self.call("ListChannels", CALL_TIMEOUT, client.list_channels(cm::ListChannelsRequest {})).await?;
        if response.success {
            Ok(response.channels.into_iter().map(|c| c.channel_name).collect())
        } else {
            Err(classify("", "ListChannels", response.error_msg.unwrap_or_default()))
        }
    }

    async fn call<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CmError> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(CmError::Timeout { endpoint: self.endpoint.to_string(), op, timeout }),
            Ok(Err(status)) => Err(CmError::Unavailable {
                endpoint: self.endpoint.to_string(),
                // The chain, not just "transport error": a TLS failure is told by its cause.
                cause: Unreachable::of(&format!("{op} ({:?})", status.code()), &status),
            }),
            Ok(Ok(response)) => Ok(response.into_inner()),
        }
    }
}

fn command_result(response: &cm::CommandResponse) -> Result<(), String> {
    if response.success { Ok(()) } else { Err(response.error_msg.clone().unwrap_or_default()) }
}

fn classify(channel: &str, op: &'static str, message: String) -> CmError {
    if wording::channel_not_found(&message, channel) {
        CmError::ChannelNotFound(channel.to_owned())
    } else {
        let said = Said::of(&message);
        CmError::Refused { op, message, said }
    }
}

/// Channel manager clients, shared by reconciles.
#[derive(Clone, Default)]
pub struct ChannelManagerPool(ClientPool<ChannelManagerClient>);

impl ChannelManagerPool {
    pub fn client(&self, endpoint: &str) -> Result<ChannelManagerClient, CmError> {
        self.client_with_tls(endpoint, None)
    }

    /// The client for `endpoint` with `tls` (the source's rotations reach it by themselves).
    pub fn client_with_tls(&self, endpoint: &str, tls: Option<TlsSource>) -> Result<ChannelManagerClient, CmError> {
        self.0.get(endpoint, tls.as_ref(), || ChannelManagerClient::with_tls(endpoint, tls.clone()))
    }

    /// Every client held, for metrics and benchmarks.
    pub fn clients(&self) -> Vec<ChannelManagerClient> {
        self.0.clients()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_errors_are_classified() {
        assert_eq!(
            classify("o/n/c", "ListParticipants", "channel o/n/c not found".into()),
            CmError::ChannelNotFound("o/n/c".into())
        );
        assert!(matches!(
            classify("o/n/c", "AddParticipant", "participant already in group: o/n/b/NULL_COMPONENT".into()),
            CmError::Refused { op: "AddParticipant", said: Said::AlreadyMember, .. }
        ));
    }
}
