//! The NBD front end: the protected disk as an export of the
//! [`tidemark_nbd`] server. It translates NBD requests into the shim's own
//! calls and the shim's errors into NBD error replies (through the
//! `io::Error` each carries, so the errno is that of the failing step); it
//! owns nothing of the write path and never journals, orders or flushes by
//! itself.

use std::io;

use tidemark_nbd::{Backend, ExportInfo, Extent, ZeroFlags};

use crate::shim::{Shim, Zeroing};

/// The shim as an NBD export (cheap to clone).
#[derive(Clone, Debug)]
pub struct Export {
    shim: Shim,
}

impl Export {
    /// Serve `shim` over NBD.
    pub fn new(shim: Shim) -> Self {
        Self { shim }
    }
}

impl Backend for Export {
    fn info(&self) -> ExportInfo {
        let size = self.shim.size();
        let name = self.shim.inner().disk_id.to_string();
        ExportInfo {
            description: format!("tidemark protected disk {name}"),
            can_fast_zero: self.shim.zeroes_fast(),
            // A FLUSH syncs the whole journal and disk, so it covers every
            // completed write on every connection.
            multi_conn: true,
            min_block: if size.is_multiple_of(512) { 512 } else { 1 },
            ..ExportInfo::new(name, size)
        }
    }

    async fn read(&self, offset: u64, len: u32, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        buf.clear();
        buf.resize(len as usize, 0);
        self.shim.read(offset, &mut buf)?;
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        Ok(self.shim.write(offset, data, fua).await?)
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(self.shim.flush().await?)
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        Ok(self.shim.trim(offset, len, fua).await?)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        let how = Zeroing {
            fua: flags.fua,
            keep_allocated: flags.no_hole,
            fast_only: flags.fast_zero,
        };
        Ok(self.shim.write_zeroes(offset, len, how).await?)
    }

    async fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(u64::from(len)).min(self.shim.size());
        let runs = if offset < end {
            self.shim.allocation(offset, end - offset, 1024)?
        } else {
            None
        };
        let Some(runs) = runs else {
            return Ok(vec![Extent {
                length: len,
                hole: false,
                zero: false,
            }]);
        };
        let out = runs
            .into_iter()
            .map(|(l, hole)| Extent {
                length: u32::try_from(l).unwrap_or(u32::MAX),
                hole,
                zero: hole,
            })
            .collect();
        Ok(out)
    }
}
