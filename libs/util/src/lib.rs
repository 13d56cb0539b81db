//! Small helpers every Tidemark program needs: crash-safe metadata writes,
//! sparse-file operations, header fields, human-readable sizes and
//! durations, logging setup and the start of a daemon, the clock, the
//! metrics renderer.
//!
//! Nothing here knows about records, journals or protocols.

pub mod audit;
pub mod bytes;
pub mod crashsafe;
pub mod fileops;
pub mod human;
pub mod located;
pub mod metrics;
pub mod owned;
pub mod ratelog;
pub mod service;

/// Initialise `tracing` to stderr, honouring `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Now, in nanoseconds since the Unix epoch (record and catalog times);
/// 0 for a clock set before 1970.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
