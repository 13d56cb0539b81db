//! Reading and writing frames (`tidemark_wire::frame`) on a byte stream.
//!
//! The reader takes the 16-byte header first and bounds its body twice:
//! by the protocol's `MAX_BODY` ([`FrameHeader::parse`]) and by the limit
//! the caller sets for this point of its conversation (a few KiB before a
//! Hello, say). Only then is the body allocated — and, with a memory
//! budget, only once the budget has room for it. It never reads past the
//! end of the frame it is reading.
//!
//! Every read is cancel-safe: what arrived stays in the reader, so
//! [`FrameReader::next`] can sit in a `select!` beside timers and stop
//! signals, and a cancelled call is simply called again.

use std::io;
use std::sync::Arc;

use tidemark_wire::frame::{ErrorCode, Frame, FrameHeader, FRAME_HEADER_LEN};
use tidemark_wire::{WireError, WireErrorKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A frame buffer larger than this is released before the next frame is
/// read, so that idle connections do not each keep a 40 MiB buffer.
const KEEP_BUFFER: usize = 4 << 20;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The connection failed (or the memory budget was closed).
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The bytes are not a valid frame, or the body exceeds the limit.
    #[error("{0}")]
    Wire(WireError),
    /// The peer closed the connection inside a frame, after this many
    /// bytes of it.
    #[error("the connection closed inside a frame ({0} bytes of it received)")]
    Truncated(usize),
}

impl ReadError {
    /// The error code to tell the peer if its bytes were bad; `None` when
    /// the connection failed or was cut short (nobody to tell, or nothing
    /// wrong with what was said).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ReadError::Io(_) | ReadError::Truncated(_) => None,
            ReadError::Wire(e) if e.kind == WireErrorKind::UnsupportedVersion => Some(ErrorCode::UnsupportedVersion),
            ReadError::Wire(_) => Some(ErrorCode::Malformed),
        }
    }
}

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// A field is out of bounds (`Frame::encode`): a bug of the sender.
    #[error("encode frame: {0}")]
    Encode(WireError),
    /// The connection failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// KiB permits for `bytes` of a budget of `total` bytes: at least 1, at
/// most the whole budget (a frame larger than the budget waits for all of
/// it rather than forever).
pub fn kib_permits(bytes: u64, total: u64) -> u32 {
    let kib = |b: u64| u32::try_from(b.div_ceil(1024)).unwrap_or(u32::MAX);
    kib(bytes).clamp(1, kib(total).max(1))
}

/// A memory budget in KiB permits of `total` bytes.
#[derive(Debug)]
struct Budget {
    permits: Arc<Semaphore>,
    total: u64,
    /// Permits for this many times each frame.
    factor: u64,
}

/// Reads frames from `R`, one at a time; cancel-safe (see the module).
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes of the current frame in `buf`.
    filled: usize,
    /// Bytes of the frame [`Self::next`] returned last (`buf[..last]`);
    /// 0 once reading the next one began.
    last: usize,
    max_body: u32,
    budget: Option<Budget>,
    /// Held for the frame being read, then for the last frame returned.
    permit: Option<OwnedSemaphorePermit>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of frames whose bodies are at most `max_body` bytes (at
    /// most the protocol's `MAX_BODY` in any case).
    pub fn new(inner: R, max_body: u32) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            filled: 0,
            last: 0,
            max_body,
            budget: None,
            permit: None,
        }
    }

    /// Count frame bodies against `budget` (KiB permits of `total` bytes):
    /// before a body is read, the reader waits for permits for twice its
    /// frame (the bytes and what is decoded from them).
    pub fn with_budget(mut self, budget: Arc<Semaphore>, total: u64) -> Self {
        self.budget = Some(Budget {
            permits: budget,
            total,
            factor: 2,
        });
        self
    }

    /// As [`Self::with_budget`], for the frame's bytes alone (the caller
    /// admits what it decodes from them once they have arrived).
    pub fn with_budget_for_bytes(mut self, budget: Arc<Semaphore>, total: u64) -> Self {
        self.budget = Some(Budget {
            permits: budget,
            total,
            factor: 1,
        });
        self
    }

    /// The body limit from the next frame on (after a Hello, say).
    pub fn set_max_body(&mut self, max_body: u32) {
        self.max_body = max_body;
    }

    /// The stream, to read what a peer still sends after the last frame.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The memory permit of the frame [`Self::next`] returned last; hold
    /// it while the frame (or what is decoded from it) is in memory.
    pub fn take_permit(&mut self) -> Option<OwnedSemaphorePermit> {
        self.permit.take()
    }

    /// The bytes (header and body) of the frame [`Self::next`] returned
    /// last, until the next read.
    pub fn frame_bytes(&self) -> &[u8] {
        &self.buf[..self.last]
    }

    /// [`Self::frame_bytes`], taken: the reader starts a new buffer.
    pub fn take_frame_bytes(&mut self) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.buf);
        b.truncate(self.last);
        self.last = 0;
        b
    }

    /// The next frame's header, once it has arrived, or `None` at a clean
    /// end of stream; [`Self::next`] then reads the body. Cancel-safe.
    pub async fn header(&mut self) -> Result<Option<FrameHeader>, ReadError> {
        self.begin();
        while self.filled < FRAME_HEADER_LEN {
            if !self.read_upto(FRAME_HEADER_LEN).await? {
                return Ok(None);
            }
        }
        self.parsed_header().map(Some)
    }

    /// The next frame, or `None` at a clean end of stream. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        if self.header().await?.is_none() {
            return Ok(None);
        }
        let need = self.parsed_header()?.frame_len();
        if let Some(b) = self.budget.as_ref().filter(|_| need > FRAME_HEADER_LEN) {
            // The read buffer (and, by default, the decoded frame).
            let want = kib_permits(b.factor * need as u64, b.total);
            if self.permit.as_ref().map_or(0, |p| p.num_permits()) < want as usize {
                // Cancel-safe: a permit acquired is kept in self.
                self.permit = None;
                let p = b
                    .permits
                    .clone()
                    .acquire_many_owned(want)
                    .await
                    .map_err(|_| ReadError::Io(io::Error::other("the memory budget is closed")))?;
                self.permit = Some(p);
            }
        }
        while self.filled < need {
            self.read_upto(need).await?;
        }
        // The permit goes with the frame (or is dropped with the error).
        self.filled = 0;
        self.last = need;
        Frame::decode(&self.buf[..need])
            .map(|(f, _)| Some(f))
            .map_err(ReadError::Wire)
    }

    /// Starting a frame: the last one's bytes are no longer wanted.
    fn begin(&mut self) {
        if self.filled == 0 {
            self.last = 0;
            if self.buf.len() > KEEP_BUFFER {
                self.buf = Vec::new();
            }
        }
    }

    /// The header in `buf`, bounded by `MAX_BODY` and `max_body`.
    fn parsed_header(&self) -> Result<FrameHeader, ReadError> {
        let h = FrameHeader::parse(&self.buf[..FRAME_HEADER_LEN]).map_err(ReadError::Wire)?;
        if h.body_len > self.max_body {
            return Err(ReadError::Wire(WireError {
                kind: WireErrorKind::OutOfBounds,
                msg: format!(
                    "frame body of {} bytes exceeds the {} bytes allowed here",
                    h.body_len, self.max_body
                ),
            }));
        }
        Ok(h)
    }

    /// One read into `buf[filled..end]`; false at a clean end of stream,
    /// an error at an end inside a frame.
    async fn read_upto(&mut self, end: usize) -> Result<bool, ReadError> {
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        let n = self.inner.read(&mut self.buf[self.filled..end]).await?;
        if n == 0 {
            return if self.filled == 0 {
                Ok(false)
            } else {
                Err(ReadError::Truncated(self.filled))
            };
        }
        self.filled += n;
        Ok(true)
    }
}

/// Read exactly one frame of at most `max_body` body bytes from `r` (a
/// [`FrameReader`] for one frame: not cancel-safe, reads nothing past it).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max_body: u32) -> Result<Option<Frame>, ReadError> {
    FrameReader::new(r, max_body).next().await
}

/// Encode `f` and write it whole.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), WriteError> {
    let b = f.encode().map_err(WriteError::Encode)?;
    w.write_all(&b).await?;
    // Over TLS, written bytes may wait in the session until flushed.
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tidemark_wire::frame::MAX_BODY;

    use super::*;

    #[tokio::test]
    async fn reader_survives_cancellation_mid_frame() {
        let bytes = Frame::Ack { seq: 42 }.encode().unwrap();
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = FrameReader::new(b, MAX_BODY);
        a.write_all(&bytes[..10]).await.unwrap();
        // A read that is cancelled after part of the frame arrived keeps it.
        let t = tokio::time::timeout(Duration::from_millis(50), r.next()).await;
        assert!(t.is_err());
        a.write_all(&bytes[10..]).await.unwrap();
        assert_eq!(r.next().await.unwrap(), Some(Frame::Ack { seq: 42 }));
        a.write_all(&bytes[..20]).await.unwrap();
        drop(a);
        assert!(matches!(r.next().await, Err(ReadError::Truncated(20))));
    }

    #[tokio::test]
    async fn reader_waits_for_the_memory_budget_before_reading_a_body() {
        const BUDGET: u64 = 80 << 20;
        let f = Frame::Error {
            code: ErrorCode::Internal,
            reason: "x".repeat(900),
        };
        let bytes = f.encode().unwrap();
        let all_permits = kib_permits(BUDGET, BUDGET);
        let budget = Arc::new(Semaphore::new(all_permits as usize));
        let all = budget.clone().acquire_many_owned(all_permits).await.unwrap();
        let mut r = FrameReader::new(&bytes[..], MAX_BODY).with_budget(budget.clone(), BUDGET);
        let t = tokio::time::timeout(Duration::from_millis(50), r.next()).await;
        assert!(t.is_err(), "no memory: the body is not read");
        drop(all);
        assert_eq!(r.next().await.unwrap(), Some(f));
        let p = r.take_permit().expect("the frame's permit");
        assert_eq!(budget.available_permits(), all_permits as usize - p.num_permits());
        drop(p);
        assert_eq!(budget.available_permits(), all_permits as usize);
        assert_eq!(kib_permits(u64::MAX, BUDGET), all_permits);
        assert_eq!(kib_permits(0, BUDGET), 1);
    }

    #[tokio::test]
    async fn reader_bounds_the_body_before_allocating() {
        let mut bytes = Frame::Ack { seq: 1 }.encode().unwrap();
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut r = FrameReader::new(&bytes[..], MAX_BODY);
        match r.next().await {
            Err(ReadError::Wire(e)) => assert_eq!(e.kind, WireErrorKind::OutOfBounds),
            other => panic!("{other:?}"),
        }
        assert!(r.buf.len() <= FRAME_HEADER_LEN);
    }

    #[tokio::test]
    async fn the_callers_limit_bounds_the_body_too() {
        let f = Frame::Error {
            code: ErrorCode::Internal,
            reason: "x".repeat(100),
        };
        let bytes = f.encode().unwrap();
        let mut r = FrameReader::new(&bytes[..], 64);
        match r.next().await {
            Err(e @ ReadError::Wire(_)) => {
                assert_eq!(e.code(), Some(ErrorCode::Malformed));
                assert!(e.to_string().contains("exceeds the 64 bytes allowed here"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(r.buf.len() <= FRAME_HEADER_LEN);
        let mut r = FrameReader::new(&bytes[..], 64);
        r.set_max_body(MAX_BODY);
        assert_eq!(r.next().await.unwrap(), Some(f));
    }

    #[tokio::test]
    async fn header_then_body_and_the_frames_bytes() {
        let a = Frame::Ack { seq: 7 }.encode().unwrap();
        let b = Frame::Ack { seq: 8 }.encode().unwrap();
        let both = [a.clone(), b.clone()].concat();
        let mut r = FrameReader::new(&both[..], MAX_BODY);
        let h = r.header().await.unwrap().unwrap();
        assert_eq!(h.frame_len(), a.len());
        // Asking again before the body is read changes nothing.
        assert_eq!(r.header().await.unwrap(), Some(h));
        assert_eq!(r.next().await.unwrap(), Some(Frame::Ack { seq: 7 }));
        assert_eq!(r.frame_bytes(), &a[..]);
        assert_eq!(r.next().await.unwrap(), Some(Frame::Ack { seq: 8 }));
        assert_eq!(r.take_frame_bytes(), b);
        assert_eq!(r.next().await.unwrap(), None);
        assert_eq!(r.header().await.unwrap(), None);
    }

    #[tokio::test]
    async fn one_frame_is_read_and_nothing_past_it() {
        let a = Frame::Ack { seq: 1 }.encode().unwrap();
        let both = [a.clone(), a.clone()].concat();
        let mut s = &both[..];
        assert_eq!(read_frame(&mut s, MAX_BODY).await.unwrap(), Some(Frame::Ack { seq: 1 }));
        assert_eq!(s.len(), a.len());
        let mut out = Vec::new();
        write_frame(&mut out, &Frame::Ack { seq: 1 }).await.unwrap();
        assert_eq!(out, a);
        let gap = Frame::Batch(vec![]);
        assert!(matches!(write_frame(&mut out, &gap).await, Err(WriteError::Encode(_))));
        let mut garbage = &b"GET / HTTP/1.1\r\n\r\n"[..];
        let e = read_frame(&mut garbage, MAX_BODY).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Malformed));
        assert!(e.to_string().contains("magic"), "{e}");
    }
}
