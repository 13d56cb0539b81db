//! The recovery state of a target's data directory, shared by the target
//! (which writes it) and the recovery tools (which read it, directly or
//! through the target's control socket).
//!
//! - [`layout`]: where each file of a data directory lives, and the lock.
//! - the catalog itself (this module's items, from `store`): one SQLite
//!   database per data directory, its schema and migrations, typed rows
//!   for disks, halts, points, undo segments and failovers.
//! - [`drill`]: drills (a point's filesystems checked) and their results;
//! - [`point`]: recovery points; [`policy`]: retention policies;
//!   [`ranges`]: byte-range sets (a halt's pending ranges).
//! - [`error`]: the error type of the recovery state, used by the target's
//!   service code as well.
//!
//! The undo segments' bytes are `tidemark_formats::undo`; this crate holds
//! their index. Nothing here opens a socket or starts a thread.

pub mod drill;
pub mod error;
pub mod layout;
pub mod point;
pub mod policy;
pub mod ranges;
mod store;

pub use error::{Error, ErrorKind, Result};
pub use point::{format_time, Point, PointKind};
pub use store::*;
