//! SLIM node Pods picked by selector: routes, recreated Pods getting them back, and mTLS to their
//! controllers.

use super::*;

#[tokio::test]
async fn slim_node_pods_get_routes_by_selector_and_get_them_back_when_recreated() {
    let (node, client) = installed().await;
    images::ensure_slim(node).expect("SLIM images");
    let _turn = SERIAL.lock().await;
    let ns = node.namespace(&client, "slim").await.expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    start_slim_nodes(node, &pods, "slim", Controller::Plain).await;
    kubectl_apply(
        node,
        &[
            subscription_between(&ns, "bob-via-slim-1", "org/ns/bob", "slim-0", "slim-1", "peer"),
            subscription_between(&ns, "alice-via-slim-0", "org/ns/alice", "slim-1", "slim-0", "remote"),
        ]
        .join("---\n"),
    );
    let started = Instant::now();
    for name in ["bob-via-slim-1", "alice-via-slim-0"] {
        slim_e2e::wait_for(&format!("Subscription {name} Ready"), Duration::from_secs(60), async || {
            subscription_ready(&client, &ns, name).await.then_some(())
        })
        .await;
    }
    println!("2 Subscriptions Ready on node Pods picked by selector in {:.1}s", started.elapsed().as_secs_f64());
    let slim0 = pods.get("slim-0").await.expect("slim-0");
    assert!(node_routes(&slim0, "org/ns/bob").await, "slim-0 lists the route to bob");

    // Apps on different nodes, reaching them by DNS name: bob listens on slim-1; alice, on slim-0,
    // sends until the route carries her message and bob's echo comes back.
    let endpoint = |pod: &str| format!("http://{pod}.slim.{ns}.svc.cluster.local:46357");
    listen_as_bob(&pods, &endpoint("slim-1")).await;
    let log = send_to_bob(&pods, "alice", &endpoint("slim-0"), "hello-1").await;
    assert!(log.contains("reply echo:hello-1"), "bob's echo came back through the nodes: {log}");

    // slim-0 deleted: its StatefulSet recreates it (a new process, no routes), the operator
    // sees the new Pod and installs the route again.
    let old_uid = slim0.uid();
    let deleted = Instant::now();
    pods.delete("slim-0", &DeleteParams::default()).await.expect("delete slim-0");
    let recreated = node::wait_pod(&pods, "slim-0", Duration::from_secs(90), "recreated and Ready", |p| {
        p.uid() != old_uid && node::pod_ready(p)
    })
    .await
    .expect("slim-0 back");
    slim_e2e::wait_for("the route back on the new slim-0", Duration::from_secs(60), async || {
        node_routes(&recreated, "org/ns/bob").await.then_some(())
    })
    .await;
    println!("slim-0 deleted -> recreated with its route in {:.1}s", deleted.elapsed().as_secs_f64());
    let log = send_to_bob(&pods, "alice-again", &endpoint("slim-0"), "hello-2").await;
    assert!(log.contains("reply echo:hello-2"), "after the restart: {log}");
}

#[tokio::test]
async fn slim_node_pods_over_mtls_by_selector_with_a_server_name() {
    let (node, client) = installed().await;
    images::ensure_slim(node).expect("SLIM images");
    let _turn = SERIAL.lock().await;
    let ns = node.namespace(&client, "slim-tls").await.expect("namespace");
    let nodes_ca = slim_e2e::pki::Ca::new("slim nodes");
    let operator_ca = slim_e2e::pki::Ca::new("slim operator clients");
    let other_ca = slim_e2e::pki::Ca::new("someone else");
    let server_name = format!("slim-tls.{ns}.svc");
    let (node_cert, node_key) = nodes_ca.leaf(&[&server_name], 1);
    let (client_cert, client_key) = operator_ca.leaf(&["slim-operator"], 1);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    for (name, data) in [
        ("node-tls", serde_json::json!({"tls.crt": node_cert, "tls.key": node_key})),
        ("operator-ca", serde_json::json!({"ca.crt": operator_ca.pem})),
        ("node-ca", serde_json::json!({"ca.crt": nodes_ca.pem})),
        ("wrong-ca", serde_json::json!({"ca.crt": other_ca.pem})),
        ("operator-client", serde_json::json!({"tls.crt": client_cert, "tls.key": client_key})),
    ] {
        let secret = serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "stringData": data}))
            .expect("secret");
        secrets.create(&PostParams::default(), &secret).await.expect("secret");
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    start_slim_nodes(node, &pods, "slim-tls", Controller::Mtls).await;

    let good = serde_json::json!({"caSecretRef": {"name": "node-ca"}, "clientCertSecretRef": {"name": "operator-client"},
                                  "serverName": server_name});
    let cases = [
        ("good", good.clone(), "True", "RoutesInstalled"),
        (
            "no-server-name",
            serde_json::json!({"caSecretRef": {"name": "node-ca"}, "clientCertSecretRef": {"name": "operator-client"}}),
            "False",
            "TlsUnexpectedServerIdentity",
        ),
        (
            "wrong-ca",
            serde_json::json!({"caSecretRef": {"name": "wrong-ca"}, "clientCertSecretRef": {"name": "operator-client"},
                                        "serverName": server_name}),
            "False",
            "TlsUntrustedServer",
        ),
        (
            "no-client-cert",
            serde_json::json!({"caSecretRef": {"name": "node-ca"}, "serverName": server_name}),
            "False",
            "TlsClientCertificateRefused",
        ),
    ];
    let messages = expect_ready(&client, &ns, "slim-tls", &cases).await;
    for ((_, _, status, _), (name, message)) in cases.iter().zip(messages) {
        if *status == "False" {
            assert!(
                message.contains("https://10.88."),
                "{name}: the message names the node Pod reached by IP: {message}"
            );
        }
    }
}
