//! The issuer's keys in a Secret of the operator's namespace (as istiod keeps its CA): created
//! by whichever replica starts first, rotated by the leader, read by every replica.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

use super::authority::{Authority, RealKeys};
use super::keys::{self, KeySet, Policy};
use crate::admin::Gate;
use crate::backoff::Backoff;
use crate::leader::Leadership;
use crate::metrics::Metrics;

/// The Secret's key holding the key set (JSON).
pub const DATA_KEY: &str = "keys.json";
/// How often every replica reads the Secret again.
const POLL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Secret {name}: {source}")]
    Api { name: String, source: kube::Error },
    #[error("Secret {name}: {reason}")]
    Unreadable { name: String, reason: String },
    #[error(
        "Secret {name} holds the keys of trust domain {held:?}, not {wanted:?} (delete it to start a new trust domain)"
    )]
    OtherTrustDomain { name: String, held: String, wanted: String },
    #[error("generating keys: {0}")]
    Generate(String),
}

#[derive(Clone, Debug)]
pub struct KeyStore {
    pub namespace: String,
    pub secret: String,
    pub trust_domain: String,
    pub policy: Policy,
    pub jwt_issuer: String,
}

impl KeyStore {
    /// Forever: reads the keys (creating them if there are none), rotates them when leading,
    /// publishes them on `authority`. A failed pass closes `gate` and is retried; keys once
    /// loaded keep signing meanwhile.
    pub async fn run(
        self,
        client: Client,
        leadership: watch::Receiver<Leadership>,
        authority: watch::Sender<Option<Arc<Authority>>>,
        gate: Arc<Gate>,
        metrics: Arc<Metrics>,
    ) {
        let api: Api<Secret> = Api::namespaced(client, &self.namespace);
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            let leading = leadership.borrow().is_leading();
            let wait = match self.pass(&api, leading).await {
                Ok(set) => {
                    let changed = authority.borrow().as_ref().is_none_or(|a| a.set != set);
                    if changed {
                        info!(secret = %self.secret, sequence = set.sequence, cas = set.cas.len(), jwt_keys = set.jwt_keys.len(), "issuer keys loaded");
                        if let Some(ca) = keys::signing(&set.cas, slim_k8s_common::unix_now()) {
                            metrics.certificate_expires("issuer-ca", keys::ca_not_after(ca.published_at, &self.policy));
                        }
                        let loaded = Authority { set, policy: self.policy, jwt_issuer: self.jwt_issuer.clone() };
                        authority.send_replace(Some(Arc::new(loaded)));
                    }
                    gate.open();
                    backoff.reset();
                    POLL
                }
                Err(error) => {
                    let wait = backoff.next_delay();
                    warn!(%error, retry_in = ?wait, "issuer keys not refreshed");
                    gate.close(format!("issuer: {error}"));
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One pass: the key set as it is now in the Secret (after our rotation, if we lead).
    async fn pass(&self, api: &Api<Secret>, leading: bool) -> Result<KeySet, StoreError> {
        let api_error = |source| StoreError::Api { name: self.secret.clone(), source };
        let now = slim_k8s_common::unix_now();
        let Some(secret) = api.get_opt(&self.secret).await.map_err(api_error)? else {
            let set =
                keys::initial(&self.trust_domain, &self.policy, now, &mut RealKeys).map_err(StoreError::Generate)?;
            return match api.create(&PostParams::default(), &self.secret_of(&set, None)?).await {
                Ok(_) => {
                    info!(secret = %self.secret, trust_domain = %self.trust_domain, "issuer keys created");
                    Ok(set)
                }
                // Another replica created them first: use theirs.
                Err(kube::Error::Api(status)) if status.is_already_exists() => {
                    self.read(&api.get(&self.secret).await.map_err(api_error)?)
                }
                Err(source) => Err(api_error(source)),
            };
        };
        let set = self.read(&secret)?;
        if !leading {
            return Ok(set);
        }
        let Some(rotated) = keys::rotate(&set, &self.policy, now, &mut RealKeys).map_err(StoreError::Generate)? else {
            return Ok(set);
        };
        match api.replace(&self.secret, &PostParams::default(), &self.secret_of(&rotated, Some(&secret))?).await {
            Ok(_) => {
                info!(secret = %self.secret, sequence = rotated.sequence, "issuer keys rotated");
                Ok(rotated)
            }
            // Changed since we read it (a former leader's last write): the next pass sees it.
            Err(kube::Error::Api(status)) if status.is_conflict() => Ok(set),
            Err(source) => Err(api_error(source)),
        }
    }

    fn read(&self, secret: &Secret) -> Result<KeySet, StoreError> {
        let unreadable = |reason: String| StoreError::Unreadable { name: self.secret.clone(), reason };
        let bytes =
            secret.data.as_ref().and_then(|d| d.get(DATA_KEY)).ok_or_else(|| unreadable(format!("no {DATA_KEY}")))?;
        let set: KeySet = serde_json::from_slice(&bytes.0).map_err(|e| unreadable(format!("{DATA_KEY}: {e}")))?;
        if set.trust_domain != self.trust_domain {
            return Err(StoreError::OtherTrustDomain {
                name: self.secret.clone(),
                held: set.trust_domain,
                wanted: self.trust_domain.clone(),
            });
        }
        if set.cas.is_empty() || set.jwt_keys.is_empty() {
            return Err(unreadable("no CA or no JWT key".into()));
        }
        Ok(set)
    }

    /// The Secret holding `set`; replacing `existing` only if it is unchanged since read.
    fn secret_of(&self, set: &KeySet, existing: Option<&Secret>) -> Result<Secret, StoreError> {
        let json = serde_json::to_vec(set).map_err(|e| StoreError::Generate(e.to_string()))?;
        let mut secret = Secret {
            data: Some(BTreeMap::from([(DATA_KEY.to_owned(), ByteString(json))])),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        secret.metadata.name = Some(self.secret.clone());
        secret.metadata.labels =
            Some(BTreeMap::from([("app.kubernetes.io/managed-by".to_owned(), "slim-operator".to_owned())]));
        secret.metadata.resource_version = existing.and_then(|s| s.metadata.resource_version.clone());
        Ok(secret)
    }
}
