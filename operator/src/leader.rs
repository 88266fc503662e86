//! Leader election over a `coordination.k8s.io/v1` Lease: only the leader reconciles, every
//! replica serves the webhook. On shutdown the leader releases the Lease so a successor takes over
//! without waiting for it to expire.
//!
//! Two leaders must never act at once, whatever the network or the clocks do. So no replica ever
//! compares another machine's clock with its own:
//! - a follower takes an expired Lease over only once the Lease's record has stayed unchanged for
//!   the lease duration on its *own* monotonic clock (as client-go's `observedTime`);
//! - a leader leads until `renew_deadline` after the *start* of its last successful renewal, also on
//!   its own clock, and every attempt is bounded by that deadline: an API call that hangs cannot
//!   keep it leading. The deadline is shorter than the lease duration, so the leader has stopped
//!   before any follower may take over.
//!
//! What leads carries its deadline ([`Leadership::Leader`]), and [`Leadership::is_leading`] checks
//! it against the clock, so a reconcile that starts late (a replica that was frozen, say) sees the
//! lost lease even before this loop has run again.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// What this replica knows about leadership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// Not known yet (not ready).
    Unknown,
    /// Leading until `until` on this replica's monotonic clock, unless renewed before.
    Leader {
        until: Instant,
    },
    Follower,
}

impl Leadership {
    /// Leads for good (leader election switched off).
    pub fn sole() -> Self {
        Leadership::Leader { until: Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600) }
    }

    /// Leading now: the deadline has not passed.
    pub fn is_leading(&self) -> bool {
        matches!(self, Leadership::Leader { until } if Instant::now() < *until)
    }

    pub fn is_leader(&self) -> bool {
        matches!(self, Leadership::Leader { .. })
    }
}

/// What to do with the Lease as it is now. Pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// No Lease yet: create it holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Someone else held it and let it expire (or released it): take it over.
    TakeOver,
    /// Someone else holds it.
    Follow { holder: String },
}

/// `unchanged_for`: how long this replica has seen the Lease's record as it is now (its own clock).
pub fn decide(lease: Option<&Lease>, identity: &str, unchanged_for: Duration) -> LeaseAction {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() { LeaseAction::TakeOver } else { LeaseAction::Create };
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == identity {
        return LeaseAction::Renew;
    }
    let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15));
    if holder.is_empty() || unchanged_for >= duration {
        LeaseAction::TakeOver
    } else {
        LeaseAction::Follow { holder: holder.to_owned() }
    }
}

/// When this replica first saw the Lease's current record.
#[derive(Debug, Default)]
struct Observed {
    record: Option<LeaseSpec>,
    since: Option<Instant>,
}

impl Observed {
    /// How long the record has been as it is in `lease`, as seen from here.
    fn unchanged_for(&mut self, lease: Option<&Lease>, now: Instant) -> Duration {
        let record = lease.and_then(|l| l.spec.clone());
        if self.since.is_none() || self.record != record {
            self.record = record;
            self.since = Some(now);
        }
        self.since.map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// Written to the Lease: how long followers wait, on their own clocks, for a renewal.
    pub lease_duration: Duration,
    /// How long after the start of its last successful renewal the leader keeps leading; bounds
    /// every attempt. Shorter than `lease_duration`.
    pub renew_deadline: Duration,
    /// Pause between attempts.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            name: "slim-operator-leader".into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// Refuses timings that would let two replicas lead at once.
    pub fn validate(&self) -> Result<(), String> {
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "the renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period >= self.renew_deadline {
            return Err(format!(
                "the retry period ({:?}) must be shorter than the renew deadline ({:?})",
                self.retry_period, self.renew_deadline
            ));
        }
        if self.lease_duration.as_secs() == 0 || self.lease_duration.subsec_nanos() != 0 {
            return Err(format!("the lease duration ({:?}) must be whole seconds", self.lease_duration));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("Lease {name}: {source}")]
    Api { name: String, source: kube::Error },
    #[error("Lease {name}: no answer within {after:?}")]
    TimedOut { name: String, after: Duration },
}

/// Keeps trying to lead until `shutdown`; publishes the state on `state`, then releases.
pub async fn run(
    client: Client,
    config: LeaseConfig,
    state: watch::Sender<Leadership>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed = Observed::default();
    tokio::pin!(shutdown);
    loop {
        attempt(&api, &config, &mut observed, &state).await;
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(config.retry_period) => {}
        }
    }
    if state.borrow().is_leading() {
        match tokio::time::timeout(config.renew_deadline, release(&api, &config)).await {
            Ok(Ok(())) => info!("lease released"),
            Ok(Err(error)) => warn!(%error, "could not release the lease"),
            Err(_) => warn!("could not release the lease: no answer in time"),
        }
    }
    state.send_replace(Leadership::Follower);
}

/// One attempt, bounded by the renew deadline (a leader's own deadline when sooner); publishes
/// the outcome.
async fn attempt(api: &Api<Lease>, config: &LeaseConfig, observed: &mut Observed, state: &watch::Sender<Leadership>) {
    let started = Instant::now();
    let current = *state.borrow();
    let budget = match current {
        Leadership::Leader { until } => until.saturating_duration_since(started).min(config.renew_deadline),
        _ => config.renew_deadline,
    };
    let outcome = match tokio::time::timeout(budget, step(api, config, observed)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(LeaseError::TimedOut { name: config.name.clone(), after: budget }),
    };
    match outcome {
        Ok(true) => {
            if !current.is_leader() {
                info!(identity = %config.identity, lease = %config.name, "became leader");
            }
            state.send_replace(Leadership::Leader { until: started + config.renew_deadline });
        }
        Ok(false) => {
            if current.is_leader() {
                warn!(identity = %config.identity, "lost the lease; reconciling stops");
            }
            state.send_replace(Leadership::Follower);
        }
        Err(error) => {
            warn!(%error, "lease update failed");
            match current {
                Leadership::Leader { until } if Instant::now() >= until => {
                    warn!(deadline = ?config.renew_deadline, "could not renew the lease in time; stepping down");
                    state.send_replace(Leadership::Follower);
                }
                Leadership::Unknown => {
                    state.send_replace(Leadership::Follower);
                }
                _ => {}
            }
        }
    }
}

/// Reads the Lease and acts on it; `Ok(true)` when we hold it afterwards.
async fn step(api: &Api<Lease>, config: &LeaseConfig, observed: &mut Observed) -> Result<bool, LeaseError> {
    let api_error = |source| LeaseError::Api { name: config.name.clone(), source };
    let current = api.get_opt(&config.name).await.map_err(api_error)?;
    let action = decide(current.as_ref(), &config.identity, observed.unchanged_for(current.as_ref(), Instant::now()));
    // The Lease's times are for people and other tools; no replica here decides by them.
    let now = MicroTime(Timestamp::now());
    let duration = i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let written = match (action, current) {
        (LeaseAction::Follow { .. }, _) | (LeaseAction::Renew | LeaseAction::TakeOver, None) => return Ok(false),
        (LeaseAction::Create, _) => {
            let mut lease = Lease {
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            };
            lease.metadata.name = Some(config.name.clone());
            api.create(&PostParams::default(), &lease).await
        }
        (action, Some(mut lease)) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if action == LeaseAction::TakeOver {
                spec.holder_identity = Some(config.identity.clone());
                spec.acquire_time = Some(now.clone());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.lease_duration_seconds = Some(duration);
            spec.renew_time = Some(now);
            // The resourceVersion we read makes this a compare-and-swap.
            api.replace(&config.name, &PostParams::default(), &lease).await
        }
    };
    match written {
        Ok(_) => Ok(true),
        // Another replica wrote first: it leads.
        Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => Ok(false),
        Err(error) => Err(api_error(error)),
    }
}

async fn release(api: &Api<Lease>, config: &LeaseConfig) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&config.name).await? else { return Ok(()) };
    let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    api.replace(&config.name, &PostParams::default(), &lease).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response};
    use kube::client::Body;

    fn lease(holder: Option<&str>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn lease_decisions_go_by_the_local_clock_only() {
        let secs = Duration::from_secs;
        assert_eq!(decide(None, "a", secs(0)), LeaseAction::Create);
        assert_eq!(decide(Some(&lease(Some("a"))), "a", secs(0)), LeaseAction::Renew);
        assert_eq!(
            decide(Some(&lease(Some("b"))), "a", secs(14)),
            LeaseAction::Follow { holder: "b".into() },
            "b's record changed 14 s ago here: its 15 s lease holds"
        );
        assert_eq!(decide(Some(&lease(Some("b"))), "a", secs(15)), LeaseAction::TakeOver, "unchanged for 15 s");
        assert_eq!(decide(Some(&lease(None)), "a", secs(0)), LeaseAction::TakeOver, "released");
        assert_eq!(decide(Some(&Lease::default()), "a", secs(0)), LeaseAction::TakeOver);
    }

    #[test]
    fn a_record_is_timed_from_when_it_was_first_seen_here() {
        let start = Instant::now();
        let mut observed = Observed::default();
        let mut held = lease(Some("b"));
        assert_eq!(observed.unchanged_for(Some(&held), start), Duration::ZERO, "first sight: the full wait");
        assert_eq!(observed.unchanged_for(Some(&held), start + Duration::from_secs(9)), Duration::from_secs(9));
        // A renewal (whatever time it claims) starts the wait again.
        held.spec.as_mut().expect("spec").renew_time = Some(MicroTime(Timestamp::UNIX_EPOCH));
        assert_eq!(observed.unchanged_for(Some(&held), start + Duration::from_secs(10)), Duration::ZERO);
        assert_eq!(observed.unchanged_for(Some(&held), start + Duration::from_secs(26)), Duration::from_secs(16));
    }

    #[test]
    fn timings_that_allow_two_leaders_are_refused() {
        let mut config = LeaseConfig::new("ns", "me");
        assert_eq!(config.validate(), Ok(()));
        config.renew_deadline = config.lease_duration;
        assert!(config.validate().is_err());
        config = LeaseConfig::new("ns", "me");
        config.retry_period = config.renew_deadline;
        assert!(config.validate().is_err());
    }

    fn mock() -> (Api<Lease>, tower_test::mock::Handle<Request<Body>, Response<Body>>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (Api::namespaced(Client::new(service, "slim-system"), "slim-system"), handle)
    }

    fn respond(respond: tower_test::mock::SendResponse<Response<Body>>, status: u16, body: serde_json::Value) {
        let bytes = serde_json::to_vec(&body).expect("json");
        respond.send_response(Response::builder().status(status).body(Body::from(bytes)).expect("response"));
    }

    /// Answers the calls of one `step` in order: (method, reply status, reply body).
    async fn step_against(replies: Vec<(Method, u16, serde_json::Value)>) -> (Result<bool, LeaseError>, Vec<String>) {
        let (api, mut handle) = mock();
        let config = LeaseConfig::new("slim-system", "me");
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for (method, status, body) in replies {
                let (request, reply) = handle.next_request().await.expect("a call");
                assert_eq!(request.method(), method);
                assert!(request.uri().path().starts_with("/apis/coordination.k8s.io/v1/namespaces/slim-system/leases"));
                seen.push(format!("{} {}", request.method(), request.uri().path()));
                respond(reply, status, body);
            }
            seen
        });
        let result = step(&api, &config, &mut Observed::default()).await;
        (result, server.await.expect("server"))
    }

    fn lease_json(holder: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "slim-operator-leader", "namespace": "slim-system", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": MicroTime(Timestamp::now())},
        })
    }

    fn not_found() -> serde_json::Value {
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
    }

    #[tokio::test]
    async fn missing_lease_is_created_and_held() {
        let (result, calls) =
            step_against(vec![(Method::GET, 404, not_found()), (Method::POST, 201, lease_json("me"))]).await;
        assert!(result.expect("step"));
        assert_eq!(calls.len(), 2);
    }

    #[tokio::test]
    async fn a_holder_is_followed_without_writes_however_old_its_renew_time() {
        // Its renewTime says an hour ago: another machine's clock, which decides nothing here.
        let mut stale = lease_json("other");
        stale["spec"]["renewTime"] =
            serde_json::json!(MicroTime(Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_hours(1)));
        let (result, calls) = step_against(vec![(Method::GET, 200, stale)]).await;
        assert!(!result.expect("step"));
        assert_eq!(calls.len(), 1, "no write while another replica's record is fresh to us");
    }

    #[tokio::test]
    async fn a_released_lease_is_taken_over_and_a_lost_race_means_following() {
        let released = lease_json("");
        let (result, _) =
            step_against(vec![(Method::GET, 200, released.clone()), (Method::PUT, 200, lease_json("me"))]).await;
        assert!(result.expect("taken over"));
        let conflict = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409});
        let (result, _) = step_against(vec![(Method::GET, 200, released), (Method::PUT, 409, conflict)]).await;
        assert!(!result.expect("conflict is not an error"), "another replica took it first");
    }

    /// The leader's API calls start hanging after it won the Lease: it must stop leading by its
    /// renew deadline, before any follower could take the Lease over (the lease duration after it
    /// last saw a renewal).
    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_calls_hang_steps_down_before_the_lease_could_be_taken_over() {
        let (api, mut handle) = mock();
        let config = LeaseConfig::new("slim-system", "me");
        let (state, mut watched) = watch::channel(Leadership::Unknown);
        let started = Instant::now();
        let leader = tokio::spawn({
            let config = config.clone();
            async move {
                let mut observed = Observed::default();
                loop {
                    attempt(&api, &config, &mut observed, &state).await;
                    tokio::time::sleep(config.retry_period).await;
                }
            }
        });
        let (_, reply) = handle.next_request().await.expect("GET");
        respond(reply, 404, not_found());
        let (_, reply) = handle.next_request().await.expect("POST");
        respond(reply, 201, lease_json("me"));
        watched.wait_for(Leadership::is_leader).await.expect("leads");
        let won = Instant::now();
        // From now on nothing is answered: every later call hangs.
        let mut pending = Vec::new();
        let stepped_down = async {
            loop {
                tokio::select! {
                    request = handle.next_request() => pending.push(request),
                    changed = watched.changed() => {
                        changed.expect("state");
                        if !watched.borrow().is_leader() { return Instant::now(); }
                    }
                }
            }
        }
        .await;
        assert_eq!(*watched.borrow(), Leadership::Follower);
        assert!(stepped_down - started <= config.renew_deadline, "stepped down {:?} after winning", stepped_down - won);
        // The earliest a follower could take over: the lease duration after it saw the renewal,
        // which it cannot have seen before we sent it.
        assert!(stepped_down - started < config.lease_duration);
        assert!(!pending.is_empty(), "it kept trying");
        leader.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn leading_ends_at_the_deadline_even_before_the_loop_notices() {
        let state = Leadership::Leader { until: Instant::now() + Duration::from_secs(10) };
        assert!(state.is_leading());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!state.is_leading(), "a frozen replica that wakes up late does not act");
        assert!(Leadership::sole().is_leading());
    }
}
