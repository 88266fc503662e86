//! The issuer's keys and their rotation. Pure: a key set and the clock in, a key set out.
//!
//! Both kinds of key (the X.509 CA, the JWT signing key) follow one rule, so a rotation never
//! makes a valid SVID fail verification:
//! - a new key is **published** (in the bundle) one maximum SVID lifetime before it **signs**, so
//!   every verifier has it before the first SVID it signed can reach them;
//! - an old key stays published until every SVID it signed has expired: one maximum lifetime after
//!   its successor started signing.

use serde::{Deserialize, Serialize};

/// How long things live, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub x509_ttl: i64,
    pub jwt_ttl: i64,
    pub ca_rotation: i64,
    pub jwt_rotation: i64,
}

impl Policy {
    /// The shortest JWT-SVID lifetime accepted: SLIM's `spire` provider refreshes its token first
    /// at a fixed 30 s, so tokens must outlive that comfortably.
    pub const MIN_JWT_TTL: i64 = 60;

    pub fn validate(&self) -> Result<(), String> {
        if self.jwt_ttl < Self::MIN_JWT_TTL {
            return Err(format!("the JWT-SVID lifetime must be at least {} s", Self::MIN_JWT_TTL));
        }
        if self.x509_ttl < 60 {
            return Err("the X.509-SVID lifetime must be at least 60 s".into());
        }
        if self.jwt_rotation < 2 * self.jwt_ttl {
            return Err("the JWT key rotation period must be at least twice the JWT-SVID lifetime".into());
        }
        if self.ca_rotation < 2 * self.x509_ttl {
            return Err("the CA rotation period must be at least twice the X.509-SVID lifetime".into());
        }
        Ok(())
    }
}

/// A key with its place in the rotation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    /// `kid` of a JWT key; a CA's serial-like name.
    pub id: String,
    /// PKCS#8 PEM (P-256).
    pub key_pem: String,
    /// The CA certificate (empty for JWT keys).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cert_pem: String,
    /// Unix seconds: in the bundle from then on.
    pub published_at: i64,
    /// Unix seconds: signs from then on (until a successor signs).
    pub signs_from: i64,
}

/// Everything the issuer signs with, as kept in its Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySet {
    pub trust_domain: String,
    /// Oldest first.
    pub cas: Vec<Key>,
    /// Oldest first.
    pub jwt_keys: Vec<Key>,
    /// Increases with every change (the bundle's sequence number).
    pub sequence: u64,
}

/// A fresh key of either kind.
pub trait KeyMaker {
    fn ca(&mut self, trust_domain: &str, published_at: i64, not_after: i64) -> Result<Key, String>;
    fn jwt(&mut self, published_at: i64) -> Result<Key, String>;
}

/// The key signing at `now`: the newest whose time has come.
pub fn signing(keys: &[Key], now: i64) -> Option<&Key> {
    keys.iter().rev().find(|k| k.signs_from <= now).or_else(|| keys.first())
}

/// Keys rotated and pruned for `now`: `Some` when something changed.
pub fn rotate(set: &KeySet, policy: &Policy, now: i64, maker: &mut dyn KeyMaker) -> Result<Option<KeySet>, String> {
    let mut next = set.clone();
    let cas = rotate_one(&mut next.cas, policy.ca_rotation, policy.x509_ttl, now, |at| {
        maker.ca(&set.trust_domain, at, ca_not_after(at, policy))
    })?;
    let jwt_keys = rotate_one(&mut next.jwt_keys, policy.jwt_rotation, policy.jwt_ttl, now, |at| maker.jwt(at))?;
    if !(cas || jwt_keys) {
        return Ok(None);
    }
    next.sequence += 1;
    Ok(Some(next))
}

/// A CA lives two rotation periods (and a lifetime): while it signs, and while what it signed lives.
pub fn ca_not_after(published_at: i64, policy: &Policy) -> i64 {
    published_at + 2 * policy.ca_rotation + 2 * policy.x509_ttl
}

/// A new key set: one CA and one JWT key, signing at once (nothing was signed before).
pub fn initial(trust_domain: &str, policy: &Policy, now: i64, maker: &mut dyn KeyMaker) -> Result<KeySet, String> {
    Ok(KeySet {
        trust_domain: trust_domain.to_owned(),
        cas: vec![maker.ca(trust_domain, now, ca_not_after(now, policy))?],
        jwt_keys: vec![maker.jwt(now)?],
        sequence: 1,
    })
}

/// Adds a successor once the newest key is `period` old (signing one `ttl` later), and drops keys
/// whose last SVID has expired. Whether anything changed.
fn rotate_one(
    keys: &mut Vec<Key>,
    period: i64,
    ttl: i64,
    now: i64,
    make: impl FnOnce(i64) -> Result<Key, String>,
) -> Result<bool, String> {
    let mut changed = false;
    if keys.last().is_none_or(|newest| now - newest.published_at >= period) {
        let mut key = make(now)?;
        key.signs_from = if keys.is_empty() { now } else { now + ttl };
        keys.push(key);
        changed = true;
    }
    // Key i signed until key i+1 started signing; its SVIDs live `ttl` longer.
    let signing_since: Vec<i64> = keys.iter().skip(1).map(|k| k.signs_from).collect();
    let before = keys.len();
    let mut index = 0;
    keys.retain(|_| {
        let keep = signing_since.get(index).is_none_or(|successor| now < successor + ttl);
        index += 1;
        keep
    });
    Ok(changed || keys.len() != before)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter(u32);

    impl KeyMaker for Counter {
        fn ca(&mut self, _: &str, at: i64, _: i64) -> Result<Key, String> {
            self.0 += 1;
            Ok(Key {
                id: format!("ca{}", self.0),
                key_pem: String::new(),
                cert_pem: "c".into(),
                published_at: at,
                signs_from: at,
            })
        }
        fn jwt(&mut self, at: i64) -> Result<Key, String> {
            self.0 += 1;
            Ok(Key {
                id: format!("k{}", self.0),
                key_pem: String::new(),
                cert_pem: String::new(),
                published_at: at,
                signs_from: at,
            })
        }
    }

    const POLICY: Policy = Policy { x509_ttl: 3600, jwt_ttl: 300, ca_rotation: 365 * 86400, jwt_rotation: 86400 };

    fn ids(keys: &[Key]) -> Vec<&str> {
        keys.iter().map(|k| k.id.as_str()).collect()
    }

    #[test]
    fn a_new_key_is_published_one_lifetime_before_it_signs_and_kept_until_its_predecessor_s_svids_expire() {
        let mut maker = Counter(0);
        let set = initial("td", &POLICY, 0, &mut maker).unwrap();
        assert_eq!(signing(&set.jwt_keys, 0).unwrap().id, "k2");
        assert_eq!(rotate(&set, &POLICY, 86399, &mut maker).unwrap(), None, "nothing before the period");
        let rotated = rotate(&set, &POLICY, 86400, &mut maker).unwrap().unwrap();
        assert_eq!(ids(&rotated.jwt_keys), ["k2", "k3"]);
        assert_eq!(rotated.sequence, 2);
        // Published now, signing one JWT lifetime later.
        assert_eq!(signing(&rotated.jwt_keys, 86400 + 299).unwrap().id, "k2");
        assert_eq!(signing(&rotated.jwt_keys, 86400 + 300).unwrap().id, "k3");
        // k2's last token (signed at 86699) expires at 86999: kept until then.
        assert_eq!(rotate(&rotated, &POLICY, 86400 + 599, &mut maker).unwrap(), None);
        let pruned = rotate(&rotated, &POLICY, 86400 + 600, &mut maker).unwrap().unwrap();
        assert_eq!(ids(&pruned.jwt_keys), ["k3"]);
        assert_eq!(ids(&pruned.cas), ["ca1"], "the CA rotates on its own period");
    }

    #[test]
    fn no_token_is_ever_signed_by_a_key_missing_from_the_bundle_it_is_checked_against() {
        // Walk a year in 50 s steps: at every instant, a token signed then and checked at any
        // point of its life finds its key in the bundle of that point.
        let policy = Policy { x509_ttl: 120, jwt_ttl: 60, ca_rotation: 3000, jwt_rotation: 130 };
        let mut maker = Counter(0);
        let mut set = initial("td", &policy, 0, &mut maker).unwrap();
        let mut history: Vec<(i64, KeySet)> = vec![(0, set.clone())];
        for now in (0..20_000).step_by(10) {
            if let Some(next) = rotate(&set, &policy, now, &mut maker).unwrap() {
                set = next;
            }
            history.push((now, set.clone()));
        }
        for (signed_at, at_signing) in &history {
            let kid = signing(&at_signing.jwt_keys, *signed_at).unwrap().id.clone();
            for (checked_at, later) in history.iter().filter(|(t, _)| t >= signed_at && *t < signed_at + policy.jwt_ttl)
            {
                assert!(
                    later.jwt_keys.iter().any(|k| k.id == kid),
                    "{kid} signed at {signed_at} missing at {checked_at}"
                );
            }
            // And a key only signs once it has been published for a lifetime (or is the first).
            let key = at_signing.jwt_keys.iter().find(|k| k.id == kid).unwrap();
            assert!(key.signs_from == 0 || key.signs_from - key.published_at >= policy.jwt_ttl);
        }
    }

    #[test]
    fn policies_that_cannot_rotate_safely_are_refused() {
        assert!(POLICY.validate().is_ok());
        assert!(Policy { jwt_ttl: 59, ..POLICY }.validate().is_err());
        assert!(Policy { jwt_rotation: 500, ..POLICY }.validate().is_err());
        assert!(Policy { ca_rotation: 7000, ..POLICY }.validate().is_err());
    }
}
