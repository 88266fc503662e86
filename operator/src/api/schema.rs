//! Hand-written schemas for lists of strings whose every item must match a rule.
//!
//! The API server estimates the worst-case cost of every CEL rule from the schema's bounds and
//! refuses a CRD whose rules could exceed its budget. A rule over a whole list
//! (`self.all(e, e.matches(..))`, or `exists_one` for uniqueness, which is quadratic) costs
//! `maxItems` times the cost of one item at best; a rule on the items, bounded by `maxLength`, is
//! estimated once per item and stays far inside the budget. Uniqueness is the server's own
//! `x-kubernetes-list-type: set`, which costs no CEL at all.

use schemars::{Schema, json_schema};

/// A list of at most `max_items` distinct strings of at most `max_length` characters, each
/// satisfying the CEL `rule` (refused with `message` otherwise).
pub fn string_set(max_items: u32, max_length: u32, rule: &str, message: &str) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": max_items,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "maxLength": max_length,
            "x-kubernetes-validations": [{"rule": rule, "message": message}],
        },
    })
}

/// Longest controller endpoint accepted (`http://` + a DNS name of 253 + a port).
pub const ENDPOINT_MAX_LENGTH: u32 = 300;

/// Most controller endpoints in one node set.
pub const MAX_ENDPOINTS: u32 = 64;

/// Longest SLIM name component list `org/namespace/name` accepted.
pub const NAME_MAX_LENGTH: u32 = 256;

/// Most participants listed in one SlimChannel.
pub const MAX_PARTICIPANTS: u32 = 256;
