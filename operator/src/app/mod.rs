//! The composition root of `slim-operator run`: what each part is built from ([`parts`]), who
//! leads ([`leadership`]), when the process is ready ([`readiness`]), and the supervision that
//! runs the parts for as long as the process does and shuts them down in order.

mod leadership;
mod parts;
mod readiness;

use std::net::SocketAddr;
use std::time::Duration;

use slim_k8s_common::supervise::{Ended, Supervisor};
use tokio::sync::watch;

use crate::cli::RunArgs;
use crate::telemetry;

/// The supervised parts' names.
const SIGNALS: &str = "signal handler";
const CONTROLLERS: &str = "controllers";
const LEADER_ELECTION: &str = "leader election";

/// Errors that end the process.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("connecting to Kubernetes (is KUBECONFIG set, or are we in a cluster?): {0}")]
    Client(kube::Error),
    #[error("controllers: {0}")]
    Controllers(crate::controller::ControllerFailure),
    #[error("admin server on {addr}: {source}")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error("rendering CRDs: {0}")]
    Crds(serde_yaml::Error),
    #[error("{0}")]
    Webhook(crate::webhook::run::WebhookError),
    #[error("--default-node-selector: {0}")]
    DefaultNodes(crate::plan::SelectorError),
    #[error("leader election: {0}")]
    LeaseTimings(String),
    #[error("--spiffe-endpoint-socket: {0}")]
    SpiffeSocket(String),
    #[error("issuer: {0}")]
    Issuer(String),
    #[error("{0}")]
    IssuerStopped(crate::issuer::IssuerError),
    /// A part that runs for as long as the process returned.
    #[error("{0} stopped unexpectedly")]
    TaskEnded(&'static str),
    #[error("{name} panicked: {message}")]
    Panicked { name: &'static str, message: String },
}

/// The parts, each returning why it ended.
type Parts = Supervisor<Result<(), RunError>>;

/// Runs the operator until a signal (then shuts down in order, `Ok`) or until a part fails.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    telemetry::init(args.log_format);
    let client = kube::Client::try_default().await.map_err(RunError::Client)?;
    let identity = args.pod_name.clone().unwrap_or_else(|| format!("slim-operator-{}", std::process::id()));
    let stop = Stop::default();
    let mut parts = Parts::new();
    parts.spawn(SIGNALS, async {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight reconciles");
        Ok(())
    });
    let election = leadership::elect(&args, &client, &identity, &mut parts)?;
    let runtime = parts::runtime(&args, client, &identity, election.leadership.clone(), &mut parts)?;
    parts::spawn_servers(&args, &runtime, &stop, &mut parts)?;
    parts.spawn(CONTROLLERS, leadership::lead(runtime, stop.clone()));
    let outcome = first_outcome(&mut parts).await;
    shut_down(parts, &stop, outcome.is_ok(), election.release, args.lease_renew_deadline).await;
    outcome
}

/// The first part to end decides: the signal handler means a requested shutdown; any other part
/// ending (before the shutdown is requested) is a failure.
async fn first_outcome(parts: &mut Parts) -> Result<(), RunError> {
    match parts.next().await {
        None | Some(Ended { name: SIGNALS, outcome: Ok(Ok(())) }) => Ok(()),
        Some(Ended { name, outcome: Ok(Ok(())) }) => Err(RunError::TaskEnded(name)),
        Some(Ended { outcome: Ok(Err(error)), .. }) => Err(error),
        Some(Ended { name, outcome: Err(message) }) => Err(RunError::Panicked { name, message }),
    }
}

/// Every part winds down; the controllers finish their in-flight reconciles (or, after a failure,
/// are cut short: SLIM writes are idempotent, so the next leader redoes them), and only then is
/// the lease released, so two replicas never write at once.
async fn shut_down(
    mut parts: Parts,
    stop: &Stop,
    graceful: bool,
    release: tokio::sync::oneshot::Sender<()>,
    renew_deadline: Duration,
) {
    stop.request();
    if !graceful {
        parts.abort(CONTROLLERS);
    }
    parts.join(CONTROLLERS).await;
    let _ = release.send(());
    let _ = tokio::time::timeout(renew_deadline + Duration::from_secs(1), parts.join(LEADER_ELECTION)).await;
}

/// The process-wide stop request every part winds down on.
#[derive(Clone)]
struct Stop(watch::Sender<bool>);

impl Default for Stop {
    fn default() -> Self {
        Self(watch::channel(false).0)
    }
}

impl Stop {
    fn request(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once the stop is requested.
    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_signal_is_a_clean_stop_and_any_other_end_a_failure() {
        let mut parts = Parts::new();
        parts.spawn(SIGNALS, async { Ok(()) });
        assert!(first_outcome(&mut parts).await.is_ok());
        let mut parts = Parts::new();
        parts.spawn("webhook", async { Ok(()) });
        assert!(matches!(first_outcome(&mut parts).await, Err(RunError::TaskEnded("webhook"))));
        let mut parts = Parts::new();
        parts.spawn("admin server", async { panic!("bind") });
        let failure = first_outcome(&mut parts).await;
        assert!(matches!(failure, Err(RunError::Panicked { name: "admin server", .. })), "{failure:?}");
    }

    /// The lease is released only once the controllers have stopped.
    #[tokio::test]
    async fn the_lease_is_released_after_the_controllers_stop() {
        let mut parts = Parts::new();
        let stop = Stop::default();
        let (stopped_tx, mut stopped_rx) = watch::channel(false);
        let stopped = stop.stopped();
        parts.spawn(CONTROLLERS, async move {
            stopped.await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            stopped_tx.send_replace(true);
            Ok(())
        });
        let (release, released) = tokio::sync::oneshot::channel();
        parts.spawn(LEADER_ELECTION, async move {
            let _ = released.await;
            assert!(*stopped_rx.borrow_and_update(), "released while the controllers ran");
            Ok(())
        });
        shut_down(parts, &stop, true, release, Duration::from_secs(1)).await;
    }
}
