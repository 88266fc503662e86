//! One SLIM node's controller API, behind one long-lived `OpenControlChannel` stream.
//!
//! A [`NodeClient`] is a handle to an actor task that owns the stream:
//! - changes from concurrent callers are merged into one `ConfigurationCommand` while an earlier
//!   command is in flight (up to [`NodeClientConfig::max_in_flight`] commands at once), and each
//!   caller gets back the outcome of its own items;
//! - route and connection listings are single-flight and cached for a caller-chosen age; acked
//!   changes are applied to the cache so it stays coherent with our own writes;
//! - a broken stream fails what was pending, reconnects with backoff, and announces the reconnect
//!   (a node that restarts has lost its routes) on the pool's event channel.
//!
//! The value types are in [`super::model`], the pure batching and ack mapping in [`super::batch`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tracing::{debug, info, warn};

use super::batch::{AckFailures, merge, message, new_message_id, take_batch};
use super::model::{ChangeOutcome, NodeChange, NodeError, NodeEvent, NodeStats, Observed, Unreachable};
use super::name::NameKey;
use super::pb::controller::v1 as ctl;
use super::pb::controller::v1::control_message::Payload;
use crate::backoff::Backoff;
use crate::tls::control::TlsSource;

/// Tunables of a node client; defaults suit production.
#[derive(Clone, Debug)]
pub struct NodeClientConfig {
    /// How long a `ConfigurationCommand` may wait for its ack (route acks can take ~30 s).
    pub change_timeout: Duration,
    /// How long a route or connection listing may take.
    pub list_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Commands in flight at once on one node; more callers are merged into the next command.
    pub max_in_flight: usize,
    /// Upper bound of items (links + routes) merged into one command.
    pub max_batch_items: usize,
    /// Reconnect backoff bounds.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl Default for NodeClientConfig {
    fn default() -> Self {
        Self {
            change_timeout: Duration::from_secs(40),
            list_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            max_in_flight: 2,
            max_batch_items: 2000,
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
        }
    }
}

enum Command {
    Change { change: NodeChange, reply: oneshot::Sender<Result<ChangeOutcome, NodeError>> },
    Snapshot { max_age: Duration, reply: oneshot::Sender<Result<Arc<Observed>, NodeError>> },
}

/// Cheap, cloneable handle to one node's actor.
#[derive(Clone)]
pub struct NodeClient {
    endpoint: Arc<str>,
    tx: mpsc::Sender<Command>,
    stats: Arc<NodeStats>,
    change_timeout: Duration,
    list_timeout: Duration,
}

impl NodeClient {
    /// Starts the actor for `endpoint` (an `http://host:port` URI of the controller API).
    pub fn spawn(endpoint: &str, config: NodeClientConfig, events: broadcast::Sender<NodeEvent>) -> Self {
        Self::spawn_with_tls(endpoint, config, events, None)
    }

    /// Starts the actor for `endpoint` (`https://host:port` with `tls`): every connection takes
    /// the material `tls` holds at that moment, so a rotated certificate is used by the next one,
    /// and a stream opened with a client certificate is re-opened before that certificate expires.
    pub fn spawn_with_tls(
        endpoint: &str,
        config: NodeClientConfig,
        events: broadcast::Sender<NodeEvent>,
        tls: Option<TlsSource>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let stats = Arc::new(NodeStats::default());
        let client = Self {
            endpoint: endpoint.into(),
            tx,
            stats: stats.clone(),
            change_timeout: config.change_timeout,
            list_timeout: config.list_timeout,
        };
        let actor =
            Actor { endpoint: endpoint.to_owned(), config, rx, stats, events, cache: None, tls, renew_at: None };
        tokio::spawn(actor.run());
        client
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Whether both handles reach the same actor (one connection).
    pub fn is_same(&self, other: &Self) -> bool {
        self.tx.same_channel(&other.tx)
    }

    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// Sends a change (possibly merged with other callers' changes) and waits for its outcome.
    pub async fn apply(&self, change: NodeChange) -> Result<ChangeOutcome, NodeError> {
        if change.is_empty() {
            return Ok(ChangeOutcome::default());
        }
        let (reply, rx) = oneshot::channel();
        self.call(Command::Change { change, reply }, rx, self.change_timeout * 2).await
    }

    /// The node's links and routes, no older than `max_age` (zero forces a fresh listing).
    pub async fn snapshot(&self, max_age: Duration) -> Result<Arc<Observed>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::Snapshot { max_age, reply }, rx, self.list_timeout * 2).await
    }

    async fn call<T>(
        &self,
        command: Command,
        rx: oneshot::Receiver<Result<T, NodeError>>,
        timeout: Duration,
    ) -> Result<T, NodeError> {
        let stopped = || NodeError::Stopped { endpoint: self.endpoint.to_string() };
        self.tx.send(command).await.map_err(|_| stopped())?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(NodeError::Timeout { endpoint: self.endpoint.to_string(), timeout }),
        }
    }
}

struct Actor {
    endpoint: String,
    config: NodeClientConfig,
    rx: mpsc::Receiver<Command>,
    stats: Arc<NodeStats>,
    events: broadcast::Sender<NodeEvent>,
    /// Last listing, with the time it was taken. Dropped on disconnect.
    cache: Option<(Instant, Arc<Observed>)>,
    tls: Option<TlsSource>,
    /// When the current stream must be re-opened: before the client certificate it was opened
    /// with expires.
    renew_at: Option<Instant>,
}

/// Why a connected session ended.
enum SessionEnd {
    /// Every handle is gone: stop the actor.
    Closed,
    /// The stream broke; reconnect.
    Broken(Unreachable),
    /// The client certificate the stream was opened with is about to expire: open a new one now.
    Renew,
}

impl Actor {
    async fn run(mut self) {
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        let mut ever_connected = false;
        let mut renewing = false;
        loop {
            let reason = match self.connect().await {
                Ok((outbound, inbound)) => {
                    backoff.reset();
                    self.stats.connects.fetch_add(1, Ordering::Relaxed);
                    self.stats.connected.store(1, Ordering::Relaxed);
                    if renewing {
                        debug!(node = %self.endpoint, "control stream re-opened with renewed credentials");
                    } else if ever_connected {
                        info!(node = %self.endpoint, "control stream re-established; node state will be re-checked");
                        let _ = self.events.send(NodeEvent::Reconnected { endpoint: self.endpoint.clone() });
                    } else {
                        debug!(node = %self.endpoint, "control stream established");
                    }
                    ever_connected = true;
                    renewing = false;
                    match Session::new(&mut self, outbound).serve(inbound).await {
                        SessionEnd::Closed => return,
                        SessionEnd::Renew => {
                            renewing = true;
                            continue;
                        }
                        SessionEnd::Broken(reason) => reason,
                    }
                }
                Err(reason) => reason,
            };
            self.cache = None;
            self.stats.connected.store(0, Ordering::Relaxed);
            let delay = backoff.next_delay();
            warn!(node = %self.endpoint, %reason, retry_in = ?delay, "control stream down");
            // While down, fail callers at once so reconciles report the node honestly and back off.
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    command = self.rx.recv() => match command {
                        None => return,
                        Some(command) => command.fail(NodeError::Unavailable {
                            endpoint: self.endpoint.clone(),
                            cause: reason.clone(),
                        }),
                    },
                }
            }
        }
    }

    async fn connect(
        &mut self,
    ) -> Result<(mpsc::Sender<ctl::ControlMessage>, Streaming<ctl::ControlMessage>), Unreachable> {
        // tonic speaks plain HTTP/2 to what the connector returns; TLS, when wanted, is ours.
        let endpoint = tonic::transport::Endpoint::from_shared(crate::tls::control::plain_uri(&self.endpoint))
            .map_err(|e| Unreachable::of("invalid endpoint", &e))?
            .connect_timeout(self.config.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        self.renew_at = None;
        let channel = match &self.tls {
            None => endpoint.connect().await,
            Some(tls) => {
                // One snapshot: the stream is renewed by the certificate it was opened with.
                let material = tls.current();
                if let Some(identity) = &material.identity {
                    let delay = renewal_delay(identity.not_after, slim_k8s_common::unix_now());
                    self.renew_at = Some(Instant::now() + delay);
                }
                endpoint
                    .connect_with_connector(crate::tls::control::connector(
                        move || material.clone(),
                        self.config.connect_timeout,
                    ))
                    .await
            }
        }
        .map_err(|e| Unreachable::of("connect", &e))?;
        let mut client = ctl::controller_service_client::ControllerServiceClient::new(channel);
        let (outbound, outbound_rx) = mpsc::channel(1024);
        let inbound = tokio::time::timeout(
            self.config.connect_timeout,
            client.open_control_channel(ReceiverStream::new(outbound_rx)),
        )
        .await
        .map_err(|_| Unreachable::Transport("opening the control channel timed out".to_owned()))?
        .map_err(|status| Unreachable::of("opening the control channel", &status))?
        .into_inner();
        Ok((outbound, inbound))
    }
}

/// How long after `now` a stream opened with a client certificate valid until `not_after` is
/// re-opened: half its remaining life, at most a minute before it expires, never in the past.
fn renewal_delay(not_after: i64, now: i64) -> Duration {
    let remaining = u64::try_from(not_after - now).unwrap_or(0);
    let lead = (remaining / 2).min(60);
    Duration::from_secs(remaining.saturating_sub(lead))
}

#[cfg(test)]
#[test]
fn renewal_is_before_expiry() {
    assert_eq!(renewal_delay(1_000 + 3_600, 1_000), Duration::from_secs(3_540), "a minute ahead");
    assert_eq!(renewal_delay(1_000 + 60, 1_000), Duration::from_secs(30), "half the life when short");
    assert_eq!(renewal_delay(900, 1_000), Duration::ZERO, "expired: at once");
}

impl Command {
    fn fail(self, error: NodeError) {
        match self {
            Command::Change { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Command::Snapshot { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

type ChangeReply = oneshot::Sender<Result<ChangeOutcome, NodeError>>;
type SnapshotReply = oneshot::Sender<Result<Arc<Observed>, NodeError>>;

struct InFlightChange {
    sent: Instant,
    parts: Vec<(NodeChange, ChangeReply)>,
}

struct InFlightList {
    sent: Instant,
    routes_id: String,
    connections_id: String,
    routes_done: bool,
    connections_done: bool,
    observed: Observed,
    /// Changes acked while the listing was under way, re-applied to its result.
    acked_meanwhile: Vec<(NodeChange, ChangeOutcome)>,
    waiters: Vec<SnapshotReply>,
}

/// One connected stream's bookkeeping.
struct Session<'a> {
    actor: &'a mut Actor,
    outbound: mpsc::Sender<ctl::ControlMessage>,
    queued: Vec<(NodeChange, ChangeReply)>,
    in_flight: HashMap<String, InFlightChange>,
    list: Option<InFlightList>,
}

impl<'a> Session<'a> {
    fn new(actor: &'a mut Actor, outbound: mpsc::Sender<ctl::ControlMessage>) -> Self {
        Self { actor, outbound, queued: Vec::new(), in_flight: HashMap::new(), list: None }
    }

    async fn serve(mut self, mut inbound: Streaming<ctl::ControlMessage>) -> SessionEnd {
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        let renew_at = self.actor.renew_at;
        let renew = async move {
            match renew_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(renew);
        let end = loop {
            tokio::select! {
                _ = &mut renew => break SessionEnd::Renew,
                command = self.actor.rx.recv() => match command {
                    None => break SessionEnd::Closed,
                    Some(command) => {
                        self.accept(command);
                        // Take whatever else is already waiting, so it joins the same command.
                        while let Ok(command) = self.actor.rx.try_recv() {
                            self.accept(command);
                        }
                    }
                },
                message = inbound.message() => match message {
                    Ok(Some(message)) => self.on_message(message),
                    Ok(None) => {
                        break SessionEnd::Broken(Unreachable::Transport("node closed the control stream".to_owned()));
                    }
                    Err(status) => {
                        break SessionEnd::Broken(Unreachable::Transport(format!(
                            "control stream error: {}",
                            status.message()
                        )));
                    }
                },
                _ = sweep.tick() => self.expire(),
            }
            if let Err(reason) = self.flush().await {
                break SessionEnd::Broken(reason);
            }
        };
        let reason = match &end {
            SessionEnd::Closed => Unreachable::Transport("client stopped".to_owned()),
            SessionEnd::Broken(reason) => reason.clone(),
            SessionEnd::Renew => {
                Unreachable::Transport("the control stream is re-opened with renewed credentials".to_owned())
            }
        };
        self.fail_all(&reason);
        end
    }

    fn endpoint(&self) -> String {
        self.actor.endpoint.clone()
    }

    fn accept(&mut self, command: Command) {
        match command {
            Command::Change { change, reply } => self.queued.push((change, reply)),
            Command::Snapshot { max_age, reply } => {
                if let Some((taken, observed)) = &self.actor.cache
                    && taken.elapsed() <= max_age
                {
                    let _ = reply.send(Ok(observed.clone()));
                    return;
                }
                match &mut self.list {
                    Some(list) => list.waiters.push(reply),
                    None => {
                        self.list = Some(InFlightList {
                            sent: Instant::now(),
                            routes_id: String::new(),
                            connections_id: String::new(),
                            routes_done: false,
                            connections_done: false,
                            observed: Observed::default(),
                            acked_meanwhile: Vec::new(),
                            waiters: vec![reply],
                        });
                    }
                }
            }
        }
    }

    /// Sends a pending listing and as many merged commands as the in-flight limit allows.
    async fn flush(&mut self) -> Result<(), Unreachable> {
        if let Some(list) = &mut self.list
            && list.routes_id.is_empty()
        {
            list.routes_id = new_message_id();
            list.connections_id = new_message_id();
            let requests = [
                message(&list.routes_id, Payload::RouteListRequest(ctl::RouteListRequest {})),
                message(&list.connections_id, Payload::ConnectionListRequest(ctl::ConnectionListRequest {})),
            ];
            for request in requests {
                self.send(request).await?;
            }
        }
        while self.in_flight.len() < self.actor.config.max_in_flight && !self.queued.is_empty() {
            let parts = self.take_batch();
            let command = merge(parts.iter().map(|(change, _)| change));
            let id = new_message_id();
            let stats = &self.actor.stats;
            stats.writes.fetch_add(1, Ordering::Relaxed);
            stats
                .route_items
                .fetch_add((command.routes_to_set.len() + command.routes_to_delete.len()) as u64, Ordering::Relaxed);
            debug!(
                node = %self.actor.endpoint,
                callers = parts.len(),
                links = command.connections_to_create.len(),
                routes_set = command.routes_to_set.len(),
                routes_deleted = command.routes_to_delete.len(),
                links_deleted = command.connections_to_delete.len(),
                "sending configuration command"
            );
            self.in_flight.insert(id.clone(), InFlightChange { sent: Instant::now(), parts });
            self.send(message(&id, Payload::ConfigCommand(command))).await?;
        }
        Ok(())
    }

    /// Takes queued changes for one command (see [`take_batch`]).
    fn take_batch(&mut self) -> Vec<(NodeChange, ChangeReply)> {
        let (batch, rest) = take_batch(std::mem::take(&mut self.queued), self.actor.config.max_batch_items);
        self.queued = rest;
        batch
    }

    async fn send(&mut self, message: ctl::ControlMessage) -> Result<(), Unreachable> {
        self.actor.stats.rpcs.fetch_add(1, Ordering::Relaxed);
        self.outbound.send(message).await.map_err(|_| Unreachable::Transport("control stream closed".to_owned()))
    }

    fn on_message(&mut self, message: ctl::ControlMessage) {
        match message.payload {
            Some(Payload::ConfigCommandAck(ack)) => self.on_change_ack(ack),
            Some(Payload::Ack(ack)) => self.on_plain_ack(ack),
            Some(Payload::RouteListResponse(response)) => self.on_routes(response),
            Some(Payload::ConnectionListResponse(response)) => self.on_connections(response),
            // Unsolicited commands (queued local-app notifications) and anything else: not ours.
            _ => {}
        }
    }

    fn on_change_ack(&mut self, ack: ctl::ConfigurationCommandAck) {
        let Some(in_flight) = self.in_flight.remove(&ack.original_message_id) else {
            return;
        };
        let failures = AckFailures::from_ack(&ack);
        for (change, reply) in in_flight.parts {
            let outcome = failures.outcome_for(&change);
            self.record_acked(&change, &outcome);
            let _ = reply.send(Ok(outcome));
        }
    }

    /// A plain `Ack` answers a command the node could not process as a whole.
    fn on_plain_ack(&mut self, ack: ctl::Ack) {
        let Some(in_flight) = self.in_flight.remove(&ack.original_message_id) else {
            return;
        };
        if ack.success {
            for (change, reply) in in_flight.parts {
                let outcome = ChangeOutcome::default();
                self.record_acked(&change, &outcome);
                let _ = reply.send(Ok(outcome));
            }
        } else {
            let reason = ack.messages.join("; ");
            for (_, reply) in in_flight.parts {
                let _ = reply.send(Err(NodeError::Rejected { endpoint: self.endpoint(), reason: reason.clone() }));
            }
        }
    }

    fn record_acked(&mut self, change: &NodeChange, outcome: &ChangeOutcome) {
        if let Some((_, observed)) = &mut self.actor.cache {
            Arc::make_mut(observed).apply(change, outcome);
        }
        if let Some(list) = &mut self.list {
            list.acked_meanwhile.push((change.clone(), outcome.clone()));
        }
    }

    fn on_routes(&mut self, response: ctl::RouteListResponse) {
        let Some(list) = self.list.as_mut().filter(|l| l.routes_id == response.original_message_id) else {
            return;
        };
        for entry in response.entries {
            let Some(key) = entry.name.as_ref().and_then(NameKey::from_proto) else {
                continue;
            };
            list.observed.names.insert(key);
            for connection in entry.connections {
                if let Some(link_id) = connection.link_id {
                    list.observed.routes.insert((key, link_id));
                }
            }
        }
        list.routes_done |= response.done;
        self.finish_list_if_done();
    }

    fn on_connections(&mut self, response: ctl::ConnectionListResponse) {
        let Some(list) = self.list.as_mut().filter(|l| l.connections_id == response.original_message_id) else {
            return;
        };
        for connection in response.entries {
            let Some(link_id) = connection.link_id.clone() else { continue };
            match connection.direction() {
                ctl::ConnectionDirection::Outgoing => {
                    let kind = connection_type_name(connection.connection_type());
                    list.observed.dialed.insert(link_id.clone(), kind.to_owned());
                }
                ctl::ConnectionDirection::Incoming => *list.observed.incoming.entry(link_id.clone()).or_default() += 1,
            }
            list.observed.links.insert(link_id);
        }
        list.connections_done |= response.done;
        self.finish_list_if_done();
    }

    fn finish_list_if_done(&mut self) {
        if !self.list.as_ref().is_some_and(|l| l.routes_done && l.connections_done) {
            return;
        }
        let Some(mut list) = self.list.take() else { return };
        for (change, outcome) in &list.acked_meanwhile {
            list.observed.apply(change, outcome);
        }
        let observed = Arc::new(list.observed);
        self.actor.cache = Some((list.sent, observed.clone()));
        for waiter in list.waiters {
            let _ = waiter.send(Ok(observed.clone()));
        }
    }

    /// Fails commands and listings the node has not answered in time.
    fn expire(&mut self) {
        let change_timeout = self.actor.config.change_timeout;
        let expired: Vec<String> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.sent.elapsed() > change_timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(in_flight) = self.in_flight.remove(&id) {
                warn!(node = %self.actor.endpoint, timeout = ?change_timeout, "configuration command not acknowledged in time");
                for (_, reply) in in_flight.parts {
                    let _ = reply.send(Err(NodeError::Timeout { endpoint: self.endpoint(), timeout: change_timeout }));
                }
            }
        }
        let list_timeout = self.actor.config.list_timeout;
        if self.list.as_ref().is_some_and(|l| !l.routes_id.is_empty() && l.sent.elapsed() > list_timeout)
            && let Some(list) = self.list.take()
        {
            for waiter in list.waiters {
                let _ = waiter.send(Err(NodeError::Timeout { endpoint: self.endpoint(), timeout: list_timeout }));
            }
        }
    }

    fn fail_all(&mut self, reason: &Unreachable) {
        let error = || NodeError::Unavailable { endpoint: self.actor.endpoint.clone(), cause: reason.clone() };
        for (_, in_flight) in self.in_flight.drain() {
            for (_, reply) in in_flight.parts {
                let _ = reply.send(Err(error()));
            }
        }
        for (_, reply) in self.queued.drain(..) {
            let _ = reply.send(Err(error()));
        }
        if let Some(list) = self.list.take() {
            for waiter in list.waiters {
                let _ = waiter.send(Err(error()));
            }
        }
    }
}

/// The name a link config gives a connection type (`LinkConfig::connection_type`).
fn connection_type_name(kind: ctl::ConnectionType) -> &'static str {
    match kind {
        ctl::ConnectionType::Local => "local",
        ctl::ConnectionType::Remote => "remote",
        ctl::ConnectionType::Peer => "peer",
        ctl::ConnectionType::Edge => "edge",
    }
}
