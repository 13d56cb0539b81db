//! On-disk formats. Each module owns one format end to end: its layout (an
//! ASCII diagram opens the module), its version, its checksum, its reader
//! and writer. Nothing here knows about networks or processes.
//!
//! - [`journal`]: the agent's write-ahead change journal (segment files of
//!   change records).
//! - [`bitmap`]: the persistent dirty bitmap used in bitmap mode.
//! - [`replica`]: replica images (raw, VMDK flat and sparse) and exports
//!   (also VMDK streamOptimized).
//! - [`spool`]: the collector's spool files.
//! - [`undo`]: the target's undo segments (old contents of replica blocks,
//!   for recovery points).
//! - [`generation`]: generation histories (who is ahead after a failover;
//!   not yet used by the services, see `docs/failback.md`).

pub mod apply;
pub mod bitmap;
pub mod error;
pub mod generation;
pub mod journal;
pub mod replica;
pub mod spool;
pub mod undo;

pub use error::{Error, ErrorKind, Located, Where};
