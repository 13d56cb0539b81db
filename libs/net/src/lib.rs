//! Frames on a byte stream, for every hop: the agent's shipper, the
//! collector's agent sessions and forwarders, the target's sessions.
//!
//! - [`frames`]: one frame reader (bounded, cancel-safe, optionally
//!   counted against a memory budget) and the frame writer.
//! - [`hello`]: the checks every listener makes of a Hello (version,
//!   token, role).
//! - [`socket`]: the socket options every connection sets.
//!
//! `tidemark-wire` stays free of I/O and of any runtime (the journal, the
//! fuzz targets and the tools use it without tokio); this crate is where
//! its frames meet tokio's streams. It owns no policy: limits, timeouts and
//! what a refusal says stay with each service.

pub mod frames;
pub mod hello;
pub mod socket;

pub use frames::{kib_permits, read_frame, write_frame, FrameReader, ReadError, WriteError};
pub use hello::{check_hello, Refusal};
pub use socket::set_user_timeout;
