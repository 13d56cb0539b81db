//! Frames on a byte stream, for every hop: the agent's shipper, the
//! collector's agent sessions and forwarders, the target's sessions.
//!
//! - [`frames`]: one frame reader (bounded, cancel-safe, optionally
//!   counted against a memory budget) and the frame writer.
//! - [`hello`]: the checks every listener makes of a Hello (version,
//!   token, role).
//! - [`https`]: the collector API's HTTPS (server and `tidemark`'s client).
//! - [`socket`]: the socket options every connection sets.
//! - [`tls`]: mutual TLS 1.3 with role-bearing identities, or plaintext
//!   by explicit choice; the connection halves every hop uses.
//!
//! `tidemark-wire` stays free of I/O and of any runtime (the journal, the
//! fuzz targets and the tools use it without tokio); this crate is where
//! its frames meet tokio's streams. It owns no policy: limits, timeouts and
//! what a refusal says stay with each service.

pub mod admit;
pub mod apitokens;
pub mod ca;
pub mod enroll;
pub mod frames;
pub mod hello;
pub mod https;
pub mod record;
pub mod socket;
pub mod tls;

pub use admit::{Admission, Admitted};
pub use frames::{kib_permits, read_frame, write_frame, FrameReader, ReadError, WriteError};
pub use hello::{check_hello, Refusal, HELLO_MAX_BODY};
pub use socket::set_user_timeout;
pub use tls::{Conn, Identity, PeerRole, Reader, Security, Writer};
