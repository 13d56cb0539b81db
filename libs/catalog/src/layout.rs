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

use tidemark_util::owned::{DirKind, DirSpec};

pub use tidemark_formats::undo::UNDO_DIR;

/// Name of the lock file that keeps two targets off one data directory
/// (the recovery tools take it too, shared, while they read it directly).
pub const LOCK_FILE: &str = "target.lock";

/// The control socket's file name inside the data directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// What the target keeps in its data directory, so that one made before
/// markers existed is recognised (and anything else refused).
pub const DIR_SPEC: DirSpec = DirSpec {
    kind: DirKind::TargetData,
    own_names: &[
        crate::store::CATALOG_FILE,
        "catalog.db-wal",
        "catalog.db-shm",
        "catalog.db-journal",
        CONTROL_SOCKET,
    ],
    any_subdir: true,
    adopt_if_any: &[LOCK_FILE],
    busy_hint: ", or a recovery tool (tidemark mount / failover) has it open",
};

/// The folder of `disk_id` (already validated as 1-64 of `[A-Za-z0-9._-]`,
/// not `.` or `..`, by the frame decoder or the command line).
pub fn disk_dir(data_dir: &Path, disk_id: &str) -> PathBuf {
    data_dir.join(disk_id)
}

/// The folder of `disk_id`'s undo segments.
pub fn undo_dir(data_dir: &Path, disk_id: &str) -> PathBuf {
    disk_dir(data_dir, disk_id).join(UNDO_DIR)
}
