//! Benchmarks only: a stand-in for the shipper that reads (and verifies)
//! every journal record as soon as it is written and lets the journal
//! recycle segments, so benchmarks see the steady-state write path
//! (segments overwritten, not allocated). Never enable it on a disk that is
//! to be replicated: consumed records are gone.

use std::time::Duration;

use tidemark_formats::journal::{Journal, JournalReader};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::shim::Shim;

/// Run until `stop` is cancelled, on a thread of its own.
pub fn spawn(shim: Shim, stop: CancellationToken) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (dir, from) = {
            let core = shim.core();
            (core.journal.config().dir.clone(), core.journal.consumed_seq() + 1)
        };
        let reader = match JournalReader::open(&dir) {
            Ok(r) => r,
            Err(e) => {
                warn!("bench consumer: {e}");
                return;
            }
        };
        let mut it = reader.records_from(from);
        let mut consumed_total = 0u64;
        while !stop.is_cancelled() {
            let mut n = 0;
            for r in it.by_ref() {
                match r {
                    Ok(_) => n += 1,
                    Err(e) => {
                        warn!("bench consumer: {e}");
                        break;
                    }
                }
                if n >= 4096 {
                    break;
                }
            }
            consumed_total += n;
            let upto = (it.next_seq().saturating_sub(1)).min(shim.applied_watermark());
            let recyclable = shim.core().journal.recyclable(upto);
            if recyclable {
                if let Err(e) = Journal::persist_consumed(&dir, upto).and_then(|_| shim.core().journal.recycle(upto)) {
                    warn!("bench consumer: {e}");
                }
            }
            if n == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        info!(records = consumed_total, "bench consumer stopped");
    })
}
