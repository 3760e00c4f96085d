//! mTLS between managers (rustls, TLS 1.3 only, ring), and between a
//! manager and its forwarder on the forwarder's unix socket.
//!
//! Both ends present their current SPIFFE certificate and accept a peer only
//! if its chain ends at the mesh CA of the current trust bundle and its
//! SPIFFE ID is in our trust domain. Names (DNS/IP SANs) are not checked:
//! SPIFFE identities are URIs, and which identity a hop must have is decided
//! by the path tokens and the authorization policy, not by the address.
//!
//! The certificate and the roots are looked up per handshake from the
//! [`IdentitySource`], so a rotation applies to the next handshake while
//! established connections keep running. Session resumption is off: every
//! connection proves possession of a currently valid key.
//!
//! On the server side each accepted connection carries a [`PeerInfo`] (the
//! verified peer SPIFFE ID and certificate), which tonic puts into every
//! request's extensions; handlers read it with [`peer_of`].
//!
//! On a unix socket ([`Tls::incoming_unix`], [`Tls::channel_unix`]) the
//! same handshake runs, and each side also says which SPIFFE IDs it talks
//! to: the forwarder accepts only managers (`spiffe://TD/nsm-manager/...`)
//! and the manager only a forwarder (`spiffe://TD/nsm-forwarder/...`), so a
//! process that can open the socket but holds no such key gets nothing.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::identity::{CertInfo, Identity, IdentitySource, trust_domain};

/// How long a TLS handshake may take before the connection is dropped (a
/// peer that stalls must not hold a task forever).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algs() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Checks that `chain` (leaf first) is valid at `now` and ends at one of
/// `roots`.
///
/// # Errors
/// rustls' reason.
pub fn verify_chain(
    roots: &rustls::RootCertStore,
    chain: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<(), rustls::Error> {
    let leaf = chain
        .first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let parsed = rustls::server::ParsedCertificate::try_from(leaf)?;
    let now = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        &chain[1..],
        now,
        algs().all,
    )
}

/// The SPIFFE ID of a verified leaf, if it is in `td`.
fn spiffe_in(leaf: &CertificateDer<'_>, td: &str) -> Result<String, rustls::Error> {
    let info = CertInfo::from_der(leaf).map_err(rustls::Error::General)?;
    match info.spiffe_id {
        Some(id) if trust_domain(&id) == Some(td) => Ok(id),
        Some(id) => Err(rustls::Error::General(format!(
            "peer `{id}` is not in trust domain `{td}`"
        ))),
        None => Err(rustls::Error::General(
            "peer certificate has no SPIFFE ID".into(),
        )),
    }
}

/// Certificate resolver and peer verifier reading the current identity.
#[derive(Debug)]
struct Current {
    source: Arc<IdentitySource>,
    /// The rustls form of the current identity's key, rebuilt on rotation.
    certified: Mutex<Option<(String, SystemTime, Arc<CertifiedKey>)>>,
}

impl Current {
    fn certified(&self) -> Option<Arc<CertifiedKey>> {
        let id = self.source.current();
        let mut c = self.certified.lock().unwrap_or_else(|p| p.into_inner());
        // Identity generations differ by certificate: compare the leaf.
        if let Some((leaf_id, na, ck)) = c.as_ref()
            && *leaf_id == id.id
            && *na == id.not_after
            && ck.cert.first() == id.chain.first()
        {
            return Some(ck.clone());
        }
        let ck = match CertifiedKey::from_der(id.chain.clone(), id.tls_key(), &provider()) {
            Ok(ck) => Arc::new(ck),
            Err(e) => {
                tracing::error!(error = %e, "current identity unusable for TLS");
                return None;
            }
        };
        *c = Some((id.id.clone(), id.not_after, ck.clone()));
        Some(ck)
    }

    fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<String, rustls::Error> {
        let id = self.source.current();
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
        verify_chain(&id.roots, &chain, now)?;
        spiffe_in(end_entity, &id.trust_domain)
    }
}

impl rustls::server::ResolvesServerCert for Current {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certified()
    }
}

impl rustls::client::ResolvesClientCert for Current {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.certified()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ServerCertVerifier for Current {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify_peer(end_entity, intermediates, now)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algs())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algs().supported_schemes()
    }
}

impl ClientCertVerifier for Current {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify_peer(end_entity, intermediates, now)
            .map(|_| ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algs())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algs().supported_schemes()
    }
}

/// The verified peer of a TLS connection (in request extensions).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// Its SPIFFE ID (verified: in our trust domain, chained to our CA).
    pub spiffe_id: String,
    /// Its leaf certificate: path tokens of this hop are checked against it.
    pub cert: CertificateDer<'static>,
}

/// The TLS peer of a request, when it came over an mTLS connection.
pub fn peer_of<T>(r: &tonic::Request<T>) -> Option<&PeerInfo> {
    r.extensions().get::<PeerInfo>()
}

/// A server-side TLS connection (over TCP, or a unix socket), with its
/// verified peer.
#[derive(Debug)]
pub struct TlsConn<S = TcpStream> {
    inner: tokio_rustls::server::TlsStream<S>,
    info: PeerInfo,
}

impl<S> Connected for TlsConn<S> {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsConn<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsConn<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// mTLS for one manager: its identity source, its server and client
/// configurations, and the SPIFFE IDs its peers presented.
#[derive(Debug)]
pub struct Tls {
    current: Arc<Current>,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    peer_ids: Mutex<HashMap<String, String>>,
}

impl Tls {
    /// Configurations backed by `source`.
    ///
    /// # Panics
    /// Never in practice: TLS 1.3 with the ring provider is always available.
    pub fn new(source: Arc<IdentitySource>) -> Arc<Tls> {
        let current = Arc::new(Current {
            source,
            certified: Mutex::new(None),
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_client_cert_verifier(current.clone())
            .with_cert_resolver(current.clone());
        server.alpn_protocols = vec![b"h2".to_vec()];
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(current.clone())
            .with_client_cert_resolver(current.clone());
        client.alpn_protocols = vec![b"h2".to_vec()];
        client.resumption = rustls::client::Resumption::disabled();
        Arc::new(Tls {
            current,
            server: Arc::new(server),
            client: Arc::new(client),
            peer_ids: Mutex::new(HashMap::new()),
        })
    }

    /// The source the identity is reloaded from.
    pub fn source(&self) -> Arc<IdentitySource> {
        self.current.source.clone()
    }

    /// The identity to sign with now.
    pub fn identity(&self) -> Arc<Identity> {
        self.current.source.current()
    }

    /// Accepts TCP connections on `listener` and hands tonic the ones whose
    /// mTLS handshake succeeds; the others are logged and dropped.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, remote) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Small frames go out at once (see the client's connect):
                // with Nagle, a reply's last frame waits for a delayed ACK.
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY on an accepted connection");
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                // Handshakes run in their own tasks: one slow peer must not
                // block the others.
                tokio::spawn(async move {
                    let what = remote.to_string();
                    if let Some((tls, mut info)) = accept(&acceptor, tcp, &what).await {
                        info.remote = Some(remote);
                        let _ = tx.send(Ok(TlsConn { inner: tls, info })).await;
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// Accepts connections on the unix socket `listener` and hands tonic the
    /// ones whose mTLS handshake succeeds with a peer whose SPIFFE ID
    /// `allow` accepts; the others are logged and dropped.
    pub fn incoming_unix(
        self: &Arc<Self>,
        listener: UnixListener,
        allow: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn<UnixStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server.clone());
        let allow = Arc::new(allow);
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "unix accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx, allow) = (acceptor.clone(), tx.clone(), allow.clone());
                tokio::spawn(async move {
                    let Some((tls, info)) = accept(&acceptor, stream, "unix socket").await else {
                        return;
                    };
                    if !allow(&info.spiffe_id) {
                        tracing::warn!(spiffe_id = %info.spiffe_id, "mTLS peer not allowed on this socket");
                        return;
                    }
                    let _ = tx.send(Ok(TlsConn { inner: tls, info })).await;
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// A lazily connected mTLS channel to the unix socket `path`, whose
    /// server must present a SPIFFE ID that `expect` accepts (connecting to
    /// anyone else fails with a PermissionDenied I/O error).
    pub fn channel_unix(
        self: &Arc<Self>,
        path: &std::path::Path,
        expect: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Channel {
        let this = self.clone();
        let path = path.to_path_buf();
        let expect = Arc::new(expect);
        let connector = tower::service_fn(move |_: Uri| {
            let (this, path, expect) = (this.clone(), path.clone(), expect.clone());
            async move {
                let stream = UnixStream::connect(&path).await?;
                let (tls, id) = this.handshake(stream).await?;
                let id = id.unwrap_or_default();
                if !expect(&id) {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "{} presented `{id}`, not the identity expected there",
                            path.display()
                        ),
                    ));
                }
                Ok(TokioIo::new(tls))
            }
        });
        // tonic needs a URI; the connector dials the socket and ignores it.
        Endpoint::from_static("http://unix.invalid")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(connector)
    }

    /// A lazily connected mTLS channel to the forwarder serving on `path`
    /// (`nsm-forwarder --identity-dir`), as a manager opens it: it must
    /// present `spiffe://TD/nsm-forwarder/...` of our own trust domain.
    pub fn forwarder_channel(self: &Arc<Self>, path: &std::path::Path) -> Channel {
        let own = self.identity().id.clone();
        self.channel_unix(path, move |id| is_role_in_domain(&own, id, "nsm-forwarder"))
    }

    /// A lazily connected mTLS channel to `tcp://HOST:PORT` (`addr` =
    /// `HOST:PORT`). The peer's SPIFFE ID is remembered for [`Tls::peer_id`].
    ///
    /// # Errors
    /// When `addr` does not form a URI.
    pub fn channel(self: &Arc<Self>, addr: &str) -> Result<Channel, String> {
        let ep = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?;
        let this = self.clone();
        let addr = addr.to_string();
        let connector = tower::service_fn(move |_: Uri| {
            let this = this.clone();
            let addr = addr.clone();
            async move { this.connect(&addr).await.map(TokioIo::new) }
        });
        Ok(ep
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(connector))
    }

    /// The client side of one handshake on `stream`: the TLS stream and the
    /// SPIFFE ID the server presented.
    async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
    ) -> io::Result<(tokio_rustls::client::TlsStream<S>, Option<String>)> {
        let connector = tokio_rustls::TlsConnector::from(self.client.clone());
        // The name is not checked (see the module doc); rustls needs one.
        let name = ServerName::try_from("nsm-mesh.invalid").expect("valid DNS name");
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "mTLS handshake timed out"))??;
        let id = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| CertInfo::from_der(c).ok())
            .and_then(|i| i.spiffe_id);
        Ok((tls, id))
    }

    async fn connect(&self, addr: &str) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (tls, id) = self.handshake(tcp).await?;
        if let Some(id) = id {
            self.peer_ids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(addr.to_string(), id);
        }
        Ok(tls)
    }

    /// The SPIFFE ID of the manager at `addr` (`HOST:PORT`): the audience of
    /// the token we send it. Known from the last handshake, else learnt by a
    /// handshake now.
    ///
    /// # Errors
    /// The peer cannot be reached or fails mTLS.
    pub async fn peer_id(&self, addr: &str) -> io::Result<String> {
        if let Some(id) = self
            .peer_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(addr)
        {
            return Ok(id.clone());
        }
        drop(self.connect(addr).await?);
        self.peer_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(addr)
            .cloned()
            .ok_or_else(|| io::Error::other("peer presented no SPIFFE ID"))
    }
}

/// The server side of one handshake on `stream` (`what` names the peer in
/// logs): the TLS stream and the verified peer (without an address), or
/// `None` after logging why not.
async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: S,
    what: &str,
) -> Option<(tokio_rustls::server::TlsStream<S>, PeerInfo)> {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::warn!(peer = %what, error = %e, "mTLS handshake refused");
            return None;
        }
        Err(_) => {
            tracing::warn!(peer = %what, "mTLS handshake timed out");
            return None;
        }
    };
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())?;
    let info = CertInfo::from_der(&cert).ok()?;
    let info = PeerInfo {
        remote: None,
        spiffe_id: info.spiffe_id.unwrap_or_default(),
        cert,
    };
    tracing::debug!(peer = %what, spiffe_id = %info.spiffe_id, "mTLS peer");
    Some((tls, info))
}

/// Whether `id` is `spiffe://TD/ROLE/...` in the trust domain of `own` (a
/// SPIFFE ID of ours): the test each side of the forwarder socket applies to
/// the other (`ROLE` = `nsm-manager` or `nsm-forwarder`).
pub fn is_role_in_domain(own: &str, id: &str, role: &str) -> bool {
    trust_domain(own).is_some_and(|td| id.starts_with(&format!("spiffe://{td}/{role}/")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{DEFAULT_CA_TTL, IdentityPaths, IdentitySource, create_ca, issue};
    use tokio_stream::StreamExt;

    /// A gRPC reply is a few small frames written one by one; with Nagle
    /// on either end, the last waits for the other's delayed ACK (40 ms on
    /// every call between managers). Both ends of an mTLS TCP connection
    /// must send at once.
    #[tokio::test]
    async fn both_ends_of_a_tcp_connection_send_without_delay() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        create_ca(&ca, "nsm.test", DEFAULT_CA_TTL).unwrap();
        let tls = |name: &str| {
            let out = d.path().join(name);
            let id = format!("spiffe://nsm.test/nsm-manager/{name}");
            issue(&ca, &id, Duration::from_secs(600), &out).unwrap();
            Tls::new(IdentitySource::load(IdentityPaths::in_dir(&out)).unwrap())
        };
        let (server, client) = (tls("m1"), tls("m2"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut incoming = server.incoming(listener);
        let (accepted, connected) = tokio::join!(incoming.next(), client.connect(&addr));
        let accepted = accepted.expect("a connection").expect("accepted");
        assert!(accepted.inner.get_ref().0.nodelay().unwrap(), "server side");
        assert!(
            connected.unwrap().get_ref().0.nodelay().unwrap(),
            "client side"
        );
    }
}
