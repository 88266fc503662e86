//! Opt-in (`--heal-channel-manager`): a channel manager that lost its SLIM node for good is
//! restarted by deleting its Pod (its Deployment starts a new one, which dials its node afresh);
//! at most once per [`HEAL_INTERVAL`] per manager, so a new manager has time to come up.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::{Context, Error};
use crate::api::SlimChannel;
use crate::plan::manager::{ManagerHost, manager_host};
use crate::plan::nodes::serving;

/// The least time between two restarts of one manager.
pub const HEAL_INTERVAL: Duration = Duration::from_secs(60);

/// Restarts the manager at `endpoint` (found from `channel`'s namespace), unless it was restarted
/// less than [`HEAL_INTERVAL`] ago; says what it did on `channel` with an event.
pub async fn restart_manager(channel: &SlimChannel, endpoint: &str, ctx: &Context) {
    if !due(ctx, endpoint) {
        return;
    }
    let namespace = channel.namespace().unwrap_or_default();
    let pods = match manager_pods(ctx, &namespace, endpoint).await {
        Ok(pods) => pods,
        Err(error) => {
            warn!(manager = endpoint, %error, "cannot find the channel manager's Pod to restart it");
            let note = format!("cannot restart the channel manager {endpoint}: {error}");
            ctx.publish(channel, EventType::Warning, "ChannelManagerNotRestarted", note).await;
            return;
        }
    };
    let mut deleted = Vec::new();
    for (pod_namespace, pod) in pods {
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod_namespace);
        match api.delete(&pod, &DeleteParams::default()).await {
            Ok(_) => deleted.push(format!("{pod_namespace}/{pod}")),
            Err(error) => warn!(%error, pod, "could not delete the channel manager's Pod"),
        }
    }
    if deleted.is_empty() {
        return;
    }
    info!(manager = endpoint, pods = ?deleted, "channel manager restarted: it had lost its SLIM node");
    ctx.channel_engine.manager_restarted(endpoint);
    let note = format!(
        "deleted the Pod(s) {} of the channel manager {endpoint}, which had lost its SLIM node; its invites are retried once it is back",
        deleted.join(", ")
    );
    ctx.publish(channel, EventType::Normal, "ChannelManagerRestarted", note).await;
}

/// Whether the manager may be restarted now (and, if so, records that it is).
fn due(ctx: &Context, endpoint: &str) -> bool {
    let mut healed = ctx.healed.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    match healed.get(endpoint) {
        Some(at) if now.duration_since(*at) < HEAL_INTERVAL => false,
        _ => {
            healed.insert(endpoint.to_owned(), now);
            true
        }
    }
}

/// The serving Pods behind `endpoint`, as `(namespace, name)`.
async fn manager_pods(ctx: &Context, namespace: &str, endpoint: &str) -> Result<Vec<(String, String)>, Error> {
    let not_in_cluster = || Error::ManagerNotInCluster(endpoint.to_owned());
    let pods = match manager_host(endpoint, namespace).ok_or_else(not_in_cluster)? {
        ManagerHost::PodIp(ip) => ctx
            .pods
            .0
            .state()
            .into_iter()
            .filter(|pod| pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) == Some(ip.as_str()))
            .collect::<Vec<_>>(),
        ManagerHost::Service { namespace, name } => {
            let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
            let service = services.get_opt(&name).await.map_err(Error::Kube)?.ok_or_else(not_in_cluster)?;
            let labels: BTreeMap<String, String> =
                service.spec.and_then(|s| s.selector).filter(|s| !s.is_empty()).ok_or_else(not_in_cluster)?;
            let selector = LabelSelector { match_labels: Some(labels), match_expressions: None };
            ctx.pods.matching(&namespace, &selector)
        }
    };
    let found: Vec<(String, String)> = pods
        .iter()
        .filter(|pod| serving(pod))
        .map(|pod| (pod.meta().namespace.clone().unwrap_or_default(), pod.name_any()))
        .collect();
    if found.is_empty() { Err(not_in_cluster()) } else { Ok(found) }
}
