//! What a SLIM node's control stream pushes on its own, measured on a real node.
//!
//! Issue #10 asked whether the node tells a controller-API client when a local app subscribes, so
//! that restarted channel members could be noticed without polling. Measured on SLIM 3.4.6: a
//! client that dials the node's controller server (as the operator does) gets nothing unasked
//! while an app connects, leaves and comes back; the unsolicited `config_command` messages of the
//! reference go to a control plane the node dials itself (`controller.clients`). So the member
//! watch polls each node's route list, once per node for all channels. If a SLIM release starts
//! pushing, this test fails and says what arrived: then the push path is worth using.

use std::time::{Duration, Instant};

use slim_e2e::{SlimApp, SlimNode, init_logging};
use slim_operator::slim::pb::controller::v1 as ctl;
use slim_operator::slim::pb::controller::v1::control_message::Payload;
use tokio_stream::wrappers::ReceiverStream;

fn describe(message: &ctl::ControlMessage) -> String {
    match &message.payload {
        Some(Payload::ConfigCommand(c)) => format!(
            "config_command links+{} routes+{} routes-{} links-{} reconcile={} routes: {:?}",
            c.connections_to_create.len(),
            c.routes_to_set.len(),
            c.routes_to_delete.len(),
            c.connections_to_delete.len(),
            c.reconcile,
            c.routes_to_set
                .iter()
                .chain(&c.routes_to_delete)
                .map(|r| r
                    .name
                    .as_ref()
                    .and_then(|n| n.str_name.as_ref())
                    .map(|s| format!("{}/{}/{}", s.str_component_0, s.str_component_1, s.str_component_2)))
                .collect::<Vec<_>>()
        ),
        Some(other) => format!("{other:?}").chars().take(120).collect(),
        None => "empty".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_control_stream_pushes_when_apps_come_and_go() {
    init_logging();
    let node = SlimNode::start("node-a").expect("node");
    let channel = tonic::transport::Endpoint::from_shared(node.controller_endpoint())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client = ctl::controller_service_client::ControllerServiceClient::new(channel);
    let (_outbound, outbound_rx) = tokio::sync::mpsc::channel::<ctl::ControlMessage>(8);
    let mut inbound = client.open_control_channel(ReceiverStream::new(outbound_rx)).await.expect("open").into_inner();
    let start = Instant::now();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(message)) = inbound.message().await {
            let _ = seen_tx.send((start.elapsed(), describe(&message)));
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("{:>6.2}s starting bob", start.elapsed().as_secs_f64());
    let bob = SlimApp::member(&node, "org/ns/bob").expect("bob");
    eprintln!("{:>6.2}s bob up", start.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(bob);
    eprintln!("{:>6.2}s bob killed", start.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let bob = SlimApp::member(&node, "org/ns/bob").expect("bob again");
    eprintln!("{:>6.2}s bob up again", start.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(bob);
    let mut all = Vec::new();
    while let Ok((at, what)) = seen.try_recv() {
        eprintln!("{:>6.2}s pushed: {what}", at.as_secs_f64());
        all.push(what);
    }
    assert!(all.is_empty(), "the node pushed {} messages unasked: {all:#?}", all.len());
}
