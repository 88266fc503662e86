//! Status conditions: built with `observedGeneration`, merged so `lastTransitionTime` only moves
//! when the status flips.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const READY: &str = "Ready";

/// A condition of `type_` with the given outcome, stamped `now`.
pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: truncate(message.into(), 1024),
        observed_generation: generation,
        last_transition_time: Time(now),
    }
}

/// Inserts or replaces `new` by type; keeps the old transition time when the status is unchanged.
pub fn upsert(conditions: &mut Vec<Condition>, mut new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            *old = new;
        }
        None => conditions.push(new),
    }
}

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// A status with `observedGeneration` and a `Ready` condition (both CRDs' statuses).
pub trait ReadyStatus: Clone {
    fn set_observed_generation(&mut self, generation: Option<i64>);
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
}

/// The previous status with `Ready=False` for `reason` (a failure before anything was synced).
pub fn failed<S: ReadyStatus>(old: &S, generation: Option<i64>, reason: &str, message: String, now: Timestamp) -> S {
    let mut status = old.clone();
    status.set_observed_generation(generation);
    upsert(status.conditions_mut(), condition(READY, false, reason, message, generation, now));
    status
}

/// Cuts `text` to at most `max` bytes on a char boundary, marking the cut.
pub fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max.saturating_sub(3);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("valid")
    }

    #[test]
    fn transition_time_moves_only_on_flip() {
        let mut conditions = vec![];
        upsert(&mut conditions, condition(READY, false, "NodeUnreachable", "a", Some(1), at(10)));
        upsert(&mut conditions, condition(READY, false, "RouteRejected", "b", Some(2), at(20)));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Time(at(10)));
        assert_eq!(conditions[0].reason, "RouteRejected");
        assert_eq!(conditions[0].observed_generation, Some(2));
        upsert(&mut conditions, condition(READY, true, "RoutesInstalled", "c", Some(2), at(30)));
        assert_eq!(conditions[0].last_transition_time, Time(at(30)));
    }

    #[test]
    fn truncates_on_char_boundary() {
        let text = truncate("é".repeat(600), 1024);
        assert!(text.len() <= 1024 && text.ends_with("..."));
    }
}
