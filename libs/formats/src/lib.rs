//! On-disk formats. Each module owns one format end to end: its layout (an
//! ASCII diagram opens the module), its version, its checksum, its reader
//! and writer. Nothing here knows about networks or processes.
//!
//! - [`journal`]: the agent's write-ahead change journal (segment files of
//!   change records).
//! - [`bitmap`]: the persistent dirty bitmap used in bitmap mode.
//! - [`replica`]: replica images (raw, VMDK flat and sparse) and exports
//!   (also VMDK streamOptimized).

pub mod apply;
pub mod bitmap;
pub mod error;
pub mod journal;
pub mod replica;
pub mod spool;

pub use error::{Error, ErrorKind};
