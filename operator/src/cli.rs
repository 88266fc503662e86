//! Command line: `slim-operator run` and `slim-operator crds`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kube::runtime::events::Reporter;

use crate::admin::{self, AdminState};
use crate::controller::{self, ControllerConfig};
use crate::metrics::{Metrics, NodeClientCollector};
use crate::slim::{NodeClientConfig, NodePool};
use crate::telemetry::{self, LogFormat};

#[derive(Parser, Debug)]
#[command(name = "slim-operator", version, about = "Kubernetes operator for SLIM")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controllers and the admin server against the cluster (kubeconfig inferred as
    /// kubectl does: KUBECONFIG, ~/.kube/config, then in-cluster).
    Run(RunArgs),
    /// Print every CRD as multi-document YAML.
    Crds,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Address of the admin server (/livez, /readyz, /metrics).
    #[arg(long, env = "SLIM_OPERATOR_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,

    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "SLIM_OPERATOR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Period of the drift check of every object (e.g. 300s, 5m).
    #[arg(long, env = "SLIM_OPERATOR_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// How long deletion retries an unreachable node before releasing the finalizer.
    #[arg(long, env = "SLIM_OPERATOR_CLEANUP_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub cleanup_timeout: Duration,

    /// Reconciles running at once (0: unbounded).
    #[arg(long, env = "SLIM_OPERATOR_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,

    /// Deadline of a SLIM node's ack to a configuration command (route acks can take ~30 s).
    #[arg(long, env = "SLIM_OPERATOR_NODE_TIMEOUT", default_value = "40s", value_parser = parse_duration)]
    pub node_timeout: Duration,

    /// Channel manager for SlimChannels that name none, e.g. http://slim-channel-manager.slim.svc:10356.
    #[arg(long, env = "SLIM_OPERATOR_CHANNEL_MANAGER")]
    pub channel_manager: Option<String>,

    /// Name of this replica for events (the Pod name, from the downward API).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
}

impl Default for RunArgs {
    fn default() -> Self {
        Self::parse_from_empty()
    }
}

impl RunArgs {
    fn parse_from_empty() -> Self {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: RunArgs,
        }
        Wrapper::parse_from(["slim-operator"]).args
    }
}

/// Parses `500ms`, `30s`, `5m`, `2h` or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 30s, 5m or 2h"))?;
    let duration = match unit {
        "" | "s" => Duration::from_secs(value),
        "ms" => Duration::from_millis(value),
        "m" => Duration::from_secs(value * 60),
        "h" => Duration::from_secs(value * 3600),
        other => return Err(format!("unknown unit {other:?} in {text:?} (use ms, s, m or h)")),
    };
    Ok(duration)
}

/// Errors that end the process.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("connecting to Kubernetes (is KUBECONFIG set, or are we in a cluster?): {0}")]
    Client(#[source] kube::Error),
    #[error("controllers: {0}")]
    Controller(#[source] controller::Error),
    #[error("admin server on {addr}: {source}")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error("rendering CRDs: {0}")]
    Crds(#[source] serde_yaml::Error),
}

pub async fn run(args: RunArgs) -> Result<(), RunError> {
    telemetry::init(args.log_format);
    let client = kube::Client::try_default().await.map_err(RunError::Client)?;
    let nodes = NodePool::new(NodeClientConfig { change_timeout: args.node_timeout, ..Default::default() });
    let mut metrics = Metrics::new();
    metrics.register_collector(NodeClientCollector { pool: nodes.clone() });
    let metrics = Arc::new(metrics);
    let ready = [Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false))];
    let reporter = Reporter { controller: controller::MANAGER.to_owned(), instance: args.pod_name.clone() };
    let config = ControllerConfig {
        resync_interval: args.resync_interval,
        cleanup_timeout: args.cleanup_timeout,
        concurrency: args.concurrency,
        channel_manager: args.channel_manager.clone(),
        ..Default::default()
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight reconciles");
        let _ = stop_tx.send(true);
    });

    let admin_state = AdminState { metrics: metrics.clone(), ready: ready.to_vec() };
    let admin_addr = args.admin_addr;
    let admin = admin::serve(admin_addr, admin_state, stopped());
    let controllers = controller::run(client, reporter, metrics, nodes, config, ready, stopped());
    // Either task ending ends the process: a controller that stopped must not look alive.
    tokio::select! {
        result = controllers => result.map_err(RunError::Controller),
        result = admin => result.map_err(|source| RunError::Admin { addr: admin_addr, source }),
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

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn run_defaults_are_documented_values() {
        let args = RunArgs::default();
        assert_eq!(args.admin_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(args.resync_interval, Duration::from_secs(300));
        assert_eq!(args.cleanup_timeout, Duration::from_secs(120));
    }
}
