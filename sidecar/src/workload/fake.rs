//! A Workload API server that behaves like a SPIRE agent, for tests and the local development
//! mode: a Unix socket, the security header enforced (`InvalidArgument` without it),
//! `PermissionDenied` until an identity exists, full-state stream pushes on every change, several
//! SVIDs with hints, federated bundles, ES256 and RS256 JWT keys with `kid` rotation, and streams
//! that can be dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use tokio::sync::{oneshot, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pb;
use super::pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use super::server::check_header;

/// A JWT signing key of the trust domain.
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    jwk: serde_json::Value,
}

impl SigningKey {
    /// A fresh P-256 key (SPIRE's default, ES256).
    pub fn es256(kid: &str) -> Self {
        let key = KeyPair::generate().expect("P-256 key generation");
        let encoding = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("PKCS#8 EC key");
        Self::new(kid, Algorithm::ES256, encoding)
    }

    /// A fresh 2048-bit RSA key (RS256).
    pub fn rs256(kid: &str) -> Self {
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key generation");
        let pem = key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).expect("PKCS#8 PEM");
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes()).expect("RSA key");
        Self::new(kid, Algorithm::RS256, encoding)
    }

    fn new(kid: &str, alg: Algorithm, encoding: EncodingKey) -> Self {
        let mut jwk = Jwk::from_encoding_key(&encoding, alg).expect("public JWK");
        jwk.common.key_id = Some(kid.to_owned());
        // SPIRE's Workload API JWKS carries kty, kid and the key parameters only.
        let mut value = serde_json::to_value(&jwk).expect("jwk json");
        if let Some(object) = value.as_object_mut() {
            object.retain(|k, _| matches!(k.as_str(), "kty" | "kid" | "crv" | "x" | "y" | "n" | "e"));
        }
        Self { kid: kid.to_owned(), alg, encoding, jwk: value }
    }

    /// The public key as a JWK (no `alg`, as the Workload API sends it).
    pub fn jwk(&self) -> &serde_json::Value {
        &self.jwk
    }

    /// `claims` signed with this key (`kid` and `typ: JWT` in the header).
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("signing")
    }
}

/// A certificate authority of a trust domain.
pub struct Authority {
    pub trust_domain: String,
    cert_pem: String,
    cert_der: Vec<u8>,
    key: KeyPair,
}

impl Clone for Authority {
    /// The same CA (two fake agents of one trust domain, e.g. a node's and the operator's).
    fn clone(&self) -> Self {
        Self {
            trust_domain: self.trust_domain.clone(),
            cert_pem: self.cert_pem.clone(),
            cert_der: self.cert_der.clone(),
            key: KeyPair::from_pem(&self.key.serialize_pem()).expect("the CA key reads back"),
        }
    }
}

impl Authority {
    pub fn new(trust_domain: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::OrganizationName, "SPIFFE");
        params.distinguished_name.push(DnType::CommonName, format!("{trust_domain} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into().expect("uri"))];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
        let cert = params.self_signed(&key).expect("CA certificate");
        Self { trust_domain: trust_domain.to_owned(), cert_pem: cert.pem(), cert_der: cert.der().to_vec(), key }
    }

    pub fn der(&self) -> &[u8] {
        &self.cert_der
    }

    /// A leaf X.509-SVID for `spiffe_id`, valid for `ttl`: (DER chain, PKCS#8 key DER).
    pub fn issue(&self, spiffe_id: &str, ttl: Duration) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::OrganizationName, "SPIRE");
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("spiffe uri"))];
        // What SPIRE puts in an X.509-SVID (the SPIFFE X.509-SVID spec requires keyUsage).
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages =
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment, KeyUsagePurpose::KeyAgreement];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::seconds(10);
        params.not_after = now + time::Duration::try_from(ttl).unwrap_or(time::Duration::HOUR);
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).expect("issuer");
        let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
        (cert.der().to_vec(), key.serialize_der())
    }
}

/// One workload identity.
#[derive(Clone)]
pub struct Identity {
    pub spiffe_id: String,
    pub hint: String,
    pub chain: Vec<u8>,
    pub key: Vec<u8>,
}

/// Tells which SPIFFE ID a caller may have, from its process id (as a SPIRE agent's workload
/// attestor does): `None` for a workload it knows nothing of.
pub type Attestor = std::sync::Arc<dyn Fn(u32) -> Option<String> + Send + Sync>;

/// What the fake agent serves; change it through [`FakeAgent::update`].
pub struct AgentState {
    /// With an attestor, each caller gets only the identities of its attested SPIFFE ID; without
    /// one, every caller gets every identity.
    pub attestor: Option<Attestor>,
    pub authority: Authority,
    /// Empty: `PermissionDenied` (no identity issued yet).
    pub identities: Vec<Identity>,
    /// Federated trust domains' CA certificates (DER), by trust domain name.
    pub federated: BTreeMap<String, Vec<u8>>,
    /// JWT signing keys; the last one signs.
    pub jwt_keys: Vec<SigningKey>,
    pub jwt_ttl: Duration,
    /// `iss` of the JWT-SVIDs: none by default, as SPIRE without `jwt_issuer`.
    pub jwt_issuer: Option<String>,
    pub x509_ttl: Duration,
    /// Calls to FetchJWTSVID so far, and when (tokio time, so paused-clock tests can read it).
    pub jwt_fetches: u64,
    pub jwt_fetched_at: Vec<tokio::time::Instant>,
    /// The audiences of every FetchJWTSVID so far.
    pub jwt_audiences: Vec<Vec<String>>,
    /// When set, the JWT bundle stream keeps sending this JWKS whatever the keys are (a negative
    /// control: a key rotation the stream withholds).
    pub frozen_jwks: Option<Vec<u8>>,
}

impl AgentState {
    pub fn new(trust_domain: &str) -> Self {
        Self {
            attestor: None,
            authority: Authority::new(trust_domain),
            identities: Vec::new(),
            federated: BTreeMap::new(),
            jwt_keys: vec![SigningKey::es256("key-1")],
            jwt_ttl: Duration::from_secs(300),
            jwt_issuer: None,
            x509_ttl: Duration::from_secs(3600),
            jwt_fetches: 0,
            jwt_fetched_at: Vec::new(),
            jwt_audiences: Vec::new(),
            frozen_jwks: None,
        }
    }

    /// Issues (or re-issues) an identity's X.509-SVID.
    pub fn issue(&mut self, spiffe_id: &str, hint: &str) {
        let (chain, key) = self.authority.issue(spiffe_id, self.x509_ttl);
        let identity = Identity { spiffe_id: spiffe_id.to_owned(), hint: hint.to_owned(), chain, key };
        match self.identities.iter_mut().find(|i| i.spiffe_id == spiffe_id && i.hint == hint) {
            Some(existing) => *existing = identity,
            None => self.identities.push(identity),
        }
    }

    /// Re-issues every identity (a rotation).
    pub fn rotate(&mut self) {
        let ids: Vec<(String, String)> =
            self.identities.iter().map(|i| (i.spiffe_id.clone(), i.hint.clone())).collect();
        for (id, hint) in ids {
            self.issue(&id, &hint);
        }
    }

    /// The identities `caller` (a process id) may have.
    fn visible(&self, caller: Option<u32>) -> Vec<&Identity> {
        let attested = match &self.attestor {
            None => return self.identities.iter().collect(),
            Some(attest) => caller.and_then(|pid| attest(pid)),
        };
        self.identities.iter().filter(|i| attested.as_deref() == Some(i.spiffe_id.as_str())).collect()
    }

    fn x509_response_of(&self, identities: &[&Identity]) -> pb::X509svidResponse {
        pb::X509svidResponse {
            svids: identities
                .iter()
                .map(|i| pb::X509svid {
                    spiffe_id: i.spiffe_id.clone(),
                    x509_svid: i.chain.clone(),
                    x509_svid_key: i.key.clone(),
                    bundle: self.authority.der().to_vec(),
                    hint: i.hint.clone(),
                })
                .collect(),
            crl: Vec::new(),
            federated_bundles: self.federated.iter().map(|(td, der)| (format!("spiffe://{td}"), der.clone())).collect(),
        }
    }

    /// The JWKS of the trust domain, indented as SPIRE prints it.
    pub fn jwks(&self) -> Vec<u8> {
        let keys: Vec<&serde_json::Value> = self.jwt_keys.iter().map(|k| &k.jwk).collect();
        let value = serde_json::json!({ "keys": keys });
        let mut out = Vec::new();
        let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
        serde::Serialize::serialize(&value, &mut serializer).expect("jwks");
        out
    }

    fn jwt_bundles_response(&self) -> pb::JwtBundlesResponse {
        let jwks = self.frozen_jwks.clone().unwrap_or_else(|| self.jwks());
        let mut bundles = BTreeMap::from([(format!("spiffe://{}", self.authority.trust_domain), jwks)]);
        for td in self.federated.keys() {
            bundles.insert(format!("spiffe://{td}"), br#"{"keys":[]}"#.to_vec());
        }
        pb::JwtBundlesResponse { bundles: bundles.into_iter().collect() }
    }

    /// A signed JWT-SVID for `spiffe_id` and `audiences`.
    pub fn sign_jwt(&self, spiffe_id: &str, audiences: &[String]) -> String {
        let key = self.jwt_keys.last().expect("a signing key");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut claims = serde_json::json!({
            "sub": spiffe_id, "aud": audiences, "iat": now, "exp": now + self.jwt_ttl.as_secs(),
        });
        if let Some(issuer) = &self.jwt_issuer {
            claims["iss"] = serde_json::Value::String(issuer.clone());
        }
        key.sign(&claims)
    }
}

/// A running fake agent; stopped on drop.
pub struct FakeAgent {
    pub socket: PathBuf,
    state: Arc<Mutex<AgentState>>,
    changes: watch::Sender<u64>,
    drops: watch::Sender<u64>,
    opened: watch::Sender<u64>,
    stop: Option<oneshot::Sender<()>>,
}

impl FakeAgent {
    /// Serves `state` on a Unix socket at `socket`.
    pub async fn start(socket: &Path, state: AgentState) -> std::io::Result<Self> {
        let (changes, _) = watch::channel(0u64);
        let (drops, _) = watch::channel(0u64);
        let (opened, _) = watch::channel(0u64);
        let mut agent =
            Self { socket: socket.to_owned(), state: Arc::new(Mutex::new(state)), changes, drops, opened, stop: None };
        agent.serve()?;
        Ok(agent)
    }

    fn serve(&mut self) -> std::io::Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let listener = tokio::net::UnixListener::bind(&self.socket)?;
        let service = Service {
            state: self.state.clone(),
            changes: self.changes.clone(),
            drops: self.drops.clone(),
            opened: self.opened.clone(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(service))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        self.stop = Some(stop);
        Ok(())
    }

    /// Stops serving as a SPIRE agent does when it restarts: open streams end (`Unavailable`),
    /// the socket is gone until [`FakeAgent::resume`].
    pub fn pause(&mut self) {
        self.drop_streams();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Serves again, with the same state, on the same socket.
    pub fn resume(&mut self) -> std::io::Result<()> {
        self.serve()
    }

    /// Changes the state and pushes the new full state on every open stream.
    pub fn update<T>(&self, change: impl FnOnce(&mut AgentState) -> T) -> T {
        let result = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            change(&mut state)
        };
        self.changes.send_modify(|n| *n += 1);
        result
    }

    /// Reads the state.
    pub fn read<T>(&self, read: impl FnOnce(&AgentState) -> T) -> T {
        read(&self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Ends every open stream with `Unavailable` (as when an agent restarts).
    pub fn drop_streams(&self) {
        self.drops.send_modify(|n| *n += 1);
    }

    /// Streams opened so far (X.509-SVID and JWT bundle streams), to wait for a reconnect.
    pub fn streams_opened(&self) -> u64 {
        *self.opened.borrow()
    }

    /// Waits until at least `count` streams have been opened in all.
    pub async fn wait_for_streams(&self, count: u64) {
        let mut opened = self.opened.subscribe();
        let _ = opened.wait_for(|n| *n >= count).await;
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

struct Service {
    state: Arc<Mutex<AgentState>>,
    changes: watch::Sender<u64>,
    drops: watch::Sender<u64>,
    opened: watch::Sender<u64>,
}

type Pushes<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The calling process, from the Unix socket's peer credentials.
fn caller<T>(request: &Request<T>) -> Option<u32> {
    let info = request.extensions().get::<tonic::transport::server::UdsConnectInfo>()?;
    info.peer_cred?.pid().and_then(|pid| u32::try_from(pid).ok())
}

impl Service {
    /// [`Service::pushes`] of what `caller` may see: `PermissionDenied` while that is nothing.
    fn attested_pushes<T: Clone + PartialEq + Send + 'static>(
        &self,
        caller: Option<u32>,
        render: fn(&AgentState, &[&Identity]) -> T,
    ) -> Pushes<T> {
        self.pushes(move |state| {
            let visible = state.visible(caller);
            if visible.is_empty() {
                Err(Status::permission_denied("no identity issued"))
            } else {
                Ok(render(state, &visible))
            }
        })
    }

    /// A stream of full states: the current one at once, then one per change (only when it differs,
    /// as SPIRE does), until the stream is dropped.
    fn pushes<T: Clone + PartialEq + Send + 'static>(
        &self,
        render: impl Fn(&AgentState) -> Result<T, Status> + Send + 'static,
    ) -> Pushes<T> {
        let state = self.state.clone();
        let mut changes = self.changes.subscribe();
        let mut drops = self.drops.subscribe();
        drops.mark_unchanged();
        self.opened.send_modify(|n| *n += 1);
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let mut last: Option<T> = None;
            loop {
                let next = render(&state.lock().unwrap_or_else(|p| p.into_inner()));
                match next {
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Ok(value) if last.as_ref() != Some(&value) => {
                        if tx.send(Ok(value.clone())).await.is_err() {
                            return;
                        }
                        last = Some(value);
                    }
                    Ok(_) => {}
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    _ = drops.changed() => {
                        let _ = tx.send(Err(Status::unavailable("agent restarting"))).await;
                        return;
                    }
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Service {
    type FetchX509SVIDStream = Pushes<pb::X509svidResponse>;
    type FetchJWTBundlesStream = Pushes<pb::JwtBundlesResponse>;
    type FetchX509BundlesStream = Pushes<pb::X509BundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        Ok(Response::new(self.attested_pushes(caller(&request), |state, visible| state.x509_response_of(visible))))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        check_header(&request)?;
        let caller = caller(&request);
        let request = request.into_inner();
        if request.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.jwt_fetches += 1;
        state.jwt_fetched_at.push(tokio::time::Instant::now());
        state.jwt_audiences.push(request.audience.clone());
        let visible = state.visible(caller);
        if visible.is_empty() {
            return Err(Status::permission_denied("no identity issued"));
        }
        let svids = visible
            .iter()
            .filter(|i| request.spiffe_id.is_empty() || i.spiffe_id == request.spiffe_id)
            .map(|i| pb::Jwtsvid {
                spiffe_id: i.spiffe_id.clone(),
                svid: state.sign_jwt(&i.spiffe_id, &request.audience),
                hint: i.hint.clone(),
            })
            .collect();
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        Ok(Response::new(self.attested_pushes(caller(&request), |state, _| state.jwt_bundles_response())))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        let render =
            |state: &AgentState, visible: &[&Identity]| super::server::x509_bundles(&state.x509_response_of(visible));
        Ok(Response::new(self.attested_pushes(caller(&request), render)))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let bundles = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            crate::agent::bundles_of(state.jwt_bundles_response())
        };
        super::server::validate(request.get_ref(), &bundles).map(Response::new)
    }
}
