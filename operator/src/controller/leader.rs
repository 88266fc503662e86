//! Leader election over a `coordination.k8s.io/v1` Lease: only the leader reconciles, every
//! replica serves the webhook. A leader that cannot renew in time steps down at once; on shutdown
//! it releases the Lease so a successor takes over without waiting for it to expire.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

/// What this replica knows about leadership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// Not known yet (not ready).
    Unknown,
    Leader,
    Follower,
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

pub fn decide(lease: Option<&Lease>, identity: &str, now: Timestamp) -> LeaseAction {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() { LeaseAction::TakeOver } else { LeaseAction::Create };
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == identity {
        return LeaseAction::Renew;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).map(|t| t.0);
    let expired = renewed.is_none_or(|at| at + duration < now);
    if holder.is_empty() || expired { LeaseAction::TakeOver } else { LeaseAction::Follow { holder: holder.to_owned() } }
}

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            name: "slim-operator-leader".into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(4),
        }
    }
}

/// Keeps trying to lead until `shutdown`; publishes the state on `state`, then releases.
pub async fn run(
    client: Client,
    config: LeaseConfig,
    state: watch::Sender<Leadership>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut last_renewal: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        match step(&api, &config).await {
            Ok(true) => {
                last_renewal = Some(tokio::time::Instant::now());
                if *state.borrow() != Leadership::Leader {
                    info!(identity = %config.identity, lease = %config.name, "became leader");
                }
                state.send_replace(Leadership::Leader);
            }
            Ok(false) => {
                if *state.borrow() == Leadership::Leader {
                    warn!(identity = %config.identity, "lost the lease; reconciling stops");
                }
                last_renewal = None;
                state.send_replace(Leadership::Follower);
            }
            Err(error) => {
                warn!(%error, "lease update failed");
                // A leader that cannot renew within the lease duration must assume it lost it.
                let stale = last_renewal.is_none_or(|at| at.elapsed() + config.renew_every >= config.lease_duration);
                if *state.borrow() == Leadership::Leader && stale {
                    warn!("could not renew the lease in time; stepping down");
                    state.send_replace(Leadership::Follower);
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(config.renew_every) => {}
        }
    }
    if *state.borrow() == Leadership::Leader {
        if let Err(error) = release(&api, &config).await {
            warn!(%error, "could not release the lease");
        } else {
            info!("lease released");
        }
    }
    state.send_replace(Leadership::Follower);
}

/// One attempt; `Ok(true)` when we hold the lease afterwards.
async fn step(api: &Api<Lease>, config: &LeaseConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(&config.name).await?;
    let action = decide(current.as_ref(), &config.identity, now);
    let duration = i32::try_from(config.lease_duration.as_secs()).unwrap_or(15);
    let written = match (action, current) {
        (LeaseAction::Follow { .. }, _) => return Ok(false),
        (LeaseAction::Create, _) => {
            let mut lease = Lease {
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
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
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.lease_duration_seconds = Some(duration);
            spec.renew_time = Some(MicroTime(now));
            // The resourceVersion we read makes this a compare-and-swap.
            api.replace(&config.name, &PostParams::default(), &lease).await
        }
        (_, None) => return Ok(false),
    };
    match written {
        Ok(_) => Ok(true),
        // Another replica wrote first: it leads.
        Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => Ok(false),
        Err(error) => Err(error),
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

    fn lease(holder: Option<&str>, renewed: Option<i64>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                lease_duration_seconds: Some(15),
                renew_time: renewed.map(|s| MicroTime(Timestamp::from_second(s).expect("time"))),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("time")
    }

    #[test]
    fn lease_decisions() {
        assert_eq!(decide(None, "a", at(100)), LeaseAction::Create);
        assert_eq!(decide(Some(&lease(Some("a"), Some(99))), "a", at(100)), LeaseAction::Renew);
        assert_eq!(
            decide(Some(&lease(Some("b"), Some(95))), "a", at(100)),
            LeaseAction::Follow { holder: "b".into() },
            "b renewed 5 s ago, its 15 s lease holds"
        );
        assert_eq!(decide(Some(&lease(Some("b"), Some(80))), "a", at(100)), LeaseAction::TakeOver, "b let it expire");
        assert_eq!(decide(Some(&lease(None, None)), "a", at(100)), LeaseAction::TakeOver, "released");
        assert_eq!(decide(Some(&Lease::default()), "a", at(100)), LeaseAction::TakeOver);
    }

    /// Answers the calls of one `step` in order: (method, reply status, reply body).
    async fn step_against(replies: Vec<(Method, u16, serde_json::Value)>) -> (Result<bool, kube::Error>, Vec<String>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "slim-system");
        let api: Api<Lease> = Api::namespaced(client, "slim-system");
        let config = LeaseConfig::new("slim-system", "me");
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for (method, status, body) in replies {
                let (request, respond) = handle.next_request().await.expect("a call");
                assert_eq!(request.method(), method);
                assert!(request.uri().path().starts_with("/apis/coordination.k8s.io/v1/namespaces/slim-system/leases"));
                seen.push(format!("{} {}", request.method(), request.uri().path()));
                let bytes = serde_json::to_vec(&body).expect("json");
                respond.send_response(Response::builder().status(status).body(Body::from(bytes)).expect("response"));
            }
            seen
        });
        let result = step(&api, &config).await;
        (result, server.await.expect("server"))
    }

    fn lease_json(holder: &str, renewed: Timestamp) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "slim-operator-leader", "namespace": "slim-system", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": MicroTime(renewed)},
        })
    }

    fn not_found() -> serde_json::Value {
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
    }

    #[tokio::test]
    async fn missing_lease_is_created_and_held() {
        let (result, calls) = step_against(vec![
            (Method::GET, 404, not_found()),
            (Method::POST, 201, lease_json("me", Timestamp::now())),
        ])
        .await;
        assert!(result.expect("step"));
        assert_eq!(calls.len(), 2);
    }

    #[tokio::test]
    async fn a_live_holder_is_followed_without_writes() {
        let (result, calls) = step_against(vec![(Method::GET, 200, lease_json("other", Timestamp::now()))]).await;
        assert!(!result.expect("step"));
        assert_eq!(calls.len(), 1, "no write while another replica holds a fresh lease");
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_and_a_lost_race_means_following() {
        let stale = Timestamp::now() - SignedDuration::from_secs(60);
        let (result, _) = step_against(vec![
            (Method::GET, 200, lease_json("other", stale)),
            (Method::PUT, 200, lease_json("me", Timestamp::now())),
        ])
        .await;
        assert!(result.expect("taken over"));
        let conflict = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409});
        let (result, _) =
            step_against(vec![(Method::GET, 200, lease_json("other", stale)), (Method::PUT, 409, conflict)]).await;
        assert!(!result.expect("conflict is not an error"), "another replica took it first");
    }
}
