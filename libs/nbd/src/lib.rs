//! The NBD protocol server used by the agent shim and, later, by point-in-time
//! views and drills.
//!
//! This crate owns the wire protocol (fixed newstyle handshake, options,
//! simple and structured replies, the transmission phase) and nothing else:
//! what a READ or WRITE *means* is the [`Backend`]'s business. It must never
//! acknowledge a request before the backend said it completed, and never
//! panic on bytes that came from a client.

use std::future::Future;
use std::io;

/// What an export offers; sent to clients in NBD_INFO_EXPORT / NBD_INFO_BLOCK_SIZE.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    /// Export name announced by NBD_OPT_LIST. The server also accepts the
    /// empty name (the default export) for this export.
    pub name: String,
    /// Free-text description (NBD_INFO_DESCRIPTION), may be empty.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    pub read_only: bool,
    pub can_flush: bool,
    pub can_fua: bool,
    pub can_trim: bool,
    pub can_zero: bool,
    pub can_fast_zero: bool,
    pub can_cache: bool,
    /// Advertise NBD_FLAG_CAN_MULTI_CONN. Only set this if a FLUSH on one
    /// connection makes every completed write on every connection durable.
    pub multi_conn: bool,
    /// Minimum block size (1 or 512).
    pub min_block: u32,
    /// Preferred block size (4096).
    pub preferred_block: u32,
    /// Maximum payload of READ and WRITE (32 MiB). TRIM and WRITE_ZEROES are
    /// not limited by it.
    pub max_payload: u32,
}

/// Flags of a WRITE_ZEROES request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    pub fua: bool,
    /// NBD_CMD_FLAG_NO_HOLE: the range must stay allocated.
    pub no_hole: bool,
    /// NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than zeroing slowly.
    pub fast_zero: bool,
}

/// One extent of a `base:allocation` block-status reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    /// NBD_STATE_HOLE (bit 0).
    pub hole: bool,
    /// NBD_STATE_ZERO (bit 1).
    pub zero: bool,
}

/// The storage behind an export.
///
/// All offsets and lengths are validated by the server against
/// [`ExportInfo::size`] and `max_payload` before a method is called.
/// Errors are `io::Error`s; the server maps their OS error code to the NBD
/// error reply (ENOSPC, EINVAL, ENOTSUP/EOPNOTSUPP, EPERM/EROFS, EOVERFLOW,
/// anything else EIO).
pub trait Backend: Send + Sync + 'static {
    /// What this export offers; called once per handshake.
    fn info(&self) -> ExportInfo;

    /// Read `len` bytes at `offset`. `buf` is an empty buffer with at least
    /// `len` capacity that the backend fills and returns (so buffers are reused).
    fn read(
        &self,
        offset: u64,
        len: u32,
        buf: Vec<u8>,
    ) -> impl Future<Output = io::Result<Vec<u8>>> + Send;

    /// Write `data` at `offset`; with `fua`, durable before returning.
    /// The backend takes the buffer (it may journal and write the same bytes).
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Make every write that completed before this call (on any connection) durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Discard a range; afterwards it must read as zeros.
    fn trim(&self, offset: u64, len: u64, fua: bool)
        -> impl Future<Output = io::Result<()>> + Send;

    /// Zero a range.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Prefetch hint; the default does nothing.
    fn cache(&self, _offset: u64, _len: u64) -> impl Future<Output = io::Result<()>> + Send {
        async { Ok(()) }
    }

    /// `base:allocation` extents covering at least the first byte of
    /// `[offset, offset+len)`, in order, not beyond it. The default reports one
    /// allocated, non-zero extent.
    fn block_status(
        &self,
        _offset: u64,
        len: u32,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send {
        async move {
            Ok(vec![Extent {
                length: len,
                hole: false,
                zero: false,
            }])
        }
    }
}
