//! Keeps a group channel true through the channel manager. IO against SLIM only.
//!
//! Invites and removals run in background tasks, one per participant: the channel manager takes
//! ~11 s to fail an invite (or a removal) for an offline participant, and that must not hold up the
//! others. A sync lists the channel, plans, starts what is due and returns at once with each
//! participant's state; a finished operation calls the sync's `on_done` so the caller can look
//! again. Failed operations are retried with per-participant exponential backoff, jittered so the
//! participants of many channels do not retry in lockstep. One operation runs at a time per
//! channel, and at most `in_flight` at once through one manager; the others wait their turn here.
//! The manager serves a channel's operations one at a time, so more would only wait there, on the
//! clock of their deadline: with 200 channels of 20 members filling at once, every invite timed
//! out after 30 s.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info};

use crate::backoff::{exponential, jitter};
use crate::plan::channel::{
    Incarnation, Incarnations, LiveInstances, MemberState, Turnover, base_name, instance_of, plan_channel,
};
use crate::slim::wording::Said;
use crate::slim::{ChannelManagerClient, CmError};

/// Called when a background operation of a channel finishes.
pub type OnDone = Arc<dyn Fn() + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Invite,
    Rejoin,
    /// The removal of a live instance that is leaving (its Pod terminating).
    HandOver,
    /// The removal of the instance of an app that stopped or restarted since it joined.
    Retire,
    Remove,
}

impl OpKind {
    fn verb(self) -> &'static str {
        match self {
            OpKind::Invite => "invite",
            OpKind::Rejoin => "re-invite",
            OpKind::HandOver => "hand-over removal",
            OpKind::Retire => "removal of the stopped instance",
            OpKind::Remove => "removal",
        }
    }
}

#[derive(Clone, Debug)]
enum OpState {
    Running {
        kind: OpKind,
    },
    /// `live`: the participant's live instances when the operation started (as the sync knew
    /// them): when they change, the participant is not the one that failed, and it is retried at
    /// once.
    Failed {
        kind: OpKind,
        message: String,
        attempts: u32,
        retry_at: Instant,
        live: Option<BTreeSet<String>>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct OpKey {
    manager: String,
    channel: String,
    participant: String,
}

impl OpKey {
    fn new(request: &ChannelSync<'_>, participant: &str) -> Self {
        Self {
            manager: request.manager.endpoint().to_owned(),
            channel: request.channel.to_owned(),
            participant: participant.to_owned(),
        }
    }

    /// Whether the key is of the channel `request` syncs.
    fn of(&self, request: &ChannelSync<'_>) -> bool {
        self.manager == request.manager.endpoint() && self.channel == request.channel
    }
}

/// The longest wait before retrying an operation that failed because the manager could not act
/// (it is restarting, or lost its node): it is back as soon as it is.
const MANAGER_DOWN_RETRY: Duration = Duration::from_secs(5);

/// Operations in flight at one manager by default.
pub const DEFAULT_IN_FLIGHT: usize = 32;

/// What a sync asks for.
pub struct ChannelSync<'a> {
    pub manager: &'a ChannelManagerClient,
    pub channel: &'a str,
    pub mls_enabled: bool,
    pub desired: &'a BTreeSet<String>,
    pub managed_before: &'a BTreeSet<String>,
    pub live: Option<&'a LiveInstances>,
    /// Names with a selected Pod that is terminating.
    pub leaving: &'a BTreeSet<String>,
    /// The process behind each name served by one selected Pod.
    pub incarnations: &'a Incarnations,
    pub on_done: OnDone,
}

/// One participant after a sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParticipantReport {
    pub name: String,
    pub joined: bool,
    pub instance: Option<String>,
    pub message: Option<String>,
    /// The message says an operation failed (a Warning event when it is new).
    pub failing: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelReport {
    /// The channel was missing and has been created.
    pub created: bool,
    /// Every desired participant.
    pub members: Vec<ParticipantReport>,
    /// Participants being removed (no longer desired, still listed).
    pub leaving: Vec<ParticipantReport>,
    /// Some operation is running; its end triggers `on_done`.
    pub busy: bool,
    /// The soonest retry of a failed operation.
    pub retry_in: Option<Duration>,
    /// The channel manager has lost its connection to its SLIM node (its invites fail with
    /// [`Said::NoRoute`]): the refusal that told it.
    pub manager_lost_node: Option<String>,
}

/// Turns to run an operation, by what they are counted per.
type Turns<K> = Arc<Mutex<HashMap<K, Arc<Semaphore>>>>;

/// Background operations of every channel, shared by reconciles (clones share them).
#[derive(Clone)]
pub struct ChannelEngine {
    ops: Arc<Mutex<HashMap<OpKey, OpState>>>,
    /// Managers that lost their node, by endpoint: the refusal that told it. Cleared by the
    /// next invite through the manager that succeeds.
    lost: Arc<Mutex<HashMap<String, String>>>,
    /// The instance each leaving participant had when it was removed (its successor is not
    /// invited while that instance is still connected).
    departed: Arc<Mutex<HashMap<OpKey, String>>>,
    /// The process each Pod-selected member joined as (recorded when its invite went through, or
    /// when first seen joined): a member whose Pod no longer runs it restarted.
    joined_as: Arc<Mutex<HashMap<OpKey, Incarnation>>>,
    /// Turns to run an operation, per manager endpoint.
    turns: Turns<String>,
    /// One operation at a time per channel (the manager serves a channel's one at a time; more
    /// would wait there, on the clock of their deadline).
    channel_turns: Turns<(String, String)>,
    /// Operations in flight at one manager (0: unbounded).
    in_flight: usize,
    retry_min: Duration,
    retry_max: Duration,
    /// Cancels every background operation (the controllers stopped or leadership was lost).
    stop: CancellationToken,
}

impl Default for ChannelEngine {
    fn default() -> Self {
        Self::new(Duration::from_secs(2), Duration::from_secs(300))
    }
}

impl ChannelEngine {
    pub fn new(retry_min: Duration, retry_max: Duration) -> Self {
        Self {
            ops: Arc::default(),
            lost: Arc::default(),
            departed: Arc::default(),
            joined_as: Arc::default(),
            turns: Arc::default(),
            channel_turns: Arc::default(),
            in_flight: DEFAULT_IN_FLIGHT,
            retry_min,
            retry_max,
            stop: CancellationToken::new(),
        }
    }

    /// At most `limit` operations in flight at one manager (0: unbounded).
    pub fn with_in_flight(mut self, limit: usize) -> Self {
        self.in_flight = limit;
        self
    }

    /// The turns of the manager at `endpoint` (`None`: unbounded), and of the channel.
    fn turns(&self, key: &OpKey) -> (Option<Arc<Semaphore>>, Arc<Semaphore>) {
        let manager = (self.in_flight > 0).then(|| {
            let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
            turns.entry(key.manager.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.in_flight))).clone()
        });
        let mut channels = self.channel_turns.lock().unwrap_or_else(|p| p.into_inner());
        let channel = (key.manager.clone(), key.channel.clone());
        (manager, channels.entry(channel).or_insert_with(|| Arc::new(Semaphore::new(1))).clone())
    }

    /// Cancels every background operation, running or to come, when the guard drops: a replica
    /// that stopped leading must not go on inviting or removing.
    pub fn stop_on_drop(&self) -> DropGuard {
        self.stop.clone().drop_guard()
    }

    /// Lists the channel (creating it if missing), starts the operations that are due and reports.
    pub async fn sync(&self, request: ChannelSync<'_>) -> Result<ChannelReport, CmError> {
        let mut report = ChannelReport::default();
        let listed = match request.manager.list_participants(request.channel).await {
            Ok(listed) => listed,
            Err(CmError::ChannelNotFound(_)) => {
                request.manager.create_channel(request.channel, request.mls_enabled).await?;
                info!(channel = request.channel, mls = request.mls_enabled, "channel created");
                report.created = true;
                Vec::new()
            }
            Err(error) => return Err(error),
        };
        let departed = self.departed(&request);
        let restarted = self.restarted(&request);
        let turnover = Turnover { leaving: request.leaving, departed: &departed, restarted: &restarted };
        let plan = plan_channel(request.desired, &listed, request.managed_before, request.live, turnover);
        let due: Vec<(String, OpKind)> = plan
            .add
            .iter()
            .map(|n| (n.clone(), OpKind::Invite))
            .chain(plan.rejoin.iter().map(|n| (n.clone(), OpKind::Rejoin)))
            .chain(plan.hand_over.iter().map(|n| (n.clone(), OpKind::HandOver)))
            .chain(plan.retire.iter().map(|n| (n.clone(), OpKind::Retire)))
            .chain(plan.remove.iter().map(|n| (n.clone(), OpKind::Remove)))
            .collect();
        self.remember_departures(&request, &listed, &due);
        self.adopt(&request, &plan.members);
        let notes = self.start_due(&request, &due, &mut report);
        report.manager_lost_node = self.lost_node(request.manager.endpoint());
        report.members = plan.members.into_iter().map(|m| member_report(m, &notes)).collect();
        report.leaving = plan
            .remove
            .iter()
            .map(|name| ParticipantReport {
                name: name.clone(),
                joined: true,
                instance: None,
                message: notes.get(name).map(Note::to_string),
                failing: notes.get(name).is_some_and(Note::failed),
            })
            .collect();
        Ok(report)
    }

    /// The instances removed from this channel as their Pods terminated, by participant, less
    /// those that no longer matter: the Pod is gone, or the instance has disconnected.
    fn departed(&self, request: &ChannelSync<'_>) -> BTreeMap<String, String> {
        let mut departed = self.departed.lock().unwrap_or_else(|p| p.into_inner());
        departed.retain(|key, instance| {
            let other = !key.of(request);
            let still_connected = request
                .live
                .is_none_or(|live| live.get(&key.participant).is_some_and(|instances| instances.contains(instance)));
            other || (request.leaving.contains(&key.participant) && still_connected)
        });
        departed
            .iter()
            .filter(|(key, _)| key.of(request))
            .map(|(key, instance)| (key.participant.clone(), instance.clone()))
            .collect()
    }

    /// Desired names whose Pod no longer runs the process that joined.
    fn restarted(&self, request: &ChannelSync<'_>) -> BTreeSet<String> {
        let mut joined_as = self.joined_as.lock().unwrap_or_else(|p| p.into_inner());
        joined_as.retain(|key, _| !key.of(request) || request.desired.contains(&key.participant));
        request
            .incarnations
            .iter()
            .filter(|(name, now)| joined_as.get(&OpKey::new(request, name)).is_some_and(|joined| now.replaced(joined)))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Records the process of each member found joined that has none recorded (it joined before
    /// this replica led).
    fn adopt(&self, request: &ChannelSync<'_>, members: &[MemberState]) {
        let mut joined_as = self.joined_as.lock().unwrap_or_else(|p| p.into_inner());
        for member in members.iter().filter(|m| m.joined) {
            if let Some(now) = request.incarnations.get(&member.name).filter(|now| now.running) {
                joined_as.entry(OpKey::new(request, &member.name)).or_insert_with(|| now.clone());
            }
        }
    }

    /// Remembers the listed instance of each leaving participant about to be removed.
    fn remember_departures(&self, request: &ChannelSync<'_>, listed: &[String], due: &[(String, OpKind)]) {
        let mut departed = self.departed.lock().unwrap_or_else(|p| p.into_inner());
        for (name, _) in due
            .iter()
            .filter(|(name, kind)| matches!(kind, OpKind::HandOver | OpKind::Remove) && request.leaving.contains(name))
        {
            let Some(instance) = listed.iter().filter(|m| base_name(m) == name).find_map(|m| instance_of(m)) else {
                continue;
            };
            departed.insert(OpKey::new(request, name), instance.to_owned());
        }
    }

    /// Starts each due operation that is neither running nor waiting to be retried; returns what
    /// each participant's operation is doing.
    fn start_due(
        &self,
        request: &ChannelSync<'_>,
        due: &[(String, OpKind)],
        report: &mut ChannelReport,
    ) -> HashMap<String, Note> {
        let now = Instant::now();
        let mut notes = HashMap::new();
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        // Forget finished failures of participants that need nothing any more.
        ops.retain(|key, state| {
            key.manager != request.manager.endpoint()
                || key.channel != request.channel
                || matches!(state, OpState::Running { .. })
                || due.iter().any(|(name, _)| *name == key.participant)
        });
        for (participant, kind) in due {
            let key = OpKey::new(request, participant);
            let live = request.live.and_then(|l| l.get(participant)).cloned();
            let attempts = match waiting(&ops, &key, now, live.as_ref(), report) {
                Ok(attempts) => attempts,
                Err(note) => {
                    notes.insert(participant.clone(), note);
                    continue;
                }
            };
            ops.insert(key.clone(), OpState::Running { kind: *kind });
            report.busy = true;
            notes.insert(participant.clone(), Note::InProgress(*kind));
            let incarnation = request.incarnations.get(participant).cloned();
            let op = Started { kind: *kind, attempts, live, incarnation };
            self.spawn(key, op, request.manager.clone(), request.on_done.clone());
        }
        notes
    }

    /// The refusal that told the manager at `endpoint` lost its node, while it has not recovered.
    pub fn lost_node(&self, endpoint: &str) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).get(endpoint).cloned()
    }

    /// The manager at `endpoint` was restarted: its failed operations are retried at once.
    pub fn manager_restarted(&self, endpoint: &str) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.retain(|key, state| key.manager != endpoint || matches!(state, OpState::Running { .. }));
    }

    /// Runs `op` in the background.
    fn spawn(&self, key: OpKey, op: Started, manager: ChannelManagerClient, on_done: OnDone) {
        let Started { kind, attempts, live, incarnation } = op;
        let ops = self.ops.clone();
        let joined_as = self.joined_as.clone();
        let lost = self.lost.clone();
        let (retry_min, retry_max) = (self.retry_min, self.retry_max);
        let stop = self.stop.clone();
        let (manager_turns, channel_turn) = self.turns(&key);
        tokio::spawn(async move {
            let turn = async {
                // Never closed, so the permits are always granted in the end: the channel's turn
                // first, so a manager's turn is never held waiting for it.
                let _channel = channel_turn.acquire_owned().await.ok();
                let _manager = match manager_turns {
                    Some(turns) => turns.acquire_owned().await.ok(),
                    None => None,
                };
                run_op(&manager, &key.channel, &key.participant, kind).await
            };
            let Some(result) = stop.run_until_cancelled(turn).await else {
                debug!(channel = %key.channel, participant = %key.participant, op = kind.verb(), "channel operation cancelled");
                return;
            };
            record_lost_node(&lost, &key.manager, kind, &result);
            if result.is_ok() {
                record_joined_as(&joined_as, &key, kind, incarnation);
            }
            {
                let mut ops = ops.lock().unwrap_or_else(|p| p.into_inner());
                match &result {
                    Ok(()) => {
                        ops.remove(&key);
                    }
                    Err(error) => {
                        let max = if error.manager_down() { retry_max.min(MANAGER_DOWN_RETRY) } else { retry_max };
                        let delay = jitter(exponential(retry_min, max, attempts));
                        ops.insert(
                            key.clone(),
                            OpState::Failed {
                                kind,
                                message: error.to_string(),
                                attempts: attempts + 1,
                                retry_at: Instant::now() + delay,
                                live,
                            },
                        );
                    }
                }
            }
            debug!(channel = %key.channel, participant = %key.participant, op = kind.verb(), ok = result.is_ok(), "channel operation finished");
            on_done();
        });
    }

    /// Deletes the channel and forgets its operations and departures.
    pub async fn delete(&self, manager: &ChannelManagerClient, channel: &str) -> Result<(), CmError> {
        manager.delete_channel(channel).await?;
        let other = |key: &OpKey| key.manager != manager.endpoint() || key.channel != channel;
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).retain(|key, _| other(key));
        self.departed.lock().unwrap_or_else(|p| p.into_inner()).retain(|key, _| other(key));
        self.joined_as.lock().unwrap_or_else(|p| p.into_inner()).retain(|key, _| other(key));
        let mut channel_turns = self.channel_turns.lock().unwrap_or_else(|p| p.into_inner());
        channel_turns.remove(&(manager.endpoint().to_owned(), channel.to_owned()));
        Ok(())
    }
}

/// An operation about to run: its kind, past attempts, and the participant's live instances and
/// process when it started.
struct Started {
    kind: OpKind,
    attempts: u32,
    live: Option<BTreeSet<String>>,
    incarnation: Option<Incarnation>,
}

/// After an operation of `key` went through: an invite records the process it reached, a removal
/// forgets it.
fn record_joined_as(
    joined_as: &Mutex<HashMap<OpKey, Incarnation>>,
    key: &OpKey,
    kind: OpKind,
    incarnation: Option<Incarnation>,
) {
    let mut joined_as = joined_as.lock().unwrap_or_else(|p| p.into_inner());
    match (kind, incarnation) {
        (OpKind::Invite | OpKind::Rejoin, Some(incarnation)) if incarnation.running => {
            joined_as.insert(key.clone(), incarnation)
        }
        _ => joined_as.remove(key),
    };
}

/// Whether the operation of `key` may start now (`Ok` with its past attempts) or must wait, with
/// what it is doing meanwhile. Notes stay the same while the state does, so status is not
/// rewritten for nothing.
fn waiting(
    ops: &HashMap<OpKey, OpState>,
    key: &OpKey,
    now: Instant,
    live_now: Option<&BTreeSet<String>>,
    report: &mut ChannelReport,
) -> Result<u32, Note> {
    match ops.get(key) {
        None => Ok(0),
        // Another instance than the one that failed (it came online, or restarted): at once.
        Some(OpState::Failed { live, .. }) if live_now.is_some() && live.as_ref() != live_now => Ok(0),
        Some(OpState::Running { kind }) => {
            report.busy = true;
            Err(Note::InProgress(*kind))
        }
        Some(OpState::Failed { kind, message, retry_at, .. }) if *retry_at > now => {
            let wait = *retry_at - now;
            report.retry_in = Some(report.retry_in.map_or(wait, |r| r.min(wait)));
            Err(Note::Failed { kind: *kind, message: message.clone(), waits_for_others: false })
        }
        Some(OpState::Failed { kind, message, .. }) if others_running(ops, key) => {
            // The manager runs a channel's invites one at a time: a retry (likely of an offline
            // participant) waits until the others are through.
            report.busy = true;
            Err(Note::Failed { kind: *kind, message: message.clone(), waits_for_others: true })
        }
        Some(OpState::Failed { attempts, .. }) => Ok(*attempts),
    }
}

/// What a participant's operation is doing, as its status says it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Note {
    InProgress(OpKind),
    Failed { kind: OpKind, message: String, waits_for_others: bool },
}

impl Note {
    fn failed(&self) -> bool {
        matches!(self, Note::Failed { .. })
    }
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Note::InProgress(kind) => write!(f, "{} in progress", kind.verb()),
            Note::Failed { kind, message, waits_for_others: false } => {
                write!(f, "{} failed: {message}; retried with backoff", kind.verb())
            }
            Note::Failed { kind, message, waits_for_others: true } => {
                write!(f, "{} failed: {message}; retry waits for other invites", kind.verb())
            }
        }
    }
}

/// Whether an operation's outcome tells the manager lost its node (an invite refused with
/// [`Said::NoRoute`]) or has it again (an invite that went through).
fn record_lost_node(lost: &Mutex<HashMap<String, String>>, manager: &str, kind: OpKind, result: &Result<(), CmError>) {
    let mut lost = lost.lock().unwrap_or_else(|p| p.into_inner());
    let (newly_lost, back) = match result {
        Err(CmError::Refused { said: Said::NoRoute, message, .. }) => {
            (lost.insert(manager.to_owned(), message.clone()).is_none().then_some(message), false)
        }
        Ok(()) if matches!(kind, OpKind::Invite | OpKind::Rejoin) => (None, lost.remove(manager).is_some()),
        _ => (None, false),
    };
    if let Some(message) = newly_lost {
        tracing::warn!(manager, %message, "the channel manager has lost its SLIM node: every invite fails");
    }
    if back {
        info!(manager, "the channel manager reaches its SLIM node again");
    }
}

fn others_running(ops: &HashMap<OpKey, OpState>, key: &OpKey) -> bool {
    ops.iter().any(|(other, state)| {
        other.manager == key.manager
            && other.channel == key.channel
            && other.participant != key.participant
            && matches!(state, OpState::Running { .. })
    })
}

async fn run_op(manager: &ChannelManagerClient, channel: &str, participant: &str, kind: OpKind) -> Result<(), CmError> {
    match kind {
        OpKind::Invite => invite(manager, channel, participant).await,
        // A live instance acknowledges its removal at once.
        OpKind::Remove | OpKind::HandOver | OpKind::Retire => manager.delete_participant(channel, participant).await,
        OpKind::Rejoin => {
            // The dead instance cannot be told, but the manager removes it all the same.
            manager.delete_participant(channel, participant).await?;
            invite(manager, channel, participant).await
        }
    }
}

/// An invite for a member that is already in counts as done.
async fn invite(manager: &ChannelManagerClient, channel: &str, participant: &str) -> Result<(), CmError> {
    match manager.add_participant(channel, participant).await {
        Err(CmError::Refused { said: Said::AlreadyMember, .. }) => Ok(()),
        other => other,
    }
}

fn member_report(member: MemberState, notes: &HashMap<String, Note>) -> ParticipantReport {
    let note = notes.get(&member.name).filter(|_| !member.joined);
    let message = match note {
        Some(note) => Some(note.to_string()),
        None => member.note,
    };
    ParticipantReport {
        instance: member.listed.filter(|_| member.joined),
        joined: member.joined,
        message: if member.joined { None } else { message },
        failing: note.is_some_and(Note::failed),
        name: member.name,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::slim::fake_channel_manager::{FakeChannelManager, MANAGER_NAME};

    /// Starts an invite that takes 400 ms (an offline participant) and counts its completions.
    async fn invite_under_way(engine: &ChannelEngine, cm: &FakeChannelManager) -> Arc<AtomicUsize> {
        cm.state().offline.insert("org/ns/dave".into());
        cm.state().offline_delay = Duration::from_millis(400);
        let manager = ChannelManagerClient::new(&cm.endpoint).expect("client");
        let done = Arc::new(AtomicUsize::new(0));
        let counter = done.clone();
        let desired = BTreeSet::from(["org/ns/dave".to_owned()]);
        let report = engine
            .sync(ChannelSync {
                manager: &manager,
                channel: "org/ns/chat",
                mls_enabled: false,
                desired: &desired,
                managed_before: &BTreeSet::new(),
                live: None,
                leaving: &BTreeSet::new(),
                incarnations: &Default::default(),
                on_done: Arc::new(move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                }),
            })
            .await
            .expect("sync");
        assert!(report.busy, "the invite runs in the background");
        done
    }

    #[tokio::test]
    async fn operations_stop_with_the_engine_guard() {
        // Left to run, the invite reports within a second.
        let cm = FakeChannelManager::start().await;
        let engine = ChannelEngine::default();
        let _running = engine.stop_on_drop();
        let done = invite_under_way(&engine, &cm).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);

        // Once the guard drops (leadership lost), the same invite never reports.
        let cm = FakeChannelManager::start().await;
        let engine = ChannelEngine::default();
        let guard = engine.stop_on_drop();
        let done = invite_under_way(&engine, &cm).await;
        drop(guard);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(done.load(Ordering::SeqCst), 0, "a cancelled operation neither finishes nor triggers");
    }

    /// One operation at a time per channel, at most `in_flight` at one manager.
    #[tokio::test]
    async fn operations_take_turns_per_channel_and_per_manager() {
        for (in_flight, most) in [(2, 2), (0, 3)] {
            let cm = FakeChannelManager::start().await;
            cm.state().offline_delay = Duration::from_millis(100);
            let engine = ChannelEngine::default().with_in_flight(in_flight);
            let manager = ChannelManagerClient::new(&cm.endpoint).expect("client");
            for c in 0..3 {
                let desired: BTreeSet<String> = (0..3).map(|p| format!("org/ns/p{c}-{p}")).collect();
                cm.state().offline.extend(desired.iter().cloned());
                let request = ChannelSync {
                    manager: &manager,
                    channel: &format!("org/ns/chat-{c}"),
                    mls_enabled: false,
                    desired: &desired,
                    managed_before: &BTreeSet::new(),
                    live: None,
                    leaving: &BTreeSet::new(),
                    incarnations: &Default::default(),
                    on_done: Arc::new(|| {}),
                };
                assert!(engine.sync(request).await.expect("sync").busy);
            }
            let finished = || cm.state().calls.iter().filter(|c| c.starts_with("AddParticipant")).count() == 9;
            for _ in 0..100 {
                if finished() && cm.state().waiting.values().all(|w| *w == 0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let state = cm.state();
            assert_eq!(state.calls.iter().filter(|c| c.starts_with("AddParticipant")).count(), 9, "{:?}", state.calls);
            assert_eq!(state.most_waiting_in_a_channel, 1, "in_flight {in_flight}: one at a time per channel");
            assert_eq!(state.most_waiting, most, "in_flight {in_flight}: at once through the manager");
        }
    }

    /// SLIM gives a restarted app the instance id of its identity: only the Pod tells the new
    /// process from the one that joined.
    #[tokio::test]
    async fn a_member_whose_pod_runs_another_process_is_removed_and_invited_again() {
        let cm = FakeChannelManager::start().await;
        let listed = "org/ns/bob/00000000-0000-0000-0000-0000000000b0";
        let members = BTreeSet::from([MANAGER_NAME.to_owned(), listed.to_owned()]);
        cm.state().channels.insert("org/ns/chat".into(), (false, members));
        let engine = ChannelEngine::default();
        let manager = ChannelManagerClient::new(&cm.endpoint).expect("client");
        let desired = BTreeSet::from(["org/ns/bob".to_owned()]);
        let sync = |instance: Option<&str>, incarnation: Incarnation| {
            let (engine, manager, desired) = (engine.clone(), manager.clone(), desired.clone());
            let live =
                LiveInstances::from([("org/ns/bob".to_owned(), instance.into_iter().map(str::to_owned).collect())]);
            async move {
                let incarnations = Incarnations::from([("org/ns/bob".to_owned(), incarnation)]);
                let request = ChannelSync {
                    manager: &manager,
                    channel: "org/ns/chat",
                    mls_enabled: false,
                    desired: &desired,
                    managed_before: &desired,
                    live: Some(&live),
                    leaving: &BTreeSet::new(),
                    incarnations: &incarnations,
                    on_done: Arc::new(|| {}),
                };
                let report = engine.sync(request).await.expect("sync");
                tokio::time::sleep(Duration::from_millis(200)).await;
                report
            }
        };
        let pod = |uid: &str, running: bool| Incarnation { pod_uid: uid.into(), restarts: 0, running };
        let same = "00000000-0000-0000-0000-0000000000b0";
        assert!(sync(Some(same), pod("a", true)).await.members[0].joined, "joined; its process recorded");
        let changes = || cm.state().calls.iter().filter(|c| !c.starts_with("List")).cloned().collect::<Vec<_>>();
        assert!(changes().is_empty());

        // Pod b now serves the name under the same instance: removed, then invited again.
        let report = sync(Some(same), pod("b", true)).await;
        assert!(!report.members[0].joined && report.busy, "{report:?}");
        assert_eq!(changes(), ["DeleteParticipant org/ns/chat org/ns/bob", "AddParticipant org/ns/chat org/ns/bob"]);
        let now = cm.state().channels["org/ns/chat"].1.iter().find(|m| m.starts_with("org/ns/bob/")).cloned();
        let instance = now.as_deref().and_then(instance_of).expect("bob invited again").to_owned();
        assert!(sync(Some(&instance), pod("b", true)).await.members[0].joined, "pod b's process is the member now");
        assert_eq!(changes().len(), 2, "nothing more to do");

        // Its app stops: the gone instance is removed at once, and not invited while offline.
        let report = sync(None, pod("b", false)).await;
        assert!(report.members[0].message.as_deref().unwrap_or("").contains("removal of the stopped instance"));
        assert_eq!(changes()[2], "DeleteParticipant org/ns/chat org/ns/bob");
        let report = sync(None, pod("b", false)).await;
        assert!(report.members[0].message.as_deref().unwrap_or("").starts_with("offline"), "{report:?}");
        assert_eq!(changes().len(), 3, "{:?}", changes());
    }

    /// Found by the soak: a participant whose invite failed (it was restarting) waited out its
    /// backoff (up to 5 min) although its new instance was there.
    #[tokio::test]
    async fn a_failed_invite_is_retried_at_once_when_the_participants_instance_changes() {
        let cm = FakeChannelManager::start().await;
        cm.state().offline.insert("org/ns/dave".into());
        cm.state().offline_delay = Duration::from_millis(10);
        let engine = ChannelEngine::new(Duration::from_secs(60), Duration::from_secs(300));
        let manager = ChannelManagerClient::new(&cm.endpoint).expect("client");
        let desired = BTreeSet::from(["org/ns/dave".to_owned()]);
        let sync = |live: LiveInstances| {
            let (engine, manager, desired) = (engine.clone(), manager.clone(), desired.clone());
            async move {
                let request = ChannelSync {
                    manager: &manager,
                    channel: "org/ns/chat",
                    mls_enabled: false,
                    desired: &desired,
                    managed_before: &BTreeSet::new(),
                    live: Some(&live),
                    leaving: &BTreeSet::new(),
                    incarnations: &Default::default(),
                    on_done: Arc::new(|| {}),
                };
                engine.sync(request).await.expect("sync")
            }
        };
        let instance = |id: &str| LiveInstances::from([("org/ns/dave".to_owned(), BTreeSet::from([id.to_owned()]))]);
        sync(instance("1")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let report = sync(instance("1")).await;
        assert!(report.retry_in.is_some_and(|r| r > Duration::from_secs(30)), "the same instance waits: {report:?}");
        cm.state().offline.clear();
        let report = sync(instance("2")).await;
        assert!(report.busy, "a new instance is invited at once: {report:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let invites = cm.state().calls.iter().filter(|c| c.contains("AddParticipant")).count();
        assert_eq!(invites, 2, "{:?}", cm.state().calls);
        assert_eq!(engine.ops.lock().expect("ops").len(), 0, "the second invite went through");
    }
}

#[cfg(test)]
mod lost_node {
    use super::*;
    use crate::slim::model::Unreachable;

    fn refused(said: Said) -> Result<(), CmError> {
        Err(CmError::Refused { op: "AddParticipant", message: format!("{said:?}"), said })
    }

    #[test]
    fn a_manager_is_lost_on_a_no_route_refusal_and_back_on_an_invite_that_goes_through() {
        let lost = Mutex::new(HashMap::new());
        record_lost_node(&lost, "http://cm", OpKind::Invite, &refused(Said::RetriesExhausted));
        assert!(lost.lock().expect("lock").is_empty(), "an offline participant says nothing of the manager");
        record_lost_node(&lost, "http://cm", OpKind::Invite, &refused(Said::NoRoute));
        assert_eq!(lost.lock().expect("lock").get("http://cm").map(String::as_str), Some("NoRoute"));
        record_lost_node(&lost, "http://cm", OpKind::Remove, &Ok(()));
        assert!(lost.lock().expect("lock").contains_key("http://cm"), "a removal proves nothing");
        record_lost_node(&lost, "http://cm", OpKind::Rejoin, &Ok(()));
        assert!(lost.lock().expect("lock").is_empty());
    }

    #[test]
    fn only_the_managers_own_failures_are_retried_soon() {
        let down =
            CmError::Unavailable { endpoint: "http://cm".into(), cause: Unreachable::Transport("refused".into()) };
        assert!(down.manager_down());
        assert!(refused(Said::NoRoute).unwrap_err().manager_down());
        assert!(!refused(Said::RetriesExhausted).unwrap_err().manager_down());
    }
}
