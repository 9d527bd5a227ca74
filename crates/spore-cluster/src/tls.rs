//! TLS around every link: the control plane's listener (links from shims, and joins), a
//! unit's (neighbour links from other shims), the dialers, and the join.
//!
//! Both sides present a certificate of the cluster CA and check the other's (TLS 1.3,
//! rustls): a peer without one fails the handshake, before any greeting is read. Links and
//! joins share the control plane's port and are told apart by their ALPN protocol: only a
//! connection that asks for [`ALPN_JOIN`] may come without a certificate, and all it can do
//! is present a token once (see `spore_shim::join`). Who a peer is comes from its
//! certificate's name (`control.spore`, `unit-N.spore`), never from what it says: the
//! acceptor refuses a greeting that claims another unit than its certificate names.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use spore_shim::proto::{JoinAnswer, JoinRequest};
use spore_shim::LinkError;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::pki::{self, hex, ClusterCa, Identity, PkiError, UnitCredentials, CONTROL_NAME};
use crate::tokens::{JoinToken, Tokens};

/// ALPN protocol of links.
pub const ALPN_LINK: &[u8] = b"spore-link/1";
/// ALPN protocol of joins.
pub const ALPN_JOIN: &[u8] = b"spore-join/1";
/// Connections at once that have not finished their TLS handshake (and join) yet; past it,
/// new ones are dropped.
const MAX_HANDSHAKES: usize = 64;

/// aws-lc with AES-128-GCM first (both sides are ours; it is the fastest of TLS 1.3's suites
/// on CPUs with AES instructions).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The connection under TLS: TCP with a read buffer (rustls reads 4 KiB at a time; the
/// buffer turns that into one system call per 128 KiB of a large message).
pub type Wire = tokio::io::BufReader<TcpStream>;

/// Bytes the [`Wire`] reads at once.
const WIRE_READ: usize = 128 * 1024;

fn wire(tcp: TcpStream) -> Wire {
    let _ = tcp.set_nodelay(true);
    tokio::io::BufReader::with_capacity(WIRE_READ, tcp)
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, PkiError> {
    let mut r = RootCertStore::empty();
    r.add(ca.clone())?;
    Ok(Arc::new(r))
}

fn other(e: impl std::fmt::Display) -> rustls::Error {
    rustls::Error::General(e.to_string())
}

/// A server config that requires a certificate of `ca` from every client.
fn mutual_server(
    ca: &CertificateDer<'static>,
    me: &Identity,
) -> Result<Arc<ServerConfig>, PkiError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .build()
        .map_err(other)?;
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(me.chain.clone(), me.key.clone_key())?;
    c.alpn_protocols = vec![ALPN_LINK.to_vec()];
    Ok(Arc::new(c))
}

/// The unit a verified peer's certificate names; the error says why there is none.
fn peer_unit(conn: &rustls::CommonState) -> Result<u32, String> {
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("the peer presented no certificate")?;
    pki::unit_of(cert).ok_or_else(|| "the peer's certificate names no unit".to_owned())
}

/// Refuses a greeting that claims another unit than the peer's certificate names.
pub(crate) fn check_claim(claimed: u32, cert_unit: u32) -> Result<(), String> {
    if claimed == cert_unit {
        return Ok(());
    }
    Err(format!(
        "the greeting claims unit {claimed}, but the certificate is unit {cert_unit}'s"
    ))
}

/// Runs `f` (a handshake) within `timeout`.
async fn within<T, E: std::fmt::Display>(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, f).await {
        Err(_) => Err(format!("no TLS handshake within {timeout:?}")),
        Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
        Ok(Ok(t)) => Ok(t),
    }
}

/// A connection the control plane accepted.
pub enum Incoming {
    /// A unit's link, its certificate verified.
    Link {
        /// The connection.
        stream: tokio_rustls::server::TlsStream<Wire>,
        /// The unit its certificate names.
        unit: u32,
    },
    /// A join (no certificate yet).
    Join(tokio_rustls::server::TlsStream<Wire>),
}

/// The control plane's server configs (links, joins) and when their certificate was made.
struct ControlConfigs {
    made: std::time::Instant,
    link: Arc<ServerConfig>,
    join: Arc<ServerConfig>,
}

impl ControlConfigs {
    /// Configs with a fresh key and certificate for the control plane.
    fn make(ca: &ClusterCa) -> Result<ControlConfigs, PkiError> {
        let me = ca.control_identity()?;
        let link = mutual_server(ca.cert(), &me)?;
        let mut join = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(me.chain.clone(), me.key.clone_key())?;
        join.alpn_protocols = vec![ALPN_JOIN.to_vec()];
        Ok(ControlConfigs {
            made: std::time::Instant::now(),
            link,
            join: Arc::new(join),
        })
    }
}

/// The control plane's certificate is made again after this long (it is valid for 30 days).
const CONTROL_REISSUE: Duration = Duration::from_secs(7 * 86_400);

/// The control plane's TLS: the cluster CA, its own certificate, and the join tokens.
pub struct ControlTls {
    ca: ClusterCa,
    tokens: Tokens,
    configs: std::sync::Mutex<ControlConfigs>,
    handshakes: Arc<Semaphore>,
}

impl std::fmt::Debug for ControlTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlTls").field("ca", &self.ca).finish()
    }
}

impl ControlTls {
    /// The control plane's TLS for the data dir `data_dir` (the CA is made there if it has
    /// none; the control plane's own key and certificate are made afresh).
    pub fn open(data_dir: &std::path::Path) -> Result<ControlTls, PkiError> {
        let (ca, made) = ClusterCa::init(data_dir)?;
        if made {
            tracing::info!(fingerprint = %ca.fingerprint_hex(), dir = %ca.dir().display(), "made the cluster CA");
        }
        Ok(ControlTls {
            tokens: Tokens::open(data_dir)?,
            configs: std::sync::Mutex::new(ControlConfigs::make(&ca)?),
            ca,
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
        })
    }

    /// The configs of links and joins, with a new certificate once the last is a week old
    /// (a control plane may run longer than its certificate's 30 days).
    fn configs(&self) -> (Arc<ServerConfig>, Arc<ServerConfig>) {
        let mut c = self.configs.lock().expect("configs lock");
        if c.made.elapsed() > CONTROL_REISSUE {
            match ControlConfigs::make(&self.ca) {
                Ok(fresh) => *c = fresh,
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "renewing the control plane's certificate")
                }
            }
        }
        (c.link.clone(), c.join.clone())
    }

    /// The cluster CA.
    pub fn ca(&self) -> &ClusterCa {
        &self.ca
    }

    /// The server config of links (a unit certificate required), for callers that run the
    /// handshake themselves.
    pub fn link_config(&self) -> Arc<ServerConfig> {
        self.configs().0
    }

    /// Takes a connection through its handshake (within `timeout`): a unit's link or a join.
    pub async fn accept(&self, tcp: TcpStream, timeout: Duration) -> Result<Incoming, String> {
        let _slot = self
            .handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| format!("{MAX_HANDSHAKES} handshakes already in progress"))?;
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), wire(tcp));
        let (link, join_config) = self.configs();
        within(timeout, async {
            let start = acceptor.await?;
            let join = start
                .client_hello()
                .alpn()
                .is_some_and(|mut a| a.any(|p| p == ALPN_JOIN));
            if join {
                return Ok(Ok(Incoming::Join(start.into_stream(join_config).await?)));
            }
            let stream = start.into_stream(link).await?;
            Ok::<_, std::io::Error>(match peer_unit(stream.get_ref().1) {
                Ok(unit) => Ok(Incoming::Link { stream, unit }),
                Err(e) => Err(e),
            })
        })
        .await?
    }

    /// Answers a join request: checks the token (for this CA and this unit) and signs the
    /// unit's certificate. The error is the reason, for the shim.
    pub fn grant(&self, req: &JoinRequest) -> Result<(JoinAnswer, String), String> {
        let rec = self
            .tokens
            .redeem(&req.token, req.unit, self.ca.fingerprint())?;
        let cert = self
            .ca
            .sign_unit(req.unit, &req.csr)
            .map_err(|e| crate::error_chain(&e))?;
        let line = serde_json::json!({
            "unit": req.unit,
            "token": rec.id,
            "at": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            "cert_sha256": CertificateDer::from_pem_slice(cert.as_bytes())
                .map(|c| hex(&pki::fingerprint(&c)))
                .unwrap_or_default(),
        });
        append_line(&self.ca.dir().join("issued.log"), &line.to_string());
        Ok((
            JoinAnswer {
                cert,
                ca: self.ca.cert_pem().to_owned(),
            },
            rec.id,
        ))
    }
}

fn append_line(path: &std::path::Path, line: &str) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = r {
        tracing::warn!(path = %path.display(), error = %e, "recording an issued certificate");
    }
}

/// Whom a shim dials.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    /// The control plane.
    Control,
    /// Another unit's shim (a neighbour link).
    Unit(u32),
}

impl Peer {
    fn name(self) -> ServerName<'static> {
        let n = match self {
            Peer::Control => CONTROL_NAME.to_owned(),
            Peer::Unit(u) => pki::unit_name(u),
        };
        ServerName::try_from(n).expect("valid DNS names")
    }
}

/// A unit's TLS: its certificate for every link it dials or accepts.
#[derive(Debug)]
pub struct UnitTls {
    unit: u32,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    handshakes: Arc<Semaphore>,
}

impl UnitTls {
    /// A unit's TLS from its stored credentials.
    pub fn new(creds: &UnitCredentials) -> Result<UnitTls, PkiError> {
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(&creds.ca)?)
            .with_client_auth_cert(creds.identity.chain.clone(), creds.identity.key.clone_key())?;
        client.alpn_protocols = vec![ALPN_LINK.to_vec()];
        Ok(UnitTls {
            unit: creds.unit,
            client: Arc::new(client),
            server: mutual_server(&creds.ca, &creds.identity)?,
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
        })
    }

    /// The unit its certificate names.
    pub fn unit(&self) -> u32 {
        self.unit
    }

    /// Dials `peer` at `addr` (HOST:PORT) and takes the connection through its handshake
    /// (within `timeout`), checking that the far side holds `peer`'s certificate.
    pub async fn dial(
        &self,
        addr: &str,
        peer: Peer,
        timeout: Duration,
    ) -> Result<tokio_rustls::client::TlsStream<Wire>, LinkError> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| LinkError::Handshake(format!("connecting to {addr}: timed out")))?
            .map_err(|e| LinkError::Handshake(format!("connecting to {addr}: {e}")))?;
        let c = tokio_rustls::TlsConnector::from(self.client.clone());
        within(timeout, c.connect(peer.name(), wire(tcp)))
            .await
            .map_err(|e| LinkError::Handshake(format!("{addr}: {e}")))
    }

    /// Takes a neighbour's connection through its handshake (within `timeout`); returns it
    /// and the unit its certificate names.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> Result<(tokio_rustls::server::TlsStream<Wire>, u32), String> {
        let _slot = self
            .handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| format!("{MAX_HANDSHAKES} handshakes already in progress"))?;
        let a = tokio_rustls::TlsAcceptor::from(self.server.clone());
        let stream = within(timeout, a.accept(wire(tcp))).await?;
        let unit = peer_unit(stream.get_ref().1)?;
        Ok((stream, unit))
    }
}

/// Joins the cluster: dials the control plane at `addr` (checking its certificate against
/// the CA fingerprint in `token`), presents the token for unit `unit` with a request for a
/// new key's certificate, and stores what comes back in `data_dir`.
pub async fn join(
    data_dir: &std::path::Path,
    addr: &str,
    token: &JoinToken,
    unit: u32,
    timeout: Duration,
) -> Result<UnitCredentials, LinkError> {
    let setup = |e: PkiError| LinkError::Handshake(crate::error_chain(&e));
    let (key, csr) = pki::unit_key(unit).map_err(setup)?;
    let p = provider();
    let mut config = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| setup(e.into()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            fingerprint: token.ca_fingerprint,
            provider: p,
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_JOIN.to_vec()];
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| LinkError::Handshake(format!("connecting to {addr}: timed out")))?
        .map_err(|e| LinkError::Handshake(format!("connecting to {addr}: {e}")))?;
    let c = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = within(timeout, c.connect(Peer::Control.name(), wire(tcp)))
        .await
        .map_err(|e| LinkError::Handshake(format!("{addr}: {e}")))?;
    let req = JoinRequest {
        unit,
        token: token.to_string(),
        csr,
    };
    let answer = spore_shim::join::request(tls, &req, timeout).await?;
    let ca = CertificateDer::from_pem_slice(answer.ca.as_bytes())
        .map_err(|e| LinkError::Handshake(format!("the CA certificate in the answer: {e}")))?;
    if pki::fingerprint(&ca) != token.ca_fingerprint {
        return Err(LinkError::Handshake(
            "the control plane answered with another CA than the token names".into(),
        ));
    }
    let creds = UnitCredentials::store(data_dir, &key, &answer.cert, &answer.ca).map_err(setup)?;
    if creds.unit != unit {
        return Err(LinkError::Handshake(format!(
            "the control plane issued a certificate for unit {}, not {unit}",
            creds.unit
        )));
    }
    Ok(creds)
}

/// Checks a control plane's certificate against a CA known only by its fingerprint (a join
/// token's): the CA must be in the chain the server sent, and the server's certificate must
/// chain to it and name the control plane.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| pki::fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                other(format!(
                    "the control plane's CA is not the one the join token names (sha256 {})",
                    hex(&self.fingerprint)
                ))
            })?;
        let roots = roots(&ca.clone().into_owned()).map_err(other)?;
        WebPkiServerVerifier::builder_with_provider(roots, self.provider.clone())
            .build()
            .map_err(other)?
            .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const T: Duration = Duration::from_secs(5);

    /// A control plane on loopback that answers joins and echoes one line on links; returns
    /// its address and what each accepted connection turned out to be.
    async fn control(
        tls: Arc<ControlTls>,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    match tls.accept(s, T).await {
                        Ok(Incoming::Link { mut stream, unit }) => {
                            let _ = tx.send(format!("link from unit {unit}"));
                            let mut b = [0u8; 4];
                            if stream.read_exact(&mut b).await.is_ok() {
                                let _ = stream.write_all(&b).await;
                                let _ = stream.flush().await;
                            }
                        }
                        Ok(Incoming::Join(stream)) => {
                            let r = spore_shim::join::serve(stream, T, |req| {
                                let tls = tls.clone();
                                async move { tls.grant(&req).map(|(a, _)| a) }
                            })
                            .await;
                            let _ = tx.send(format!("join: {r:?}"));
                        }
                        Err(e) => {
                            let _ = tx.send(format!("refused: {e}"));
                        }
                    }
                });
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn shims_join_with_a_token_then_link_with_their_certificate_alone() {
        let cp = tempfile::tempdir().unwrap();
        let tls = Arc::new(ControlTls::open(cp.path()).unwrap());
        let (token, _) = tls
            .tokens
            .create(tls.ca().fingerprint(), Duration::from_secs(60), false, None)
            .unwrap();
        let (addr, mut seen) = control(tls.clone()).await;

        let shim = tempfile::tempdir().unwrap();
        let creds = join(shim.path(), &addr, &token, 5, T).await.unwrap();
        assert_eq!(creds.unit, 5);
        assert!(seen.recv().await.unwrap().contains("join: Ok(5)"));
        let issued = std::fs::read_to_string(cp.path().join("cluster/issued.log")).unwrap();
        assert!(issued.contains("\"unit\":5"), "{issued}");

        // The stored certificate alone opens a link, which the control plane sees as unit 5.
        let unit = UnitTls::new(&UnitCredentials::load(shim.path()).unwrap().unwrap()).unwrap();
        let mut s = unit.dial(&addr, Peer::Control, T).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        assert_eq!(seen.recv().await.unwrap(), "link from unit 5");

        // A unit certificate does not pass for the control plane, nor for another unit.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let naddr = l.local_addr().unwrap().to_string();
        let server = Arc::new(unit);
        let srv = server.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let srv = srv.clone();
                tokio::spawn(async move {
                    if let Ok((mut st, _)) = srv.accept(s, T).await {
                        let mut b = [0u8; 1];
                        let _ = st.read(&mut b).await;
                    }
                });
            }
        });
        for peer in [Peer::Control, Peer::Unit(6)] {
            let r = async {
                let mut s = server.dial(&naddr, peer, T).await?;
                s.write_all(b"x").await?;
                Ok::<_, LinkError>(())
            }
            .await;
            let e = r.unwrap_err().to_string();
            assert!(
                e.contains("NotValidForName") || e.contains("not valid for"),
                "{peer:?}: {e}"
            );
        }
        assert!(server.dial(&naddr, Peer::Unit(5), T).await.is_ok());
    }

    #[tokio::test]
    async fn peers_without_a_certificate_or_with_another_ca_get_nothing() {
        let cp = tempfile::tempdir().unwrap();
        let tls = Arc::new(ControlTls::open(cp.path()).unwrap());
        let (addr, mut seen) = control(tls.clone()).await;

        // A TLS client that trusts the CA but has no certificate: the handshake fails.
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots(tls.ca().cert()).unwrap())
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_LINK.to_vec()];
        let tcp = TcpStream::connect(&addr).await.unwrap();
        let c = tokio_rustls::TlsConnector::from(Arc::new(config));
        if let Ok(mut s) = c.connect(Peer::Control.name(), tcp).await {
            // TLS 1.3: the client finishes first; the server's refusal comes as an alert.
            let _ = s.write_all(b"ping").await;
            let mut b = Vec::new();
            assert!(s.read_to_end(&mut b).await.is_err() || b.is_empty());
        }
        let why = seen.recv().await.unwrap();
        assert!(why.contains("refused: TLS handshake"), "{why}");

        // Plain TCP speaking the link's greeting: not TLS.
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(&[0xA7, 1, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, b'{', b'}'])
            .await
            .unwrap();
        let mut b = Vec::new();
        let _ = tcp.read_to_end(&mut b).await;
        let why = seen.recv().await.unwrap();
        assert!(why.contains("refused: TLS handshake"), "{why}");

        // A token of another CA: the shim refuses this control plane before sending it.
        let other = tempfile::tempdir().unwrap();
        let other_ca = ControlTls::open(other.path()).unwrap();
        let (token, _) = other_ca
            .tokens
            .create(
                other_ca.ca().fingerprint(),
                Duration::from_secs(60),
                false,
                None,
            )
            .unwrap();
        let shim = tempfile::tempdir().unwrap();
        let e = join(shim.path(), &addr, &token, 5, T).await.unwrap_err();
        assert!(
            e.to_string().contains("not the one the join token names"),
            "{e}"
        );
        assert!(UnitCredentials::load(shim.path()).unwrap().is_none());
        // A forged secret under this CA's fingerprint is refused by the control plane.
        let forged: JoinToken = format!(
            "spore1.0000abcd.{}.{}",
            "0".repeat(32),
            tls.ca().fingerprint_hex()
        )
        .parse()
        .unwrap();
        let e = join(shim.path(), &addr, &forged, 5, T).await.unwrap_err();
        assert!(e.to_string().contains("join refused: unknown"), "{e}");
    }
}
