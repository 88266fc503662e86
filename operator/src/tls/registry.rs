//! TLS material of the operator's control connections (node controller APIs, the channel
//! manager), from what `tls` names (Secrets, ConfigMaps, SPIFFE mode) or the operator's defaults
//! (PEM files, its own X.509-SVID). One watch per distinct setting, re-read every few seconds by
//! [`ControlTlsRegistry::refresh`], so a rotated Secret or a new SVID is used for the next
//! connection; streams still open are re-opened by the node clients before their certificate
//! expires.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{info, warn};

use super::control::{ClientIdentity, ServerTrust, SpiffeMatch, TlsMaterial, TlsSource};
use super::secrets::{config_map_bytes, secret_keys};
use super::svid::Svid;
use crate::api::ControlTls;
use crate::controller::Error;

/// What `https://` endpoints get when their `tls` says nothing (flags / Helm values).
#[derive(Clone, Debug, Default)]
pub struct ControlTlsDefaults {
    /// CA bundle (PEM file, e.g. a mounted Secret); none: the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM files).
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// SPIFFE mode by default: servers of this trust domain, with the operator's own SVID.
    pub spiffe_trust_domain: Option<String>,
}

struct Entry {
    tx: watch::Sender<Arc<TlsMaterial>>,
    source: TlsSource,
    /// What the material was built from (hashed), to send only changes.
    fingerprint: String,
    /// Last asked for by a reconcile; entries nobody asks for are dropped.
    used: tokio::time::Instant,
    /// The last refresh failure, said once until it changes.
    failing: Option<String>,
}

/// An entry no reconcile asked for in this long is dropped (every object is reconciled at least
/// every resync interval, 5 min by default).
const UNUSED_FOR: Duration = Duration::from_secs(900);

type Key = (String, ControlTls);

/// Every TLS setting in use, each with its current material.
pub struct ControlTlsRegistry {
    client: Client,
    defaults: ControlTlsDefaults,
    /// The operator's SVID, when it has a Workload API socket.
    svids: Option<watch::Receiver<Option<Svid>>>,
    entries: std::sync::Mutex<HashMap<Key, Entry>>,
}

impl ControlTlsRegistry {
    pub fn new(client: Client, defaults: ControlTlsDefaults, svids: Option<watch::Receiver<Option<Svid>>>) -> Self {
        Self { client, defaults, svids, entries: Default::default() }
    }

    /// The TLS of a connection to `endpoint` for an object in `namespace` whose spec says `tls`;
    /// `None` for plain text (an `http://` endpoint).
    pub async fn source(
        &self,
        namespace: &str,
        tls: Option<&ControlTls>,
        endpoint: &str,
    ) -> Result<Option<TlsSource>, Error> {
        if !endpoint.starts_with("https://") || tls.is_some_and(|t| t.insecure) {
            return Ok(None);
        }
        let settings = tls.cloned().unwrap_or_default();
        // The operator's defaults are the same for every namespace.
        let scope = if settings == ControlTls::default() { String::new() } else { namespace.to_owned() };
        let key = (scope, settings);
        if let Some(entry) = self.lock().get_mut(&key) {
            entry.used = tokio::time::Instant::now();
            return Ok(Some(entry.source.clone()));
        }
        // Loaded without holding the lock (API reads); a racing reconcile's entry wins.
        let (material, fingerprint) = self.load(&key.0, &key.1).await?;
        let mut entries = self.lock();
        let entry = entries.entry(key).or_insert_with(|| {
            let (tx, rx) = watch::channel(Arc::new(material));
            let source = TlsSource::new(rx);
            Entry { tx, source, fingerprint, used: tokio::time::Instant::now(), failing: None }
        });
        Ok(Some(entry.source.clone()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads every setting in use again; changed material goes to its watch (the next connection).
    /// Settings no reconcile asked for lately are dropped.
    pub async fn refresh(&self) {
        let keys: Vec<Key> = {
            let mut entries = self.lock();
            entries.retain(|_, entry| entry.used.elapsed() < UNUSED_FOR);
            entries.keys().cloned().collect()
        };
        for key in keys {
            let loaded = self.load(&key.0, &key.1).await;
            let mut entries = self.lock();
            let Some(entry) = entries.get_mut(&key) else { continue };
            let namespace = key.0.as_str();
            match loaded {
                Ok((material, fingerprint)) => {
                    entry.failing = None;
                    if fingerprint != entry.fingerprint {
                        info!(namespace, "control TLS material changed; the next connections use it");
                        entry.fingerprint = fingerprint;
                        entry.tx.send_replace(Arc::new(material));
                    }
                }
                Err(error) => {
                    let message = error.to_string();
                    if entry.failing.as_deref() != Some(message.as_str()) {
                        warn!(namespace, error = %message, "control TLS material not refreshed; the last one stays");
                        entry.failing = Some(message);
                    }
                }
            }
        }
    }

    /// Refreshes every `period` until dropped.
    pub async fn refresh_every(self: Arc<Self>, period: Duration) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.refresh().await;
        }
    }

    /// The material `settings` name, and its fingerprint (what a change is told by).
    async fn load(&self, namespace: &str, settings: &ControlTls) -> Result<(TlsMaterial, String), Error> {
        let mut print = Fingerprint::default();
        if let Some(server) = self.spiffe_server(settings)? {
            let svid = self.svid().await?;
            print.feed(svid.spiffe_id.as_bytes());
            print.feed(&svid.identity.not_after.to_le_bytes());
            for cert in &svid.bundle {
                print.feed(cert);
            }
            print.feed(server.to_string().as_bytes());
            let mut material = svid.material(server);
            material.server_name = settings.server_name.clone();
            return Ok((material, print.finish()));
        }
        let (ca_pem, identity_pem) = if *settings == ControlTls::default() {
            self.default_pems()?
        } else {
            self.referenced_pems(namespace, settings).await?
        };
        let material = material_of(ca_pem, identity_pem, settings.server_name.clone(), &mut print)?;
        Ok((material, print.finish()))
    }

    /// Which SPIFFE IDs the server may have, in SPIFFE mode (the settings', or the operator's
    /// default trust domain when the settings say nothing).
    fn spiffe_server(&self, settings: &ControlTls) -> Result<Option<SpiffeMatch>, Error> {
        Ok(match &settings.spiffe {
            Some(server) => Some(match (&server.id, &server.trust_domain) {
                (Some(id), _) => SpiffeMatch::Exact(id.clone()),
                (None, Some(domain)) => SpiffeMatch::MemberOf(domain.clone()),
                (None, None) => return Err(invalid("spiffe needs an id or a trustDomain")),
            }),
            None if *settings == ControlTls::default() => {
                self.defaults.spiffe_trust_domain.clone().map(SpiffeMatch::MemberOf)
            }
            None => None,
        })
    }

    /// The CA bundle and client certificate of the operator's flags (files).
    fn default_pems(&self) -> Result<Pems, Error> {
        let read = |path: &Option<PathBuf>| -> Result<Option<Vec<u8>>, Error> {
            path.as_ref()
                .map(|p| std::fs::read(p).map_err(|e| invalid(format!("reading {}: {e}", p.display()))))
                .transpose()
        };
        let identity = match (read(&self.defaults.client_cert_file)?, read(&self.defaults.client_key_file)?) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(invalid("--control-tls-client-cert-file and --control-tls-client-key-file go together")),
        };
        Ok((read(&self.defaults.ca_file)?, identity))
    }

    /// The CA bundle and client certificate the settings reference (Secrets, a ConfigMap).
    async fn referenced_pems(&self, namespace: &str, settings: &ControlTls) -> Result<Pems, Error> {
        let ca = match (&settings.ca_secret_ref, &settings.ca_config_map_ref) {
            (Some(secret), _) => {
                let [ca] = secret_keys(&self.client, namespace, &secret.name, [secret.key.as_str()]).await?;
                Some(ca)
            }
            (None, Some(map)) => Some(config_map_bytes(&self.client, namespace, &map.name, &map.key).await?),
            (None, None) => None,
        };
        let identity = match &settings.client_cert_secret_ref {
            Some(secret) => {
                let [cert, key] = secret_keys(&self.client, namespace, &secret.name, ["tls.crt", "tls.key"]).await?;
                Some((cert, key))
            }
            None => None,
        };
        Ok((ca, identity))
    }

    /// The operator's SVID (waits a little for the first one).
    async fn svid(&self) -> Result<Svid, Error> {
        let Some(svids) = &self.svids else {
            return Err(invalid("SPIFFE mode needs the operator's Workload API socket (--spiffe-endpoint-socket)"));
        };
        let mut svids = svids.clone();
        match tokio::time::timeout(Duration::from_secs(10), svids.wait_for(Option::is_some)).await {
            Ok(Ok(svid)) => svid.clone().ok_or_else(|| invalid("no X.509-SVID from the Workload API yet")),
            _ => Err(invalid("no X.509-SVID from the Workload API yet")),
        }
    }
}

/// A CA bundle (PEM) and a client certificate and key (PEM), each when given.
type Pems = (Option<Vec<u8>>, Option<(Vec<u8>, Vec<u8>)>);

/// A hash of everything the material is made of.
#[derive(Default)]
struct Fingerprint(Sha256);

impl Fingerprint {
    fn feed(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// The material from PEMs: the CA bundle (else the system roots) and the client identity.
fn material_of(
    ca_pem: Option<Vec<u8>>,
    identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    server_name: Option<String>,
    print: &mut Fingerprint,
) -> Result<TlsMaterial, Error> {
    let trust = match &ca_pem {
        None => ServerTrust::SystemRoots,
        Some(pem) => {
            print.feed(pem);
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(format!("CA bundle: {e}")))?;
            if certs.is_empty() {
                return Err(invalid("the CA bundle holds no PEM certificate"));
            }
            ServerTrust::Ca(certs)
        }
    };
    let identity = match &identity_pem {
        None => None,
        Some((cert, key)) => {
            print.feed(cert);
            print.feed(key);
            Some(Arc::new(ClientIdentity::from_pem(cert, key).map_err(|e| invalid(e.to_string()))?))
        }
    };
    if let Some(name) = &server_name {
        print.feed(name.as_bytes());
    }
    Ok(TlsMaterial { trust, identity, server_name })
}

fn invalid(message: impl Into<String>) -> Error {
    Error::ControlTls(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::control::ServerTrust;

    fn offline_client() -> Client {
        let (service, _handle) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
        Client::new(service, "default")
    }

    fn ca_pem(name: &str) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.self_signed(&key).expect("CA").pem()
    }

    #[tokio::test]
    async fn defaults_apply_to_https_endpoints_and_a_rotated_file_reaches_the_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca_pem("first")).expect("write");
        let defaults = ControlTlsDefaults { ca_file: Some(ca_file.clone()), ..Default::default() };
        let registry = ControlTlsRegistry::new(offline_client(), defaults, None);

        assert!(registry.source("apps", None, "http://n:46358").await.expect("plain").is_none(), "http:// is plain");
        let insecure = ControlTls { insecure: true, ..Default::default() };
        assert!(registry.source("apps", Some(&insecure), "https://n:1").await.expect("insecure").is_none());
        let source = registry.source("apps", None, "https://n:46358").await.expect("tls").expect("a source");
        let first = match &source.current().trust {
            ServerTrust::Ca(certs) => certs.clone(),
            other => panic!("the default CA file: {other:?}"),
        };
        // Every namespace shares the defaults' source.
        let other = registry.source("other", None, "https://m:1").await.expect("tls").expect("a source");
        assert_eq!(other.id(), source.id());

        registry.refresh().await;
        assert!(matches!(&source.current().trust, ServerTrust::Ca(c) if *c == first), "unchanged: nothing sent");
        std::fs::write(&ca_file, ca_pem("rotated")).expect("rotate");
        registry.refresh().await;
        assert!(matches!(&source.current().trust, ServerTrust::Ca(c) if *c != first), "the rotated CA");

        // What cannot work is said, not guessed.
        let spiffe = ControlTls {
            spiffe: Some(crate::api::SpiffeServer { id: None, trust_domain: Some("example.org".into()) }),
            ..Default::default()
        };
        let error = registry.source("apps", Some(&spiffe), "https://n:1").await.expect_err("no SVID source");
        assert_eq!(error.reason(), "ControlTlsInvalid");
        assert!(error.to_string().contains("--spiffe-endpoint-socket"), "{error}");

        // A setting nobody asks for any more (its objects are gone) is dropped, not re-read forever.
        tokio::time::pause();
        tokio::time::advance(UNUSED_FOR + Duration::from_secs(1)).await;
        registry.refresh().await;
        assert!(registry.lock().is_empty());
    }
}
