//! SLIM reports refusals in text only (`error_msg`: no code), from nodes' acks and from the
//! channel manager. This is the one module that reads that text: each phrase the operator relies
//! on, where SLIM 3.4.6 says it, and what it means. Everything else matches on [`Said`].

/// What a refusal says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Said {
    /// The participant is already a member: "participant already in group: …"
    /// (`agntcy-slim-session` `SessionError::ParticipantAlreadyInGroup`).
    AlreadyMember,
    /// "channel … already exists" (channel manager `CreateChannel`).
    AlreadyExists,
    /// The item is not there: "channel … not found" (channel manager), "Connection with link_id …
    /// not found", "connection not found" (node controller), "does not exist".
    NotFound,
    /// A session message was never acknowledged: "message send retries exhausted for id=…"
    /// (`SessionError`). An invite: the participant is offline. A removal: the manager removed the
    /// participant but could not tell it (it is dead).
    RetriesExhausted,
    /// The sender's own SLIM has no route for the name: "no matching found for […]"
    /// (`agntcy-slim-datapath` `DataPathError::NoMatch`), at once. From the channel manager it
    /// means the manager lost its connection to its node for good: SLIM 3.4.6 re-dials a broken
    /// connection once, and when that attempt is refused (a node still starting answers
    /// `Unimplemented`) it logs "unable to reconnect to remote node", then "explicit default
    /// gateway is gone", and never dials again. A participant merely offline is refused after
    /// ~11 s with [`Said::RetriesExhausted`] instead.
    NoRoute,
    /// Anything else.
    Other,
}

impl Said {
    pub fn of(message: &str) -> Self {
        let message = message.to_ascii_lowercase();
        if message.contains("already in group") {
            Said::AlreadyMember
        } else if message.contains("already exists") {
            Said::AlreadyExists
        } else if message.contains("not found") || message.contains("not exist") {
            Said::NotFound
        } else if message.contains("retries exhausted") {
            Said::RetriesExhausted
        } else if message.contains("no matching found") {
            Said::NoRoute
        } else {
            Said::Other
        }
    }
}

/// Whether a "not found" from the channel manager is about `channel` itself (not a participant
/// in it): "channel org/ns/chat not found".
pub fn channel_not_found(message: &str, channel: &str) -> bool {
    Said::of(message) == Said::NotFound && message.contains(channel) && !message.contains("participant")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The phrases as SLIM 3.4.6 words them (from its source and from real nodes and managers).
    #[test]
    fn slim_phrases_are_told_apart() {
        let cases = [
            ("participant already in group: o/n/b/NULL_COMPONENT", Said::AlreadyMember),
            ("channel org/ns/ch already exists", Said::AlreadyExists),
            ("channel org/ns/ch not found", Said::NotFound),
            ("Connection with link_id 0c3d not found", Said::NotFound),
            ("connection not found", Said::NotFound),
            ("connection slimop-1 does not exist", Said::NotFound),
            ("Link Not Found", Said::NotFound),
            ("failed to add participant to session: message send retries exhausted for id=7", Said::RetriesExhausted),
            (
                "failed to invite participant org/ns/carol to channel org/ns/exp: failed to add participant to session: send failure reported from slim: ErrorPayload: message processing error: no matching found for [873e580376ea963b, eef9769a4c6990d1, 595e7c499be299b9, NULL_COMPONENT] (session_id=1017885823, message_id=239357911, session_message_type=DiscoveryRequest)",
                Said::NoRoute,
            ),
            ("invalid config_data", Said::Other),
            ("", Said::Other),
        ];
        for (message, said) in cases {
            assert_eq!(Said::of(message), said, "{message}");
        }
    }

    #[test]
    fn a_missing_channel_is_told_from_a_missing_participant() {
        assert!(channel_not_found("channel o/n/c not found", "o/n/c"));
        assert!(!channel_not_found("participant o/n/b not found in channel o/n/c", "o/n/c"));
        assert!(!channel_not_found("channel o/n/other not found", "o/n/c"));
    }
}
