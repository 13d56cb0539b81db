//! Recovery points and point-in-time views of a target's disks: the API the
//! recovery tools (`tidemark points`, `mount`, `failover`) are built on
//! (`docs/recovery.md`).
//!
//! Works with or without a running target: while a daemon holds the data
//! directory (`target.lock` is locked), every call goes through its control
//! socket `DIR/control.sock`, so that the daemon pins what a view needs
//! before its expiry could remove it; otherwise the library opens the
//! directory itself and holds a shared lock on `target.lock` for as long
//! as a view is open, so that no daemon starts (and expires undo data)
//! under it.
//!
//! A [`View`] at point P reads, for each 4 KiB block, the undo entry with
//! the lowest capture seq above P, or the replica where there is none. It
//! never changes: undo captured while it is open is consulted too (an
//! overwrite after P is always captured, and marked in the catalog before
//! the replica is written), and each read checks the index, reads, and
//! checks the index again, so a concurrent apply cannot slip new replica
//! bytes into it.
//!
//! This crate never writes the replica or undo data. Modules: [`at`]
//! (`--at` forms and tag names), `access` (the daemon's control socket or
//! a shared lock; points, drain), [`view`] (views and the failover
//! record), [`overlay`] (a writable copy-on-write layer over a view), [`fuse`]
//! (layered images as files, for loop devices and filesystem checkers).

pub mod access;
/// The error type: the recovery state's (`tidemark_catalog::error`).
pub use tidemark_catalog::error;
pub use tidemark_catalog::error::{Error, ErrorKind, Result};
pub mod at;
pub mod fuse;
pub mod overlay;
pub mod view;

pub use access::{disk_state, drain, drill, drills, newest_points_direct, points, points_direct, resolve, Drained};
pub use at::{describe, parse_rfc3339, select, tag_name_problem, AtSpec, AT_FORMS};
pub use tidemark_catalog::layout::CONTROL_SOCKET;
pub use tidemark_catalog::{format_time, Point, PointKind};
pub use view::View;
