//! The one error type of the formats crate.

use std::fmt;
use std::io;
use std::path::Path;

pub use tidemark_util::located::{Located, Where};

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
    /// What was wrong (the file, offset and seq are in `at`).
    pub context: String,
    /// Where: path, offset, seq, operation.
    /// Boxed: errors travel in `Result`s on hot paths, and most have no context.
    pub at: Box<Where>,
    /// The underlying I/O error, if any.
    pub source: Option<io::Error>,
}

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

    /// An I/O error with what was being done on which path.
    pub fn io(what: &str, path: &Path, e: io::Error) -> Self {
        Self {
            kind: ErrorKind::Io,
            context: String::new(),
            at: Box::new(Where {
                op: Some(what.to_string()),
                path: Some(path.to_path_buf()),
                ..Where::default()
            }),
            source: Some(e),
        }
    }

    /// Corrupt content in `path`.
    pub fn corrupt(path: &Path, msg: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Corrupt, msg.to_string()).path(path)
    }

    /// The raw OS error code, for mapping to protocol errors.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(io::Error::raw_os_error)
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
        self.source.as_ref().map(|e| e as _)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        let kind = e.source.as_ref().map_or(io::ErrorKind::Other, io::Error::kind);
        io::Error::new(kind, e.to_string())
    }
}

impl Located for Error {
    fn at_mut(&mut self) -> &mut Where {
        &mut self.at
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
