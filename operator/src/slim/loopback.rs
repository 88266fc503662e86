//! A tonic server on 127.0.0.1 for the unit tests' fakes; stopped on drop.

use std::convert::Infallible;

use tokio::sync::oneshot;
use tonic::server::NamedService;

pub struct LoopbackServer {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    stop: Option<oneshot::Sender<()>>,
}

impl LoopbackServer {
    pub async fn serve<S>(service: S) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let addr = listener.local_addr().expect("address");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self { endpoint: format!("http://{addr}"), stop: Some(stop) }
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
