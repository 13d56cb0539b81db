//! Standard output that survives a closed pipe.
//!
//! `println!` panics when stdout is a pipe whose reader went away
//! (`tidemark status | head -1`): Rust ignores SIGPIPE, so the write fails
//! with EPIPE and the macro turns that into a panic (exit 101). Every line
//! the tool prints goes through `outln!` instead: a closed stdout ends
//! the output quietly, the command's work goes on (a tag inserted, a
//! failover recorded still count), and the process exits as it would have
//! — nobody is left to read what it had to say. Any other write error (a
//! full disk behind `>`) is reported once, at exit, and makes it fail.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU8, Ordering};

/// Nothing went wrong writing stdout.
const OPEN: u8 = 0;
/// The reader went away (EPIPE): print nothing more, exit as usual.
const CLOSED: u8 = 1;
/// Another write error: print nothing more, and fail at exit.
const FAILED: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(OPEN);
static ERROR: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Write `args` and a newline to stdout, and flush; see the module docs.
pub fn line(args: std::fmt::Arguments<'_>) {
    write(|o| {
        o.write_fmt(args)?;
        o.write_all(b"\n")
    });
}

/// Write `s` as it is (no newline added) to stdout, and flush.
pub fn text(s: &str) {
    write(|o| o.write_all(s.as_bytes()));
}

/// Write through `f` to locked, buffered stdout and flush; a failure
/// closes the output for the rest of the run.
pub fn write(f: impl FnOnce(&mut dyn Write) -> io::Result<()>) {
    if STATE.load(Ordering::Relaxed) != OPEN {
        return;
    }
    let stdout = io::stdout();
    let mut lock = stdout.lock();
    let r = f(&mut lock).and_then(|()| lock.flush());
    if let Err(e) = r {
        note(&e);
    }
}

/// Record a write error on stdout (EPIPE: the reader is gone).
pub fn note(e: &io::Error) {
    if e.kind() == io::ErrorKind::BrokenPipe {
        STATE.store(CLOSED, Ordering::Relaxed);
    } else {
        STATE.store(FAILED, Ordering::Relaxed);
        let mut m = ERROR.lock().unwrap_or_else(|p| p.into_inner());
        m.get_or_insert_with(|| e.to_string());
    }
}

/// A write error on stdout other than a closed pipe, to report at exit.
pub fn failure() -> Option<String> {
    if STATE.load(Ordering::Relaxed) != FAILED {
        return None;
    }
    ERROR.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// `println!` that never panics: a closed stdout ends the output quietly.
macro_rules! outln {
    () => { $crate::out::text("\n") };
    ($($arg:tt)*) => { $crate::out::line(format_args!($($arg)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pipe_ends_the_output_quietly() {
        note(&io::ErrorKind::BrokenPipe.into());
        assert_eq!(STATE.load(Ordering::Relaxed), CLOSED);
        assert_eq!(failure(), None);
        // Nothing more is written, and nothing panics.
        line(format_args!("not printed"));
        assert_eq!(STATE.load(Ordering::Relaxed), CLOSED);
    }
}
