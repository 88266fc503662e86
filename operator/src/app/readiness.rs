//! `/readyz`: when this replica is ready.

use std::sync::Arc;

use tokio::sync::watch;

use crate::admin::{self, Gate, Readiness};
use crate::controller::Caches;
use crate::leader::Leadership;

/// Ready when the webhook's (and issuer's) gates are open where it serves, leadership is known,
/// and, on the leader, the controllers' caches are synced.
pub(super) fn readiness(
    webhook: Option<Vec<Arc<Gate>>>,
    caches: Caches,
    leadership: watch::Receiver<Leadership>,
) -> Readiness {
    let webhook = webhook.map(admin::all_gates);
    Arc::new(move || {
        let mut missing = Vec::new();
        if let Some(Err(reason)) = webhook.as_ref().map(|gates| gates()) {
            missing.push(reason);
        }
        match &*leadership.borrow() {
            Leadership::Unknown => missing.push("leadership not known yet".to_owned()),
            Leadership::Follower => {}
            Leadership::Leader { .. } => {
                if let Err(reason) = caches.state() {
                    missing.push(reason);
                }
            }
        }
        if missing.is_empty() { Ok(()) } else { Err(missing.join("; ")) }
    })
}
