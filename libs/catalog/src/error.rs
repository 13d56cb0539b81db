//! The error type of the recovery state (catalog, undo, replica), which the
//! target's service code uses as its own.
//!
//! Errors are mapped to protocol replies at the edge (the session): a
//! [`ErrorKind::Malformed`] becomes `Error{Malformed}` for the collector,
//! everything else `Error{Internal}`.

use std::fmt;

pub use tidemark_util::located::{Located, Where};

/// The broad class of an [`Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The operating system refused a read, write, sync, rename or bind
    /// (replica, dedup window, data directory, socket).
    Io,
    /// The SQLite catalog failed, or holds something this build cannot use
    /// (a newer schema, a value out of range).
    Catalog,
    /// The peer sent something the protocol does not allow: a gap in the
    /// seqs, a record out of range, a packed batch that does not unpack.
    Malformed,
    /// Another process or connection holds what was asked for (the data
    /// directory's lock).
    Busy,
    /// The configuration cannot work (an empty token).
    Config,
    /// A failpoint fired (fault-injection tests only).
    Injected,
    /// Bytes on disk that do not read back as written (an undo segment
    /// whose magic or checksum is wrong).
    Corrupt,
    /// A file written by a format version this build does not read.
    UnsupportedVersion,
    /// A file belongs to something else (another disk, another geometry).
    Mismatch,
    /// What the caller asked for cannot be understood (an `--at` that is
    /// no point specification).
    Invalid,
    /// The running target refused or failed a request made through its
    /// control socket (its reason is the message).
    Refused,
    /// What was asked for does not exist (a disk, a recovery point).
    NotFound,
    /// The disk was failed over: the target no longer applies to it.
    FailedOver,
    /// The disk's undo retention is at `--retention-max` and its policy is
    /// `--on-full stop`: applying waits for an operator.
    RetentionFull,
}

/// An error with what was being done and where (path, disk, seq).
#[derive(Debug)]
pub struct Error {
    /// Broad class, for callers that react differently.
    pub kind: ErrorKind,
    /// What was wrong (disk, seq, path, offset and operation are in `at`).
    pub context: String,
    /// Where: disk, seq, operation, path, offset.
    /// Boxed: errors travel in `Result`s on hot paths, and most have no context.
    pub at: Box<Where>,
    /// The underlying error, if any.
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error without an underlying cause.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Self {
            kind,
            context: context.into(),
            at: Box::default(),
            source: None,
        }
    }

    /// An error caused by `source`, with what was being done.
    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            kind,
            context: context.into(),
            at: Box::default(),
            source: Some(Box::new(source)),
        }
    }

    /// Bad input from the peer.
    pub fn malformed(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Malformed, context)
    }

    /// A failpoint fired.
    pub fn injected(name: &str) -> Self {
        Self::new(ErrorKind::Injected, format!("failpoint {name}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.at
            .render(f, &self.context, self.source.as_ref().map(|s| s as &dyn fmt::Display))
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

impl Located for Error {
    fn at_mut(&mut self) -> &mut Where {
        &mut self.at
    }
}

/// Attach context to I/O results.
pub trait IoContext<T> {
    /// Context in words (a message).
    fn io_ctx(self, what: impl FnOnce() -> String) -> Result<T>;
    /// Context as typed fields: the operation and the path.
    fn io_at(self, op: &str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::with_source(ErrorKind::Io, what(), e))
    }

    fn io_at(self, op: &str, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::with_source(ErrorKind::Io, "", e).op(op).path(path))
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Self::with_source(ErrorKind::Catalog, "catalog", e)
    }
}

impl From<tidemark_formats::Error> for Error {
    fn from(e: tidemark_formats::Error) -> Self {
        use tidemark_formats::ErrorKind as F;
        let kind = match e.kind {
            F::OutOfBounds => ErrorKind::Malformed,
            F::Corrupt => ErrorKind::Corrupt,
            F::UnsupportedVersion => ErrorKind::UnsupportedVersion,
            F::Mismatch => ErrorKind::Mismatch,
            _ => ErrorKind::Io,
        };
        // Keep the I/O cause as the source, so callers can still see it.
        Self {
            kind,
            context: e.context,
            at: e.at,
            source: e.source.map(|s| Box::new(s) as _),
        }
    }
}
