//! The start of every Tidemark daemon (agent, collector, target): a
//! private umask, logging, a panic that ends the process at once,
//! failpoints, and SIGINT/SIGTERM as a cancellation. The runtime stays each daemon's own choice.

use std::io;

use tokio_util::sync::CancellationToken;

/// What [`start`] set up, kept until the daemon exits: dropping it clears
/// the failpoints.
#[must_use = "the failpoints are cleared when this is dropped"]
pub struct Service {
    #[cfg(feature = "failpoints")]
    _failpoints: fail::FailScenario<'static>,
}

/// Umask 077; logging to stderr ([`crate::init_logging`]); a panic anywhere — a
/// failpoint's `panic` action included — aborts the process at once, as a
/// crash or `kill -9` would: no unwinding into half-done state, no other
/// task carrying on; failpoints from the `FAILPOINTS` environment variable
/// in test builds only (cargo feature `tidemark-util/failpoints`, off by
/// default: a release build ignores `FAILPOINTS`, and says so).
pub fn start() -> Service {
    // Everything a daemon creates — journal, spool, replicas, undo,
    // catalogs, sockets — is its owner's alone (0600 files, 0700 folders):
    // they hold the protected disks' data.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    crate::init_logging();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    #[cfg(not(feature = "failpoints"))]
    if std::env::var_os("FAILPOINTS").is_some() {
        tracing::warn!(
            "FAILPOINTS is set, but this build has no failpoints (cargo feature tidemark-util/failpoints): ignored"
        );
    }
    Service {
        #[cfg(feature = "failpoints")]
        _failpoints: fail::FailScenario::setup(),
    }
}

/// SIGTERM or SIGINT cancels `stop`, with one log line
/// (`SIGTERM: stopping`). The handlers are installed before this returns,
/// so every signal from then on is caught. Call it inside a tokio runtime.
pub fn cancel_on_signals(stop: &CancellationToken) -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        stop.cancel();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_signal_cancels() {
        let stop = CancellationToken::new();
        cancel_on_signals(&stop).unwrap();
        assert!(!stop.is_cancelled());
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), stop.cancelled())
            .await
            .expect("SIGTERM cancels");
    }
}
