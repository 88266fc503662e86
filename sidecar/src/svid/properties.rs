//! What the Workload API (or a file) hands the agent, corrupted at random: never a panic, never
//! accepted unless it is what it claims to be (a rendered SVID's key is its leaf's; a validated
//! token is the one signed). `PROPTEST_CASES` sets the case count.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use proptest::prelude::*;

use super::jwt;
use super::x509::{self, X509Options};
use crate::workload::fake::{Authority, SigningKey};
use crate::workload::pb::{X509svid, X509svidResponse};

const ID: &str = "spiffe://example.org/app";

/// One valid SVID, made once: (chain DER, key DER, bundle DER).
static SVID: LazyLock<(Vec<u8>, Vec<u8>, Vec<u8>)> = LazyLock::new(|| {
    let authority = Authority::new("example.org");
    let (chain, key) = authority.issue(ID, Duration::from_secs(3600));
    (chain, key, authority.der().to_vec())
});

static KEY: LazyLock<SigningKey> = LazyLock::new(|| SigningKey::es256("k1"));

fn response(chain: Vec<u8>, key: Vec<u8>, bundle: Vec<u8>, spiffe_id: String) -> X509svidResponse {
    X509svidResponse {
        svids: vec![X509svid { spiffe_id, x509_svid: chain, x509_svid_key: key, bundle, hint: String::new() }],
        ..Default::default()
    }
}

/// `bytes` damaged: cut short, one byte changed, or bytes inserted.
fn corrupt(bytes: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = bytes.len().max(1);
    prop_oneof![
        (0..len).prop_map({
            let bytes = bytes.clone();
            move |at| bytes[..at.min(bytes.len())].to_vec()
        }),
        (0..len, 1..=255u8).prop_map({
            let bytes = bytes.clone();
            move |(at, x)| {
                let mut b = bytes.clone();
                if let Some(byte) = b.get_mut(at) {
                    *byte ^= x;
                }
                b
            }
        }),
        (0..len, prop::collection::vec(any::<u8>(), 1..8)).prop_map(move |(at, extra)| {
            let mut b = bytes.clone();
            let at = at.min(b.len());
            b.splice(at..at, extra);
            b
        }),
    ]
}

fn bundles(jwks: Vec<u8>) -> jwt::JwtBundles {
    BTreeMap::from([("example.org".to_owned(), jwks)])
}

fn valid_jwks() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"keys": [KEY.jwk()]})).expect("jwks")
}

fn token() -> String {
    KEY.sign(&serde_json::json!({"sub": ID, "aud": ["slim"], "exp": 4_000_000_000i64}))
}

proptest! {
    #[test]
    fn random_bytes_are_never_rendered(
        chain in prop::collection::vec(any::<u8>(), 0..256),
        key in prop::collection::vec(any::<u8>(), 0..128),
        bundle in prop::collection::vec(any::<u8>(), 0..256),
        spiffe_id in "\\PC{0,30}",
    ) {
        prop_assert!(x509::render(&response(chain, key, bundle, spiffe_id), "", X509Options::default(), 0).is_err());
    }

    #[test]
    fn a_damaged_chain_or_key_is_refused_or_still_a_matching_pair(
        chain in corrupt(SVID.0.clone()),
        key in corrupt(SVID.1.clone()),
        which in 0..3usize,
    ) {
        let (good_chain, good_key, bundle) = SVID.clone();
        let (chain, key) = match which {
            0 => (chain, good_key),
            1 => (good_chain, key),
            _ => (chain, key),
        };
        if let Ok(files) = x509::render(&response(chain, key.clone(), bundle.clone(), ID.into()), "", X509Options::default(), 0) {
            // Whatever was accepted is a certificate with the key that belongs to it.
            prop_assert_eq!(files.spiffe_id, ID);
            prop_assert!(!files.key_pem.is_empty() && !files.svid_pem.is_empty());
        }
    }

    #[test]
    fn a_damaged_bundle_is_refused_or_parses(bundle in corrupt(SVID.2.clone())) {
        let (chain, key, _) = SVID.clone();
        let rendered = x509::render(&response(chain, key, bundle.clone(), ID.into()), "", X509Options::default(), 0);
        if rendered.is_ok() {
            prop_assert!(x509::split_der(&bundle).is_ok(), "a bundle that does not parse is not written");
        }
    }

    #[test]
    fn random_tokens_and_key_sets_are_never_valid(
        token in "[A-Za-z0-9_.-]{0,200}",
        jwks in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        prop_assert!(jwt::validate(&token, &bundles(jwks.clone()), &["slim".into()], 0, 0).is_err());
        prop_assert!(jwt::validate(&token, &bundles(valid_jwks()), &["slim".into()], 0, 0).is_err());
        let _ = jwt::read_bundle_file(&jwks, "example.org");
    }

    #[test]
    fn a_damaged_token_is_refused_or_is_the_token_signed(damaged in corrupt(token().into_bytes())) {
        let Ok(text) = String::from_utf8(damaged) else { return Ok(()) };
        if let Ok(valid) = jwt::validate(&text, &bundles(valid_jwks()), &["slim".into()], 0, 0) {
            // Base64 may carry the same bytes in other spellings: what validates says what was signed.
            prop_assert_eq!(valid.spiffe_id, ID);
            prop_assert_eq!(valid.audiences, vec!["slim".to_owned()]);
        }
    }

    #[test]
    fn a_damaged_key_set_never_validates_another_key_s_token(jwks in corrupt(valid_jwks())) {
        let other = SigningKey::es256("k1").sign(&serde_json::json!({"sub": ID, "aud": ["slim"], "exp": 4_000_000_000i64}));
        prop_assert!(jwt::validate(&other, &bundles(jwks), &["slim".into()], 0, 0).is_err());
    }
}

#[test]
fn the_valid_fixtures_are_valid() {
    let (chain, key, bundle) = SVID.clone();
    assert!(x509::render(&response(chain, key, bundle, ID.into()), "", X509Options::default(), 0).is_ok());
    assert!(jwt::validate(&token(), &bundles(valid_jwks()), &["slim".into()], 0, 0).is_ok());
}
