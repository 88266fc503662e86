//! The issuer's serving CA, in a ConfigMap of every namespace where the webhook injected an agent
//! that talks to the issuer (ConfigMaps cannot be mounted across namespaces; Istio keeps its
//! `istio-ca-root-cert` the same way). Kept current when the CA changes.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Label of every such ConfigMap (how they are found again when the CA changes).
pub const LABEL: &str = "slim.agntcy.org/issuer-ca";
/// The key the CA is under (the agent reads `<mount>/ca.crt`).
pub const KEY: &str = "ca.crt";

/// Forever: every namespace sent on `namespaces` gets the ConfigMap `name` with the CA on `ca`;
/// when the CA changes, every labelled ConfigMap is updated.
pub async fn run(
    client: Client,
    name: String,
    mut ca: watch::Receiver<Option<String>>,
    mut namespaces: mpsc::UnboundedReceiver<String>,
) {
    // Namespaces whose ConfigMap holds the current CA.
    let mut current: BTreeSet<String> = BTreeSet::new();
    let mut pending: BTreeSet<String> = BTreeSet::new();
    loop {
        let pem = ca.borrow_and_update().clone();
        if let Some(pem) = pem.as_deref() {
            for namespace in std::mem::take(&mut pending) {
                if !current.contains(&namespace) {
                    match apply(&client, &namespace, &name, pem).await {
                        Ok(()) => {
                            current.insert(namespace);
                        }
                        Err(error) => {
                            warn!(%namespace, %error, "issuer CA ConfigMap not written; retrying");
                            pending.insert(namespace);
                        }
                    }
                }
            }
        }
        let retry = !pending.is_empty();
        tokio::select! {
            changed = ca.changed() => {
                if changed.is_err() { return; }
                // A new CA: every ConfigMap we know of, and every labelled one, again.
                pending.extend(std::mem::take(&mut current));
                pending.extend(labelled(&client, &name).await);
            }
            namespace = namespaces.recv() => match namespace {
                Some(namespace) => { pending.insert(namespace); }
                None => return,
            },
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)), if retry => {}
        }
    }
}

/// Namespaces holding one of our ConfigMaps.
async fn labelled(client: &Client, name: &str) -> Vec<String> {
    let api: Api<ConfigMap> = Api::all(client.clone());
    match api.list_metadata(&ListParams::default().labels(&format!("{LABEL}=true"))).await {
        Ok(list) => list.items.iter().filter(|c| c.name_any() == name).filter_map(|c| c.namespace()).collect(),
        Err(error) => {
            warn!(%error, "listing issuer CA ConfigMaps failed");
            Vec::new()
        }
    }
}

async fn apply(client: &Client, namespace: &str, name: &str, pem: &str) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let config_map = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": BTreeMap::from([(LABEL, "true"), ("app.kubernetes.io/managed-by", "slim-operator")])},
        "data": {KEY: pem},
    });
    api.patch(name, &PatchParams::apply("slim-operator").force(), &Patch::Apply(config_map)).await?;
    debug!(%namespace, %name, "issuer CA ConfigMap applied");
    info!(%namespace, %name, "issuer CA published");
    Ok(())
}
