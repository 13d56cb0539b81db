//! Benchmarks only: a stand-in for the shipper that consumes journal
//! records as soon as their disk writes have completed, so the journal
//! recycles segments and benchmarks see the steady-state write path
//! (preallocated segments overwritten, not allocated). It does not read the
//! records: what a real shipper costs belongs to the replication benchmarks.
//! Never enable it on a disk that is to be replicated: consumed records are
//! gone. `protect` (and the command line) refuse it together with a
//! collector.

use std::time::Duration;

use tidemark_formats::journal::Journal;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::shim::Shim;

/// Run until `stop` is cancelled, on a thread of its own.
pub fn spawn(shim: Shim, stop: CancellationToken) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let dir = shim.core().journal.config().dir.clone();
        let mut consumed = 0;
        while !stop.is_cancelled() {
            let upto = shim.applied_watermark();
            if shim.core().journal.recyclable(upto) {
                match Journal::persist_consumed(&dir, upto).and_then(|_| shim.core().journal.recycle(upto)) {
                    Ok(()) => {
                        consumed = upto;
                        shim.maybe_exit_bitmap_mode();
                    }
                    Err(e) => warn!("bench consumer: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        info!(consumed_seq = consumed, "bench consumer stopped");
    })
}
