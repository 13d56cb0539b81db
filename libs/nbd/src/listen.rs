//! Where the server listens: `unix:PATH` or `tcp:HOST:PORT`.

use std::fmt;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::Error;

/// A parsed listen address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix domain socket at this path.
    Unix(PathBuf),
    /// A TCP address; `host` is a name or an IP address (IPv6 without brackets).
    Tcp { host: String, port: u16 },
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            ListenAddr::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

impl FromStr for ListenAddr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        parse_listen(s)
    }
}

/// Parses `unix:PATH` or `tcp:HOST:PORT` (`tcp:[::1]:10809` for IPv6; port 0
/// picks a free port).
pub fn parse_listen(spec: &str) -> Result<ListenAddr, Error> {
    let bad = |reason| Error::ListenSpec {
        spec: spec.to_string(),
        reason,
    };
    if let Some(path) = spec.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad("empty socket path"));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    let Some(rest) = spec.strip_prefix("tcp:") else {
        return Err(bad("unknown scheme"));
    };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let Some((host, port)) = v6.split_once("]:") else {
            return Err(bad("bracketed host must be followed by :PORT"));
        };
        (host, port)
    } else {
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(bad("missing :PORT"));
        };
        if host.contains(':') {
            return Err(bad("IPv6 addresses must be written in brackets"));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| bad("port is not a number between 0 and 65535"))?;
    Ok(ListenAddr::Tcp {
        host: host.to_string(),
        port,
    })
}

/// A bound listening socket, ready for [`crate::serve`].
#[derive(Debug)]
pub enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    /// What this listener is bound to (with the real port for `tcp:…:0`).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Listener::Unix(l) => {
                let a = l.local_addr()?;
                let p = a.as_pathname().map(PathBuf::from).unwrap_or_default();
                Ok(ListenAddr::Unix(p))
            }
            Listener::Tcp(l) => {
                let a = l.local_addr()?;
                Ok(ListenAddr::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                })
            }
        }
    }
}

/// Binds a listener. For a unix socket, a stale socket file left by a dead
/// server is removed; a live one (something accepts connections) or any other
/// kind of file at that path is an error.
pub async fn bind(addr: &ListenAddr) -> Result<Listener, Error> {
    let fail = |source| Error::Bind {
        addr: addr.to_string(),
        source,
    };
    match addr {
        ListenAddr::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.file_type().is_socket() {
                    return Err(fail(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "path exists and is not a socket",
                    )));
                }
                if tokio::net::UnixStream::connect(path).await.is_ok() {
                    return Err(fail(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another server is listening on this socket",
                    )));
                }
                std::fs::remove_file(path).map_err(fail)?;
            }
            Ok(Listener::Unix(tokio::net::UnixListener::bind(path).map_err(fail)?))
        }
        ListenAddr::Tcp { host, port } => {
            let l = tokio::net::TcpListener::bind((host.as_str(), *port))
                .await
                .map_err(fail)?;
            Ok(Listener::Tcp(l))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_addresses() {
        assert_eq!(
            parse_listen("unix:/tmp/x.sock").unwrap(),
            ListenAddr::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            parse_listen("tcp:localhost:10809").unwrap(),
            ListenAddr::Tcp {
                host: "localhost".into(),
                port: 10809
            }
        );
        assert_eq!(
            parse_listen("tcp:[::1]:0").unwrap(),
            ListenAddr::Tcp {
                host: "::1".into(),
                port: 0
            }
        );
        let a: ListenAddr = "tcp:127.0.0.1:1".parse().unwrap();
        assert_eq!(a.to_string(), "tcp:127.0.0.1:1");
        assert_eq!(parse_listen("tcp:[::1]:5").unwrap().to_string(), "tcp:[::1]:5");
    }

    #[test]
    fn rejects_bad_addresses() {
        for spec in [
            "",
            "unix:",
            "/tmp/x.sock",
            "udp:1.2.3.4:5",
            "tcp:",
            "tcp:host",
            "tcp::80",
            "tcp:host:http",
            "tcp:host:65536",
            "tcp:::1:80",
            "tcp:[::1]80",
            "tcp:[]:80",
        ] {
            let e = parse_listen(spec).unwrap_err();
            assert!(matches!(e, Error::ListenSpec { .. }), "{spec}: {e}");
            assert!(e.to_string().contains("unix:PATH or tcp:HOST:PORT"), "{e}");
        }
    }

    #[tokio::test]
    async fn bind_replaces_stale_socket_but_not_files() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let addr = ListenAddr::Unix(sock.clone());
        let l = bind(&addr).await.unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
        // Live: refused.
        assert!(matches!(bind(&addr).await, Err(Error::Bind { .. })));
        drop(l);
        // Stale: replaced.
        let _l = bind(&addr).await.unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            bind(&ListenAddr::Unix(file.clone())).await,
            Err(Error::Bind { .. })
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}
