//! The agent against the fake Workload API (a Unix socket, the real proto). What it writes is read
//! back with the `spiffe` crate as an independent checker.

mod common;

use common::wait_until;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use slim_identity_agent::agent::{run_daemon, run_once};
use slim_identity_agent::config::Config;
use slim_identity_agent::workload::fake::{AgentState, FakeAgent, SigningKey};
use spiffe::{JwtBundle, JwtBundleSet, JwtSvid, TrustDomain, X509Svid};
use tokio::sync::oneshot;

const ID: &str = "spiffe://example.org/ns/apps/sa/chat";

struct Setup {
    _dir: tempfile::TempDir,
    out: PathBuf,
    agent: FakeAgent,
}

async fn setup(issue: bool) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("svids");
    std::fs::create_dir(&out).expect("out dir");
    let mut state = AgentState::new("example.org");
    if issue {
        state.issue(ID, "");
    }
    let agent = FakeAgent::start(&dir.path().join("agent.sock"), state).await.expect("fake agent");
    Setup { _dir: dir, out, agent }
}

fn config(setup: &Setup, extra: &str) -> Config {
    Config::from_yaml(&format!(
        "agent_address: {}\ncert_dir: {}\nsvid_file_name: tls.crt\nsvid_key_file_name: tls.key\n\
         svid_bundle_file_name: bundle.pem\njwt_bundle_file_name: key.jwt\n\
         jwt_svids: [{{jwt_audience: slim, jwt_svid_file_name: jwt_svid.token, jwt_extra_audiences: [gateway]}}]\n{extra}",
        setup.agent.socket.display(),
        setup.out.display()
    ))
    .expect("config")
}

fn spawn_daemon(
    config: Config,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), slim_identity_agent::agent::AgentError>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(run_daemon(config, async {
        let _ = stopped.await;
    }));
    (stop, handle)
}

fn read(dir: &Path, name: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.join(name)).ok()
}

fn pem_ders(pem: &[u8]) -> Vec<Vec<u8>> {
    let text = String::from_utf8_lossy(pem);
    text.split("-----BEGIN ")
        .skip(1)
        .map(|block| {
            let body: String = block.lines().skip(1).take_while(|l| !l.starts_with("-----END")).collect();
            base64::engine::general_purpose::STANDARD.decode(body).expect("base64")
        })
        .collect()
}

/// The written X.509 files, parsed by the spiffe crate.
fn written_svid(dir: &Path) -> X509Svid {
    let chain: Vec<u8> = pem_ders(&read(dir, "tls.crt").expect("svid file")).concat();
    let key = pem_ders(&read(dir, "tls.key").expect("key file")).concat();
    X509Svid::parse_from_der(&chain, &key).expect("spiffe crate accepts the written SVID and key")
}

/// spiffe-helper's JWT bundle file into the spiffe crate's bundle set.
fn written_bundles(dir: &Path) -> JwtBundleSet {
    let map: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&read(dir, "key.jwt").expect("bundle file")).expect("map format");
    let mut set = JwtBundleSet::new();
    for (domain, encoded) in map {
        let jwks = base64::engine::general_purpose::STANDARD.decode(encoded).expect("base64 jwks");
        let domain = TrustDomain::new(&domain).expect("trust domain");
        set.add_bundle(JwtBundle::from_jwt_authorities(domain, &jwks).expect("jwks"));
    }
    set
}

#[tokio::test]
async fn daemon_writes_files_the_spiffe_crate_accepts() {
    let s = setup(true).await;
    let (stop, handle) = spawn_daemon(config(&s, ""));
    wait_until("all files", || {
        ["tls.crt", "tls.key", "bundle.pem", "key.jwt", "jwt_svid.token"].iter().all(|f| s.out.join(f).exists())
    })
    .await;

    let svid = written_svid(&s.out);
    assert_eq!(svid.spiffe_id().to_string(), ID);
    let authorities = pem_ders(&read(&s.out, "bundle.pem").expect("bundle"));
    assert_eq!(authorities, vec![s.agent.read(|st| st.authority.der().to_vec())]);

    let bundles = written_bundles(&s.out);
    let domain = TrustDomain::new("example.org").expect("td");
    assert!(bundles.get(&domain).is_some());
    let token = String::from_utf8(read(&s.out, "jwt_svid.token").expect("token")).expect("utf8");
    assert!(!token.ends_with('\n'), "the token is written as received, no newline");
    let jwt = JwtSvid::parse_and_validate(&token, &bundles, &["slim"]).expect("spiffe crate validates the token");
    assert_eq!(jwt.spiffe_id().to_string(), ID);
    JwtSvid::parse_and_validate(&token, &bundles, &["gateway"]).expect("extra audiences are requested too");

    let mode = |name: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(s.out.join(name)).expect("meta").permissions().mode() & 0o777
    };
    assert_eq!(
        (mode("tls.crt"), mode("tls.key"), mode("jwt_svid.token"), mode("key.jwt")),
        (0o644, 0o600, 0o600, 0o600)
    );
    let _ = stop.send(());
    assert!(handle.await.expect("join").is_ok(), "a stop is a clean exit");
}

#[tokio::test]
async fn rs256_keys_and_kid_rotation_are_followed() {
    let s = setup(true).await;
    s.agent.update(|st| st.jwt_keys = vec![SigningKey::rs256("rsa-1")]);
    let (stop, _handle) = spawn_daemon(config(&s, "jwt_svid_refresh_percent: 1\n"));
    wait_until("first token", || s.out.join("jwt_svid.token").exists()).await;
    let header = |token: &[u8]| -> serde_json::Value {
        let text = String::from_utf8_lossy(token);
        let part = text.split('.').next().unwrap_or_default().to_owned();
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).expect("b64"))
            .expect("json")
    };
    assert_eq!(header(&read(&s.out, "jwt_svid.token").expect("token"))["alg"], "RS256");

    // Rotation: a new ES256 key is added (both in the bundle), then the old one is dropped.
    s.agent.update(|st| st.jwt_keys.push(SigningKey::es256("ec-2")));
    wait_until("bundle with both keys", || {
        let domain = TrustDomain::new("example.org").expect("td");
        written_bundles(&s.out)
            .get(&domain)
            .is_some_and(|b| b.find_jwt_authority("ec-2").is_some() && b.find_jwt_authority("rsa-1").is_some())
    })
    .await;
    s.agent.update(|st| {
        st.jwt_keys.remove(0);
    });
    wait_until("old kid gone", || {
        let domain = TrustDomain::new("example.org").expect("td");
        written_bundles(&s.out).get(&domain).is_some_and(|b| b.find_jwt_authority("rsa-1").is_none())
    })
    .await;
    // Force a refresh: the token now comes from the new key and validates with the new bundle.
    s.agent.update(|st| st.jwt_ttl = Duration::from_secs(2));
    wait_until("token signed by ec-2", || read(&s.out, "jwt_svid.token").is_some_and(|t| header(&t)["kid"] == "ec-2"))
        .await;
    let token = String::from_utf8(read(&s.out, "jwt_svid.token").expect("token")).expect("utf8");
    JwtSvid::parse_and_validate(&token, &written_bundles(&s.out), &["slim"]).expect("valid after rotation");
    let _ = stop.send(());
}

#[tokio::test]
async fn permission_denied_until_an_identity_exists_then_rotation_and_dropped_streams() {
    let s = setup(false).await;
    let (stop, _handle) = spawn_daemon(config(&s, ""));
    // The agent has asked (and been told PermissionDenied) on both streams.
    tokio::time::timeout(Duration::from_secs(10), s.agent.wait_for_streams(2)).await.expect("the agent asked");
    assert!(!s.out.join("tls.crt").exists(), "nothing is written without an identity");

    s.agent.update(|st| st.issue(ID, ""));
    wait_until("identity issued and written", || {
        s.out.join("tls.crt").exists() && s.out.join("jwt_svid.token").exists()
    })
    .await;
    let first = read(&s.out, "tls.crt");

    s.agent.update(|st| st.rotate());
    wait_until("rotated certificate", || read(&s.out, "tls.crt") != first).await;
    written_svid(&s.out);

    // The agent restarts: streams drop; the agent reopens both (after its ~1 s backoff), and a
    // rotation made only then arrives over the new streams.
    let opened = s.agent.streams_opened();
    s.agent.drop_streams();
    tokio::time::timeout(Duration::from_secs(10), s.agent.wait_for_streams(opened + 2))
        .await
        .expect("the agent reopened its X.509 and bundle streams");
    let second = read(&s.out, "tls.crt");
    s.agent.update(|st| st.rotate());
    wait_until("rotation after reconnect", || read(&s.out, "tls.crt") != second).await;
    written_svid(&s.out);
    let _ = stop.send(());
}

#[tokio::test]
async fn hints_pick_the_svid_and_federated_bundles_are_added() {
    let s = setup(true).await;
    let other = s.agent.update(|st| {
        st.issue("spiffe://example.org/internal", "internal");
        let federated = slim_identity_agent::workload::fake::Authority::new("partner.org");
        st.federated.insert("partner.org".into(), federated.der().to_vec());
        federated.der().to_vec()
    });
    let (stop, _handle) = spawn_daemon(config(&s, "hint: internal\ninclude_federated_domains: true\n"));
    wait_until("files", || s.out.join("tls.crt").exists() && s.out.join("jwt_svid.token").exists()).await;
    assert_eq!(written_svid(&s.out).spiffe_id().to_string(), "spiffe://example.org/internal");
    let bundle = pem_ders(&read(&s.out, "bundle.pem").expect("bundle"));
    assert_eq!(bundle.len(), 2, "own authority, then the federated one");
    assert_eq!(bundle[1], other);
    let token = String::from_utf8(read(&s.out, "jwt_svid.token").expect("token")).expect("utf8");
    let jwt = JwtSvid::parse_and_validate(&token, &written_bundles(&s.out), &["slim"]).expect("valid");
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/internal", "the JWT-SVID follows the hint too");
    let _ = stop.send(());
}

#[tokio::test]
async fn jwks_format_is_a_plain_key_set_of_our_trust_domain() {
    let s = setup(true).await;
    let (stop, _handle) = spawn_daemon(config(&s, "jwt_bundle_format: jwks\n"));
    wait_until("bundle", || s.out.join("key.jwt").exists()).await;
    let jwks = read(&s.out, "key.jwt").expect("jwks");
    let value: serde_json::Value = serde_json::from_slice(&jwks).expect("json");
    assert!(value["keys"].as_array().is_some_and(|k| k.len() == 1));
    let bundle = JwtBundle::from_jwt_authorities(TrustDomain::new("example.org").expect("td"), &jwks)
        .expect("spiffe crate reads it");
    assert!(bundle.find_jwt_authority("key-1").is_some());
    let _ = stop.send(());
}

#[tokio::test]
async fn deleted_or_changed_files_are_restored_within_a_second() {
    let s = setup(true).await;
    let (stop, _handle) = spawn_daemon(config(&s, ""));
    wait_until("files", || s.out.join("jwt_svid.token").exists() && s.out.join("tls.key").exists()).await;
    let token = read(&s.out, "jwt_svid.token");
    std::fs::remove_file(s.out.join("jwt_svid.token")).expect("delete");
    let start = std::time::Instant::now();
    wait_until("restored token", || read(&s.out, "jwt_svid.token") == token).await;
    assert!(start.elapsed() < Duration::from_secs(1), "restored after {:?}", start.elapsed());
    let key = read(&s.out, "tls.key");
    std::fs::write(s.out.join("tls.key"), "not a key").expect("overwrite");
    wait_until("restored key", || read(&s.out, "tls.key") == key).await;
    let _ = stop.send(());
}

#[tokio::test]
async fn one_shot_mode_writes_once_with_extra_audiences() {
    let s = setup(true).await;
    run_once(config(&s, "daemon_mode: false\n")).await.expect("one shot");
    let token = String::from_utf8(read(&s.out, "jwt_svid.token").expect("token")).expect("utf8");
    let bundles = written_bundles(&s.out);
    JwtSvid::parse_and_validate(&token, &bundles, &["gateway"])
        .expect("spiffe-helper drops extra audiences in one-shot mode; we do not");
    written_svid(&s.out);
}

#[tokio::test]
async fn one_shot_waits_for_a_late_identity_and_reports_a_missing_socket() {
    let s = setup(false).await;
    let agent = &s.agent;
    let issue_later = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        agent.update(|st| st.issue(ID, ""));
    };
    let (result, ()) = tokio::join!(run_once(config(&s, "daemon_mode: false\n")), issue_later);
    result.expect("PermissionDenied is retried until the identity exists");
    assert!(s.out.join("tls.crt").exists());

    let mut missing = config(&s, "daemon_mode: false\n");
    missing.agent_address = "/nonexistent/agent.sock".into();
    let error = run_once(missing).await.expect_err("no socket").to_string();
    assert!(error.contains("/nonexistent/agent.sock") && error.contains("does not exist"), "{error}");
}

#[tokio::test]
async fn requests_without_the_security_header_are_refused() {
    use slim_identity_agent::workload::pb;
    let s = setup(true).await;
    let path = s.agent.socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect");
    let mut bare = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let status = bare
        .fetch_jwtsvid(pb::JwtsvidRequest { audience: vec!["slim".into()], spiffe_id: String::new() })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "security header missing from request");

    // The spiffe crate's own client (it adds the header) agrees with the fake.
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", s.agent.socket.display()))
        .await
        .expect("spiffe client");
    let context = client.fetch_x509_context().await.expect("x509 context");
    assert_eq!(context.default_svid().expect("svid").spiffe_id().to_string(), ID);
}

#[tokio::test]
async fn invalid_argument_stops_the_daemon_with_the_reason() {
    let s = setup(true).await;
    let mut config = config(&s, "");
    config.jwt_svids.clear();
    config.jwt_bundle_file_name.clear();
    // An agent that refuses the request: the fake refuses requests without the header; a client
    // that cannot send it does not exist, so point at a socket serving a refusing agent instead.
    let refusing = tempfile::tempdir().expect("tempdir");
    let socket = refusing.path().join("refuse.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    tokio::spawn(async move {
        use slim_identity_agent::workload::pb::spiffe_workload_api_server::SpiffeWorkloadApiServer;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(Refusing))
            .serve_with_incoming(incoming)
            .await;
    });
    config.agent_address = socket.display().to_string();
    let error = tokio::time::timeout(Duration::from_secs(10), run_daemon(config, std::future::pending()))
        .await
        .expect("fails fast")
        .expect_err("InvalidArgument is fatal");
    assert!(error.to_string().contains("InvalidArgument"), "{error}");
}

struct Refusing;

#[tonic::async_trait]
impl slim_identity_agent::workload::pb::spiffe_workload_api_server::SpiffeWorkloadApi for Refusing {
    type FetchX509SVIDStream = tokio_stream::wrappers::ReceiverStream<
        Result<slim_identity_agent::workload::pb::X509svidResponse, tonic::Status>,
    >;
    type FetchJWTBundlesStream = tokio_stream::wrappers::ReceiverStream<
        Result<slim_identity_agent::workload::pb::JwtBundlesResponse, tonic::Status>,
    >;
    type FetchX509BundlesStream = tokio_stream::wrappers::ReceiverStream<
        Result<slim_identity_agent::workload::pb::X509BundlesResponse, tonic::Status>,
    >;
    async fn fetch_x509_bundles(
        &self,
        _: tonic::Request<slim_identity_agent::workload::pb::X509BundlesRequest>,
    ) -> Result<tonic::Response<Self::FetchX509BundlesStream>, tonic::Status> {
        Err(tonic::Status::invalid_argument("malformed request"))
    }
    async fn validate_jwtsvid(
        &self,
        _: tonic::Request<slim_identity_agent::workload::pb::ValidateJwtsvidRequest>,
    ) -> Result<tonic::Response<slim_identity_agent::workload::pb::ValidateJwtsvidResponse>, tonic::Status> {
        Err(tonic::Status::invalid_argument("malformed request"))
    }
    async fn fetch_x509svid(
        &self,
        _: tonic::Request<slim_identity_agent::workload::pb::X509svidRequest>,
    ) -> Result<tonic::Response<Self::FetchX509SVIDStream>, tonic::Status> {
        Err(tonic::Status::invalid_argument("malformed request"))
    }
    async fn fetch_jwtsvid(
        &self,
        _: tonic::Request<slim_identity_agent::workload::pb::JwtsvidRequest>,
    ) -> Result<tonic::Response<slim_identity_agent::workload::pb::JwtsvidResponse>, tonic::Status> {
        Err(tonic::Status::invalid_argument("malformed request"))
    }
    async fn fetch_jwt_bundles(
        &self,
        _: tonic::Request<slim_identity_agent::workload::pb::JwtBundlesRequest>,
    ) -> Result<tonic::Response<Self::FetchJWTBundlesStream>, tonic::Status> {
        Err(tonic::Status::invalid_argument("malformed request"))
    }
}

/// The daemon serves the Workload API on its socket from what upstream streams: ready only once
/// it holds an X.509-SVID and bundles, and an upstream restart leaves what the app holds in place.
#[tokio::test]
async fn the_daemon_serves_its_pod_and_keeps_serving_while_upstream_restarts() {
    let mut s = setup(false).await;
    let served_socket = s.out.join("run/agent.sock");
    let health_port = free_port();
    let mut config = config(
        &s,
        &format!(
            "workload_api_socket: {}\nhealth_checks: {{listener_enabled: true, bind_port: {health_port}}}\n",
            served_socket.display()
        ),
    );
    config.x509 = None;
    config.jwt_svids.clear();
    config.jwt_bundle_file_name.clear();
    let (stop, handle) = spawn_daemon(config);
    let ready = || async move {
        let url = format!("http://127.0.0.1:{health_port}/ready");
        http_get(&url).await
    };
    wait_until_async("the socket", || async { served_socket.exists() }).await;
    assert_eq!(ready().await.0, 503, "nothing held: not ready");
    assert!(ready().await.1.contains("waiting for an X.509-SVID"), "{}", ready().await.1);

    s.agent.update(|state| state.issue(ID, ""));
    wait_until_async("ready", || async { ready().await.0 == 200 }).await;
    assert!(ready().await.1.contains("\"serving\""));
    let app = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", served_socket.display()))
        .await
        .expect("the app connects");
    assert_eq!(app.fetch_x509_svid().await.expect("svid").spiffe_id().to_string(), ID);

    // Upstream gone: the streams' state stays, JWT-SVIDs are refused with the reason.
    s.agent.pause();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.fetch_x509_svid().await.expect("held").spiffe_id().to_string(), ID);
    assert!(app.fetch_jwt_bundles().await.is_ok(), "bundles held");
    let error = app.fetch_jwt_svid(["slim"], None).await.expect_err("no upstream").to_string();
    assert!(error.contains("cannot issue JWT-SVIDs now"), "{error}");
    assert_eq!(ready().await.0, 200, "what the app needs is still served");
    s.agent.resume().expect("resume");
    wait_until_async("JWT-SVIDs again", || async { app.fetch_jwt_svid(["slim"], None).await.is_ok() }).await;

    // Withdrawn upstream (PermissionDenied): nothing is served any more.
    s.agent.update(|state| state.identities.clear());
    s.agent.drop_streams();
    wait_until_async("withdrawn", || async { app.fetch_x509_svid().await.is_err() }).await;
    let _ = stop.send(());
    handle.await.expect("joined").expect("clean stop");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
}

async fn wait_until_async<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    for _ in 0..500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// (status, body) of a plain HTTP GET on loopback.
async fn http_get(url: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(mut stream) = tokio::net::TcpStream::connect(host).await else { return (0, String::new()) };
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}
