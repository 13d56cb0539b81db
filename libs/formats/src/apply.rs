//! Applying change records to a raw disk image or block device: used by the
//! agent to re-apply its journal after an unclean stop, by `tidemark journal
//! replay`, and later by the target for raw replicas.
//!
//! Zero and Trim leave the range reading zeros (a punched hole in a file, a
//! zero-out on a block device), exactly as the shim did on the source.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tidemark_util::fileops::{self, BackingKind};
use tidemark_wire::record::{RecordHeader, RecordKind};

use crate::error::{Error, ErrorKind, IoContext, Result};

/// Apply one verified record to `f` (of `size` bytes), restricted to the
/// parts of its range for which `keep(offset, len)` returns the sub-ranges
/// to write (pass [`whole`] to write everything).
pub fn apply_record(
    f: &File,
    path: &Path,
    kind: BackingKind,
    size: u64,
    h: &RecordHeader,
    payload: &[u8],
    keep: impl Fn(u64, u64) -> Vec<(u64, u64)>,
) -> Result<()> {
    if h.length > 0 && h.offset.checked_add(h.length).is_none_or(|end| end > size) {
        return Err(Error::new(
            ErrorKind::OutOfBounds,
            format!(
                "seq {}: range {}+{} is beyond the {size}-byte disk {}",
                h.seq,
                h.offset,
                h.length,
                path.display()
            ),
        ));
    }
    match h.kind {
        RecordKind::Write | RecordKind::Sync => {
            for (o, l) in keep(h.offset, h.length) {
                let s = usize::try_from(o - h.offset).unwrap_or(0);
                let e = s + usize::try_from(l).unwrap_or(0);
                f.write_all_at(&payload[s..e], o)
                    .ctx(&format!("apply seq {} to", h.seq), path)?;
            }
        }
        RecordKind::Zero | RecordKind::Trim => {
            for (o, l) in keep(h.offset, h.length) {
                fileops::discard_zeroing(f, kind, o, l).ctx(&format!("apply seq {} to", h.seq), path)?;
            }
        }
        RecordKind::Flush | RecordKind::Tag | RecordKind::SyncDone | RecordKind::SyncBegin => {}
    }
    Ok(())
}

/// The `keep` filter that writes a record's whole range.
pub fn whole(offset: u64, len: u64) -> Vec<(u64, u64)> {
    vec![(offset, len)]
}
