//! Reading and writing frames on a TCP stream: the 16-byte header is read
//! and bounded first, then exactly the body; nothing larger than the
//! caller's limit is ever allocated.

use std::io;

use tidemark_wire::frame::{ErrorCode, Frame, FrameHeader, FRAME_HEADER_LEN};
use tidemark_wire::{WireError, WireErrorKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The connection failed or closed mid-frame.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The bytes are not a valid frame (or exceed `max_body`).
    #[error("{0}")]
    Bad(WireError),
}

impl ReadError {
    /// The error code to tell the peer, if the bytes were bad.
    pub(crate) fn code(&self) -> Option<ErrorCode> {
        match self {
            ReadError::Io(_) => None,
            ReadError::Bad(e) if e.kind == WireErrorKind::UnsupportedVersion => Some(ErrorCode::UnsupportedVersion),
            ReadError::Bad(_) => Some(ErrorCode::Malformed),
        }
    }
}

/// Read the next frame header, or `None` on a clean end of stream.
pub(crate) async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    max_body: u32,
) -> Result<Option<(FrameHeader, [u8; FRAME_HEADER_LEN])>, ReadError> {
    let mut hb = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        let n = r.read(&mut hb[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(ReadError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed after {got} bytes of a frame header"),
            )));
        }
        got += n;
    }
    let h = FrameHeader::parse(&hb).map_err(ReadError::Bad)?;
    if h.body_len > max_body {
        return Err(ReadError::Bad(WireError {
            kind: WireErrorKind::OutOfBounds,
            msg: format!(
                "frame body of {} bytes exceeds the {max_body} bytes allowed here",
                h.body_len
            ),
        }));
    }
    Ok(Some((h, hb)))
}

/// Read the body announced by `h` and decode the frame; returns it with the
/// whole frame's bytes (header and body).
pub(crate) async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    h: FrameHeader,
    hb: [u8; FRAME_HEADER_LEN],
) -> Result<(Frame, Vec<u8>), ReadError> {
    let mut buf = vec![0u8; h.frame_len()];
    buf[..FRAME_HEADER_LEN].copy_from_slice(&hb);
    r.read_exact(&mut buf[FRAME_HEADER_LEN..]).await?;
    let (f, _) = Frame::decode(&buf).map_err(ReadError::Bad)?;
    Ok((f, buf))
}

/// Read one whole frame of at most `max_body` body bytes.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_body: u32,
) -> Result<Option<(Frame, Vec<u8>)>, ReadError> {
    match read_header(r, max_body).await? {
        None => Ok(None),
        Some((h, hb)) => read_body(r, h, hb).await.map(Some),
    }
}

/// Encode and write one frame.
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> io::Result<()> {
    let b = f
        .encode()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("encode frame: {e}")))?;
    w.write_all(&b).await
}

/// An Error frame with `reason`.
pub(crate) fn error_frame(code: ErrorCode, reason: impl Into<String>) -> Frame {
    Frame::Error {
        code,
        reason: reason.into(),
    }
}
