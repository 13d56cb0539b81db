//! What the collector says on a connection besides its protocol replies.
//! Frames are read and written with `tidemark_net` (bounded, cancel-safe).

use tidemark_wire::frame::{ErrorCode, Frame};

/// An Error frame with `reason`.
pub(crate) fn error_frame(code: ErrorCode, reason: impl Into<String>) -> Frame {
    Frame::Error {
        code,
        reason: reason.into(),
    }
}
