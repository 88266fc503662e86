//! JWT-SVID validation and X.509 rendering, including what must be refused.

use std::collections::BTreeMap;

use base64::Engine;
use slim_identity_agent::agent::unix_now;
use slim_identity_agent::svid::jwt::{self, JwtError};
use slim_identity_agent::svid::x509::{self, X509Options};
use slim_identity_agent::workload::fake::{AgentState, SigningKey};
use slim_identity_agent::workload::pb;

const ID: &str = "spiffe://example.org/app";

fn state() -> AgentState {
    let mut state = AgentState::new("example.org");
    state.issue(ID, "");
    state
}

fn bundles(state: &AgentState) -> jwt::JwtBundles {
    BTreeMap::from([("example.org".to_owned(), state.jwks())])
}

fn aud(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A token with `header` and `claims`, signed (or not) as given.
fn forged(header: serde_json::Value, claims: serde_json::Value, signature: &str) -> String {
    let b64 = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.{signature}", b64(&header), b64(&claims))
}

#[test]
fn es256_and_rs256_tokens_validate() {
    let mut state = state();
    let token = state.sign_jwt(ID, &aud(&["slim", "other"]));
    let valid = jwt::validate(&token, &bundles(&state), &aud(&["slim"]), unix_now(), 0).expect("ES256");
    assert_eq!(valid.spiffe_id, ID);
    assert_eq!(valid.audiences, aud(&["slim", "other"]));
    state.jwt_keys = vec![SigningKey::rs256("rsa")];
    let token = state.sign_jwt(ID, &aud(&["slim"]));
    jwt::validate(&token, &bundles(&state), &aud(&["slim"]), unix_now(), 0).expect("RS256");
}

#[test]
fn invalid_tokens_are_refused_with_the_reason() {
    let state = state();
    let good = state.sign_jwt(ID, &aud(&["slim"]));
    let b = bundles(&state);
    let now = unix_now();
    let error = jwt::validate(&good, &b, &aud(&["gateway"]), now, 0).expect_err("audience");
    assert_eq!(error, JwtError::Audience { expected: aud(&["gateway"]), token: aud(&["slim"]) });
    assert!(error.to_string().contains("[\"slim\"]") && error.to_string().contains("[\"gateway\"]"));
    assert!(matches!(jwt::validate(&good, &b, &aud(&["slim"]), now + 3600, 0), Err(JwtError::Expired(_))));
    assert!(matches!(jwt::validate(&good, &BTreeMap::new(), &aud(&["slim"]), now, 0), Err(JwtError::NoBundle(_))));

    let (header, claims, signature) = {
        let mut parts = good.split('.');
        (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""))
    };
    let tampered_claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
        serde_json::json!({"sub": "spiffe://example.org/admin", "aud": ["slim"], "exp": now + 300}).to_string(),
    );
    let tampered = format!("{header}.{tampered_claims}.{signature}");
    assert!(matches!(jwt::validate(&tampered, &b, &aud(&["slim"]), now, 0), Err(JwtError::Signature(_))));
    let _ = claims;

    let exp = now + 300;
    let cases = [
        (
            serde_json::json!({"alg": "none", "kid": "key-1"}),
            serde_json::json!({"sub": ID, "aud": "slim", "exp": exp}),
            "not accepted",
        ),
        (
            serde_json::json!({"alg": "HS256", "kid": "key-1"}),
            serde_json::json!({"sub": ID, "aud": "slim", "exp": exp}),
            "not accepted",
        ),
        (serde_json::json!({"alg": "ES256"}), serde_json::json!({"sub": ID, "aud": "slim", "exp": exp}), "no kid"),
        (
            serde_json::json!({"alg": "ES256", "kid": "key-1", "typ": "XYZ"}),
            serde_json::json!({"sub": ID, "aud": "slim", "exp": exp}),
            "typ",
        ),
        (
            serde_json::json!({"alg": "ES256", "kid": "key-1"}),
            serde_json::json!({"sub": "bob", "aud": "slim", "exp": exp}),
            "not a SPIFFE ID",
        ),
        (
            serde_json::json!({"alg": "ES256", "kid": "other"}),
            serde_json::json!({"sub": ID, "aud": "slim", "exp": exp}),
            "not in the JWT bundle",
        ),
        (
            serde_json::json!({"alg": "ES256", "kid": "key-1"}),
            serde_json::json!({"sub": ID, "aud": [], "exp": exp}),
            "include none",
        ),
        (
            serde_json::json!({"alg": "ES256", "kid": "key-1"}),
            serde_json::json!({"sub": ID, "aud": "slim", "exp": exp, "nbf": now + 999}),
            "not valid before",
        ),
    ];
    for (header, claims, expected) in cases {
        let token = forged(header.clone(), claims.clone(), "c2ln");
        let error = jwt::validate(&token, &b, &aud(&["slim"]), now, 0).expect_err("refused").to_string();
        assert!(error.contains(expected), "{header} {claims}: {error}");
    }
}

#[test]
fn bundle_files_round_trip_in_both_formats() {
    let state = state();
    let b = bundles(&state);
    let helper = jwt::spiffe_helper_bundle(&b);
    let map: BTreeMap<String, String> = serde_json::from_slice(&helper).expect("map");
    assert_eq!(map.keys().collect::<Vec<_>>(), vec!["example.org"], "trust domain names, no spiffe:// prefix");
    assert_eq!(jwt::read_bundle_file(&helper, "unused").expect("read"), b);
    let jwks = jwt::jwks_bundle(&b, "example.org").expect("jwks");
    let read = jwt::read_bundle_file(&jwks, "example.org").expect("read");
    let token = state.sign_jwt(ID, &aud(&["slim"]));
    jwt::validate(&token, &read, &aud(&["slim"]), unix_now(), 0).expect("a plain JWKS verifies too");
    assert!(jwt::jwks_bundle(&b, "other.org").is_err());
}

fn response(state: &AgentState) -> pb::X509svidResponse {
    let identity = &state.identities[0];
    pb::X509svidResponse {
        svids: vec![pb::X509svid {
            spiffe_id: identity.spiffe_id.clone(),
            x509_svid: identity.chain.clone(),
            x509_svid_key: identity.key.clone(),
            bundle: state.authority.der().to_vec(),
            hint: "main".into(),
        }],
        crl: vec![],
        federated_bundles: Default::default(),
    }
}

#[test]
fn x509_files_and_refusals() {
    let state = state();
    let files = x509::render(&response(&state), "", X509Options::default(), unix_now()).expect("render");
    assert!(files.svid_pem.starts_with(b"-----BEGIN CERTIFICATE-----\n"));
    assert!(files.key_pem.starts_with(b"-----BEGIN PRIVATE KEY-----\n"));
    assert_eq!(files.spiffe_id, ID);
    assert!(files.not_after > unix_now());
    assert_eq!(
        x509::render(&response(&state), "missing", X509Options::default(), 0),
        Err(x509::X509Error::HintNotFound("missing".into()))
    );
    assert!(x509::render(&response(&state), "main", X509Options::default(), unix_now()).is_ok());

    // A key from another SVID is never written with this certificate.
    let mut mixed = response(&state);
    let mut other = AgentState::new("example.org");
    other.issue(ID, "");
    mixed.svids[0].x509_svid_key = other.identities[0].key.clone();
    let error = x509::render(&mixed, "", X509Options::default(), unix_now()).expect_err("mismatch");
    assert!(error.to_string().contains("does not match"), "{error}");

    let mut no_bundle = response(&state);
    no_bundle.svids[0].bundle.clear();
    assert_eq!(
        x509::render(&no_bundle, "", X509Options::default(), 0),
        Err(x509::X509Error::NoBundle("example.org".into()))
    );

    // omit_expired drops certificates past their notAfter (here: everything, a year on).
    let later = unix_now() + 400 * 86400;
    let omitted = x509::render(&response(&state), "", X509Options { omit_expired: true, ..Default::default() }, later)
        .expect("render");
    assert!(omitted.svid_pem.is_empty() && omitted.bundle_pem.is_empty());
}

/// root -> intermediate -> leaf, as SPIRE issues with an upstream authority.
fn chain_with_intermediate() -> pb::X509svidResponse {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    let ca = |name: &str| {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    };
    let root_key = KeyPair::generate().expect("key");
    let root_params = ca("root");
    let root = root_params.self_signed(&root_key).expect("root");
    let root_issuer = Issuer::new(root_params, root_key);
    let intermediate_key = KeyPair::generate().expect("key");
    let intermediate_params = ca("intermediate");
    let intermediate = intermediate_params.signed_by(&intermediate_key, &root_issuer).expect("intermediate");
    let intermediate_issuer = Issuer::new(intermediate_params, intermediate_key);
    let leaf_key = KeyPair::generate().expect("key");
    let mut leaf_params = CertificateParams::default();
    leaf_params.subject_alt_names = vec![SanType::URI(ID.try_into().expect("uri"))];
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &intermediate_issuer).expect("leaf");
    pb::X509svidResponse {
        svids: vec![pb::X509svid {
            spiffe_id: ID.into(),
            x509_svid: [leaf.der().to_vec(), intermediate.der().to_vec()].concat(),
            x509_svid_key: leaf_key.serialize_der(),
            bundle: root.der().to_vec(),
            hint: String::new(),
        }],
        crl: vec![],
        federated_bundles: Default::default(),
    }
}

#[test]
fn intermediates_go_with_the_svid_or_into_the_bundle() {
    let response = chain_with_intermediate();
    let count = |pem: &[u8]| String::from_utf8_lossy(pem).matches("-----BEGIN CERTIFICATE-----").count();
    let plain = x509::render(&response, "", X509Options::default(), unix_now()).expect("render");
    assert_eq!((count(&plain.svid_pem), count(&plain.bundle_pem)), (2, 1), "leaf + intermediate; root");
    let moved = x509::render(
        &response,
        "",
        X509Options { add_intermediates_to_bundle: true, ..Default::default() },
        unix_now(),
    )
    .expect("render");
    assert_eq!((count(&moved.svid_pem), count(&moved.bundle_pem)), (1, 2), "leaf only; root + intermediate");
    // The intermediate moved from the end of the SVID file to the end of the bundle.
    let intermediate = &plain.svid_pem[moved.svid_pem.len()..];
    assert!(moved.bundle_pem.ends_with(intermediate));
}
