//! The operator's node clients over TLS to real SLIM nodes (3.4.6 via `slim-bindings`) whose
//! controller API is served with TLS, then with mutual TLS: routes installed and listed over each;
//! the server authorised by CA and host name, or by SPIFFE ID (exact or trust domain) from its
//! X.509-SVID; every failure told by its cause; a client certificate rotated in the middle.

use std::sync::Arc;
use std::time::Duration;

use slim_e2e::pki::{Ca, server_tls};
use slim_e2e::{SlimNode, init_logging};
use slim_operator::api::{ConnectionType, LinkSpec};
use slim_operator::plan::{ResolvedTls, render_link};
use slim_operator::slim::{LinkConfig, NodeChange, NodePool, RouteRef, SlimName};
use slim_operator::tls::control::{ClientIdentity, ServerTrust, SpiffeMatch, TlsFailure, TlsMaterial, TlsSource};
use tokio::sync::watch;

const NODE_ID: &str = "spiffe://example.org/slim/node-a";

fn material(trust: ServerTrust, identity: Option<Arc<ClientIdentity>>) -> TlsMaterial {
    TlsMaterial { trust, identity, server_name: None }
}

/// A link from the node under test to `to`, a plain node.
fn link_to(to: &SlimNode) -> LinkConfig {
    let spec =
        LinkSpec { endpoint: to.data_endpoint(), connection_type: ConnectionType::Remote, tls: None, controller: None };
    render_link(&spec, &ResolvedTls::default())
}

/// A fresh pool that reaches `node` with `tls`.
fn over(node: &SlimNode, tls: TlsSource) -> NodePool {
    NodePool::default().with_tls(std::collections::HashMap::from([(node.controller_endpoint(), tls)]))
}

/// Installs a route with a fresh pool using `material`, and reads it back from the node.
/// A failure: its TLS cause as the client typed it, and its message.
type Failed = (Option<TlsFailure>, String);

async fn route_over(node: &SlimNode, link: &LinkConfig, material: TlsMaterial) -> Result<(), Failed> {
    let (_keep, rx) = watch::channel(Arc::new(material));
    let pool = over(node, TlsSource::new(rx));
    install(&pool, node, link, "org/ns/bob").await
}

async fn install(pool: &NodePool, node: &SlimNode, link: &LinkConfig, name: &str) -> Result<(), Failed> {
    let client = pool.node(&node.controller_endpoint());
    let route = RouteRef { name: SlimName::parse(name).expect("name"), link_id: link.link_id.clone() };
    let change = NodeChange { create_links: vec![link.clone()], set_routes: vec![route.clone()], ..Default::default() };
    let failed = |e: slim_operator::slim::NodeError| (e.tls_failure(), e.to_string());
    client.apply(change).await.map_err(failed)?;
    let listed = client.snapshot(Duration::ZERO).await.map_err(failed)?;
    if listed.has_route(&route) { Ok(()) } else { Err((None, format!("route not listed: {listed:?}"))) }
}

fn cause(result: Result<(), Failed>) -> Failed {
    result.expect_err("must fail")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_over_tls_and_mtls_with_every_failure_told_apart() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("test CA");
    let other = Ca::new("another CA");
    let node_cert = ca.leaf(&["127.0.0.1", "localhost", NODE_ID], 30);
    let target = SlimNode::start("node-target").expect("target node");
    let link = link_to(&target);

    // TLS: the operator checks the node; the node asks nothing of the operator.
    let tls = SlimNode::start_with_controller_tls("node-tls", &server_tls(dir.path(), &node_cert, None)).expect("node");
    assert!(tls.controller_endpoint().starts_with("https://"));
    route_over(&tls, &link, material(ServerTrust::Ca(vec![ca.der.clone()]), None)).await.expect("routes over TLS");
    let spiffe = |id: SpiffeMatch| material(ServerTrust::Spiffe { bundle: vec![ca.der.clone()], id }, None);
    route_over(&tls, &link, spiffe(SpiffeMatch::Exact(NODE_ID.into()))).await.expect("the node's SPIFFE ID");
    route_over(&tls, &link, spiffe(SpiffeMatch::MemberOf("example.org".into()))).await.expect("its trust domain");
    let (failure, message) =
        cause(route_over(&tls, &link, material(ServerTrust::Ca(vec![other.der.clone()]), None)).await);
    assert_eq!(failure, Some(TlsFailure::UntrustedServer), "{message}");
    let (failure, message) =
        cause(route_over(&tls, &link, spiffe(SpiffeMatch::Exact("spiffe://example.org/slim/node-b".into()))).await);
    assert_eq!(failure, Some(TlsFailure::UnexpectedServerIdentity), "{message}");
    assert!(message.contains(NODE_ID) && message.contains("node-b"), "names both IDs: {message}");
    let (failure, message) = cause(route_over(&tls, &link, spiffe(SpiffeMatch::MemberOf("other.org".into()))).await);
    assert_eq!(failure, Some(TlsFailure::UnexpectedServerIdentity), "{message}");
    let (failure, message) = cause(
        route_over(
            &tls,
            &link,
            TlsMaterial {
                server_name: Some("slim.example".into()),
                ..material(ServerTrust::Ca(vec![ca.der.clone()]), None)
            },
        )
        .await,
    );
    assert_eq!(failure, Some(TlsFailure::UnexpectedServerIdentity), "a host name the certificate lacks: {message}");

    // Mutual TLS: the node wants a certificate from the operator, signed by the test CA.
    let mut mtls =
        SlimNode::start_with_controller_tls("node-mtls", &server_tls(dir.path(), &node_cert, Some(&ca))).expect("node");
    let trust = || ServerTrust::Ca(vec![ca.der.clone()]);
    route_over(&mtls, &link, material(trust(), Some(ca.identity(1)))).await.expect("routes over mTLS");
    let (failure, message) = cause(route_over(&mtls, &link, material(trust(), None)).await);
    assert_eq!(failure, Some(TlsFailure::ClientCertRefused), "no client certificate: {message}");
    let (failure, message) = cause(route_over(&mtls, &link, material(trust(), Some(other.identity(1)))).await);
    assert_eq!(failure, Some(TlsFailure::ClientCertRefused), "a certificate of another CA: {message}");
    let (failure, message) = cause(route_over(&mtls, &link, material(trust(), Some(ca.identity(-1)))).await);
    assert_eq!(failure, Some(TlsFailure::ClientCertExpired), "{message}");

    // A client certificate rotated in the middle: the open stream keeps working, and when the node
    // restarts trusting only the new certificate's CA, the client reconnects with it.
    let next_ca = Ca::new("next CA");
    let (source, rx) = watch::channel(Arc::new(material(trust(), Some(ca.identity(1)))));
    let pool = over(&mtls, TlsSource::new(rx));
    install(&pool, &mtls, &link, "org/ns/carol").await.expect("before the rotation");
    source.send_replace(Arc::new(material(trust(), Some(next_ca.identity(1)))));
    install(&pool, &mtls, &link, "org/ns/dave").await.expect("the open stream after the rotation");
    mtls.set_controller_tls(&server_tls(dir.path(), &node_cert, Some(&next_ca))).expect("config");
    tokio::task::block_in_place(|| mtls.restart()).expect("restart");
    let mut last = Err((None, String::new()));
    for _ in 0..40 {
        last = install(&pool, &mtls, &link, "org/ns/erin").await;
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    last.expect("reconnected with the rotated certificate");
}

/// SPIFFE end to end: the node takes its X.509-SVID and its clients' trust bundle from a Workload
/// API (SLIM's own `spire` TLS source), the operator takes its own from another agent of the same
/// trust domain; routes go in, and a server with an unexpected SPIFFE ID is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_over_mtls_with_x509_svids_from_the_workload_api() {
    use slim_e2e::pki::SpiffeNode;
    use slim_operator::tls::svid;
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let spiffe = SpiffeNode::start(dir.path(), "node-spiffe", NODE_ID, "spiffe://example.org/slim-operator").await;
    let (node, operator_socket) = (&spiffe.node, spiffe.operator_socket.clone());
    let target = SlimNode::start("node-target").expect("target node");
    let link = link_to(&target);

    let (tx, svids) = watch::channel(None);
    tokio::spawn(svid::follow(operator_socket.clone(), tx));
    let mut first = svids.clone();
    let svid = first.wait_for(Option::is_some).await.expect("the SVID stream").clone().expect("the operator's SVID");
    // What the registry gives SPIFFE-mode connections: the SVID's material for a server ID.
    let source = |id: &str| TlsSource::new(watch::channel(Arc::new(svid.material(SpiffeMatch::Exact(id.into())))).1);
    let exact = source(NODE_ID);
    assert!(exact.current().identity.is_some(), "the operator presents its SVID");
    let pool = over(node, exact);
    install(&pool, node, &link, "org/ns/bob").await.expect("routes over SPIFFE mTLS");
    // The node does ask for the operator's SVID: without one it refuses.
    let bundle = svids.borrow().as_ref().map(|s| s.bundle.clone()).unwrap_or_default();
    let anonymous = material(ServerTrust::Spiffe { bundle, id: SpiffeMatch::Exact(NODE_ID.into()) }, None);
    let (failure, message) = cause(route_over(node, &link, anonymous).await);
    assert_eq!(failure, Some(TlsFailure::ClientCertRefused), "{message}");

    let wrong = source("spiffe://example.org/slim/node-b");
    let pool = over(node, wrong);
    let (failure, message) = cause(install(&pool, node, &link, "org/ns/bob").await);
    assert_eq!(failure, Some(TlsFailure::UnexpectedServerIdentity), "{message}");
}

/// The channel manager 3.4.6 serves its API with SLIM's server config, TLS included: the operator's
/// channel manager client creates a channel over mTLS, and is refused without its certificate or
/// with another CA's trust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_manager_over_mtls() {
    use slim_e2e::ChannelManager;
    use slim_operator::slim::ChannelManagerClient;
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, other) = (Ca::new("test CA"), Ca::new("another CA"));
    let manager_cert = ca.leaf(&["127.0.0.1", "localhost"], 30);
    let node = SlimNode::start("node-cm").expect("node");
    let manager = tokio::task::block_in_place(|| {
        ChannelManager::start_with_api_tls(&node, &server_tls(dir.path(), &manager_cert, Some(&ca)))
    })
    .expect("channel manager with mTLS");
    assert!(manager.endpoint().starts_with("https://"));
    let client = |material: TlsMaterial| {
        // A receiver keeps the last value after its sender is gone.
        let (_, rx) = watch::channel(Arc::new(material));
        ChannelManagerClient::with_tls(&manager.endpoint(), Some(TlsSource::new(rx))).expect("client")
    };
    let trust = || ServerTrust::Ca(vec![ca.der.clone()]);
    client(material(trust(), Some(ca.identity(1))))
        .create_channel("org/ns/secure-chat", false)
        .await
        .unwrap_or_else(|e| panic!("CreateChannel over mTLS: {e}; manager log: {}", manager.log()));
    let refused = client(material(trust(), None)).create_channel("org/ns/other", false).await.expect_err("no cert");
    assert_eq!(refused.tls_failure(), Some(TlsFailure::ClientCertRefused), "{refused}");
    let untrusted = client(material(ServerTrust::Ca(vec![other.der.clone()]), Some(ca.identity(1))))
        .create_channel("org/ns/other", false)
        .await
        .expect_err("wrong CA");
    assert_eq!(untrusted.tls_failure(), Some(TlsFailure::UntrustedServer), "{untrusted}");
}

/// A stream opened with a client certificate is re-opened before that certificate expires, with
/// the material current then: no failed call, one more connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_stream_is_renewed_before_its_client_certificate_expires() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("test CA");
    let node_cert = ca.leaf(&["127.0.0.1"], 30);
    let node = SlimNode::start_with_controller_tls("node-renew", &server_tls(dir.path(), &node_cert, Some(&ca)))
        .expect("node");
    let target = SlimNode::start("node-target").expect("target");
    let link = link_to(&target);
    let identity = |seconds: i64| {
        let (cert, key) = ca.leaf_for(&["spiffe://example.org/slim-operator"], time::Duration::seconds(seconds));
        Arc::new(ClientIdentity::from_pem(cert.as_bytes(), key.as_bytes()).expect("identity"))
    };
    // Valid for 6 s (plus the two days of back-dating): re-opened at half the remaining life.
    let (source, rx) = watch::channel(Arc::new(material(ServerTrust::Ca(vec![ca.der.clone()]), Some(identity(6)))));
    let pool = over(&node, TlsSource::new(rx));
    install(&pool, &node, &link, "org/ns/bob").await.expect("first stream");
    let client = pool.node(&node.controller_endpoint());
    assert_eq!(client.stats().connects.load(std::sync::atomic::Ordering::Relaxed), 1);
    source.send_replace(Arc::new(material(ServerTrust::Ca(vec![ca.der.clone()]), Some(identity(3600)))));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(client.stats().connects.load(std::sync::atomic::Ordering::Relaxed), 2, "re-opened once, before expiry");
    install(&pool, &node, &link, "org/ns/carol").await.expect("the renewed stream");
}
