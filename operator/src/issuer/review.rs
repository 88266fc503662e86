//! Who is asking: the agent's projected token checked by the API server (TokenReview, which
//! refuses a token of a deleted pod), then the pod it is bound to.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, PostParams};

use crate::webhook::inject::{INJECTED, INJECTED_SOURCE};

/// A pod allowed to be issued an identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
    pub pod_uid: String,
}

/// Why a caller was refused. `reason()` is what it is counted and answered under.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no bearer token")]
    NoToken,
    #[error("the API server did not authenticate the token for audience {audience:?}: {error}")]
    NotAuthenticated { audience: String, error: String },
    #[error("the token belongs to {0}, not a service account")]
    NotServiceAccount(String),
    #[error("the token is not bound to a pod (use a projected service-account token)")]
    NotPodBound,
    #[error("pod {namespace}/{pod} no longer exists")]
    PodGone { namespace: String, pod: String },
    #[error("pod {namespace}/{pod} is not the pod the token was issued for (UID {token_uid})")]
    PodMismatch { namespace: String, pod: String, token_uid: String },
    #[error("pod {namespace}/{pod} runs as service account {actual:?}, the token is {token:?}'s")]
    ServiceAccountMismatch { namespace: String, pod: String, actual: String, token: String },
    #[error("pod {namespace}/{pod} was not injected with the identity agent (annotation {INJECTED})")]
    NotInjected { namespace: String, pod: String },
    #[error("pod {namespace}/{pod} did not choose identity source kubernetes")]
    NotKubernetesSource { namespace: String, pod: String },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoToken => "NoToken",
            Refusal::NotAuthenticated { .. } => "TokenNotAuthenticated",
            Refusal::NotServiceAccount(_) => "NotServiceAccount",
            Refusal::NotPodBound => "NotPodBound",
            Refusal::PodGone { .. } => "PodGone",
            Refusal::PodMismatch { .. } => "PodMismatch",
            Refusal::ServiceAccountMismatch { .. } => "ServiceAccountMismatch",
            Refusal::NotInjected { .. } => "PodNotInjected",
            Refusal::NotKubernetesSource { .. } => "NotKubernetesSource",
        }
    }
}

/// The API server could not be asked (not the caller's fault).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ReviewUnavailable {
    what: &'static str,
    source: kube::Error,
}

/// What the API server said about a token, reduced to what decides (pure input of [`caller_of`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reviewed {
    pub authenticated: bool,
    pub error: String,
    pub username: String,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

impl From<TokenReviewStatus> for Reviewed {
    fn from(status: TokenReviewStatus) -> Self {
        let user = status.user.unwrap_or_default();
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first().cloned());
        Reviewed {
            authenticated: status.authenticated.unwrap_or(false),
            error: status.error.unwrap_or_default(),
            username: user.username.unwrap_or_default(),
            pod_name: first("authentication.kubernetes.io/pod-name"),
            pod_uid: first("authentication.kubernetes.io/pod-uid"),
        }
    }
}

/// The caller a review names, or why there is none. Pure.
pub fn caller_of(reviewed: &Reviewed, audience: &str) -> Result<Caller, Refusal> {
    if !reviewed.authenticated {
        let error = if reviewed.error.is_empty() { "not authenticated".to_owned() } else { reviewed.error.clone() };
        return Err(Refusal::NotAuthenticated { audience: audience.to_owned(), error });
    }
    let Some(rest) = reviewed.username.strip_prefix("system:serviceaccount:") else {
        return Err(Refusal::NotServiceAccount(reviewed.username.clone()));
    };
    let (namespace, service_account) =
        rest.split_once(':').ok_or_else(|| Refusal::NotServiceAccount(reviewed.username.clone()))?;
    let (Some(pod), Some(pod_uid)) = (&reviewed.pod_name, &reviewed.pod_uid) else {
        return Err(Refusal::NotPodBound);
    };
    Ok(Caller {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        pod: pod.clone(),
        pod_uid: pod_uid.clone(),
    })
}

/// Whether `pod` (as read now; `None`: gone) is the caller's and asked for this identity. Pure.
pub fn check_pod(caller: &Caller, pod: Option<&Pod>) -> Result<(), Refusal> {
    let (namespace, name) = (caller.namespace.clone(), caller.pod.clone());
    let Some(pod) = pod else { return Err(Refusal::PodGone { namespace, pod: name }) };
    if pod.metadata.uid.as_deref() != Some(caller.pod_uid.as_str()) {
        return Err(Refusal::PodMismatch { namespace, pod: name, token_uid: caller.pod_uid.clone() });
    }
    let actual = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    if actual != caller.service_account {
        return Err(Refusal::ServiceAccountMismatch {
            namespace,
            pod: name,
            actual,
            token: caller.service_account.clone(),
        });
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if !annotations.contains_key(INJECTED) {
        return Err(Refusal::NotInjected { namespace, pod: name });
    }
    if annotations.get(INJECTED_SOURCE).map(String::as_str) != Some("kubernetes") {
        return Err(Refusal::NotKubernetesSource { namespace, pod: name });
    }
    Ok(())
}

/// Asks the API server about tokens and pods.
#[derive(Clone)]
pub struct Reviewer {
    pub client: Client,
    pub audience: String,
}

impl Reviewer {
    /// The token's caller, checked against its live pod.
    pub async fn review(&self, token: &str) -> Result<Result<Caller, Refusal>, ReviewUnavailable> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|source| ReviewUnavailable { what: "TokenReview", source })?;
        let caller = match caller_of(&reviewed.status.map(Reviewed::from).unwrap_or_default(), &self.audience) {
            Ok(caller) => caller,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &caller.namespace);
        let pod =
            pods.get_opt(&caller.pod).await.map_err(|source| ReviewUnavailable { what: "reading the pod", source })?;
        Ok(check_pod(&caller, pod.as_ref()).map(|()| caller))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reviewed() -> Reviewed {
        Reviewed {
            authenticated: true,
            error: String::new(),
            username: "system:serviceaccount:team:alice".into(),
            pod_name: Some("app-1".into()),
            pod_uid: Some("uid-1".into()),
        }
    }

    fn pod(uid: &str, sa: Option<&str>, annotations: &[(&str, &str)]) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.uid = Some(uid.into());
        pod.metadata.annotations = Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            service_account_name: sa.map(str::to_owned),
            ..Default::default()
        });
        pod
    }

    const CHOSE: [(&str, &str); 2] = [(INJECTED, "0.1.0"), (INJECTED_SOURCE, "kubernetes")];

    #[test]
    fn a_pod_bound_service_account_token_names_its_caller() {
        let caller = caller_of(&reviewed(), "slim-issuer").unwrap();
        assert_eq!((caller.namespace.as_str(), caller.service_account.as_str()), ("team", "alice"));
        assert_eq!(check_pod(&caller, Some(&pod("uid-1", Some("alice"), &CHOSE))), Ok(()));
    }

    #[test]
    fn every_refusal_has_its_reason() {
        let refused = |r: Reviewed| caller_of(&r, "slim-issuer").unwrap_err().reason();
        assert_eq!(refused(Reviewed { authenticated: false, ..reviewed() }), "TokenNotAuthenticated");
        assert_eq!(refused(Reviewed { username: "alice@example.com".into(), ..reviewed() }), "NotServiceAccount");
        assert_eq!(refused(Reviewed { pod_uid: None, ..reviewed() }), "NotPodBound");
        let caller = caller_of(&reviewed(), "a").unwrap();
        let check = |p: Option<&Pod>| check_pod(&caller, p).unwrap_err().reason();
        assert_eq!(check(None), "PodGone");
        assert_eq!(check(Some(&pod("uid-2", Some("alice"), &CHOSE))), "PodMismatch");
        assert_eq!(check(Some(&pod("uid-1", None, &CHOSE))), "ServiceAccountMismatch");
        assert_eq!(check(Some(&pod("uid-1", Some("alice"), &CHOSE[1..]))), "PodNotInjected");
        assert_eq!(check(Some(&pod("uid-1", Some("alice"), &CHOSE[..1]))), "NotKubernetesSource");
    }
}
