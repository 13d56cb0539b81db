//! The transmission phase of one connection: read requests, run them on the
//! backend concurrently, send replies (possibly out of order).
//!
//! Two futures share the connection's task:
//!
//! ```text
//!  socket ──▶ reader ──(request + payload + budget permit)──▶ processor ──▶ socket
//!             header, payload read          validate, run on backend,
//!             once into the Vec the         encode replies; everything
//!             backend receives              ready goes out in one write
//! ```
//!
//! The reader owns flow control: it takes a permit from a per-connection
//! budget (request count and payload bytes) before it reads a payload, so a
//! client can never make us hold more than [`BUDGET_KIB`] of requests.
//! The processor never drops a backend future once started: even if the
//! client goes away, every request that reached the backend runs to the end.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::proto::*;
use crate::{Backend, Error};

/// Budget of one connection, in KiB of request payload.
const BUDGET_KIB: u32 = 128 << 10;
/// Every request costs at least this much, which bounds the number of
/// requests in flight to BUDGET_KIB / SLOT_KIB = 128.
const SLOT_KIB: u32 = 1 << 10;
/// An oversized WRITE payload up to this size is read and thrown away so the
/// connection can go on with an error reply; anything larger ends the
/// connection (the spec allows a server to treat it as denial of service).
const MAX_SKIP: u32 = 64 << 20;
/// READ data up to this size is copied next to the reply headers so that
/// several replies go out in one write; larger data is sent from its own
/// buffer with a vectored write.
const COPY_MAX: usize = 16 << 10;
/// Read buffers kept for reuse, and the largest one worth keeping.
const POOL_MAX: usize = 32;
const POOL_BUF_MAX: usize = 1 << 20;
/// How long a shutdown waits for a stalled client to finish sending a
/// message or to read its replies.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Backend errors logged at WARN per connection; the rest go to DEBUG and
/// are counted in a summary when the connection closes.
const WARN_LIMIT: u64 = 8;

/// A request the reader handed over: header, WRITE payload, budget permit.
struct Incoming {
    req: Request,
    payload: Option<Vec<u8>>,
    permit: OwnedSemaphorePermit,
}

/// A finished backend call, ready to be encoded.
struct Done {
    cookie: u64,
    outcome: Outcome,
    _permit: OwnedSemaphorePermit,
}

enum Outcome {
    Ok,
    Read { offset: u64, data: Vec<u8> },
    Extents(Vec<(u32, u32)>),
    Failed { errno: u32, msg: String },
}

/// Runs the transmission phase until the client disconnects (NBD_CMD_DISC or
/// EOF), breaks the protocol, or `shutdown` is cancelled; in every case the
/// requests already read are completed and answered first.
pub(crate) async fn run<B, R, W>(
    backend: &B,
    mut reader: R,
    writer: W,
    params: Params,
    shutdown: CancellationToken,
) -> Result<(), Error>
where
    B: Backend,
    R: AsyncBufRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Semaphore::new(BUDGET_KIB as usize));
    // Stops the reader between requests: on shutdown, or when replies can no
    // longer be written.
    let stop = shutdown.child_token();
    let reading = read_requests(&mut reader, tx, params.max_payload, budget, &stop);
    let processing = process(backend, rx, writer, &params, &stop);
    let (read_result, process_result) = tokio::join!(reading, processing);
    // The reader's error says why the connection ended; a write error after
    // the client vanished is just a consequence.
    read_result.and(process_result)
}

async fn read_requests<R>(
    r: &mut R,
    tx: mpsc::UnboundedSender<Incoming>,
    max_payload: u32,
    budget: Arc<Semaphore>,
    stop: &CancellationToken,
) -> Result<(), Error>
where
    R: AsyncBufRead + Unpin,
{
    let mut hdr = [0u8; REQUEST_LEN];
    loop {
        // Between requests is the only place where stopping is clean. Data
        // already buffered is checked first: registering with the token on
        // every request would cost a lock.
        if stop.is_cancelled() {
            return Ok(());
        }
        let more = tokio::select! {
            biased;
            res = r.fill_buf() => !res.map_err(|e| Error::io("waiting for a request", e))?.is_empty(),
            _ = stop.cancelled() => false,
        };
        if !more {
            return Ok(());
        }
        within_grace(stop, "reading a request header", async {
            r.read_exact(&mut hdr)
                .await
                .map_err(|e| Error::io("reading a request header", e))
        })
        .await?;
        let req = parse_request(&hdr).map_err(|m| Error::protocol(format!("bad request magic {m:#010x}")))?;
        if req.typ == CMD_DISC {
            debug!("client sent NBD_CMD_DISC");
            return Ok(());
        }
        let carries_data = matches!(req.typ, CMD_READ | CMD_WRITE) && req.len <= max_payload;
        let cost = if carries_data {
            req.len.div_ceil(1024).max(SLOT_KIB)
        } else {
            SLOT_KIB
        };
        let Ok(permit) = budget.clone().acquire_many_owned(cost.min(BUDGET_KIB)).await else {
            return Ok(()); // never closed; nothing sensible to do if it were
        };
        let mut payload = None;
        let mut fatal = None;
        if req.typ == CMD_WRITE {
            if req.len <= max_payload {
                let len = req.len as usize;
                payload = Some(within_grace(stop, "reading a write payload", read_payload(r, len)).await?);
            } else if req.len <= MAX_SKIP {
                let during = "skipping an oversized write payload";
                let mut rest = (&mut *r).take(u64::from(req.len));
                let n = within_grace(stop, during, async {
                    tokio::io::copy_buf(&mut rest, &mut tokio::io::sink())
                        .await
                        .map_err(|e| Error::io(during, e))
                })
                .await?;
                if n != u64::from(req.len) {
                    return Err(Error::Disconnected { during });
                }
            } else {
                // Answer it (EINVAL), then hang up: we will not read 4 GiB to find the next header.
                fatal = Some(Error::protocol(format!(
                    "write of {} bytes exceeds the maximum payload and is too large to skip",
                    req.len
                )));
            }
        }
        if tx.send(Incoming { req, payload, permit }).is_err() {
            return Ok(());
        }
        if let Some(e) = fatal {
            return Err(e);
        }
    }
}

/// Runs one socket operation, but gives up [`SHUTDOWN_GRACE`] after `token`
/// was cancelled: a client that stalls mid-message (or stops reading
/// replies) must not hold up a shutdown forever.
pub(crate) async fn within_grace<T>(
    token: &CancellationToken,
    during: &'static str,
    op: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::select! {
        biased;
        r = op => r,
        _ = grace_expired(token) => Err(Error::Io {
            during,
            source: io::Error::new(io::ErrorKind::TimedOut, "shutdown grace period expired"),
        }),
    }
}

pub(crate) async fn grace_expired(token: &CancellationToken) {
    token.cancelled().await;
    tokio::time::sleep(SHUTDOWN_GRACE).await;
}

/// Reads a WRITE payload into the one buffer the backend will own, without
/// zeroing it first. Large payloads bypass the read buffer and land in it
/// directly; small ones are copied out of the read buffer (cheaper than a
/// syscall per request).
async fn read_payload<R: AsyncBufRead + Unpin>(r: &mut R, len: usize) -> Result<Vec<u8>, Error> {
    let mut data = Vec::with_capacity(len);
    let mut rest = (&mut *r).take(len as u64);
    while data.len() < len {
        let n = rest
            .read_buf(&mut data)
            .await
            .map_err(|e| Error::io("reading a write payload", e))?;
        if n == 0 {
            return Err(Error::Disconnected {
                during: "reading a write payload",
            });
        }
    }
    Ok(data)
}

async fn process<B, W>(
    backend: &B,
    mut rx: mpsc::UnboundedReceiver<Incoming>,
    writer: W,
    p: &Params,
    stop: &CancellationToken,
) -> Result<(), Error>
where
    B: Backend,
    W: AsyncWrite + Unpin,
{
    let mut inflight = FuturesUnordered::new();
    let mut out = Responder::new(writer, p, stop.clone());
    let mut rx_open = true;
    while rx_open || !inflight.is_empty() {
        tokio::select! {
            biased;
            Some(done) = inflight.next(), if !inflight.is_empty() => out.encode(done),
            msg = rx.recv(), if rx_open => match msg {
                Some(inc) => {
                    if let Some(fut) = start(backend, inc, p, &mut out) {
                        inflight.push(fut);
                    }
                }
                None => rx_open = false,
            },
        }
        // Take everything else that is ready right now, so that the replies
        // go out together in one write.
        loop {
            let mut progressed = false;
            while rx_open {
                match rx.try_recv() {
                    Ok(inc) => {
                        if let Some(fut) = start(backend, inc, p, &mut out) {
                            inflight.push(fut);
                        }
                        progressed = true;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => rx_open = false,
                }
            }
            while let Some(Some(done)) = inflight.next().now_or_never() {
                out.encode(done);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        if out.flush().await.is_err() {
            // The client is gone: stop reading, but let the backend finish.
            stop.cancel();
        }
    }
    out.finish().await
}

/// Validates one request; answers it on the spot if it is invalid or needs
/// no backend call, else returns the future that runs it.
fn start<'a, B: Backend, W: AsyncWrite + Unpin>(
    backend: &'a B,
    inc: Incoming,
    p: &Params,
    out: &mut Responder<W>,
) -> Option<impl std::future::Future<Output = Done> + Send + 'a> {
    let Incoming { req, payload, permit } = inc;
    let op = match validate(&req, p) {
        Ok(op) => op,
        Err(rej) => {
            debug!(
                cookie = req.cookie,
                command = req.typ,
                offset = req.offset,
                len = req.len,
                "rejected: {}",
                rej.msg
            );
            put_error(&mut out.buf, p.structured, req.cookie, rej.errno, rej.msg);
            return None;
        }
    };
    match op {
        Op::Nothing => {
            put_ok(&mut out.buf, req.cookie);
            None
        }
        Op::EmptyRead => {
            put_empty_read(&mut out.buf, p.structured, req.cookie);
            None
        }
        op => {
            let buf = match op {
                Op::Read { len, .. } => out.take_buffer(len as usize),
                _ => Vec::new(),
            };
            Some(execute(backend, op, payload, buf, req.cookie, permit))
        }
    }
}

async fn execute<B: Backend>(
    backend: &B,
    op: Op,
    payload: Option<Vec<u8>>,
    buf: Vec<u8>,
    cookie: u64,
    permit: OwnedSemaphorePermit,
) -> Done {
    let failed = |e: io::Error| Outcome::Failed {
        errno: errno_of(&e),
        msg: e.to_string(),
    };
    let outcome = match op {
        Op::Read { offset, len } => match backend.read(offset, len, buf).await {
            Ok(data) if data.len() == len as usize => Outcome::Read { offset, data },
            Ok(data) => Outcome::Failed {
                errno: NBD_EIO,
                msg: format!("backend returned {} bytes for a read of {len}", data.len()),
            },
            Err(e) => failed(e),
        },
        Op::Write { offset, len, fua } => match payload {
            Some(data) if data.len() == len as usize => match backend.write(offset, data, fua).await {
                Ok(()) => Outcome::Ok,
                Err(e) => failed(e),
            },
            _ => failed(io::Error::other("write payload missing")),
        },
        Op::Flush => unit(backend.flush().await, failed),
        Op::Trim { offset, len, fua } => unit(backend.trim(offset, u64::from(len), fua).await, failed),
        Op::Cache { offset, len } => unit(backend.cache(offset, u64::from(len)).await, failed),
        Op::WriteZeroes { offset, len, flags } => {
            unit(backend.write_zeroes(offset, u64::from(len), flags).await, failed)
        }
        Op::BlockStatus { offset, len, req_one } => match backend.block_status(offset, len).await {
            Ok(raw) => {
                let extents = sanitize_extents(&raw, len, req_one);
                if extents.is_empty() {
                    failed(io::Error::other("backend returned no usable extents"))
                } else {
                    Outcome::Extents(extents)
                }
            }
            Err(e) => failed(e),
        },
        Op::Nothing | Op::EmptyRead => Outcome::Ok,
    };
    Done {
        cookie,
        outcome,
        _permit: permit,
    }
}

fn unit(r: io::Result<()>, failed: impl Fn(io::Error) -> Outcome) -> Outcome {
    match r {
        Ok(()) => Outcome::Ok,
        Err(e) => failed(e),
    }
}

/// Encodes replies into one buffer and writes it out in as few syscalls as
/// possible; keeps READ buffers for reuse.
struct Responder<W> {
    w: W,
    buf: Vec<u8>,
    /// Large READ data to send after `buf[..pos]`.
    big: Vec<(usize, Vec<u8>)>,
    pool: Vec<Vec<u8>>,
    structured: bool,
    context: u32,
    /// Cancelled on shutdown (and when writing fails): bounds how long a
    /// write may wait for a client that does not read.
    stop: CancellationToken,
    /// Set once a write failed; afterwards replies are discarded.
    broken: Option<io::Error>,
    backend_errors: u64,
}

impl<W: AsyncWrite + Unpin> Responder<W> {
    fn new(w: W, p: &Params, stop: CancellationToken) -> Self {
        Responder {
            stop,
            w,
            buf: Vec::with_capacity(64 << 10),
            big: Vec::new(),
            pool: Vec::new(),
            structured: p.structured,
            context: p.meta_context.unwrap_or(0),
            broken: None,
            backend_errors: 0,
        }
    }

    fn take_buffer(&mut self, len: usize) -> Vec<u8> {
        match self.pool.pop() {
            Some(b) if b.capacity() >= len => b,
            _ => Vec::with_capacity(len),
        }
    }

    fn recycle(&mut self, mut b: Vec<u8>) {
        if self.pool.len() < POOL_MAX && b.capacity() <= POOL_BUF_MAX {
            b.clear();
            self.pool.push(b);
        }
    }

    fn encode(&mut self, done: Done) {
        let cookie = done.cookie;
        match done.outcome {
            Outcome::Ok => put_ok(&mut self.buf, cookie),
            Outcome::Read { offset, data } => {
                put_read_header(&mut self.buf, self.structured, cookie, offset, len_u32(data.len()));
                if data.len() <= COPY_MAX {
                    self.buf.extend_from_slice(&data);
                    self.recycle(data);
                } else {
                    self.big.push((self.buf.len(), data));
                }
            }
            Outcome::Extents(extents) => put_block_status(&mut self.buf, cookie, self.context, &extents),
            Outcome::Failed { errno, msg } => {
                self.backend_errors += 1;
                if self.backend_errors <= WARN_LIMIT {
                    warn!(cookie, errno, "backend error: {msg}");
                } else {
                    debug!(cookie, errno, "backend error: {msg}");
                }
                // Without structured replies a failed READ is a bare simple
                // reply with the error set and no data, as the spec requires.
                put_error(&mut self.buf, self.structured, cookie, errno, &msg);
            }
        }
    }

    /// Writes everything encoded so far.
    async fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() && self.big.is_empty() {
            return Ok(());
        }
        let result = if self.broken.is_some() {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        } else {
            let stop = self.stop.clone();
            let write = async { self.write_out().await.map_err(|e| Error::io("writing replies", e)) };
            match within_grace(&stop, "writing replies", write).await {
                Ok(()) => Ok(()),
                Err(Error::Io { source, .. }) => Err(source),
                Err(e) => Err(io::Error::other(e.to_string())),
            }
        };
        self.buf.clear();
        let big = std::mem::take(&mut self.big);
        for (_, data) in big {
            self.recycle(data);
        }
        if let Err(e) = &result {
            if self.broken.is_none() {
                debug!("cannot send replies: {e}");
                self.broken = Some(io::Error::new(e.kind(), e.to_string()));
            }
        }
        result
    }

    async fn write_out(&mut self) -> io::Result<()> {
        if self.big.is_empty() {
            return self.w.write_all(&self.buf).await;
        }
        let mut segs: Vec<&[u8]> = Vec::with_capacity(self.big.len() * 2 + 1);
        let mut at = 0;
        for (pos, data) in &self.big {
            segs.push(&self.buf[at..*pos]);
            segs.push(data);
            at = *pos;
        }
        segs.push(&self.buf[at..]);
        write_segments(&mut self.w, &segs).await
    }

    async fn finish(mut self) -> Result<(), Error> {
        let _ = self.flush().await;
        if self.backend_errors > WARN_LIMIT {
            warn!(
                "{} backend errors on this connection ({} not logged at WARN)",
                self.backend_errors,
                self.backend_errors - WARN_LIMIT
            );
        }
        if let Some(e) = self.broken.take() {
            return Err(Error::io("writing replies", e));
        }
        // Half-close so the client sees EOF after the last reply.
        let stop = self.stop.clone();
        let w = &mut self.w;
        let _ = within_grace(&stop, "closing", async {
            let _ = w.flush().await;
            let _ = w.shutdown().await;
            Ok(())
        })
        .await;
        Ok(())
    }
}

/// write_all for a list of buffers, with vectored writes.
async fn write_segments<W: AsyncWrite + Unpin>(w: &mut W, segs: &[&[u8]]) -> io::Result<()> {
    const MAX_IOV: usize = 64;
    let (mut idx, mut off) = (0usize, 0usize);
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_IOV.min(segs.len()));
    while idx < segs.len() {
        if off >= segs[idx].len() {
            idx += 1;
            off = 0;
            continue;
        }
        iov.clear();
        iov.push(IoSlice::new(&segs[idx][off..]));
        iov.extend(
            segs[idx + 1..]
                .iter()
                .filter(|s| !s.is_empty())
                .take(MAX_IOV - 1)
                .map(|s| IoSlice::new(s)),
        );
        let mut n = w.write_vectored(&iov).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 && idx < segs.len() {
            let left = segs[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_segments_handles_partial_writes() {
        // A duplex with a tiny buffer forces many partial writes.
        let (mut a, mut b) = tokio::io::duplex(7);
        let segs: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; usize::from(i) * 13]).collect();
        let expected: Vec<u8> = segs.concat();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        let refs: Vec<&[u8]> = segs.iter().map(|s| s.as_slice()).collect();
        write_segments(&mut a, &refs).await.unwrap();
        drop(a);
        assert_eq!(reader.await.unwrap(), expected);
    }
}
