//! Records, frames and codecs shared by the agent, the collector and the
//! target. Kept slim: no I/O, no async, no allocation beyond the payloads.
//!
//! - [`call`]: the JSON an operator's Call carries down the line.
//! - [`disk_id`]: what a disk is called, checked once where it enters.
//! - [`chunk`]: the chunks a hash-compare resync hashes and compares.
//! - [`record`]: the change record, from the journal to the replica.
//! - [`frame`]: the framed network protocol for both hops (hello, batches,
//!   acks, progress, requests, errors); `docs/pipeline.md` says who sends what.
//! - [`pack`]: the collector → target batch encoding (dedup window, zero
//!   blocks, zstd).

pub mod call;
pub mod chunk;
pub mod disk_id;
pub mod frame;
pub mod pack;
pub mod record;

pub use disk_id::{DiskId, DiskIdError};
pub use record::{Record, RecordHeader, RecordKind, WireError, WireErrorKind};
