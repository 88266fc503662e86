//! TLS to SLIM control endpoints (node controller APIs): which server to trust (a CA bundle, the
//! system roots, or a SPIFFE trust bundle plus the server's SPIFFE ID), what the operator presents
//! (a client certificate, e.g. its X.509-SVID), and a failure's cause in words an operator can act
//! on. Building the configuration is pure; [`connect`] is the one IO edge.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Where a client gets its TLS material for each new connection; the sender side swaps in
/// rotated certificates (a Secret changed, a new SVID arrived). Clones share the source and its
/// [`TlsSource::id`], which tells clients of one node with different TLS settings apart.
#[derive(Clone, Debug)]
pub struct TlsSource {
    id: u64,
    rx: tokio::sync::watch::Receiver<Arc<TlsMaterial>>,
}

impl TlsSource {
    pub fn new(rx: tokio::sync::watch::Receiver<Arc<TlsMaterial>>) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self { id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed), rx }
    }

    /// Never 0 (what plain-text clients are keyed by).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The material now.
    pub fn current(&self) -> Arc<TlsMaterial> {
        self.rx.borrow().clone()
    }
}

/// How the server's certificate is judged.
#[derive(Clone, Debug)]
pub enum ServerTrust {
    /// The machine's roots, and the endpoint's host name in the certificate.
    SystemRoots,
    /// This CA bundle, and the endpoint's host name (or [`TlsMaterial::server_name`]).
    Ca(Vec<CertificateDer<'static>>),
    /// An X.509-SVID chaining to this SPIFFE trust bundle, whose SPIFFE ID (its URI SAN) matches;
    /// host names are not checked (go-spiffe's `tlsconfig.MTLSClientConfig` does the same).
    Spiffe { bundle: Vec<CertificateDer<'static>>, id: SpiffeMatch },
}

/// Which SPIFFE IDs a server may have (go-spiffe's `AuthorizeID` / `AuthorizeMemberOf`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpiffeMatch {
    Exact(String),
    MemberOf(String),
}

impl SpiffeMatch {
    pub fn allows(&self, id: &str) -> bool {
        match self {
            SpiffeMatch::Exact(want) => id == want,
            SpiffeMatch::MemberOf(domain) => id
                .strip_prefix("spiffe://")
                .and_then(|rest| rest.split('/').next())
                .is_some_and(|td| td.eq_ignore_ascii_case(domain.trim_start_matches("spiffe://"))),
        }
    }
}

impl std::fmt::Display for SpiffeMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpiffeMatch::Exact(id) => write!(f, "{id}"),
            SpiffeMatch::MemberOf(domain) => write!(f, "a member of {}", domain.trim_start_matches("spiffe://")),
        }
    }
}

/// A certificate chain and its key, presented to servers that ask.
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The leaf's `notAfter` (Unix seconds).
    pub not_after: i64,
}

impl std::fmt::Debug for ClientIdentity {
    // The key is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("certificates", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl ClientIdentity {
    /// From PEM (a `kubernetes.io/tls` Secret's `tls.crt` and `tls.key`).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        use rustls::pki_types::pem::PemObject;
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Material(format!("client certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Material(format!("client key: {e}")))?;
        Self::new(chain, key)
    }

    /// From DER (an X.509-SVID from the Workload API: the chain and a PKCS#8 key).
    pub fn new(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or_else(|| TlsError::Material("client certificate: empty chain".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| TlsError::Material(format!("client certificate: {e}")))?;
        let not_after = parsed.validity().not_after.timestamp();
        Ok(Self { chain, key, not_after })
    }
}

/// Everything one connection needs.
#[derive(Clone, Debug)]
pub struct TlsMaterial {
    pub trust: ServerTrust,
    pub identity: Option<Arc<ClientIdentity>>,
    /// The name checked in the server's certificate instead of the endpoint's host.
    pub server_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS material: {0}")]
    Material(String),
    #[error("client certificate expired at {0} (Unix time)")]
    ClientCertExpired(i64),
}

/// Why a TLS connection failed, as condition reasons name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// The server's certificate does not chain to the trusted CA or bundle.
    UntrustedServer,
    /// The server's SPIFFE ID or host name is not the expected one.
    UnexpectedServerIdentity,
    /// The server's certificate has expired (or is not valid yet).
    ServerCertExpired,
    /// Our own certificate has expired.
    ClientCertExpired,
    /// The server refused our certificate, or wanted one and got none.
    ClientCertRefused,
}

impl TlsFailure {
    /// The condition reason.
    pub fn reason(self) -> &'static str {
        match self {
            TlsFailure::UntrustedServer => "TlsUntrustedServer",
            TlsFailure::UnexpectedServerIdentity => "TlsUnexpectedServerIdentity",
            TlsFailure::ServerCertExpired => "TlsServerCertificateExpired",
            TlsFailure::ClientCertExpired => "TlsClientCertificateExpired",
            TlsFailure::ClientCertRefused => "TlsClientCertificateRefused",
        }
    }

    /// The failure rustls reports, when it is one an operator can act on.
    pub fn of_rustls(error: &rustls::Error) -> Option<Self> {
        use rustls::{AlertDescription as Alert, CertificateError as Cert};
        match error {
            rustls::Error::InvalidCertificate(cert) => match cert {
                Cert::UnknownIssuer | Cert::BadSignature => Some(TlsFailure::UntrustedServer),
                Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                    Some(TlsFailure::UnexpectedServerIdentity)
                }
                Cert::Expired | Cert::ExpiredContext { .. } | Cert::NotValidYet | Cert::NotValidYetContext { .. } => {
                    Some(TlsFailure::ServerCertExpired)
                }
                Cert::Other(other) if other.0.downcast_ref::<UnexpectedSpiffeId>().is_some() => {
                    Some(TlsFailure::UnexpectedServerIdentity)
                }
                _ => None,
            },
            rustls::Error::AlertReceived(
                Alert::CertificateRequired
                | Alert::BadCertificate
                | Alert::UnknownCA
                | Alert::CertificateExpired
                | Alert::CertificateUnknown,
            ) => Some(TlsFailure::ClientCertRefused),
            _ => None,
        }
    }

    /// The failure [`connect`] classified, found in an error's chain (tonic and hyper carry the
    /// connector's `io::Error` as a source; an `io::Error` hides its inner error from `source()`,
    /// so it is looked into too).
    pub fn in_chain(error: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let mut next = Some(error);
        while let Some(error) = next {
            let failed = error.downcast_ref::<TlsConnectFailed>().or_else(|| {
                let inner = error.downcast_ref::<std::io::Error>()?.get_ref()?;
                inner.downcast_ref::<TlsConnectFailed>()
            });
            if let Some(failed) = failed {
                return Some(failed.failure);
            }
            next = error.source();
        }
        None
    }
}

/// A TLS connection that failed for a known cause, classified where rustls reports it. It travels
/// inside the `io::Error` the connector returns; [`TlsFailure::in_chain`] finds it again.
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub struct TlsConnectFailed {
    pub failure: TlsFailure,
    detail: String,
}

impl TlsConnectFailed {
    fn io(failure: TlsFailure, kind: std::io::ErrorKind, detail: String) -> std::io::Error {
        std::io::Error::new(kind, Self { failure, detail })
    }

    /// `error` with its cause attached when it is a TLS failure rustls told apart.
    fn classified(error: std::io::Error) -> std::io::Error {
        let failure = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).and_then(TlsFailure::of_rustls);
        match failure {
            Some(failure) => Self::io(failure, error.kind(), error.to_string()),
            None => error,
        }
    }
}

/// A server certificate whose SPIFFE ID is not the one wanted.
#[derive(Debug, thiserror::Error)]
#[error("{SPIFFE_MISMATCH}: {found}, want {want}")]
struct UnexpectedSpiffeId {
    found: String,
    want: String,
}

const SPIFFE_MISMATCH: &str = "unexpected SPIFFE ID";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration for `material` at `now` (Unix seconds).
pub fn client_config(material: &TlsMaterial, now: i64) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Material(e.to_string()))?;
    let roots = |certs: &[CertificateDer<'static>]| {
        let mut store = RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(certs.iter().cloned());
        if added == 0 { Err(TlsError::Material("no usable CA certificate".into())) } else { Ok(store) }
    };
    let builder = match &material.trust {
        ServerTrust::SystemRoots => {
            let mut store = RootCertStore::empty();
            store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            builder.with_root_certificates(store)
        }
        ServerTrust::Ca(certs) => builder.with_root_certificates(roots(certs)?),
        ServerTrust::Spiffe { bundle, id } => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(SpiffeVerifier {
                roots: roots(bundle)?,
                id: id.clone(),
                algorithms: provider.signature_verification_algorithms,
            }))
        }
    };
    let mut config = match &material.identity {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            if identity.not_after <= now {
                return Err(TlsError::ClientCertExpired(identity.not_after));
            }
            builder
                .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
                .map_err(|e| TlsError::Material(format!("client certificate: {e}")))?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts a server whose certificate chains to the SPIFFE bundle and carries an allowed ID.
#[derive(Debug)]
struct SpiffeVerifier {
    roots: RootCertStore,
    id: SpiffeMatch,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let mismatch = |found: &str| {
            let error = UnexpectedSpiffeId { found: found.to_owned(), want: self.id.to_string() };
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(error))))
        };
        let id = spiffe_id(end_entity).ok_or_else(|| mismatch("none"))?;
        if self.id.allows(&id) { Ok(ServerCertVerified::assertion()) } else { Err(mismatch(&id)) }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The certificate's SPIFFE ID: its one `spiffe://` URI SAN.
pub fn spiffe_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some((*uri).to_owned()),
        _ => None,
    });
    let id = ids.next()?;
    ids.next().is_none().then_some(id)
}

/// How long a new connection waits for the server's verdict on the client's certificate (or on
/// its having none): TLS 1.3 sends it after the handshake, as an alert, or the server's first
/// HTTP/2 frame (which an h2 server sends at once).
const VERDICT_WAIT: Duration = Duration::from_millis(200);

/// A TCP connection to `host:port` with the TLS handshake done (ALPN `h2`). The server's refusal
/// of the client certificate (an alert, or closing) is read here, so that it is reported as such
/// rather than as a broken pipe on the first write.
pub async fn connect(
    host: &str,
    port: u16,
    material: &TlsMaterial,
    timeout: Duration,
) -> Result<Prefixed<TlsStream<TcpStream>>, std::io::Error> {
    use tokio::io::AsyncReadExt;
    let config = client_config(material, slim_k8s_common::unix_now()).map_err(|error| match error {
        TlsError::ClientCertExpired(_) => {
            TlsConnectFailed::io(TlsFailure::ClientCertExpired, std::io::ErrorKind::InvalidInput, error.to_string())
        }
        TlsError::Material(_) => std::io::Error::other(error),
    })?;
    let name = material.server_name.as_deref().unwrap_or(host);
    let server_name = ServerName::try_from(name.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("server name {name:?}: {e}")))?;
    let handshake = async {
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        TlsConnector::from(Arc::new(config)).connect(server_name, tcp).await.map_err(TlsConnectFailed::classified)
    };
    let mut stream = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS connect timed out"))??;
    let mut prefix = Vec::new();
    {
        let mut buf = vec![0u8; 16 * 1024];
        match tokio::time::timeout(VERDICT_WAIT, stream.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) => {
                return Err(TlsConnectFailed::io(
                    TlsFailure::ClientCertRefused,
                    std::io::ErrorKind::ConnectionAborted,
                    "the server closed the connection after the handshake (our certificate refused)".into(),
                ));
            }
            Ok(Ok(n)) => prefix.extend_from_slice(&buf[..n]),
            Ok(Err(error)) => return Err(TlsConnectFailed::classified(error)),
        }
    }
    Ok(Prefixed { prefix, offset: 0, inner: stream })
}

/// What tonic dials for an endpoint whose TLS is ours: the same authority over `http://` (tonic
/// speaks plain HTTP/2 over the stream [`connector`] returns).
pub fn plain_uri(endpoint: &str) -> String {
    match endpoint.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => endpoint.to_owned(),
    }
}

/// What [`connector`] hands tonic: a TLS stream, as hyper's IO.
pub type TlsIo = hyper_util::rt::TokioIo<Prefixed<TlsStream<TcpStream>>>;

/// A tonic connector: every new connection takes the material `material()` gives at that moment
/// (a [`TlsSource`]'s current one, or one fixed snapshot).
pub fn connector(
    material: impl Fn() -> Arc<TlsMaterial> + Clone + Send + 'static,
    timeout: Duration,
) -> impl tower::Service<
    tonic::codegen::http::Uri,
    Response = TlsIo,
    Error = std::io::Error,
    Future = impl Future<Output = Result<TlsIo, std::io::Error>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |uri: tonic::codegen::http::Uri| {
        let material = material();
        async move {
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri
                .port_u16()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri}: no port")))?;
            connect(&host, port, &material, timeout).await.map(hyper_util::rt::TokioIo::new)
        }
    })
}

/// A stream that first yields bytes already read from it.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    offset: usize,
    inner: S,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.offset < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.offset);
            let start = self.offset;
            buf.put_slice(&self.prefix[start..start + n]);
            self.offset += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_match_exactly_or_by_trust_domain() {
        let exact = SpiffeMatch::Exact("spiffe://example.org/slim/node-0".into());
        assert!(exact.allows("spiffe://example.org/slim/node-0"));
        assert!(!exact.allows("spiffe://example.org/slim/node-1"));
        let member = SpiffeMatch::MemberOf("example.org".into());
        assert!(member.allows("spiffe://example.org/anything"));
        assert!(member.allows("spiffe://EXAMPLE.org/x"));
        assert!(!member.allows("spiffe://example.org.evil/x"));
        assert!(!member.allows("spiffe://other.org/x"));
        assert!(!member.allows("https://example.org/x"));
        assert_eq!(member.to_string(), "a member of example.org");
    }

    #[test]
    fn rustls_failures_are_told_apart_by_type() {
        use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
        let spiffe = UnexpectedSpiffeId { found: "spiffe://x/y".into(), want: "spiffe://x/z".into() };
        let cases = [
            (Error::InvalidCertificate(Cert::UnknownIssuer), Some(TlsFailure::UntrustedServer)),
            (Error::InvalidCertificate(Cert::BadSignature), Some(TlsFailure::UntrustedServer)),
            (
                Error::InvalidCertificate(Cert::Other(rustls::OtherError(Arc::new(spiffe)))),
                Some(TlsFailure::UnexpectedServerIdentity),
            ),
            (Error::InvalidCertificate(Cert::NotValidForName), Some(TlsFailure::UnexpectedServerIdentity)),
            (Error::InvalidCertificate(Cert::Expired), Some(TlsFailure::ServerCertExpired)),
            (Error::InvalidCertificate(Cert::NotValidYet), Some(TlsFailure::ServerCertExpired)),
            (Error::AlertReceived(Alert::CertificateRequired), Some(TlsFailure::ClientCertRefused)),
            (Error::AlertReceived(Alert::BadCertificate), Some(TlsFailure::ClientCertRefused)),
            (Error::AlertReceived(Alert::HandshakeFailure), None),
            (Error::InvalidCertificate(Cert::Revoked), None),
        ];
        for (error, expected) in cases {
            assert_eq!(TlsFailure::of_rustls(&error), expected, "{error}");
            // As the connector returns it, wrapped as tonic and hyper do.
            let io = TlsConnectFailed::classified(std::io::Error::new(std::io::ErrorKind::InvalidData, error));
            let wrapped = Wrapper(Box::new(io));
            assert_eq!(TlsFailure::in_chain(&wrapped), expected, "{wrapped}");
        }
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "tcp connect error");
        assert_eq!(TlsFailure::in_chain(&Wrapper(Box::new(refused))), None);
    }

    /// An error whose source is another, as tonic's transport error is.
    #[derive(Debug, thiserror::Error)]
    #[error("transport error")]
    struct Wrapper(#[source] Box<dyn std::error::Error + Send + Sync>);

    #[test]
    fn an_expired_client_certificate_is_refused_before_connecting() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert =
            rcgen::CertificateParams::new(vec!["client".into()]).expect("params").self_signed(&key).expect("cert");
        let identity =
            ClientIdentity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).expect("identity");
        let not_after = identity.not_after;
        let material = TlsMaterial {
            trust: ServerTrust::Ca(vec![cert.der().clone()]),
            identity: Some(Arc::new(identity)),
            server_name: None,
        };
        assert!(client_config(&material, not_after - 10).is_ok());
        let error = client_config(&material, not_after + 1).expect_err("expired");
        assert!(matches!(error, TlsError::ClientCertExpired(_)), "{error}");
        assert!(!format!("{:?}", material.identity).contains("PRIVATE"), "the key is never printed");
    }
}
