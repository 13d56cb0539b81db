//! The NBD protocol server used by the agent shim and, later, by point-in-time
//! views and drills.
//!
//! This crate owns the wire protocol (fixed newstyle handshake, options,
//! simple and structured replies, the transmission phase) and nothing else:
//! what a READ or WRITE *means* is the [`Backend`]'s business. It must never
//! acknowledge a request before the backend said it completed, and never
//! panic on bytes that came from a client.
//!
//! ```text
//!  Listener ──accept──▶ connection task (one per client)
//!                        handshake (handshake.rs): options → Params
//!                        transmission (transmission.rs): reader → backend → replies
//! ```
//!
//! Entry points: [`parse_listen`] + [`bind`] + [`serve`] for a listening
//! server, [`serve_connection`] for any byte stream. [`FileBackend`] and
//! [`MemBackend`] are ready-made backends (a plain file; memory, for tests).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

mod error;
mod file;
mod fuzz;
mod handshake;
mod listen;
mod mem;
mod proto;
mod transmission;

pub use error::Error;
pub use file::FileBackend;
#[doc(hidden)]
pub use fuzz::fuzz_session;
pub use listen::{bind, parse_listen, ListenAddr, Listener};
pub use mem::MemBackend;

/// Size of the per-connection read buffer: at queue depth 16 a burst of 4 KiB
/// writes (headers and payloads) arrives in one read syscall.
const READ_BUFFER: usize = 128 << 10;

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
///
/// How the server calls it: requests of one connection run concurrently
/// (up to 128 in flight), all polled by that connection's task. Calls are
/// *started* (first polled) in the order the requests arrived on the
/// connection, so work a method does before its first `.await` (taking a
/// sequence number, say) happens in request order. A call, once started,
/// is always driven to completion, even if the client disconnects. Work
/// done inline blocks that connection (not the others): keep it to
/// microseconds and move anything slow to a thread.
pub trait Backend: Send + Sync + 'static {
    /// What this export offers; called once per handshake.
    fn info(&self) -> ExportInfo;

    /// Read `len` bytes at `offset`. `buf` is an empty buffer with at least
    /// `len` capacity that the backend fills and returns (so buffers are reused).
    fn read(&self, offset: u64, len: u32, buf: Vec<u8>) -> impl Future<Output = io::Result<Vec<u8>>> + Send;

    /// Write `data` at `offset`; with `fua`, durable before returning.
    /// The backend takes the buffer (it may journal and write the same bytes).
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> impl Future<Output = io::Result<()>> + Send;

    /// Make every write that completed before this call (on any connection) durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Discard a range; afterwards it must read as zeros.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = io::Result<()>> + Send;

    /// Zero a range.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> impl Future<Output = io::Result<()>> + Send;

    /// Prefetch hint; the default does nothing.
    fn cache(&self, _offset: u64, _len: u64) -> impl Future<Output = io::Result<()>> + Send {
        async { Ok(()) }
    }

    /// `base:allocation` extents covering at least the first byte of
    /// `[offset, offset+len)`, in order, not beyond it. The default reports one
    /// allocated, non-zero extent.
    fn block_status(&self, _offset: u64, len: u32) -> impl Future<Output = io::Result<Vec<Extent>>> + Send {
        async move {
            Ok(vec![Extent {
                length: len,
                hole: false,
                zero: false,
            }])
        }
    }
}

impl ExportInfo {
    /// An export of `size` bytes with every feature on, minimum block 1,
    /// preferred block 4096 and a 32 MiB maximum payload.
    pub fn new(name: impl Into<String>, size: u64) -> Self {
        ExportInfo {
            name: name.into(),
            description: String::new(),
            size,
            read_only: false,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_zero: true,
            can_fast_zero: true,
            can_cache: true,
            multi_conn: false,
            min_block: 1,
            preferred_block: 4096,
            max_payload: 32 << 20,
        }
    }
}

/// Most clients served at once; more are closed at accept (logged at a
/// bounded rate).
pub const MAX_CONNECTIONS: usize = 64;

/// The whole handshake (options included) must end within this; a client
/// that connects and stalls holds nothing longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections on `listener` and serves `backend` to each, until
/// `shutdown` is cancelled. Then it stops accepting; every connection stops
/// reading new requests, completes and answers the ones in flight, and
/// closes. Returns once every connection has finished, so the caller can
/// make the backend durable and exit.
///
/// Errors of single connections are logged, not returned. A client that
/// stalls mid-message or stops reading replies gets 5 s after `shutdown`
/// before its connection is dropped. Needs a tokio runtime with the time
/// driver enabled.
pub async fn serve<B: Backend>(listener: Listener, backend: Arc<B>, shutdown: CancellationToken) -> io::Result<()> {
    let mut conns = JoinSet::new();
    let refused = tidemark_util::ratelog::RateLimitedLog::default();
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(res) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = res {
                    warn!("connection task failed: {e}");
                }
                continue;
            }
            acc = accept(&listener) => acc,
        };
        match accepted {
            Ok(stream) if conns.len() >= MAX_CONNECTIONS => {
                refused.warn(format_args!(
                    "closed a connection from {}: {MAX_CONNECTIONS} clients are connected already",
                    stream.peer()
                ));
                drop(stream);
            }
            Ok(stream) => {
                next_id += 1;
                let span = tracing::debug_span!("nbd", conn = next_id, peer = %stream.peer());
                let (backend, shutdown) = (Arc::clone(&backend), shutdown.clone());
                conns.spawn(
                    async move {
                        debug!("connection opened");
                        let result = match stream {
                            Accepted::Unix(s, _) => {
                                let (r, w) = s.into_split();
                                run_connection(r, w, backend, shutdown).await
                            }
                            Accepted::Tcp(s, _) => {
                                let (r, w) = s.into_split();
                                run_connection(r, w, backend, shutdown).await
                            }
                        };
                        log_end(&result);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the
                // listener itself stays usable.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    info!(
        connections = conns.len(),
        "stopped accepting; waiting for connections to finish"
    );
    while let Some(res) = conns.join_next().await {
        if let Err(e) = res {
            warn!("connection task failed: {e}");
        }
    }
    Ok(())
}

/// Serves `backend` over one already-connected stream (unix, TCP, an
/// in-memory duplex, ...), from the handshake to the close. On `shutdown`
/// it stops reading requests, answers those in flight and returns.
///
/// `Ok` means the client ended the session cleanly (NBD_OPT_ABORT,
/// NBD_CMD_DISC, or closing the connection between requests).
pub async fn serve_connection<B, S>(stream: S, backend: Arc<B>, shutdown: CancellationToken) -> Result<(), Error>
where
    B: Backend,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (r, w) = tokio::io::split(stream);
    run_connection(r, w, backend, shutdown).await
}

async fn run_connection<B, R, W>(r: R, mut w: W, backend: Arc<B>, shutdown: CancellationToken) -> Result<(), Error>
where
    B: Backend,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mut r = BufReader::with_capacity(READ_BUFFER, r);
    let info = backend.info();
    let negotiation = handshake::negotiate(&mut r, &mut w, &info, &shutdown);
    let negotiation = async {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiation)
            .await
            .map_err(|_| Error::Protocol {
                reason: format!("the handshake did not end within {} s", HANDSHAKE_TIMEOUT.as_secs()),
            })?
    };
    let Some(params) = transmission::within_grace(&shutdown, "negotiating", negotiation).await? else {
        return Ok(());
    };
    debug!(
        structured = params.structured,
        block_status = params.meta_context.is_some(),
        "entering transmission phase"
    );
    transmission::run(&*backend, r, w, params, shutdown).await
}

fn log_end(result: &Result<(), Error>) {
    match result {
        Ok(()) => debug!("connection closed"),
        Err(e @ Error::Protocol { .. }) => warn!("dropped client: {e}"),
        Err(e) => debug!("connection closed: {e}"),
    }
}

enum Accepted {
    Unix(tokio::net::UnixStream, String),
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
}

impl Accepted {
    fn peer(&self) -> String {
        match self {
            Accepted::Unix(_, p) => p.clone(),
            Accepted::Tcp(_, a) => a.to_string(),
        }
    }
}

async fn accept(l: &Listener) -> io::Result<Accepted> {
    match l {
        Listener::Unix(l) => {
            let (s, a) = l.accept().await?;
            let peer = a
                .as_pathname()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "unix".to_string());
            Ok(Accepted::Unix(s, peer))
        }
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            // Replies are small and latency-bound; never let Nagle hold them.
            s.set_nodelay(true)?;
            Ok(Accepted::Tcp(s, a))
        }
    }
}
