//! The one error type of the formats crate.

use std::fmt;
use std::io;
use std::path::Path;

/// The broad class of an [`Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The operating system refused a read, write, sync or rename.
    Io,
    /// Bytes on disk do not form what the format says (bad magic, checksum,
    /// hash, a gap in the sequence).
    Corrupt,
    /// A file written by a format version this build does not read.
    UnsupportedVersion,
    /// An offset or length beyond what the file or format allows.
    OutOfBounds,
    /// The journal reached its size cap; the caller switches to bitmap mode.
    Full,
    /// The file belongs to something else (another disk, another geometry).
    Mismatch,
}

/// An error with what was being done and where.
#[derive(Debug)]
pub struct Error {
    /// Broad class, for callers that react differently.
    pub kind: ErrorKind,
    /// What was wrong, naming the file and, where known, offset and seq.
    pub context: String,
    /// The underlying I/O error, if any.
    pub source: Option<io::Error>,
}

impl Error {
    /// A new error without an underlying cause.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Self {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An I/O error with what was being done on which path.
    pub fn io(what: &str, path: &Path, e: io::Error) -> Self {
        Self {
            kind: ErrorKind::Io,
            context: format!("{what} {}", path.display()),
            source: Some(e),
        }
    }

    /// Corrupt content in `path`.
    pub fn corrupt(path: &Path, msg: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Corrupt, format!("{}: {msg}", path.display()))
    }

    /// The raw OS error code, for mapping to protocol errors.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(io::Error::raw_os_error)
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
        self.source.as_ref().map(|e| e as _)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e.source {
            Some(s) => io::Error::new(s.kind(), format!("{}: {s}", e.context)),
            None => io::Error::other(e.context),
        }
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Helper for path-carrying I/O errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: &str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(what, path, e))
    }
}
