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
    let _ = session(data);
}

/// Runs the session; returns how many bytes the server sent.
fn session(data: &[u8]) -> usize {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_time().build() else {
        return 0;
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
            let mut total = 0;
            while let Ok(n) = from_server.read(&mut sink).await {
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        };
        let run = async { tokio::join!(session, feed, drain).2 };
        tokio::time::timeout(Duration::from_secs(10), run).await.unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client prefix that gets through the handshake, so random bytes after
    /// it exercise the transmission phase.
    fn handshake_prefix() -> Vec<u8> {
        let mut s = 3u32.to_be_bytes().to_vec();
        for (opt, data) in [(8u32, vec![]), (7u32, vec![0, 0, 0, 0, 0, 0])] {
            s.extend_from_slice(&crate::proto::IHAVEOPT.to_be_bytes());
            s.extend_from_slice(&opt.to_be_bytes());
            s.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
            s.extend_from_slice(&data);
        }
        s
    }

    #[test]
    fn a_valid_session_gets_answers() {
        let greeting = 18;
        let mut data = handshake_prefix();
        // READ 4 KiB at 0, cookie 1.
        data.extend_from_slice(&crate::proto::REQUEST_MAGIC.to_be_bytes());
        data.extend_from_slice(&[0, 0, 0, 0]);
        data.extend_from_slice(&1u64.to_be_bytes());
        data.extend_from_slice(&0u64.to_be_bytes());
        data.extend_from_slice(&4096u32.to_be_bytes());
        let sent = session(&data);
        // Greeting, ACK (20), GO replies (INFO_EXPORT 32 + BLOCK_SIZE 34 + ACK 20), chunk 20 + 8 + 4096.
        assert_eq!(sent, greeting + 20 + 32 + 34 + 20 + 20 + 8 + 4096);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn sessions_never_panic(
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            prefixed in proptest::prelude::any::<bool>(),
        ) {
            let mut data = if prefixed { handshake_prefix() } else { Vec::new() };
            data.extend_from_slice(&tail);
            fuzz_session(&data);
        }
    }
}
