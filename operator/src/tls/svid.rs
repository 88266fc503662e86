//! The operator's own X.509-SVID and trust bundle from the SPIFFE Workload API (the identity
//! agent's client and rendering, shared rather than copied), as TLS material for SPIFFE-mode
//! connections: presented as the client certificate, the bundle trusted for the server's chain,
//! the server authorised by its SPIFFE ID. Every SVID the Workload API pushes replaces the last.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use slim_identity_contract::workload::{WorkloadClient, WorkloadError};
use slim_identity_contract::x509::{self, X509Files, X509Options};
use tokio::sync::watch;
use tracing::{info, warn};

use super::control::{ClientIdentity, ServerTrust, SpiffeMatch, TlsError, TlsMaterial};
use crate::backoff::Backoff;

/// The operator's current SVID, ready for TLS.
#[derive(Clone, Debug)]
pub struct Svid {
    pub spiffe_id: String,
    pub identity: Arc<ClientIdentity>,
    pub bundle: Vec<CertificateDer<'static>>,
}

impl Svid {
    /// From the files the agent would write.
    pub fn from_files(files: &X509Files) -> Result<Self, TlsError> {
        let identity = ClientIdentity::from_pem(&files.svid_pem, &files.key_pem)?;
        let bundle = CertificateDer::pem_slice_iter(&files.bundle_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Material(format!("SPIFFE bundle: {e}")))?;
        Ok(Self { spiffe_id: files.spiffe_id.clone(), identity: Arc::new(identity), bundle })
    }

    /// The material for a server whose SPIFFE ID must match `server`.
    pub fn material(&self, server: SpiffeMatch) -> TlsMaterial {
        TlsMaterial {
            trust: ServerTrust::Spiffe { bundle: self.bundle.clone(), id: server },
            identity: Some(self.identity.clone()),
            server_name: None,
        }
    }
}

/// Follows the Workload API at `socket` forever, publishing each SVID; reconnects with backoff.
pub async fn follow(socket: PathBuf, tx: watch::Sender<Option<Svid>>) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let error = match stream(&socket, &tx, &mut backoff).await {
            Ok(()) => return,
            Err(error) => error,
        };
        let delay = backoff.next_delay();
        warn!(%error, retry_in = ?delay, "operator X.509-SVID stream");
        tokio::time::sleep(delay).await;
    }
}

/// One stream; `Ok` when nobody listens any more.
async fn stream(
    socket: &std::path::Path,
    tx: &watch::Sender<Option<Svid>>,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let client = WorkloadClient::connect(socket).await.map_err(|e| e.to_string())?;
    let mut updates = client.x509_svids().await.map_err(|e| e.to_string())?;
    loop {
        match updates.message().await {
            Ok(Some(response)) => {
                backoff.reset();
                let options = X509Options {
                    add_intermediates_to_bundle: false,
                    include_federated_domains: false,
                    omit_expired: true,
                };
                match x509::render(&response, "", options, slim_k8s_common::unix_now())
                    .map_err(|e| e.to_string())
                    .and_then(|files| Svid::from_files(&files).map_err(|e| e.to_string()))
                {
                    Ok(svid) => {
                        info!(spiffe_id = %svid.spiffe_id, not_after = svid.identity.not_after, "operator X.509-SVID");
                        tx.send_replace(Some(svid));
                    }
                    Err(error) => warn!(%error, "operator X.509-SVID update skipped"),
                }
                if tx.is_closed() {
                    return Ok(());
                }
            }
            Ok(None) => return Err("the Workload API ended the stream".into()),
            Err(status) => return Err(WorkloadError::from_status(socket, &status).to_string()),
        }
    }
}
