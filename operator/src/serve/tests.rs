//! The accept loop against hostile clients, over real sockets.

use std::time::Instant;

use axum::body::Bytes;
use axum::routing::post;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

const LIMITS: Limits = Limits {
    handshake_timeout: Duration::from_millis(500),
    header_timeout: Duration::from_millis(500),
    request_timeout: Duration::from_secs(1),
    body_limit: 1024,
};

/// A plain server answering `POST /echo` with the body's length; its port and its stop switch.
async fn server() -> (u16, tokio::sync::oneshot::Sender<()>) {
    let router = Router::new().route("/echo", post(|body: Bytes| async move { body.len().to_string() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, router, None, LIMITS, async {
        let _ = stopped.await;
    }));
    (port, stop)
}

/// Sends `request` as is and reads until the server closes: what it answered.
async fn exchange(port: u16, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn post_echo(body: &str) -> Vec<u8> {
    format!("POST /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

/// Whether the server closed `stream` within `within` (whatever it said first).
async fn closed(stream: &mut TcpStream, within: Duration) -> bool {
    let mut rest = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut rest)).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_finish_their_headers_are_closed_while_others_are_answered_at_once() {
    let (port, _stop) = server().await;
    let opened = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        stream.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\n").await.expect("partial headers");
        slow.push(stream);
    }
    // Everyone else is answered meanwhile, each at once.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let answer = exchange(port, &post_echo("hello")).await;
        slowest = slowest.max(started.elapsed());
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("\r\n5"), "{answer}");
    }
    assert!(slowest < Duration::from_millis(100), "the slowest answer took {slowest:?}");
    // The slow ones are closed once their headers are overdue, not before.
    for stream in &mut slow {
        assert!(closed(stream, Duration::from_secs(3)).await, "a connection without headers is closed");
    }
    assert!(opened.elapsed() >= LIMITS.header_timeout, "closed after the header timeout, not at once");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_too() {
    let (port, _stop) = server().await;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    stream.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi").await.expect("request");
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf).await.expect("answer");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let idle = Instant::now();
    assert!(closed(&mut stream, Duration::from_secs(3)).await, "no second request: closed");
    assert!(idle.elapsed() >= LIMITS.header_timeout / 2, "not at once: {:?}", idle.elapsed());
}

#[tokio::test]
async fn a_body_trickled_in_gets_408_and_a_body_over_the_limit_413() {
    let (port, _stop) = server().await;
    let started = Instant::now();
    let answer = exchange(port, b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly ten b").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let took = started.elapsed();
    assert!(took >= LIMITS.request_timeout && took < LIMITS.request_timeout * 3, "answered after {took:?}");

    let big = "x".repeat(LIMITS.body_limit + 1);
    assert!(exchange(port, &post_echo(&big)).await.starts_with("HTTP/1.1 413"));
    // Announced larger than the limit: refused before the body is read.
    let answer = exchange(port, b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // At the limit: fine.
    let full = "x".repeat(LIMITS.body_limit);
    assert!(exchange(port, &post_echo(&full)).await.ends_with(&format!("\r\n{}", LIMITS.body_limit)));
}
