//! Entry point for fuzzers: one whole server session over an in-memory pipe.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::{serve_connection, ExportInfo, MemBackend};

/// Feeds `data` to a server session as everything a client sends, then
/// closes the client's side. Must never panic and always returns (a time
/// limit guards against hangs, which the fuzzer would report as timeouts).
pub fn fuzz_session(data: &[u8]) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    let mut info = ExportInfo::new("fuzz", 1 << 20);
    info.max_payload = 64 << 10;
    let backend = Arc::new(MemBackend::with_info(info));
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(64 << 10);
        let session = serve_connection(server, backend, CancellationToken::new());
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let feed = async move {
            let _ = to_server.write_all(data).await;
            let _ = to_server.shutdown().await;
        };
        let drain = async move {
            let mut sink = vec![0u8; 64 << 10];
            while let Ok(n) = from_server.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            let _ = tokio::join!(session, feed, drain);
        })
        .await;
    });
}
