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
        let sni = rustls::pki_types::ServerName::try_from(format!(
            "{}.{}",
            crate::tls::PeerRole::Collector.name(),
            crate::tls::DOMAIN
        ))
        .map_err(|e| ureq::Error::from(std::io::Error::other(e.to_string())))?;
        let conn = rustls::ClientConnection::new(self.0.clone(), sni)
            .map_err(|e| ureq::Error::from(std::io::Error::other(e.to_string())))?;
        let mut s = rustls::StreamOwned::new(conn, io);
        // Handshake now, so a wrong server is named here, not as a read error.
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).map_err(|e| {
                ureq::Error::from(std::io::Error::other(format!(
                    "TLS handshake with the collector's API: {e}"
                )))
            })?;
        }
        Ok(Box::new(UreqStream(s)))
    }
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
