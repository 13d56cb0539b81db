//! The one public error type of this crate.

use std::io;

/// Why a connection ended badly, or why a listener could not be set up.
///
/// Per-request failures (a bad offset, a backend I/O error) are not errors
/// of this type: they become NBD error replies and the connection goes on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket failed while `during` (e.g. "reading request header").
    #[error("I/O error while {during}: {source}")]
    Io {
        during: &'static str,
        #[source]
        source: io::Error,
    },
    /// The client closed the connection in the middle of a message
    /// (`during` says which); requests already received are still completed.
    #[error("client disconnected while {during}")]
    Disconnected { during: &'static str },
    /// The client broke the protocol (bad magic, unknown handshake flags,
    /// an oversized option or payload, an unknown export with
    /// NBD_OPT_EXPORT_NAME); the server dropped the connection.
    #[error("protocol violation: {reason}")]
    Protocol { reason: String },
    /// A listen address that is neither `unix:PATH` nor `tcp:HOST:PORT`.
    #[error("invalid listen address {spec:?}: {reason} (expected unix:PATH or tcp:HOST:PORT)")]
    ListenSpec { spec: String, reason: &'static str },
    /// Binding or preparing the listening socket at `addr` failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn protocol(reason: impl Into<String>) -> Self {
        Error::Protocol { reason: reason.into() }
    }

    /// Maps a socket error, turning an early EOF into [`Error::Disconnected`].
    pub(crate) fn io(during: &'static str, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                Error::Disconnected { during }
            }
            _ => Error::Io { during, source },
        }
    }

    /// Whether this is the client's fault (worth a warning) rather than an
    /// ordinary disconnect.
    pub fn is_protocol_violation(&self) -> bool {
        matches!(self, Error::Protocol { .. })
    }
}
