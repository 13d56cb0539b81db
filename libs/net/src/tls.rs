//! Mutual TLS 1.3 on every hop (agent → collector, collector → target;
//! `docs/security.md`). Each side holds an identity issued by the
//! deployment's CA (`tidemark ca issue`): a certificate whose one DNS
//! name is `NAME.ROLE.tidemark`, the role one of agent, collector,
//! target. A listener requires a client certificate from that CA and
//! learns the peer's identity from it; a dialer verifies that the server
//! it reached holds a certificate of the role it meant to reach (and,
//! when told, of that name). The chain, validity dates and key usage are
//! checked by rustls' WebPKI verifiers; this module adds the role.
//!
//! Loaded: a `crl.pem` in the identity folder (`tidemark revoke`
//! writes it in the CA's folder; the operator copies it to each service)
//! is read at start and again whenever it changes: a revoked certificate
//! fails every handshake after, and the live sessions of a revoked peer
//! end ([`Conn::revoked`]) within [`CRL_POLL`].
//!
//! Plaintext is [`Security::Plaintext`], chosen only by an explicit flag
//! (`--insecure-plaintext`), which status and logs then name.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::record::EstablishError;

/// The CA's certificate in an identity folder.
pub const CA_FILE: &str = "ca.pem";
/// The identity's certificate (and any intermediates).
pub const CERT_FILE: &str = "cert.pem";
/// The identity's private key (mode 0600).
pub const KEY_FILE: &str = "key.pem";
/// The last label of every identity's DNS name.
pub const DOMAIN: &str = "tidemark";
/// The certificate revocation list in an identity folder (optional).
pub const CRL_FILE: &str = "crl.pem";
/// How often a service looks for a changed revocation list.
pub const CRL_POLL: Duration = Duration::from_secs(2);
/// How long a listener waits for a peer's TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`Tls::accept`] says of a connection closed before its TLS
/// handshake: a port probe (readiness checks, monitoring), not worth a
/// warning.
pub const PROBE: &str = "closed before the TLS handshake";

/// What a peer is, by its certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerRole {
    Agent,
    Collector,
    Target,
}

impl PeerRole {
    pub fn name(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Collector => "collector",
            Self::Target => "target",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "agent" => Self::Agent,
            "collector" => Self::Collector,
            "target" => Self::Target,
            _ => return None,
        })
    }
}

impl fmt::Display for PeerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A peer's identity: its name within the deployment and its role.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub name: String,
    pub role: PeerRole,
}

impl Identity {
    /// An identity named `name` (1 to 63 of `a-z`, `0-9` and `-`, not at
    /// either end: a DNS label).
    pub fn new(name: &str, role: PeerRole) -> Result<Self, String> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !ok {
            return Err(format!(
                "identity name {name:?}: 1 to 63 of a-z, 0-9 and '-' (not first or last), like a host name"
            ));
        }
        Ok(Self {
            name: name.to_string(),
            role,
        })
    }

    /// The DNS name its certificate carries: `NAME.ROLE.tidemark`.
    pub fn dns_name(&self) -> String {
        format!("{}.{}.{DOMAIN}", self.name, self.role.name())
    }

    /// The identity a DNS name `NAME.ROLE.tidemark` stands for.
    pub fn from_dns_name(s: &str) -> Option<Self> {
        let rest = s.strip_suffix(DOMAIN)?.strip_suffix('.')?;
        let (name, role) = rest.rsplit_once('.')?;
        Self::new(name, PeerRole::parse(role)?).ok()
    }

    /// The identity a certificate names: exactly one `NAME.ROLE.tidemark`
    /// DNS name. Only meaningful once the chain has been verified.
    pub fn of_cert(der: &CertificateDer<'_>) -> Result<Self, String> {
        let cert =
            webpki::EndEntityCert::try_from(der).map_err(|e| format!("a certificate that does not parse: {e}"))?;
        let ids: Vec<Identity> = cert.valid_dns_names().filter_map(Self::from_dns_name).collect();
        match ids.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(format!(
                "a certificate that names no Tidemark identity (NAME.ROLE.{DOMAIN})"
            )),
            _ => Err("a certificate that names more than one Tidemark identity".into()),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

/// How a hop's connections are made: mutual TLS with this side's identity,
/// or plaintext (an explicit operator choice).
#[derive(Clone)]
pub enum Security {
    Tls(Arc<Tls>),
    Plaintext,
}

impl fmt::Debug for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Security {
    /// `Tls` from the identity folder `dir` (`tidemark ca issue --out`),
    /// which must hold an identity of role `role`; `Plaintext` when `dir`
    /// is `None` and `plaintext` says so; else an error naming both flags.
    pub fn from_flags(dir: Option<&Path>, plaintext: bool, role: PeerRole) -> Result<Self, String> {
        match (dir, plaintext) {
            (Some(_), true) => Err("--tls and --insecure-plaintext exclude each other".into()),
            (Some(d), false) => {
                let tls = Tls::load(d)?;
                if tls.me.role != role {
                    return Err(format!(
                        "--tls {}: the certificate is {}'s; this service needs a {role} identity (tidemark ca issue \
                         --role {role})",
                        d.display(),
                        tls.me
                    ));
                }
                Ok(Self::Tls(Arc::new(tls)))
            }
            (None, true) => Ok(Self::Plaintext),
            (None, false) => Err(format!(
                "no transport security given: --tls DIR (an identity from tidemark ca issue --role {role}) or, to \
                 send everything in clear text, --insecure-plaintext"
            )),
        }
    }

    /// For status and logs: `tls (agent web-1)` or `PLAINTEXT`.
    pub fn describe(&self) -> String {
        match self {
            Self::Tls(t) => format!("tls ({})", t.me),
            Self::Plaintext => "PLAINTEXT (--insecure-plaintext)".into(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }
}

/// The reading half of a connection, plaintext or TLS.
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half of a connection, plaintext or TLS.
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// An established connection: its halves and, over TLS, the peer's
/// verified identity.
pub struct Conn {
    pub reader: Reader,
    pub writer: Writer,
    pub peer: Option<Identity>,
    /// Cancelled when the peer's certificate is revoked (never, in
    /// plaintext): the session must end.
    pub revoked: Arc<CancellationToken>,
    /// TLS without a client certificate ([`Tls::serve_enrollment`]): the
    /// peer may enroll and nothing else.
    pub anonymous: bool,
}

fn plain(tcp: TcpStream) -> Conn {
    let (r, w) = tcp.into_split();
    Conn {
        reader: Box::new(r),
        writer: Box::new(w),
        peer: None,
        revoked: Arc::default(),
        anonymous: false,
    }
}

/// The identity and the revocation list as last read, and the listener's
/// configuration made with them.
pub(crate) struct Loaded {
    /// `crl.pem`'s and `cert.pem`'s (modified time, length) when read.
    seen: Seen,
    pub(crate) certs: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    lists: Vec<webpki::CertRevocationList<'static>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    server: Arc<ServerConfig>,
}

/// The (modified time, length) of the folder's `crl.pem` and `cert.pem`,
/// and of the CA folder's `crl.pem` when this service holds the CA (None:
/// no such file).
type Seen = [Option<(SystemTime, u64)>; 3];

fn seen(dir: &Path, ca_crl: Option<&Path>) -> Seen {
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
    };
    [
        stamp(&dir.join(CRL_FILE)),
        stamp(&dir.join(CERT_FILE)),
        ca_crl.and_then(stamp),
    ]
}

/// The objects of kind `what` in a PEM file (at least one).
fn read_pem<T: PemObject>(path: &Path, what: &str) -> Result<Vec<T>, String> {
    let v = T::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if v.is_empty() {
        return Err(format!("{}: no {what} in it", path.display()));
    }
    Ok(v)
}

/// The revocation lists of a PEM file (at least one).
fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    read_pem(path, "revocation list")
}

/// The certificates of a PEM file (at least one).
pub(crate) fn read_certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    read_pem(p, "certificate")
}

/// Check that `crls` are the CA's: this identity's own certificate (`own`,
/// issued by the CA) verifies with them, or is revoked by them. A list
/// another CA signed covers no certificate of ours, and would make every
/// handshake fail for an unknown revocation status.
pub(crate) fn check_crls(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    crls: &[CertificateRevocationListDer<'static>],
    own: &CertificateDer<'static>,
) -> Result<(), String> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls.to_vec())
        .build()
        .map_err(|e| e.to_string())?;
    match verifier.verify_client_cert(own, &[], UnixTime::now()) {
        Ok(_) | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) => Ok(()),
        Err(e) => Err(format!("not a revocation list of this CA: {e}")),
    }
}

/// Read the folder's identity (`cert.pem`, `key.pem`: `me` it must stay)
/// and revocation list (if any), and make the listener's configuration
/// with them; `anonymous`: a client without a certificate may connect
/// (for enrollment only).
fn read_files(
    dir: &Path,
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    me: Option<&Identity>,
    anonymous: bool,
    ca_crl: Option<&Path>,
) -> Result<Loaded, String> {
    private_file(&dir.join(KEY_FILE))?;
    let certs = read_certs(&dir.join(CERT_FILE))?;
    let key = PrivateKeyDer::from_pem_file(dir.join(KEY_FILE))
        .map_err(|e| format!("{}: {e}", dir.join(KEY_FILE).display()))?;
    if let Some(me) = me {
        let now = Identity::of_cert(&certs[0]).map_err(|e| format!("{}: {e}", dir.join(CERT_FILE).display()))?;
        if &now != me {
            return Err(format!(
                "{}: the certificate is now {now}'s, not {me}'s: a service keeps its identity (restart it to change)",
                dir.join(CERT_FILE).display()
            ));
        }
    }
    let path = dir.join(CRL_FILE);
    let seen = seen(dir, ca_crl);
    let mut crls: Vec<CertificateRevocationListDer<'static>> = Vec::new();
    if seen[0].is_some() {
        crls.extend(read_crls(&path)?);
    }
    if let (Some(p), Some(_)) = (ca_crl, seen[2]) {
        crls.extend(read_crls(p)?);
    }
    let mut lists = Vec::new();
    for c in &crls {
        lists.push(
            webpki::OwnedCertRevocationList::from_der(c.as_ref())
                .map_err(|e| format!("{}: not a revocation list: {e:?}", path.display()))?
                .into(),
        );
    }
    if !crls.is_empty() {
        check_crls(roots, provider, &crls, &certs[0]).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let mut client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
    if !crls.is_empty() {
        client = client.with_crls(crls.clone());
    }
    if anonymous {
        client = client.allow_unauthenticated();
    }
    let client = client.build().map_err(|e| format!("{}: {e}", path.display()))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(client)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(|e| format!("{}: the key does not fit the certificate: {e}", dir.display()))?;
    // The record layer after the handshake is crate::record's, which
    // carries no session tickets (no resumption is used).
    server.enable_secret_extraction = true;
    server.send_tls13_tickets = 0;
    Ok(Loaded {
        seen,
        certs,
        key,
        lists,
        crls,
        server: Arc::new(server),
    })
}

/// One side's loaded identity and the configurations made from it.
pub struct Tls {
    pub me: Identity,
    pub dir: PathBuf,
    pub(crate) provider: Arc<CryptoProvider>,
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) loaded: RwLock<Loaded>,
    /// Clients without a certificate may connect (to enroll; the caller
    /// allows them nothing else).
    anonymous: std::sync::atomic::AtomicBool,
    /// The CA folder's `crl.pem`, read as well, when this service holds
    /// the CA ([`Tls::serve_enrollment`]): `tidemark revoke` takes effect
    /// here without a copy.
    ca_crl: std::sync::OnceLock<PathBuf>,
    /// Live sessions accepted: the peer certificate's serial, and the
    /// token its session ends on.
    sessions: Mutex<Vec<(Vec<u8>, Weak<CancellationToken>)>>,
}

impl Tls {
    /// Load the identity folder `dir`: `ca.pem`, `cert.pem`, `key.pem`
    /// (which no one but its owner may read).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let ca = read_certs(&dir.join(CA_FILE))?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots
                .add(c)
                .map_err(|e| format!("{}: not a CA certificate: {e}", dir.join(CA_FILE).display()))?;
        }
        let provider = Arc::new(provider());
        let roots = Arc::new(roots);
        let loaded = read_files(dir, &roots, &provider, None, false, None)?;
        let me = Identity::of_cert(&loaded.certs[0]).map_err(|e| format!("{}: {e}", dir.join(CERT_FILE).display()))?;
        Ok(Self {
            me,
            dir: dir.to_path_buf(),
            provider,
            roots,
            loaded: RwLock::new(loaded),
            anonymous: std::sync::atomic::AtomicBool::new(false),
            ca_crl: std::sync::OnceLock::new(),
            sessions: Mutex::new(Vec::new()),
        })
    }

    /// Serve enrollment with the CA in `ca_dir` (the collector's `--ca`):
    /// clients without a certificate may connect ([`Conn::peer`] is then
    /// None on a TLS connection, and the caller allows such a connection
    /// an `Enroll` and nothing else), and the CA folder's revocation list
    /// is in force here as soon as `tidemark revoke` writes it.
    pub fn serve_enrollment(&self, ca_dir: &Path) -> Result<(), String> {
        self.anonymous.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.ca_crl.set(ca_dir.join(CRL_FILE));
        self.reread()
    }

    /// Read the folder (and the CA's list, if served) into `loaded`.
    fn reread(&self) -> Result<(), String> {
        let r = read_files(
            &self.dir,
            &self.roots,
            &self.provider,
            Some(&self.me),
            self.anonymous.load(std::sync::atomic::Ordering::Relaxed),
            self.ca_crl.get().map(PathBuf::as_path),
        )?;
        *self.loaded.write().unwrap_or_else(PoisonError::into_inner) = r;
        Ok(())
    }

    /// Read `crl.pem` and the identity (`cert.pem`, `key.pem`: renewed)
    /// again if either changed: rebuild the verifiers with them and end the
    /// live sessions of peers the list revokes. Returns how many sessions
    /// were ended. Files that cannot be read are an error and change
    /// nothing (what was read before stays in force).
    pub fn reload_files(&self) -> Result<usize, String> {
        let ca_crl = self.ca_crl.get().map(PathBuf::as_path);
        if self.loaded.read().unwrap_or_else(PoisonError::into_inner).seen == seen(&self.dir, ca_crl) {
            return Ok(0);
        }
        self.reread()?;
        Ok(self.end_revoked_sessions())
    }

    /// Cancel the live sessions whose peer certificate the list revokes.
    fn end_revoked_sessions(&self) -> usize {
        let r = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.retain(|(_, t)| t.strong_count() > 0);
        let mut ended = 0;
        for (serial, t) in sessions.iter() {
            if r.lists.iter().any(|l| matches!(l.find_serial(serial), Ok(Some(_)))) {
                if let Some(t) = t.upgrade() {
                    if !t.is_cancelled() {
                        t.cancel();
                        ended += 1;
                    }
                }
            }
        }
        ended
    }

    /// The dialing side's configuration: this identity's certificate,
    /// and the server must hold one of this CA for role `want` (and name
    /// `name`, if given), not revoked by the lists in force.
    pub(crate) fn client_config(&self, want: PeerRole, name: Option<&str>) -> Result<Arc<ClientConfig>, String> {
        if let Err(e) = self.reload_files() {
            tracing::error!("{e} (the list read before stays in force)");
        }
        let (crls, certs, key) = {
            let r = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
            (r.crls.clone(), r.certs.clone(), r.key.clone_key())
        };
        let mut inner = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone());
        if !crls.is_empty() {
            inner = inner.with_crls(crls);
        }
        let inner = inner.build().map_err(|e| e.to_string())?;
        let verifier = RoleVerifier {
            inner,
            want,
            name: name.map(str::to_string),
        };
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        // The record layer after the handshake is crate::record's.
        config.enable_secret_extraction = true;
        Ok(Arc::new(config))
    }

    /// The listening side's configuration, as last loaded.
    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        self.loaded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .server
            .clone()
    }

    /// Accept a connection: the TLS handshake (bounded by
    /// [`HANDSHAKE_TIMEOUT`]), with a client certificate of this CA
    /// required; returns the connection and the peer's identity.
    pub async fn accept(&self, tcp: TcpStream) -> Result<Conn, String> {
        if let Err(e) = self.reload_files() {
            tracing::error!("{e} (the list read before stays in force)");
        }
        let conn = rustls::ServerConnection::new(self.server_config()).map_err(|e| format!("TLS: {e}"))?;
        let (r, w, cert) = crate::record::establish(tcp, conn.into(), HANDSHAKE_TIMEOUT)
            .await
            .map_err(|e| match e {
                EstablishError::Timeout => format!("no TLS handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                EstablishError::Handshake(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => PROBE.to_string(),
                EstablishError::Handshake(e) => format!("TLS handshake: {e}"),
            })?;
        let Some(cert) = cert else {
            if !self.anonymous.load(std::sync::atomic::Ordering::Relaxed) {
                return Err("TLS handshake: the peer sent no certificate".into());
            }
            return Ok(Conn {
                reader: Box::new(r),
                writer: Box::new(w),
                peer: None,
                revoked: Arc::default(),
                anonymous: true,
            });
        };
        let (peer, serial) = {
            let serial = webpki::EndEntityCert::try_from(&cert)
                .map_err(|e| format!("the peer's certificate: {e}"))?
                .serial()
                .to_vec();
            (
                Identity::of_cert(&cert).map_err(|e| format!("the peer's certificate: {e}"))?,
                serial,
            )
        };
        let revoked = Arc::new(CancellationToken::new());
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
            sessions.retain(|(_, t)| t.strong_count() > 0);
            sessions.push((serial, Arc::downgrade(&revoked)));
        }
        Ok(Conn {
            reader: Box::new(r),
            writer: Box::new(w),
            peer: Some(peer),
            revoked,
            anonymous: false,
        })
    }

    /// Dial: the TLS handshake with `tcp`, requiring the server to hold a
    /// certificate of this CA for role `want` (and name `name`, if given).
    pub async fn connect(&self, tcp: TcpStream, want: PeerRole, name: Option<&str>) -> Result<Conn, String> {
        let config = self.client_config(want, name)?;
        // The name sent is not what is checked (the role and CA are).
        let sni = ServerName::try_from(format!("{}.{DOMAIN}", want.name())).map_err(|e| e.to_string())?;
        let conn = rustls::ClientConnection::new(config, sni).map_err(|e| format!("TLS: {e}"))?;
        let (r, w, cert) = crate::record::establish(tcp, conn.into(), HANDSHAKE_TIMEOUT)
            .await
            .map_err(|e| match e {
                EstablishError::Timeout => format!("no TLS handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                EstablishError::Handshake(e) => format!("TLS handshake with the {want}: {e}"),
            })?;
        let peer = cert.as_ref().map(Identity::of_cert).transpose()?;
        Ok(Conn {
            reader: Box::new(r),
            writer: Box::new(w),
            peer,
            revoked: Arc::default(),
            anonymous: false,
        })
    }
}

impl Security {
    /// A listener's side of a new connection.
    pub async fn accept(&self, tcp: TcpStream) -> Result<Conn, String> {
        match self {
            Self::Tls(t) => t.accept(tcp).await,
            Self::Plaintext => Ok(plain(tcp)),
        }
    }

    /// [`Security::accept`] for a listener, its failure logged: a port
    /// probe at debug, anything else as `{what}: {error}` within `log`'s
    /// rate. `Err(true)`: a refusal (for the caller's count); `Err(false)`:
    /// a probe.
    pub async fn accept_logged(
        &self,
        tcp: TcpStream,
        log: &tidemark_util::ratelog::RateLimitedLog,
        what: &str,
    ) -> Result<Conn, bool> {
        match self.accept(tcp).await {
            Ok(c) => Ok(c),
            Err(e) if e == PROBE => {
                tracing::debug!("connection {e}");
                Err(false)
            }
            Err(e) => {
                log.warn(format_args!("{what}: {e}"));
                Err(true)
            }
        }
    }

    /// Look for a changed revocation list every [`CRL_POLL`] until `stop`,
    /// ending the live sessions of revoked peers (nothing in plaintext).
    pub fn spawn_crl_watch(&self, stop: CancellationToken) {
        let Self::Tls(t) = self else { return };
        let t = t.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(CRL_POLL) => {}
                }
                match t.reload_files() {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(
                        sessions = n,
                        "revocation list changed: ended the sessions of revoked peers"
                    ),
                    Err(e) => tracing::error!("{e} (the list read before stays in force)"),
                }
            }
        });
    }

    /// A dialer's side of a new connection to a peer of role `want`.
    pub async fn connect(&self, tcp: TcpStream, want: PeerRole, name: Option<&str>) -> Result<Conn, String> {
        match self {
            Self::Tls(t) => t.connect(tcp, want, name).await,
            Self::Plaintext => Ok(plain(tcp)),
        }
    }
}

/// Checks a server's certificate as WebPKI does (chain to the CA,
/// validity, key usage, the name in it), for the identity the
/// certificate itself names, after checking that identity's role (and
/// name) is the one dialled for.
#[derive(Debug)]
pub(crate) struct RoleVerifier {
    pub(crate) inner: Arc<WebPkiServerVerifier>,
    pub(crate) want: PeerRole,
    pub(crate) name: Option<String>,
}

impl ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = Identity::of_cert(end_entity).map_err(rustls::Error::General)?;
        if id.role != self.want {
            return Err(rustls::Error::General(format!(
                "the server is {id}, not a {}: wrong address, or a certificate used for the wrong role",
                self.want
            )));
        }
        if let Some(n) = &self.name {
            if &id.name != n {
                return Err(rustls::Error::General(format!(
                    "the server is {id}, not {} {n}",
                    self.want
                )));
            }
        }
        let name = ServerName::try_from(id.dns_name()).map_err(|e| rustls::Error::General(e.to_string()))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Check that `cert` (DER) chains to the CA certificate(s) in `ca_pem`,
/// is valid now and names a Tidemark identity; returns the identity.
/// `tidemark ca issue` checks what it made with this before writing it.
pub fn check_issued(ca_pem: &[u8], cert: &[u8]) -> Result<Identity, String> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        let c = c.map_err(|e| format!("the CA certificate: {e}"))?;
        roots.add(c).map_err(|e| format!("the CA certificate: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider()))
        .build()
        .map_err(|e| e.to_string())?;
    let der = CertificateDer::from(cert.to_vec());
    verifier
        .verify_client_cert(&der, &[], UnixTime::now())
        .map_err(|e| format!("the certificate does not verify against the CA: {e}"))?;
    Identity::of_cert(&der)
}

/// A client configuration without a certificate that requires the server
/// to hold a collector certificate of the CA in `ca_pem` (from the file
/// `what`, for errors): enrollment, and the tools' HTTPS to the API.
pub(crate) fn collector_client_config(ca_pem: &[u8], what: &Path) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        let c = c.map_err(|e| format!("{}: {e}", what.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("{}: not a CA certificate: {e}", what.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate in it", what.display()));
    }
    let provider = Arc::new(provider());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RoleVerifier {
            inner,
            want: PeerRole::Collector,
            name: None,
        }))
        .with_no_client_auth())
}

/// The crypto provider: *ring*. It builds with nothing but a C compiler
/// for every target Tidemark ships (glibc, musl, windows-gnu), which
/// aws-lc-rs does not without cmake and NASM; rustls deprecates it for
/// lacking post-quantum key exchange (X25519MLKEM768), a gap named in
/// `docs/security.md`.
/// Its cipher suites are TLS 1.3's three, AES-128-GCM first: with AES-NI
/// the fastest, and replication is bulk data on a few cores.
#[allow(deprecated)]
pub(crate) fn provider() -> CryptoProvider {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    }
}

/// Refuse a secret file (a key, a token) that its group or others may
/// read or write, naming the mode and the fix.
pub fn private_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is open to its group or others (mode {mode:04o}): it holds a secret; chmod 600 it",
            path.display()
        ));
    }
    Ok(())
}

/// Write a secret file atomically, 0600 from the start (a temp file in
/// the same folder, fsync'd, renamed over `path`, the folder fsync'd).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(d) = path.parent() {
            tidemark_util::crashsafe::fsync_dir(d)?;
        }
        Ok(())
    })();
    r.map_err(|e| format!("write {}: {e}", path.display()))
}

/// Remove a secret file durably.
pub fn remove_secret(path: &Path) -> Result<(), String> {
    tidemark_util::crashsafe::remove_durable(path).map_err(|e| format!("remove {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_dns_names() {
        let id = Identity::new("web-1", PeerRole::Agent).unwrap();
        assert_eq!(id.dns_name(), "web-1.agent.tidemark");
        assert_eq!(Identity::from_dns_name("web-1.agent.tidemark"), Some(id));
        for bad in [
            "web-1.agent.example",
            "web-1.admin.tidemark",
            "a.b.agent.tidemark",
            "-x.agent.tidemark",
            "agent.tidemark",
            "Web.agent.tidemark",
        ] {
            assert_eq!(Identity::from_dns_name(bad), None, "{bad}");
        }
        assert!(Identity::new(&"x".repeat(64), PeerRole::Target).is_err());
        assert!(Identity::new("", PeerRole::Target).is_err());
    }

    #[test]
    fn security_needs_an_explicit_choice() {
        let e = Security::from_flags(None, false, PeerRole::Agent).err().unwrap();
        assert!(e.contains("--tls DIR") && e.contains("--insecure-plaintext"), "{e}");
        assert!(Security::from_flags(Some(Path::new("/nonexistent")), true, PeerRole::Agent).is_err());
        let p = Security::from_flags(None, true, PeerRole::Agent).ok().unwrap();
        assert!(!p.is_tls() && p.describe().contains("PLAINTEXT"));
    }
}
