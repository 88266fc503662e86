//! A faithful in-process fake of a SLIM node's controller API, for unit tests without Python.
//!
//! It keeps links and routes in memory and answers like SLIM 3.4.6: one ack per command with a
//! status per item, "not found" failures for deletes of missing items, route listings in chunks
//! of 100 ended by `done`, connection listings likewise, and an unsolicited `config_command` as
//! the first message of each stream (as a node with local apps sends).

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::loopback::LoopbackServer;
use super::name::NameKey;
use super::pb::controller::v1 as ctl;
use super::pb::controller::v1::control_message::Payload;
use super::pb::controller::v1::controller_service_server::{ControllerService, ControllerServiceServer};

#[derive(Debug, Default)]
pub struct FakeState {
    pub links: BTreeMap<String, String>,
    pub routes: BTreeSet<(NameKey, String)>,
    /// ConfigurationCommands received.
    pub commands: usize,
    /// Refuse every route with this message.
    pub reject_routes: Option<String>,
}

/// A running fake node; stopped on drop.
pub struct FakeNode {
    pub endpoint: String,
    pub state: Arc<Mutex<FakeState>>,
    restarts: tokio::sync::watch::Sender<u64>,
    _server: LoopbackServer,
}

impl FakeNode {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let (restarts, restarted) = tokio::sync::watch::channel(0u64);
        let server =
            LoopbackServer::serve(ControllerServiceServer::new(Service { state: state.clone(), restarted })).await;
        Self { endpoint: server.endpoint.clone(), state, restarts, _server: server }
    }

    /// Simulates a node restart: every open control stream ends and all state is lost.
    pub fn restart(&self) {
        let mut state = self.state();
        state.links.clear();
        state.routes.clear();
        drop(state);
        self.restarts.send_modify(|generation| *generation += 1);
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake node state")
    }
}

struct Service {
    state: Arc<Mutex<FakeState>>,
    restarted: tokio::sync::watch::Receiver<u64>,
}

type Replies = Pin<Box<dyn Stream<Item = Result<ctl::ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl ControllerService for Service {
    type OpenControlChannelStream = Replies;

    async fn open_control_channel(
        &self,
        request: Request<Streaming<ctl::ControlMessage>>,
    ) -> Result<Response<Self::OpenControlChannelStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let state = self.state.clone();
        let mut restarted = self.restarted.clone();
        restarted.mark_unchanged();
        tokio::spawn(async move {
            let unsolicited = ctl::ControlMessage {
                message_id: "local-app-notice".into(),
                payload: Some(Payload::ConfigCommand(ctl::ConfigurationCommand::default())),
            };
            if tx.send(Ok(unsolicited)).await.is_err() {
                return;
            }
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    _ = restarted.changed() => return,
                };
                let Ok(Some(message)) = message else { return };
                for reply in handle(&state, message) {
                    if tx.send(Ok(reply)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn handle(state: &Mutex<FakeState>, message: ctl::ControlMessage) -> Vec<ctl::ControlMessage> {
    let mut state = state.lock().expect("fake node state");
    let id = message.message_id;
    match message.payload {
        Some(Payload::ConfigCommand(command)) => {
            vec![reply(Payload::ConfigCommandAck(configure(&mut state, id, command)))]
        }
        Some(Payload::RouteListRequest(_)) => chunks(route_entries(&state), |entries, done| {
            reply(Payload::RouteListResponse(ctl::RouteListResponse { original_message_id: id.clone(), entries, done }))
        }),
        Some(Payload::ConnectionListRequest(_)) => chunks(connection_entries(&state), |entries, done| {
            reply(Payload::ConnectionListResponse(ctl::ConnectionListResponse {
                original_message_id: id.clone(),
                entries,
                done,
            }))
        }),
        _ => vec![],
    }
}

fn reply(payload: Payload) -> ctl::ControlMessage {
    ctl::ControlMessage { message_id: uuid::Uuid::new_v4().to_string(), payload: Some(payload) }
}

/// Applies a configuration command as a SLIM node does: links first, then routes set and deleted
/// (a route needs its link), then links deleted (with their routes); one ack per item.
fn configure(state: &mut FakeState, id: String, command: ctl::ConfigurationCommand) -> ctl::ConfigurationCommandAck {
    state.commands += 1;
    let mut ack = ctl::ConfigurationCommandAck { original_message_id: id, ..Default::default() };
    for connection in command.connections_to_create {
        state.links.insert(connection.link_id.clone(), connection.config_data);
        ack.connections_status.push(ctl::ConnectionAck {
            link_id: connection.link_id,
            success: true,
            error_msg: String::new(),
        });
    }
    for route in command.routes_to_set {
        let (success, error_msg) = set_route(state, &route);
        ack.routes_status.push(ctl::RouteAck { route: Some(route), success, error_msg });
    }
    for route in command.routes_to_delete {
        let key = route.name.as_ref().and_then(NameKey::from_proto);
        let link = route.link_id.clone().unwrap_or_default();
        let removed = key.is_some_and(|key| state.routes.remove(&(key, link)));
        let error_msg = if removed { String::new() } else { "route not found".to_owned() };
        ack.routes_status.push(ctl::RouteAck { route: Some(route), success: removed, error_msg });
    }
    for link in command.connections_to_delete {
        let removed = state.links.remove(&link).is_some();
        state.routes.retain(|(_, l)| *l != link);
        let error_msg = if removed { String::new() } else { format!("connection {link} not found") };
        ack.connections_status.push(ctl::ConnectionAck { link_id: link, success: removed, error_msg });
    }
    ack
}

/// `(success, error)` of setting one route, with SLIM's wording for a missing link.
fn set_route(state: &mut FakeState, route: &ctl::Route) -> (bool, String) {
    let key = route.name.as_ref().and_then(NameKey::from_proto);
    let link = route.link_id.clone().unwrap_or_default();
    match (&state.reject_routes, key) {
        (Some(reason), _) => (false, reason.clone()),
        (None, None) => (false, "route has no encoded name".to_owned()),
        (None, Some(_)) if !state.links.contains_key(&link) => {
            (false, format!("Connection with link_id {link} not found"))
        }
        (None, Some(key)) => {
            state.routes.insert((key, link));
            (true, String::new())
        }
    }
}

/// The route list as a node sends it: one entry per name with every link it goes over.
fn route_entries(state: &FakeState) -> Vec<ctl::RouteEntry> {
    let mut by_name: BTreeMap<NameKey, Vec<String>> = BTreeMap::new();
    for (key, link) in &state.routes {
        by_name.entry(*key).or_default().push(link.clone());
    }
    by_name
        .into_iter()
        .map(|(key, links)| ctl::RouteEntry {
            name: Some(super::pb::dataplane::v1::Name { name: Some(key.to_proto()), str_name: None }),
            connections: links
                .into_iter()
                .map(|link| ctl::ConnectionEntry { link_id: Some(link), ..Default::default() })
                .collect(),
        })
        .collect()
}

fn connection_entries(state: &FakeState) -> Vec<ctl::ConnectionEntry> {
    state
        .links
        .iter()
        .enumerate()
        .map(|(i, (link, config))| ctl::ConnectionEntry {
            id: i as u64,
            connection_type: ctl::ConnectionType::Remote as i32,
            config_data: config.clone(),
            link_id: Some(link.clone()),
            ..Default::default()
        })
        .collect()
}

/// Splits a listing into messages of 100 entries; the last one says `done` (an empty listing is
/// one empty, done message).
fn chunks<T: Clone>(
    entries: Vec<T>,
    mut message: impl FnMut(Vec<T>, bool) -> ctl::ControlMessage,
) -> Vec<ctl::ControlMessage> {
    if entries.is_empty() {
        return vec![message(vec![], true)];
    }
    let count = entries.len().div_ceil(100);
    entries.chunks(100).enumerate().map(|(i, chunk)| message(chunk.to_vec(), i + 1 == count)).collect()
}
