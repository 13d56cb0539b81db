//! Plain configuration of a protected disk; the CLI fills it in.

use std::path::PathBuf;

pub use crate::ship::ShipConfig;
pub use tidemark_nbd::ListenAddr;
pub use tidemark_wire::DiskId;

/// The ublk front end's settings (`--ublk`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UblkOptions {
    /// Device number N of `/dev/ublkbN`; `None`: the one this state
    /// directory used last (to recover it), else the kernel picks.
    pub id: Option<u32>,
    /// Hardware queues (one server thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
}

impl Default for UblkOptions {
    fn default() -> Self {
        UblkOptions {
            id: None,
            queues: 1,
            depth: 64,
        }
    }
}

/// Everything `protect` needs.
#[derive(Clone, Debug)]
pub struct ProtectConfig {
    pub disk: PathBuf,
    pub state: PathBuf,
    /// Serve the disk over NBD here (with or without `ublk`).
    pub listen: Option<ListenAddr>,
    /// Serve the disk as a ublk block device (`/dev/ublkbN`).
    pub ublk: Option<UblkOptions>,
    /// Checked where it came in (the command line, a config file).
    pub disk_id: DiskId,
    /// Create a sparse file of this size if `disk` does not exist.
    pub create_size: Option<u64>,
    /// Journal cap; `None` means 10 % of the disk, at least 1 GiB.
    pub journal_cap: Option<u64>,
    /// Benchmarks only: consume journal records as soon as they are
    /// written, standing in for a collector, so segments recycle.
    pub bench_consume: bool,
    /// Ship the journal to this collector; `None`: journal only (no
    /// shipping, no sync).
    pub ship: Option<ShipConfig>,
}

/// The default journal cap for a disk of `size` bytes.
pub fn default_journal_cap(size: u64) -> u64 {
    (size / 10).max(1 << 30)
}

/// Segment size for a journal cap: 64 MiB, smaller for small caps so a
/// cap still spans several segments.
pub fn segment_size_for(cap: u64) -> u64 {
    (cap / 8).clamp(1 << 20, 64 << 20)
}
