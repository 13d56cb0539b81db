//! Where things are in a target's data directory.
//!
//! ```text
//!  DIR/
//!    TIDEMARK-DIR      marker: this is a target data directory (libs/util `owned`)
//!    target.lock       flock: exclusive for the daemon, shared for a tool reading directly
//!    control.sock      the daemon's control socket (JSON lines, docs/recovery.md)
//!    catalog.db        the SQLite catalog (this crate)
//!    <disk id>/
//!      replica.raw | replica.vmdk (+ replica-flat.vmdk)   the replica (libs/formats `replica`)
//!      window.blocks   the dedup window
//!      undo/<n>.undo   undo segments (libs/formats `undo`)
//! ```

use std::path::{Path, PathBuf};

pub use tidemark_formats::undo::UNDO_DIR;

/// Name of the lock file that keeps two targets off one data directory
/// (the recovery tools take it too, shared, while they read it directly).
pub const LOCK_FILE: &str = "target.lock";

/// The control socket's file name inside the data directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// The folder of `disk_id` (already validated as 1-64 of `[A-Za-z0-9._-]`,
/// not `.` or `..`, by the frame decoder or the command line).
pub fn disk_dir(data_dir: &Path, disk_id: &str) -> PathBuf {
    data_dir.join(disk_id)
}

/// The folder of `disk_id`'s undo segments.
pub fn undo_dir(data_dir: &Path, disk_id: &str) -> PathBuf {
    disk_dir(data_dir, disk_id).join(UNDO_DIR)
}
