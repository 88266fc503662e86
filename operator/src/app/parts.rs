//! What each part is built from: the clients and caches the controllers share ([`runtime`]), and
//! the servers beside them ([`spawn_servers`]): admin, webhook, issuer.

use std::sync::Arc;

use kube::runtime::events::Reporter;
use tokio::sync::{mpsc, watch};

use super::{Parts, RunError, Stop, readiness};
use crate::admin::{self, AdminState, Gate};
use crate::api::NodeSet;
use crate::cli::RunArgs;
use crate::controller::{self, Caches, ControllerConfig, ResourceCollector, Runtime};
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::slim::{ChannelManagerPool, ClientCollector, NodeClientConfig, NodePool};
use crate::tls::{ControlTlsDefaults, ControlTlsRegistry};
use crate::webhook::CertStore;
use crate::webhook::run::WebhookGates;

/// The clients, caches and settings the controllers share, with the metrics that read them. The
/// operator's own SVID stream (SPIFFE mode) joins the parts.
pub(super) fn runtime(
    args: &RunArgs,
    client: kube::Client,
    identity: &str,
    leadership: watch::Receiver<Leadership>,
    parts: &mut Parts,
) -> Result<Runtime, RunError> {
    let nodes = NodePool::new(NodeClientConfig { change_timeout: args.node_timeout, ..Default::default() });
    let channel_managers = ChannelManagerPool::default();
    let caches = Caches::default();
    let mut metrics = Metrics::new();
    metrics.register_collector(ClientCollector { nodes: nodes.clone(), channel_managers: channel_managers.clone() });
    metrics.register_collector(ResourceCollector { caches: caches.clone() });
    Ok(Runtime {
        control_tls: control_tls(args, &client, parts)?,
        client,
        reporter: Reporter { controller: controller::MANAGER.to_owned(), instance: Some(identity.to_owned()) },
        metrics: Arc::new(metrics),
        nodes,
        channel_managers,
        config: controller_config(args)?,
        caches,
        leadership,
    })
}

/// Control-connection TLS: the defaults from the flags and, in SPIFFE mode, the operator's own
/// SVID followed for as long as the process runs.
fn control_tls(args: &RunArgs, client: &kube::Client, parts: &mut Parts) -> Result<Arc<ControlTlsRegistry>, RunError> {
    const SVID_STREAM: &str = "operator X.509-SVID stream";
    let svids = match &args.spiffe_endpoint_socket {
        None => None,
        Some(socket) => {
            let path = slim_identity_contract::config::socket_path_of(socket)
                .map_err(|e| RunError::SpiffeSocket(e.to_string()))?;
            let (tx, rx) = watch::channel(None);
            parts.spawn(SVID_STREAM, async move {
                crate::tls::svid::follow(path, tx).await;
                Err(RunError::TaskEnded(SVID_STREAM))
            });
            Some(rx)
        }
    };
    let defaults = ControlTlsDefaults {
        ca_file: args.control_tls_ca_file.clone(),
        client_cert_file: args.control_tls_client_cert_file.clone(),
        client_key_file: args.control_tls_client_key_file.clone(),
        spiffe_trust_domain: args.control_tls_spiffe_trust_domain.clone(),
    };
    Ok(Arc::new(ControlTlsRegistry::new(client.clone(), defaults, svids)))
}

fn controller_config(args: &RunArgs) -> Result<ControllerConfig, RunError> {
    let endpoints = args.default_node_endpoints.iter().map(|e| e.trim().to_owned()).filter(|e| !e.is_empty());
    Ok(ControllerConfig {
        resync_interval: args.resync_interval,
        cleanup_timeout: args.cleanup_timeout,
        concurrency: args.concurrency,
        channel_manager: args.channel_manager.clone(),
        default_nodes: NodeSet {
            endpoints: endpoints.collect(),
            selector: crate::plan::parse_equality_selector(&args.default_node_selector)
                .map_err(RunError::DefaultNodes)?,
            tls: None,
        },
        member_poll_interval: args.member_poll_interval,
        heal_channel_manager: args.heal_channel_manager,
        channel_manager_in_flight: args.channel_manager_in_flight,
        watch_namespace: args.watch_namespace.clone().filter(|ns| !ns.trim().is_empty()),
        ..Default::default()
    })
}

/// The admin server and, when on, the webhook and the issuer (which serves with the webhook's
/// certificate and learns from it the namespaces to publish its CA in).
pub(super) fn spawn_servers(args: &RunArgs, runtime: &Runtime, stop: &Stop, parts: &mut Parts) -> Result<(), RunError> {
    let webhook = args.webhook_settings();
    let issuer = args.issuer_settings()?;
    let webhook_gates = WebhookGates::default();
    let issuer_gate = Gate::closed("issuer: keys not loaded yet");
    let certs = Arc::new(CertStore::with_metrics(runtime.metrics.clone()));
    let (issuer_namespaces, namespaces_rx) = mpsc::unbounded_channel();

    let mut gates = vec![webhook_gates.certificate.clone(), webhook_gates.namespaces.clone()];
    if issuer.is_some() {
        gates.push(issuer_gate.clone());
    }
    let ready =
        readiness::readiness(webhook.as_ref().map(|_| gates), runtime.caches.clone(), runtime.leadership.clone());
    let addr = args.admin_addr;
    let admin = admin::serve(addr, AdminState { metrics: runtime.metrics.clone(), ready }, stop.stopped());
    parts.spawn("admin server", async move { admin.await.map_err(|source| RunError::Admin { addr, source }) });

    if let Some(settings) = issuer {
        let (client, metrics, leadership) =
            (runtime.client.clone(), runtime.metrics.clone(), runtime.leadership.clone());
        let served = crate::issuer::run(
            settings,
            client,
            metrics,
            leadership,
            certs.clone(),
            namespaces_rx,
            issuer_gate,
            stop.stopped(),
        );
        parts.spawn("issuer", async move { served.await.map_err(RunError::IssuerStopped) });
    }
    if let Some(settings) = webhook {
        let issuer_namespaces = args.issuer.issuer.then_some(issuer_namespaces);
        let (client, metrics) = (runtime.client.clone(), runtime.metrics.clone());
        let served = crate::webhook::run::run(
            settings,
            client,
            metrics,
            webhook_gates,
            certs,
            issuer_namespaces,
            stop.stopped(),
        );
        parts.spawn("webhook", async move { served.await.map_err(RunError::Webhook) });
    }
    Ok(())
}
