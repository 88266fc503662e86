//! Kubernetes service-account tokens as identities: validated the way a receiver would (issuer,
//! audience, time, signature against the cluster's JWKS) plus what only the pod itself can check
//! (the token is bound to this pod, in this namespace). Pure.

use serde::Deserialize;

use super::jwt::{self, JwtError};

/// The key under which the cluster's JWKS sits among the agent's JWT bundles.
pub const BUNDLE_KEY: &str = "kubernetes";

/// A validated service-account token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountToken {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub subject: String,
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to (`name`, `uid`), when it is (projected tokens always are).
    pub pod: Option<(String, String)>,
    pub issuer: String,
    pub audiences: Vec<String>,
    /// `exp` (Unix seconds).
    pub expiry: i64,
}

impl ServiceAccountToken {
    /// What `verify` prints after the subject.
    pub fn describe(&self) -> String {
        let pod = match &self.pod {
            Some((name, uid)) => format!(", pod {name} (uid {uid})"),
            None => String::new(),
        };
        format!("service account {} in namespace {}{pod}, issuer {}", self.service_account, self.namespace, self.issuer)
    }
}

/// What this pod expects of its own token; `None` fields are not checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    /// The cluster's issuer (from its OIDC discovery document).
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(flatten)]
    registered: jwt::Claims,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: Option<String>,
    pod: Option<ObjectRef>,
}

#[derive(Deserialize)]
struct ObjectRef {
    name: String,
    uid: String,
}

/// True when the token's subject is a service account's (how `verify` tells the two kinds apart).
pub fn is_service_account_token(token: &str) -> bool {
    jwt::unverified_claims::<Claims>(token.trim())
        .ok()
        .and_then(|c| c.registered.sub)
        .is_some_and(|sub| sub.starts_with("system:serviceaccount:"))
}

/// Validates a service-account token against the cluster's JWKS at `now` (`leeway` seconds of
/// clock skew allowed).
pub fn validate(
    token: &str,
    jwks: &[u8],
    expected: &Expected,
    now: i64,
    leeway: u64,
) -> Result<ServiceAccountToken, JwtError> {
    let token = token.trim();
    let (header, kid) = jwt::checked_header(token)?;
    let Claims { registered: claims, kubernetes: bound } = jwt::unverified_claims(token)?;
    let issuer = claims.iss.clone().unwrap_or_default();
    if issuer.is_empty() || expected.issuer.as_ref().is_some_and(|e| *e != issuer) {
        return Err(JwtError::Issuer { expected: expected.issuer.clone().unwrap_or_default(), token: claims.iss });
    }
    let subject = claims.sub.clone().unwrap_or_default();
    let (namespace, service_account) = split_subject(&subject).ok_or(JwtError::NotServiceAccount(subject.clone()))?;
    let key = jwt::decoding_key(jwks, &kid, &issuer)?;
    let audiences = claims.aud.list();
    let expiry = jwt::check_audience_and_time(&audiences, claims.exp, claims.nbf, &expected.audiences, now, leeway)?;
    jwt::check_signature(token, &header, &key)?;

    let pod = bound.as_ref().and_then(|k| k.pod.as_ref()).map(|p| (p.name.clone(), p.uid.clone()));
    let claimed_namespace = bound.as_ref().and_then(|k| k.namespace.as_deref());
    if claimed_namespace.is_some_and(|n| n != namespace) {
        return Err(JwtError::Malformed(format!(
            "kubernetes.io.namespace {claimed_namespace:?} contradicts sub {subject:?}"
        )));
    }
    if let Some(want) = &expected.namespace
        && want != namespace
    {
        return Err(JwtError::PodBinding {
            expected: format!("namespace {want}"),
            token: format!("namespace {namespace}"),
        });
    }
    check_pod(expected, pod.as_ref())?;
    Ok(ServiceAccountToken {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        subject,
        pod,
        issuer,
        audiences,
        expiry,
    })
}

/// A pod that knows its name or UID accepts only a token bound to it.
fn check_pod(expected: &Expected, pod: Option<&(String, String)>) -> Result<(), JwtError> {
    if expected.pod_name.is_none() && expected.pod_uid.is_none() {
        return Ok(());
    }
    let wanted = format!(
        "pod {} (uid {})",
        expected.pod_name.as_deref().unwrap_or("?"),
        expected.pod_uid.as_deref().unwrap_or("?")
    );
    let Some((name, uid)) = pod else {
        return Err(JwtError::PodBinding { expected: wanted, token: "no pod".into() });
    };
    let name_ok = expected.pod_name.as_ref().is_none_or(|n| n == name);
    let uid_ok = expected.pod_uid.as_ref().is_none_or(|u| u == uid);
    if name_ok && uid_ok {
        Ok(())
    } else {
        Err(JwtError::PodBinding { expected: wanted, token: format!("pod {name} (uid {uid})") })
    }
}

/// `system:serviceaccount:<namespace>:<name>` into its two parts.
fn split_subject(subject: &str) -> Option<(&str, &str)> {
    let (namespace, name) = subject.strip_prefix("system:serviceaccount:")?.split_once(':')?;
    let valid = |s: &str| !s.is_empty() && !s.contains(':');
    (valid(namespace) && valid(name)).then_some((namespace, name))
}

#[cfg(all(test, feature = "dev"))]
mod tests {
    use super::*;
    use crate::workload::fake::SigningKey;
    use serde_json::json;

    const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
    const NOW: i64 = 1_800_000_000;

    fn claims() -> serde_json::Value {
        json!({
            "iss": ISSUER, "sub": "system:serviceaccount:apps:alice", "aud": ["slim"],
            "iat": NOW - 10, "nbf": NOW - 10, "exp": NOW + 3600,
            "kubernetes.io": {
                "namespace": "apps",
                "pod": {"name": "alice-0", "uid": "uid-1"},
                "serviceaccount": {"name": "alice", "uid": "sa-uid"},
            },
        })
    }

    fn jwks(keys: &[&SigningKey]) -> Vec<u8> {
        serde_json::to_vec(&json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()})).expect("jwks")
    }

    fn expected() -> Expected {
        Expected {
            issuer: Some(ISSUER.into()),
            audiences: vec!["slim".into()],
            namespace: Some("apps".into()),
            pod_name: Some("alice-0".into()),
            pod_uid: Some("uid-1".into()),
        }
    }

    #[test]
    fn a_projected_token_of_this_pod_is_accepted_with_rs256_and_es256() {
        for key in [SigningKey::rs256("rsa"), SigningKey::es256("ec")] {
            let token = key.sign(&claims());
            let valid = validate(&token, &jwks(&[&key]), &expected(), NOW, 0).expect("valid");
            assert_eq!(valid.subject, "system:serviceaccount:apps:alice");
            assert_eq!((valid.namespace.as_str(), valid.service_account.as_str()), ("apps", "alice"));
            assert_eq!(valid.pod, Some(("alice-0".into(), "uid-1".into())));
            assert_eq!(valid.expiry, NOW + 3600);
            assert!(valid.describe().contains("pod alice-0"), "{}", valid.describe());
            assert!(is_service_account_token(&token));
        }
    }

    #[test]
    fn each_wrong_claim_is_refused_with_its_reason() {
        let key = SigningKey::es256("ec");
        let keys = jwks(&[&key]);
        let refused = |change: &dyn Fn(&mut serde_json::Value), expected: &Expected| {
            let mut c = claims();
            change(&mut c);
            validate(&key.sign(&c), &keys, expected, NOW, 0).expect_err("refused")
        };
        let e = refused(&|c| c["aud"] = json!(["other"]), &expected());
        assert!(matches!(e, JwtError::Audience { .. }), "{e}");
        let e = refused(&|c| c["iss"] = json!("https://elsewhere"), &expected());
        assert!(matches!(e, JwtError::Issuer { .. }), "{e}");
        let e = refused(&|c| drop(c.as_object_mut().map(|o| o.remove("iss"))), &Expected::default());
        assert!(matches!(e, JwtError::Issuer { token: None, .. }), "{e}");
        let e = refused(&|c| c["sub"] = json!("spiffe://example.org/alice"), &expected());
        assert!(matches!(e, JwtError::NotServiceAccount(_)), "{e}");
        let e = refused(&|c| c["exp"] = json!(NOW - 1), &expected());
        assert!(matches!(e, JwtError::Expired(_)), "{e}");
        let e = refused(&|c| c["kubernetes.io"]["pod"]["uid"] = json!("uid-2"), &expected());
        assert_eq!(
            e.to_string(),
            "the token is bound to pod alice-0 (uid uid-2), not to this pod (pod alice-0 (uid uid-1))"
        );
        let e = refused(&|c| drop(c["kubernetes.io"].as_object_mut().map(|o| o.remove("pod"))), &expected());
        assert!(matches!(e, JwtError::PodBinding { .. }), "{e}");
        let receiver = Expected { audiences: vec!["slim".into()], ..Expected::default() };
        let e = refused(&|c| c["sub"] = json!("system:serviceaccount:other:alice"), &receiver);
        assert!(matches!(e, JwtError::Malformed(_)), "{e}");
        let e = refused(&|_| {}, &Expected { namespace: Some("prod".into()), ..expected() });
        assert!(matches!(e, JwtError::PodBinding { .. }), "{e}");
        // Unchecked fields stay unchecked: a receiver knows no pod.
        assert!(validate(&key.sign(&claims()), &keys, &receiver, NOW, 0).is_ok());
    }

    #[test]
    fn a_key_the_cluster_does_not_publish_is_an_unknown_kid() {
        let (signer, published) = (SigningKey::es256("new"), SigningKey::es256("old"));
        let e = validate(&signer.sign(&claims()), &jwks(&[&published]), &expected(), NOW, 0).expect_err("refused");
        assert!(matches!(e, JwtError::UnknownKid { ref kid, ref bundle } if kid == "new" && bundle == ISSUER), "{e}");
        // Same kid, other key: the signature says so.
        let impostor = SigningKey::es256("old");
        let e = validate(&impostor.sign(&claims()), &jwks(&[&published]), &expected(), NOW, 0).expect_err("refused");
        assert!(matches!(e, JwtError::Signature(_)), "{e}");
    }
}
