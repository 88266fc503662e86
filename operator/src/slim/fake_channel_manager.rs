//! An in-process fake of the SLIM channel manager for unit tests, answering as 3.4.6 does:
//! application errors as `success = false` + `error_msg`, instance names in listings (the
//! manager's own included), "already in group" for a member invited twice, and a slow failure
//! for participants marked offline.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::loopback::LoopbackServer;
use tonic::{Request, Response, Status};

use super::pb::channel_manager::v1 as cm;
use super::pb::channel_manager::v1::channel_manager_service_server::{
    ChannelManagerService, ChannelManagerServiceServer,
};

pub const MANAGER_NAME: &str = "org/ns/channel-manager/00000000-0000-0000-0000-00000000000a";

#[derive(Debug, Default)]
pub struct FakeCmState {
    /// channel -> (mls, members as instance names)
    pub channels: BTreeMap<String, (bool, BTreeSet<String>)>,
    /// Participants whose invite fails after `offline_delay`.
    pub offline: BTreeSet<String>,
    pub offline_delay: Duration,
    pub calls: Vec<String>,
    /// Invites of offline participants under way, by channel, and the most there ever were at
    /// once: in all, and in one channel.
    pub waiting: BTreeMap<String, usize>,
    pub most_waiting: usize,
    pub most_waiting_in_a_channel: usize,
}

impl FakeCmState {
    fn offline_invite(&mut self, channel: &str, started: bool) {
        let count = self.waiting.entry(channel.to_owned()).or_default();
        if started {
            *count += 1;
        } else {
            *count = count.saturating_sub(1);
        }
        self.most_waiting_in_a_channel = self.most_waiting_in_a_channel.max(*count);
        self.most_waiting = self.most_waiting.max(self.waiting.values().sum());
    }
}

pub struct FakeChannelManager {
    pub endpoint: String,
    pub state: Arc<Mutex<FakeCmState>>,
    _server: LoopbackServer,
}

impl FakeChannelManager {
    pub async fn start() -> Self {
        let state =
            Arc::new(Mutex::new(FakeCmState { offline_delay: Duration::from_millis(300), ..Default::default() }));
        let server = LoopbackServer::serve(ChannelManagerServiceServer::new(Service { state: state.clone() })).await;
        Self { endpoint: server.endpoint.clone(), state, _server: server }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, FakeCmState> {
        self.state.lock().expect("fake channel manager state")
    }
}

struct Service {
    state: Arc<Mutex<FakeCmState>>,
}

fn reply(result: Result<(), String>) -> Result<Response<cm::CommandResponse>, Status> {
    Ok(Response::new(match result {
        Ok(()) => cm::CommandResponse { success: true, error_msg: None },
        Err(message) => cm::CommandResponse { success: false, error_msg: Some(message) },
    }))
}

impl Service {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeCmState> {
        self.state.lock().expect("fake channel manager state")
    }
}

#[tonic::async_trait]
impl ChannelManagerService for Service {
    async fn create_channel(
        &self,
        request: Request<cm::CreateChannelRequest>,
    ) -> Result<Response<cm::CommandResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.lock();
        state.calls.push(format!("CreateChannel {}", request.channel_name));
        if state.channels.contains_key(&request.channel_name) {
            return reply(Err(format!("channel {} already exists", request.channel_name)));
        }
        let members = BTreeSet::from([MANAGER_NAME.to_owned()]);
        state.channels.insert(request.channel_name, (request.mls_enabled, members));
        reply(Ok(()))
    }

    async fn delete_channel(
        &self,
        request: Request<cm::DeleteChannelRequest>,
    ) -> Result<Response<cm::CommandResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.lock();
        state.calls.push(format!("DeleteChannel {}", request.channel_name));
        match state.channels.remove(&request.channel_name) {
            Some(_) => reply(Ok(())),
            None => reply(Err(format!("channel {} not found", request.channel_name))),
        }
    }

    async fn add_participant(
        &self,
        request: Request<cm::ParticipantRequest>,
    ) -> Result<Response<cm::CommandResponse>, Status> {
        let request = request.into_inner();
        let (offline, delay) = {
            let mut state = self.lock();
            state.calls.push(format!("AddParticipant {} {}", request.channel_name, request.participant_name));
            (state.offline.contains(&request.participant_name), state.offline_delay)
        };
        if offline {
            self.lock().offline_invite(&request.channel_name, true);
            tokio::time::sleep(delay).await;
            self.lock().offline_invite(&request.channel_name, false);
            return reply(Err(format!(
                "failed to invite participant {} to channel {}: failed to add participant to session: message send retries exhausted for id=1",
                request.participant_name, request.channel_name
            )));
        }
        let mut state = self.lock();
        let Some((_, members)) = state.channels.get_mut(&request.channel_name) else {
            return reply(Err(format!("channel {} not found", request.channel_name)));
        };
        let prefix = format!("{}/", request.participant_name);
        if members.iter().any(|m| m.starts_with(&prefix)) {
            return reply(Err(format!(
                "failed to invite participant {0} to channel {1}: session cleanup failed: participant already in group: {0}/NULL_COMPONENT",
                request.participant_name, request.channel_name
            )));
        }
        members.insert(format!("{prefix}{}", uuid::Uuid::new_v4()));
        reply(Ok(()))
    }

    async fn delete_participant(
        &self,
        request: Request<cm::ParticipantRequest>,
    ) -> Result<Response<cm::CommandResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.lock();
        state.calls.push(format!("DeleteParticipant {} {}", request.channel_name, request.participant_name));
        let Some((_, members)) = state.channels.get_mut(&request.channel_name) else {
            return reply(Err(format!("channel {} not found", request.channel_name)));
        };
        let prefix = format!("{}/", request.participant_name);
        let before = members.len();
        members.retain(|m| !m.starts_with(&prefix));
        if members.len() == before {
            return reply(Err(format!("participant {} not found", request.participant_name)));
        }
        reply(Ok(()))
    }

    async fn list_channels(
        &self,
        _: Request<cm::ListChannelsRequest>,
    ) -> Result<Response<cm::ListChannelsResponse>, Status> {
        let state = self.lock();
        let channels = state
            .channels
            .keys()
            .map(|name| cm::ChannelInfo { channel_name: name.clone(), owner: None, expires_at: None })
            .collect();
        Ok(Response::new(cm::ListChannelsResponse { success: true, error_msg: None, channels }))
    }

    async fn list_participants(
        &self,
        request: Request<cm::ListParticipantsRequest>,
    ) -> Result<Response<cm::ListParticipantsResponse>, Status> {
        let request = request.into_inner();
        let state = self.lock();
        Ok(Response::new(match state.channels.get(&request.channel_name) {
            Some((_, members)) => cm::ListParticipantsResponse {
                success: true,
                error_msg: None,
                participant_name: members.iter().cloned().collect(),
            },
            None => cm::ListParticipantsResponse {
                success: false,
                error_msg: Some(format!("channel {} not found", request.channel_name)),
                participant_name: vec![],
            },
        }))
    }
}
