//! tidemark-agent: puts a protected disk behind a userspace block shim and
//! journals every write, in order, before it reaches the disk.
//!
//! Data flow: a front end ([`nbd`], [`ublk`]) hands requests to the
//! [`shim::Shim`] in the shim's own terms; the shim appends a change record
//! to the journal (write-ahead), writes the backing disk, and only then lets
//! the front end acknowledge. The shim never acknowledges a write that is not
//! tracked: past the journal cap it tracks regions in a dirty bitmap instead,
//! and on a journal or bitmap error it fails the request.

pub mod compare;
pub mod config;
pub mod control;
pub mod drain;
pub mod metrics;
pub mod nbd;
pub mod ranges;
pub mod run;
pub mod shim;
pub mod ship;
pub mod state;
pub mod status;
pub mod sync;
pub mod sync_state;
pub mod syncer;
pub mod ublk;
pub mod unapplied;

/// Nanoseconds since the Unix epoch, for record timestamps.
pub use tidemark_util::now_ns;
