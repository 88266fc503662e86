//! Who leads: the election (or sole leadership without one), and the controllers run while this
//! replica leads.

use tokio::sync::{oneshot, watch};

use super::{LEADER_ELECTION, Parts, RunError, Stop};
use crate::cli::RunArgs;
use crate::controller::{self, Runtime};
use crate::leader::{self, Leadership, LeaseConfig};

/// Leader election as wired: the leadership as it changes, and the sender that releases the
/// lease (the election itself runs among the parts).
pub(super) struct Election {
    pub leadership: watch::Receiver<Leadership>,
    pub release: oneshot::Sender<()>,
}

/// Starts leader election when on; without it this replica leads for as long as it runs.
pub(super) fn elect(
    args: &RunArgs,
    client: &kube::Client,
    identity: &str,
    parts: &mut Parts,
) -> Result<Election, RunError> {
    let (leader_tx, leadership) = watch::channel(Leadership::Unknown);
    let (release, released) = oneshot::channel::<()>();
    if !args.leader_election {
        leader_tx.send_replace(Leadership::sole());
        // The sender lives until the process ends: a dropped sender would read as leadership lost.
        parts.spawn(LEADER_ELECTION, async move {
            let _ = released.await;
            drop(leader_tx);
            Ok(())
        });
        return Ok(Election { leadership, release });
    }
    let lease = LeaseConfig {
        lease_duration: args.lease_duration,
        renew_deadline: args.lease_renew_deadline,
        retry_period: args.lease_retry_period,
        ..LeaseConfig::new(&args.namespace, identity)
    };
    lease.validate().map_err(RunError::LeaseTimings)?;
    let election = leader::run(client.clone(), lease, leader_tx, async {
        let _ = released.await;
    });
    parts.spawn(LEADER_ELECTION, async move {
        election.await;
        Ok(())
    });
    Ok(Election { leadership, release })
}

/// Runs the controllers whenever this replica leads, until `stop`. Losing the lease stops
/// reconciling at once (SLIM writes are idempotent, so a reconcile cut short is simply redone
/// by the next leader).
pub(super) async fn lead(runtime: Runtime, stop: Stop) -> Result<(), RunError> {
    let mut leadership = runtime.leadership.clone();
    let mut stopped = std::pin::pin!(stop.stopped());
    loop {
        tokio::select! {
            () = &mut stopped => return Ok(()),
            changed = leadership.wait_for(Leadership::is_leader) => if changed.is_err() { return Ok(()) },
        }
        runtime.metrics.leading(true);
        let mut lost = leadership.clone();
        tokio::select! {
            result = controller::run(runtime.clone(), stop.stopped()) => {
                return result.map_err(RunError::Controllers)
            }
            _ = lost.wait_for(|l| !l.is_leader()) => {
                runtime.metrics.leading(false);
                runtime.caches.reset();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A dropped sender reads as leadership lost (the controllers would restart in a loop).
    #[tokio::test]
    async fn without_election_this_replica_leads_until_released() {
        let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().expect("uri")))
            .expect("a client that is never used");
        let mut parts = Parts::new();
        let election = elect(&RunArgs::default(), &client, "me", &mut parts).expect("no election");
        let mut leadership = election.leadership.clone();
        assert!(leadership.borrow().is_leading());
        let lost = tokio::time::timeout(Duration::from_millis(200), leadership.wait_for(|l| !l.is_leader())).await;
        assert!(lost.is_err(), "leadership must not end while the election is held");
        drop(lost);
        let _ = election.release.send(());
        parts.join(LEADER_ELECTION).await;
        assert!(leadership.wait_for(|l| !l.is_leader()).await.is_err(), "released: the sender is gone");
    }
}
