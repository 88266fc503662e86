//! Pausing reconciliation (Strimzi's `pause-reconciliation`, Flux's `suspend`): an object with
//! the annotation `slim.agntcy.org/paused: "true"` gets no write to SLIM at all, no install, no
//! repair, no invite, no removal. Its status says so; deleting it releases the finalizer without
//! touching SLIM. Removing the annotation reconciles at once (every change of the object does).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;

use crate::api::condition::{READY, ReadyStatus, condition, upsert};

/// The annotation; `"true"` pauses.
pub const ANNOTATION: &str = "slim.agntcy.org/paused";
/// The condition type and the reason both carry while paused.
pub const CONDITION: &str = "Paused";
pub const REASON: &str = "ReconciliationPaused";

pub fn is_paused(meta: &ObjectMeta) -> bool {
    meta.annotations.as_ref().and_then(|a| a.get(ANNOTATION)).is_some_and(|v| v.trim() == "true")
}

/// The status of a paused object: `Paused=True`, and `Ready=False` for that reason; the rest as
/// it was (what was last observed stays listed). Pure.
pub fn paused_status<S: ReadyStatus>(old: &S, generation: Option<i64>, now: Timestamp) -> S {
    let mut status = old.clone();
    status.set_observed_generation(generation);
    let message = format!("reconciliation paused by the annotation {ANNOTATION}: nothing is written to SLIM");
    upsert(status.conditions_mut(), condition(CONDITION, true, REASON, message.clone(), generation, now));
    upsert(status.conditions_mut(), condition(READY, false, REASON, message, generation, now));
    status
}

/// A status about to be written for an object that is not paused: a `Paused` condition left
/// from a pause is dropped. Pure.
pub fn resumed<S: ReadyStatus>(mut status: S) -> S {
    status.conditions_mut().retain(|c| c.type_ != CONDITION);
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SubscriptionStatus;
    use crate::api::condition::find;

    fn meta(value: Option<&str>) -> ObjectMeta {
        ObjectMeta { annotations: value.map(|v| [(ANNOTATION.to_owned(), v.to_owned())].into()), ..Default::default() }
    }

    #[test]
    fn only_true_pauses() {
        assert!(is_paused(&meta(Some("true"))));
        assert!(is_paused(&meta(Some(" true "))));
        for value in [None, Some("false"), Some("yes"), Some("")] {
            assert!(!is_paused(&meta(value)), "{value:?}");
        }
    }

    #[test]
    fn a_paused_status_says_so_keeps_what_was_observed_and_resuming_drops_it() {
        let mut old = SubscriptionStatus { route_name: Some("org/ns/app".into()), ..Default::default() };
        upsert(&mut old.conditions, condition(READY, true, "RoutesInstalled", "ok", Some(1), Timestamp::UNIX_EPOCH));
        let paused = paused_status(&old, Some(2), Timestamp::now());
        assert_eq!(paused.route_name.as_deref(), Some("org/ns/app"));
        let ready = find(&paused.conditions, READY).expect("ready");
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", REASON));
        assert_eq!(find(&paused.conditions, CONDITION).map(|c| c.status.as_str()), Some("True"));
        let resumed = resumed(paused);
        assert!(find(&resumed.conditions, CONDITION).is_none());
        assert!(find(&resumed.conditions, READY).is_some());
    }
}
