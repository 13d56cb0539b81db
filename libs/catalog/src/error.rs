//! The error type of the recovery state (catalog, undo, replica), which the
//! target's service code uses as its own.
//!
//! Errors are mapped to protocol replies at the edge (the session): a
//! [`ErrorKind::Malformed`] becomes `Error{Malformed}` for the collector,
//! everything else `Error{Internal}`.

use std::fmt;

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
    /// What was wrong, naming the file, disk or seq where known.
    pub context: String,
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
        match &self.source {
            Some(s) => write!(f, "{}: {s}", self.context),
            None => f.write_str(&self.context),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// Attach context to I/O results.
pub trait IoContext<T> {
    fn io_ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::with_source(ErrorKind::Io, what(), e))
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
            _ => ErrorKind::Io,
        };
        // Keep the I/O cause as the source, so callers can still see it.
        Self {
            kind,
            context: e.context,
            source: e.source.map(|s| Box::new(s) as _),
        }
    }
}
