//! Benchmark: AdmissionReviews over HTTPS on loopback at a fixed rate (open loop).
//!
//!   cargo bench -p slim-e2e --bench webhook [-- --rate 500 --seconds 10 --connections 16]
//!
//! Each review is scheduled at a fixed time; latency runs from that time to the answer, so
//! queueing behind a slow answer counts. Half the pods are injected, half are skipped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use slim_e2e::HttpsConnection;
use slim_operator::webhook::certs;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn review(i: usize) -> Vec<u8> {
    let annotations = if i.is_multiple_of(2) { json!({"slim.agntcy.org/inject-identity": "true"}) } else { json!({}) };
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": format!("uid-{i}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "apps", "operation": "CREATE", "userInfo": {"username": "bench"},
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "chat-", "annotations": annotations},
                "spec": {"containers": [{"name": "app", "image": "registry.example/chat:1",
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    "volumes": [{"name": "data", "emptyDir": {}}]}},
        }
    }))
    .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rate = arg("--rate", 500);
    let seconds = arg("--seconds", 10);
    let connections = arg("--connections", 16);
    let names = certs::service_names("slim-operator-webhook", "slim-system");
    let (addr, material) = slim_e2e::webhook::serve(&names).await;

    let (pool_tx, pool_rx) = async_channel(connections);
    for _ in 0..connections {
        let connection = HttpsConnection::connect(addr, "slim-operator-webhook.slim-system.svc", &material.ca_pem)
            .await
            .expect("connect");
        pool_tx.send(connection).await.expect("pool");
    }
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    println!("{total} reviews at {rate}/s over {connections} HTTPS connections (TLS 1.3, loopback)");
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let (pool_tx, pool_rx) = (pool_tx.clone(), pool_rx.clone());
        tasks.push(tokio::spawn(async move {
            let mut connection = pool_rx.lock().await.recv().await.expect("connection");
            let result = connection.post("/mutate", review(i)).await;
            let latency = due.elapsed();
            let _ = pool_tx.send(connection).await;
            let ok = matches!(result, Ok((200, _)));
            (latency, ok)
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut failures = 0;
    for task in tasks {
        let (latency, ok) = task.await.expect("task");
        latencies.push(latency);
        failures += usize::from(!ok);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.90).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3
    );
    println!("throughput {:.0} reviews/s, failures {failures}", total as f64 / elapsed.as_secs_f64());
    println!("result: p99 {:.2} ms (target < 5 ms at 500/s)", pct(0.99).as_secs_f64() * 1e3);
}

type Pool =
    (tokio::sync::mpsc::Sender<HttpsConnection>, Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<HttpsConnection>>>);

fn async_channel(capacity: usize) -> Pool {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    (tx, Arc::new(tokio::sync::Mutex::new(rx)))
}
