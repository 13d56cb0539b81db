//! HTTPS for the collector's API (`docs/security.md`, "The API"): the
//! collector serves it with its own identity (no client certificate
//! asked: callers authenticate with bearer tokens), and the `tidemark`
//! tools verify that the server holds a collector certificate of the
//! deployment's CA, as an agent does when it dials a collector. Host
//! names are not what is checked (identities are `NAME.collector.tidemark`,
//! whatever address the API listens on); the CA and the role are.

use std::path::Path;
use std::sync::{Arc, PoisonError};

use rustls::server::NoClientAuth;
use rustls::{ClientConfig, ServerConfig};

use crate::tls::Tls;

impl Tls {
    /// The API listener's configuration: this identity's certificate (as
    /// last read: a renewed one is served from the next connection), TLS
    /// 1.3, HTTP/1.1, no client certificate.
    pub fn https_server_config(&self) -> Result<Arc<ServerConfig>, String> {
        let (certs, key) = {
            let r = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
            (r.certs.clone(), r.key.clone_key())
        };
        let mut c = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(NoClientAuth))
            .with_single_cert(certs, key)
            .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    }
}

/// A client configuration for the collector's API: the server must hold a
/// collector certificate issued by the CA in `ca_file` (PEM).
pub fn api_client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, String> {
    let pem = std::fs::read(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?;
    let mut c = crate::tls::collector_client_config(&pem, ca_file)?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// HTTPS for `ureq` (which the tools use) with [`api_client_config`],
/// without ureq's own TLS stack and its bundled public roots.
#[cfg(feature = "ureq")]
pub struct UreqTls(pub Arc<ClientConfig>);

#[cfg(feature = "ureq")]
impl ureq::TlsConnector for UreqTls {
    fn connect(&self, _dns_name: &str, io: Box<dyn ureq::ReadWrite>) -> Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
        // The name sent is not what is checked (the role and the CA are).
        let sni = format!("{}.{}", crate::tls::PeerRole::Collector.name(), crate::tls::DOMAIN);
        ureq_connect(&self.0, &sni, io, "the collector's API")
    }
}

/// A client configuration for an ordinary HTTPS server (an alert
/// webhook's receiver): its certificate must chain to a CA in `ca_file`
/// (PEM; e.g. the system bundle) and name the host of the URL.
pub fn web_client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("{}: {e}", ca_file.display()))?;
        // A bundle may hold certificates rustls cannot use as roots: skip them.
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(format!("{}: no CA certificate in it", ca_file.display()));
    }
    let provider = Arc::new(crate::tls::provider());
    let mut c = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// HTTPS for `ureq` with [`web_client_config`]: the server's name is the
/// URL's host, checked as browsers do.
#[cfg(feature = "ureq")]
pub struct UreqWebTls(pub Arc<ClientConfig>);

#[cfg(feature = "ureq")]
impl ureq::TlsConnector for UreqWebTls {
    fn connect(&self, dns_name: &str, io: Box<dyn ureq::ReadWrite>) -> Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
        ureq_connect(&self.0, dns_name, io, dns_name)
    }
}

/// A TLS client stream to `sni`, its handshake done (so a wrong server is
/// named here, not as a read error).
#[cfg(feature = "ureq")]
#[allow(clippy::result_large_err)] // ureq::TlsConnector's own error type
fn ureq_connect(
    config: &Arc<ClientConfig>,
    sni: &str,
    io: Box<dyn ureq::ReadWrite>,
    what: &str,
) -> Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
    let err = |m: String| ureq::Error::from(std::io::Error::other(m));
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(|e| err(format!("{sni}: {e}")))?;
    let conn = rustls::ClientConnection::new(config.clone(), name).map_err(|e| err(e.to_string()))?;
    let mut s = rustls::StreamOwned::new(conn, io);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| err(format!("TLS handshake with {what}: {e}")))?;
    }
    Ok(Box::new(UreqStream(s)))
}

#[cfg(feature = "ureq")]
struct UreqStream(rustls::StreamOwned<rustls::ClientConnection, Box<dyn ureq::ReadWrite>>);

#[cfg(feature = "ureq")]
impl std::fmt::Debug for UreqStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UreqStream(TLS)")
    }
}

#[cfg(feature = "ureq")]
impl std::io::Read for UreqStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

#[cfg(feature = "ureq")]
impl std::io::Write for UreqStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(feature = "ureq")]
impl ureq::ReadWrite for UreqStream {
    fn socket(&self) -> Option<&std::net::TcpStream> {
        self.0.sock.socket()
    }
}
