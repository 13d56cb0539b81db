//! Records, frames and codecs shared by the agent, the collector and the
//! target. Kept slim: no I/O, no async, no allocation beyond the payloads.
//!
//! Today this holds the change record ([`record`]); the framed network
//! protocol joins it with the replication pipeline.

pub mod record;

pub use record::{Record, RecordHeader, RecordKind, WireError, WireErrorKind};
