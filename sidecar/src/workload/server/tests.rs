//! The served Workload API over a real Unix socket, with the fake SPIRE agent upstream and the
//! `spiffe` crate (an independent client) as the app.

use std::time::Duration;

use super::*;
use crate::workload::fake::{AgentState, FakeAgent};

const TD: &str = "example.org";

struct Setup {
    _dir: tempfile::TempDir,
    upstream: FakeAgent,
    served: Served,
    socket: PathBuf,
}

/// The fake upstream with alice and bob; the served socket keeps `hint`'s SVID, fed by hand
/// from upstream's current state (the agent's streams do that in the daemon).
async fn setup(hint: &str) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut state = AgentState::new(TD);
    state.issue(&format!("spiffe://{TD}/alice"), "alice");
    state.issue(&format!("spiffe://{TD}/bob"), "bob");
    let upstream = FakeAgent::start(&dir.path().join("upstream.sock"), state).await.expect("upstream");
    let served = Served::new(hint);
    let socket = dir.path().join("pod/agent.sock");
    let issuer = Arc::new(Upstream { socket: upstream.socket.clone(), hint: hint.to_owned() });
    let server = bind(&socket, served.clone(), issuer).expect("bind");
    tokio::spawn(server);
    Setup { _dir: dir, upstream, served, socket }
}

async fn feed(s: &Setup) {
    let client = crate::workload::WorkloadClient::connect(&s.upstream.socket).await.expect("upstream");
    let x509 = client.x509_svids().await.expect("stream").message().await.expect("x509").expect("some");
    let bundles = client.jwt_bundles().await.expect("stream").message().await.expect("bundles").expect("some");
    s.served.set_x509(Some(x509));
    s.served.set_bundles(Some(bundles));
}

async fn app(socket: &Path) -> spiffe::WorkloadApiClient {
    spiffe::WorkloadApiClient::connect_to(format!("unix://{}", socket.display())).await.expect("the app connects")
}

async fn bare(socket: &Path) -> pb::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel> {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect");
    pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel)
}

#[tokio::test]
async fn without_the_security_header_every_call_is_invalid_argument() {
    let s = setup("").await;
    feed(&s).await;
    let mut client = bare(&s.socket).await;
    let request = pb::JwtsvidRequest { audience: vec!["slim".into()], spiffe_id: String::new() };
    let codes = [
        client.fetch_jwtsvid(request).await.map(|_| ()).expect_err("refused").code(),
        client.fetch_x509svid(pb::X509svidRequest {}).await.map(|_| ()).expect_err("refused").code(),
        client.fetch_jwt_bundles(pb::JwtBundlesRequest {}).await.map(|_| ()).expect_err("refused").code(),
        client.fetch_x509_bundles(pb::X509BundlesRequest {}).await.map(|_| ()).expect_err("refused").code(),
        client
            .validate_jwtsvid(pb::ValidateJwtsvidRequest { audience: "a".into(), svid: "x".into() })
            .await
            .map(|_| ())
            .expect_err("refused")
            .code(),
    ];
    assert_eq!(codes, [tonic::Code::InvalidArgument; 5]);
}

#[tokio::test]
async fn nothing_held_is_permission_denied() {
    let s = setup("alice").await;
    let client = app(&s.socket).await;
    let error = client.fetch_x509_svid().await.expect_err("nothing held").to_string();
    assert!(error.contains("PermissionDenied") || error.contains("no identity"), "{error}");
    let error = client.fetch_jwt_svid(["slim"], None).await.expect_err("nothing held").to_string();
    assert!(error.contains("PermissionDenied") || error.contains("no identity"), "{error}");
    assert!(!s.served.complete());
}

#[tokio::test]
async fn the_app_gets_its_hinted_identity_bundles_and_forwarded_jwt_svids() {
    let s = setup("bob").await;
    feed(&s).await;
    assert!(s.served.complete());
    let client = app(&s.socket).await;
    let context = client.fetch_x509_context().await.expect("x509 context");
    let svid = context.default_svid().expect("svid");
    assert_eq!(svid.spiffe_id().to_string(), format!("spiffe://{TD}/bob"), "only the hinted SVID is served");
    let bundles = client.fetch_x509_bundles().await.expect("x509 bundles");
    assert!(bundles.get(&spiffe::TrustDomain::new(TD).expect("td")).is_some());

    // Audiences pass through unchanged, SLIM's key-carrying one included.
    let claims = "slim-claims:eyJwdWJrZXkiOiAiQUFBQSJ9";
    let token = client.fetch_jwt_svid(["slim", claims], None).await.expect("JWT-SVID");
    assert_eq!(token.spiffe_id().to_string(), format!("spiffe://{TD}/bob"));
    assert_eq!(token.audience(), ["slim", claims]);
    let seen = s.upstream.read(|state| state.jwt_audiences.last().cloned()).expect("forwarded");
    assert_eq!(seen, ["slim", claims]);

    // The spiffe crate's validation of the JWT bundles served agrees, and so does ValidateJWTSVID.
    let bundles = client.fetch_jwt_bundles().await.expect("jwt bundles");
    spiffe::JwtSvid::parse_and_validate(token.token(), &bundles, &["slim"]).expect("valid against served bundles");
    let validated = client.validate_jwt_token("slim", token.token()).await.expect("validated");
    assert_eq!(validated.spiffe_id().to_string(), format!("spiffe://{TD}/bob"));
    let refused = client.validate_jwt_token("other", token.token()).await.expect_err("wrong audience");
    assert!(refused.to_string().contains("audience"), "{refused}");
}

#[tokio::test]
async fn audience_lists_no_app_needs_are_refused() {
    let s = setup("").await;
    feed(&s).await;
    let client = app(&s.socket).await;
    let many: Vec<String> = (0..=MAX_AUDIENCES).map(|i| format!("aud-{i}")).collect();
    let error = client.fetch_jwt_svid(&many, None).await.expect_err("too many").to_string();
    assert!(error.contains("at most 16 audiences"), "{error}");
    let huge = "x".repeat(MAX_AUDIENCE_BYTES + 1);
    let error = client.fetch_jwt_svid([huge.as_str()], None).await.expect_err("too large").to_string();
    assert!(error.contains("bytes"), "{error}");
    assert_eq!(s.upstream.read(|state| state.jwt_fetches), 0, "nothing refused reached upstream");
}

#[tokio::test]
async fn streams_push_changes_and_end_when_the_identity_is_withdrawn() {
    let s = setup("alice").await;
    feed(&s).await;
    let mut client = crate::workload::WorkloadClient::connect(&s.socket).await.expect("connect");
    let mut stream = client.x509_svids().await.expect("stream");
    let first = stream.message().await.expect("ok").expect("first");
    assert_eq!(first.svids.len(), 1);

    // The same state again pushes nothing; a rotation pushes the new SVID.
    feed(&s).await;
    assert!(tokio::time::timeout(Duration::from_millis(300), stream.message()).await.is_err(), "no push");
    s.upstream.update(|state| state.rotate());
    feed(&s).await;
    let rotated = stream.message().await.expect("ok").expect("pushed");
    assert_ne!(rotated.svids[0].x509_svid, first.svids[0].x509_svid);

    // Withdrawn: the stream ends with PermissionDenied, new calls get it too.
    s.served.set_x509(None);
    let status = stream.message().await.expect_err("withdrawn");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    client = crate::workload::WorkloadClient::connect(&s.socket).await.expect("connect");
    let mut stream = client.x509_svids().await.expect("opens");
    assert_eq!(stream.message().await.expect_err("denied").code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_clear_unavailable_for_jwt_svids() {
    let mut s = setup("").await;
    feed(&s).await;
    s.upstream.pause();
    let client = app(&s.socket).await;
    let error = client.fetch_jwt_svid(["slim"], None).await.expect_err("upstream down").to_string();
    assert!(error.contains("the upstream Workload API cannot issue JWT-SVIDs now"), "{error}");
    // What is held is still served.
    client.fetch_x509_svid().await.expect("the X.509-SVID held");
    s.upstream.resume().expect("resume");
    client.fetch_jwt_svid(["slim"], None).await.expect("upstream back");
}

#[test]
fn a_hint_that_matches_nothing_serves_nothing() {
    let response = pb::X509svidResponse {
        svids: vec![pb::X509svid { spiffe_id: "spiffe://td/a".into(), hint: "a".into(), ..Default::default() }],
        ..Default::default()
    };
    assert!(select_hinted(response.clone(), "b").is_none());
    assert_eq!(select_hinted(response.clone(), "a"), Some(response.clone()));
    assert_eq!(select_hinted(response.clone(), ""), Some(response));
}

/// The socket is a Unix socket file, `0666` so an app running as another user of the pod can
/// connect, in the directory the webhook mounts from a pod-local volume (its test:
/// `apps_get_the_agents_workload_api_socket_and_no_spire_volume`); nothing is served over TCP.
/// A stale file left by an earlier agent is replaced.
#[tokio::test]
async fn the_socket_is_a_pod_local_unix_socket_any_user_of_the_pod_can_open() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let s = setup("alice").await;
    let metadata = std::fs::metadata(&s.socket).expect("socket");
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o666);
    // An agent restarted in the same pod finds the old file and takes its place.
    let issuer = Arc::new(Upstream { socket: s.upstream.socket.clone(), hint: "alice".into() });
    let again = bind(&s.socket, s.served.clone(), issuer).expect("rebind over a stale socket");
    tokio::spawn(again);
    feed(&s).await;
    let svid = app(&s.socket).await.fetch_x509_svid().await.expect("served on the new socket");
    assert_eq!(svid.spiffe_id().to_string(), format!("spiffe://{TD}/alice"));
}
