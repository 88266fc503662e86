//! The webhook's serving certificate: either managed by the operator (a CA and a leaf kept in a
//! Secret, the CA patched into the MutatingWebhookConfiguration's `caBundle`, rotated before
//! expiry) or mounted from files (cert-manager) and reloaded when they change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde_json::json;
use tracing::{info, warn};

use super::server::CertStore;
use crate::admin::Gate;
use crate::backoff::Backoff;

const CA_VALIDITY_DAYS: i64 = 3650;
const LEAF_VALIDITY_DAYS: i64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate or key PEM: {0}")]
    Pem(String),
    #[error("Secret {name}: {source}")]
    Secret { name: String, source: kube::Error },
    #[error("MutatingWebhookConfiguration {name}: {source}")]
    Webhook { name: String, source: kube::Error },
    #[error("reading {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("building the caBundle patch: {0}")]
    CaBundlePatch(serde_json::Error),
    #[error("MutatingWebhookConfiguration {0} not found: caBundle not published (is the chart installed?)")]
    NoWebhookConfiguration(String),
}

/// PEM material of a CA and the leaf it signed.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial { <redacted> }")
    }
}

/// DNS names of the webhook Service.
pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// A new ECDSA P-256 CA (or `ca` reused) and a leaf for `names`.
pub fn generate(names: &[String], ca: Option<(&str, &str)>) -> Result<TlsMaterial, CertError> {
    let now = time_now();
    let (ca_pem, ca_key_pem) = match ca {
        Some((cert, key)) => (cert.to_owned(), key.to_owned()),
        None => {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, "slim-operator webhook CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_before = now - time::Duration::minutes(5);
            params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
            let cert = params.self_signed(&key)?;
            (cert.pem(), key.serialize_pem())
        }
    };
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(LEAF_VALIDITY_DAYS);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(TlsMaterial { ca_pem, ca_key_pem, cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A rustls signing key from PEM.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Pem(format!("certificate: {e}")))?;
    if chain.is_empty() {
        return Err(CertError::Pem("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| CertError::Pem(format!("key: {e}")))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| CertError::Pem(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// Seconds left and total lifetime of the first certificate in `pem`.
pub fn lifetime(pem: &str) -> Option<(i64, i64)> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let validity = cert.validity();
    let (from, to) = (validity.not_before.timestamp(), validity.not_after.timestamp());
    let now = time_now().unix_timestamp();
    Some((to - now, to - from))
}

/// Rotate when less than a third of the lifetime is left (or the PEM is unreadable).
pub fn needs_rotation(pem: &str) -> bool {
    match lifetime(pem) {
        Some((left, total)) => left * 3 < total,
        None => true,
    }
}

/// Where the operator keeps and publishes its own certificate.
#[derive(Clone, Debug)]
pub struct SelfManaged {
    pub namespace: String,
    pub secret: String,
    pub service: String,
    pub webhook_configuration: String,
}

impl SelfManaged {
    /// Keeps the certificate valid and published, forever: loads, rotates, patches `caBundle`.
    /// A failed pass (the namespace, the Secret or the webhook configuration missing, a refused
    /// call) closes `gate` with its cause and is retried with backoff; it never ends the loop.
    pub async fn run(self, client: Client, store: Arc<CertStore>, gate: Arc<Gate>) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        loop {
            let wait = match self.sync(&client, &store).await {
                Ok(wait) => {
                    if !gate.is_open() {
                        info!(secret = %self.secret, "webhook certificate in place");
                    }
                    gate.open();
                    backoff.reset();
                    wait
                }
                Err(error) => {
                    let wait = backoff.next_delay();
                    warn!(%error, retry_in = ?wait, "webhook certificate not in place; retrying");
                    gate.close(format!("webhook: {error}"));
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One pass; returns when to look again.
    pub async fn sync(&self, client: &Client, store: &CertStore) -> Result<Duration, CertError> {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
        let secret_error = |source| CertError::Secret { name: self.secret.clone(), source };
        let existing = secrets.get_opt(&self.secret).await.map_err(secret_error)?;
        let current = existing.as_ref().and_then(read_material);
        let material = match &current {
            Some(material) if !needs_rotation(&material.cert_pem) => material.clone(),
            _ => {
                let keep_ca = current
                    .as_ref()
                    .filter(|m| !needs_rotation(&m.ca_pem))
                    .map(|m| (m.ca_pem.as_str(), m.ca_key_pem.as_str()));
                let fresh = generate(&service_names(&self.service, &self.namespace), keep_ca)?;
                let secret = material_secret(&self.secret, &fresh, existing.as_ref());
                let written = match existing {
                    Some(_) => secrets.replace(&self.secret, &PostParams::default(), &secret).await,
                    None => secrets.create(&PostParams::default(), &secret).await,
                };
                match written {
                    Ok(_) => {
                        info!(secret = %self.secret, "webhook serving certificate issued");
                        fresh
                    }
                    // Another replica won the race: use what it wrote.
                    Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
                        let secret = secrets.get(&self.secret).await.map_err(secret_error)?;
                        read_material(&secret).ok_or_else(|| {
                            CertError::Pem(format!("Secret {} holds no usable certificate", self.secret))
                        })?
                    }
                    Err(source) => return Err(secret_error(source)),
                }
            }
        };
        store.set(certified_key(&material.cert_pem, &material.key_pem)?);
        store.set_ca(&material.ca_pem);
        self.publish_ca(client, &material.ca_pem).await?;
        let (left, total) = lifetime(&material.cert_pem).unwrap_or((3600, 3600));
        let until_rotation = (left - total / 3).max(60) as u64;
        Ok(Duration::from_secs(until_rotation.min(3600)))
    }

    /// Sets `caBundle` on every webhook of the configuration that lacks it.
    async fn publish_ca(&self, client: &Client, ca_pem: &str) -> Result<(), CertError> {
        let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let webhook_error = |source| CertError::Webhook { name: self.webhook_configuration.clone(), source };
        let Some(configuration) = api.get_opt(&self.webhook_configuration).await.map_err(webhook_error)? else {
            return Err(CertError::NoWebhookConfiguration(self.webhook_configuration.clone()));
        };
        let bundle = ByteString(ca_pem.as_bytes().to_vec());
        let patches: Vec<serde_json::Value> = configuration
            .webhooks
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, w)| w.client_config.ca_bundle.as_ref() != Some(&bundle))
            .map(|(i, _)| json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle}))
            .collect();
        if patches.is_empty() {
            return Ok(());
        }
        let patch: json_patch::Patch =
            serde_json::from_value(serde_json::Value::Array(patches)).map_err(CertError::CaBundlePatch)?;
        api.patch(&configuration.name_any(), &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
            .map_err(webhook_error)?;
        info!(name = %self.webhook_configuration, "caBundle published");
        Ok(())
    }
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret.data.as_ref()?.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok())
}

fn read_material(secret: &Secret) -> Option<TlsMaterial> {
    Some(TlsMaterial {
        ca_pem: text(secret, "ca.crt")?,
        ca_key_pem: text(secret, "ca.key")?,
        cert_pem: text(secret, "tls.crt")?,
        key_pem: text(secret, "tls.key")?,
    })
}

fn material_secret(name: &str, material: &TlsMaterial, existing: Option<&Secret>) -> Secret {
    let data = BTreeMap::from([
        ("ca.crt".to_owned(), ByteString(material.ca_pem.clone().into_bytes())),
        ("ca.key".to_owned(), ByteString(material.ca_key_pem.clone().into_bytes())),
        ("tls.crt".to_owned(), ByteString(material.cert_pem.clone().into_bytes())),
        ("tls.key".to_owned(), ByteString(material.key_pem.clone().into_bytes())),
    ]);
    let mut secret = Secret { data: Some(data), type_: Some("Opaque".into()), ..Default::default() };
    secret.metadata.name = Some(name.to_owned());
    secret.metadata.labels =
        Some(BTreeMap::from([("app.kubernetes.io/managed-by".to_owned(), "slim-operator".to_owned())]));
    // Optimistic concurrency: a replace only wins over the version we read.
    secret.metadata.resource_version = existing.and_then(|s| s.metadata.resource_version.clone());
    secret
}

/// A certificate mounted from files (`tls.crt`, `tls.key`), reloaded when their content changes.
#[derive(Clone, Debug)]
pub struct Mounted {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Mounted {
    /// Loads the pair (an unreadable pair closes `gate` and is retried), then reloads it when
    /// its content changes, forever.
    pub async fn run(self, store: Arc<CertStore>, gate: Arc<Gate>) {
        let mut last: Option<(String, String)> = None;
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        loop {
            let wait = match self.read() {
                Ok(pair) if last.as_ref() == Some(&pair) => Duration::from_secs(10),
                Ok((cert, key)) => match certified_key(&cert, &key) {
                    Ok(certified) => {
                        store.set(certified);
                        if let Some(ca) = self.read_ca() {
                            store.set_ca(&ca);
                        }
                        gate.open();
                        info!(path = %self.cert.display(), "webhook certificate loaded");
                        last = Some((cert, key));
                        backoff.reset();
                        Duration::from_secs(10)
                    }
                    // A half-updated pair (cert and key written separately): try again shortly.
                    Err(error) => self.failed(&gate, &error, &mut backoff, last.is_some()),
                },
                Err(error) => self.failed(&gate, &error, &mut backoff, last.is_some()),
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn read(&self) -> Result<(String, String), CertError> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|source| CertError::File { path: path.clone(), source })
        };
        Ok((read(&self.cert)?, read(&self.key)?))
    }

    /// `ca.crt` beside the pair (cert-manager writes it), when there is one.
    fn read_ca(&self) -> Option<String> {
        std::fs::read_to_string(self.cert.with_file_name("ca.crt")).ok().filter(|pem| pem.contains("CERTIFICATE"))
    }

    /// A pair that cannot be used: the gate closes only if nothing was ever loaded (a loaded
    /// certificate keeps serving while its replacement is half-written).
    fn failed(&self, gate: &Gate, error: &CertError, backoff: &mut Backoff, serving: bool) -> Duration {
        let wait = backoff.next_delay();
        warn!(%error, retry_in = ?wait, "webhook certificate files not loadable");
        if !serving {
            gate.close(format!("webhook: {error}"));
        }
        wait
    }
}
