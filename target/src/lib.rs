//! tidemark-target, the master target: receives one packed stream per disk
//! from the collector, checks every record's blake3 end to end, applies the
//! records in seq order to a replica (raw, VMDK monolithicFlat or
//! monolithicSparse: `--format`, per disk), and acknowledges a seq
//! only once it is durable in the replica and committed to the catalog.
//!
//! ```text
//!  collector ──Packed──▶ session ──unpack (window.blocks)──▶ apply ──▶ undo/<n>.undo (old contents)
//!            ◀─Ack─────     │                                  │ fdatasync, mark in catalog
//!            ◀─Request─     │                                  ├──▶ replica.{raw,vmdk}, flush
//!            ◀─TargetState──┘                                  ▼
//!                                          catalog.db (applied_seq, halts, points, undo index)
//!  tools ──recovery::View──▶ control.sock (pin) + replica + undo segments (read only)
//! ```
//!
//! - `session` (private): one connection, one disk; Hello
//!   checks, Welcome, the batch loop, state reports, requests upstream.
//! - `apply` (private): the ordering and halting rules, with
//!   no network in sight.
//! - [`replica`]: the per-disk folder and the replica in the disk's format
//!   (through `tidemark_formats::replica::ReplicaImage`).
//! - [`window`]: the file-backed dedup window.
//! - `retention`: the pins that keep expiry off open views.
//! - `control` (private): the daemon's control socket, through which the
//!   recovery tools reach a data directory while the target runs.
//!
//! The recovery state on disk lives in libraries, shared with the tools
//! (`docs/architecture.md`): the catalog, its schema, points, policies and
//! the error type in `tidemark_catalog` (re-exported here as [`catalog`],
//! [`error`], [`ranges`]); the undo segment format in
//! `tidemark_formats::undo` ([`undo`]); points, `--at`, views, drain and
//! failover records in `tidemark_recovery` ([`recovery`]).
//!
//! The contract with the collector is `docs/pipeline.md`; this crate's
//! behaviour in detail is `docs/target.md`. Libraries take [`Config`];
//! clap lives in the binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tidemark_util::owned::{self, OwnedDir};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

mod apply;
mod calls;
mod compare;
mod plan;
pub use tidemark_catalog as catalog;
mod control;
mod drill;
mod http;
mod metrics;
pub use tidemark_catalog::error;
pub use tidemark_catalog::ranges;
pub use tidemark_recovery as recovery;
pub mod replica;
pub mod retention;
mod session;
pub use tidemark_formats::undo;
pub mod window;

pub use apply::MAX_POSITION;
pub use error::{Error, ErrorKind, Result};

use error::IoContext;

pub use tidemark_catalog::layout::LOCK_FILE;

/// What the target keeps in its data directory (defined with the layout,
/// so the tools that prepare one claim it the same way).
pub use tidemark_catalog::layout::DIR_SPEC;

fn dir_error(e: owned::DirError) -> Error {
    let kind = match e.kind {
        owned::DirErrorKind::Busy => ErrorKind::Busy,
        owned::DirErrorKind::Io => ErrorKind::Io,
        owned::DirErrorKind::Unsupported => ErrorKind::UnsupportedVersion,
        _ => ErrorKind::Config,
    };
    Error::new(kind, e.message)
}

/// How the target runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where to accept collector connections (`HOST:PORT`; port 0 picks one).
    pub listen: String,
    /// The data directory: `catalog.db` and one folder per disk.
    pub data_dir: PathBuf,
    /// The shared token every Hello must carry (not empty).
    pub token: Vec<u8>,
    /// Dedup window size in 4 KiB blocks; must equal the collector's
    /// (default [`tidemark_wire::pack::DEFAULT_WINDOW_BLOCKS`]).
    pub window_blocks: u32,
    /// Longest time between two `TargetState` reports (default 2 s).
    pub state_interval: Duration,
    /// How long a new connection may take to say Hello (default 10 s).
    pub hello_timeout: Duration,
    /// The retention policy a disk gets when the target first sees it.
    pub retention: retention::DiskPolicy,
    /// The replica format a disk gets when the target first sees it
    /// (default raw).
    pub format: replica::ReplicaFormat,
    /// Size at which an undo segment is closed (the unit of expiry).
    pub segment_bytes: u64,
    /// Where to serve `GET /metrics` (HOST:PORT); None: only the control
    /// socket's `metrics` op.
    pub metrics_listen: Option<String>,
    /// Mutual TLS with the target's identity (collectors must present
    /// collector certificates of its CA), or plaintext. The binary asks for
    /// an explicit choice; this default is plaintext.
    pub security: tidemark_net::Security,
}

impl Config {
    /// A configuration with the defaults.
    pub fn new(listen: impl Into<String>, data_dir: impl Into<PathBuf>, token: impl Into<Vec<u8>>) -> Self {
        Self {
            listen: listen.into(),
            data_dir: data_dir.into(),
            token: token.into(),
            window_blocks: tidemark_wire::pack::DEFAULT_WINDOW_BLOCKS,
            state_interval: Duration::from_secs(2),
            hello_timeout: Duration::from_secs(10),
            retention: retention::DiskPolicy::default(),
            format: replica::ReplicaFormat::Raw,
            segment_bytes: retention::DEFAULT_SEGMENT_BYTES,
            metrics_listen: None,
            security: tidemark_net::Security::Plaintext,
        }
    }
}

/// A bound, not yet serving target: the data directory is locked, the
/// catalog is open and current, the listener is bound.
#[derive(Debug)]
pub struct Target {
    listener: TcpListener,
    control: tokio::net::UnixListener,
    metrics: Option<TcpListener>,
    shared: Arc<session::Shared>,
    /// Marked and locked for as long as the target runs.
    _dir: OwnedDir,
}

impl Target {
    /// Bind the listener, then claim the data directory (marker and lock,
    /// `tidemark_util::owned`), open the catalog and bind the control
    /// socket. A refused start changes nothing on disk; one that fails after
    /// the claim removes what it created.
    pub async fn bind(cfg: Config) -> Result<Self> {
        if cfg.token.is_empty() {
            return Err(Error::new(ErrorKind::Config, "the token is empty"));
        }
        let dir = cfg.data_dir.clone();
        // Refuse another daemon's directory, foreign files or a held lock,
        // then bind, before anything is created.
        owned::probe(&dir, &DIR_SPEC).map_err(dir_error)?;
        let listener = TcpListener::bind(&cfg.listen)
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("cannot listen on {}: {e}", cfg.listen)))?;
        let metrics = match &cfg.metrics_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| Error::new(ErrorKind::Io, format!("cannot serve metrics on {a}: {e}")))?,
            ),
            None => None,
        };
        let claimed = owned::claim(&dir, &DIR_SPEC).map_err(dir_error)?;
        if claimed.adopted() {
            info!(data = %dir.display(), "adopted a data directory of an earlier version (marker written)");
        }
        let opened = (|| {
            // Creates the catalog or brings its schema up to date.
            drop(catalog::Catalog::open(&dir)?);
            let path = claimed
                .free_socket_path(catalog::layout::CONTROL_SOCKET)
                .map_err(dir_error)?;
            control::bind(&path).io_ctx(|| format!("cannot create the control socket {}", path.display()))
        })();
        let control = match opened {
            Ok(c) => c,
            Err(e) => {
                claimed.abandon();
                return Err(e);
            }
        };
        Ok(Self {
            listener,
            control,
            metrics,
            shared: Arc::new(session::Shared::new(cfg)),
            _dir: claimed,
        })
    }

    /// The address the listener is bound to (with the real port).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().io_ctx(|| "listener address".into())
    }

    /// The address of the metrics endpoint, if it has one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serve connections until `stop` is cancelled; then stop accepting,
    /// let each connection finish the batch it is applying, and return.
    pub async fn serve(self, stop: CancellationToken) -> Result<()> {
        let addr = self.local_addr()?;
        info!(
            listen = %addr,
            data = %self.shared.cfg.data_dir.display(),
            security = %self.shared.cfg.security.describe(),
            "serving"
        );
        if !self.shared.cfg.security.is_tls() {
            warn!("--insecure-plaintext: collectors connect unauthenticated but for the token, and everything crosses in clear text");
        }
        let mut conns = JoinSet::new();
        let control = tokio::spawn(control::serve(self.control, self.shared.clone(), stop.clone()));
        let admission = tidemark_net::Admission::default();
        self.shared.cfg.security.spawn_crl_watch(stop.clone());
        let metrics = self.metrics.map(|l| {
            info!(metrics = %l.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()), "serving metrics");
            tokio::spawn(http::serve_http(l, self.shared.clone(), stop.clone()))
        });
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                a = self.listener.accept() => match a {
                    Ok((stream, peer)) => match admission.admit(peer.ip()) {
                        Ok(slots) => {
                            conns.spawn(session::handle(stream, peer, self.shared.clone(), stop.clone(), slots));
                        }
                        Err(why) => self.shared.refused_log.warn(format_args!("closed a connection from {peer}: {why}")),
                    },
                    Err(e) => {
                        // Out of descriptors or a connection reset before
                        // accept: wait a little instead of spinning.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(self.listener);
        while conns.join_next().await.is_some() {}
        let _ = control.await;
        if let Some(m) = metrics {
            let _ = m.await;
        }
        info!("stopped");
        Ok(())
    }
}

/// Bind and serve until `stop` is cancelled.
pub async fn run(cfg: Config, stop: CancellationToken) -> Result<()> {
    Target::bind(cfg).await?.serve(stop).await
}
