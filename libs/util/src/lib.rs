//! Small helpers every Tidemark program needs: crash-safe metadata writes,
//! sparse-file operations, human-readable sizes and durations, logging setup.
//!
//! Nothing here knows about records, journals or protocols.

pub mod crashsafe;
pub mod fileops;
pub mod human;
pub mod owned;

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
