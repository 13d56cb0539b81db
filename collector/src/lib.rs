//! tidemark-collector: the process server. It receives change streams from
//! many agents, makes every batch durable in its spool before acknowledging
//! it, and forwards each disk's records in seq order to the target, packed
//! (`tidemark_wire::pack`: zstd, a dedup window, zero blocks). It keeps
//! accepting while the target is away and drains when it returns, relays
//! resync requests between the target and the agents, and serves the status
//! API and metrics. `docs/pipeline.md` is the contract it implements.
//!
//! What it must never do: acknowledge a batch before it is durable, delete
//! a spool file before the target acknowledged every record in it, drop a
//! record to make room (a full spool stops reading agent sockets instead),
//! hold a disk's whole backlog in memory, or panic on bytes from the network.
//!
//! - [`config`]: the plain configuration struct (`main.rs` owns the CLI).
//! - `catalog`: SQLite bindings of disk ids to UUIDs, trim marks, requests
//!   owed to agents.
//! - `state`: per-disk state, counters, status JSON.
//! - `spool`: the collector's use of `tidemark_formats::spool` (write with
//!   failpoints, index, trim).
//! - `agent`: one agent connection. `forward`: one disk's target session.
//! - `api`: the HTTP status API and Prometheus metrics; `manage`: its
//!   points, tags, drills and policy endpoints, on `calls` (calls down a
//!   disk's connections, policies, drills and their schedule).

mod agent;
mod alerts;
mod api;
mod audit;
mod calls;
mod catalog;
pub mod config;
mod failpoint;
mod forward;
mod history;
mod manage;
mod net;
mod spool;
mod state;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tidemark_util::owned::{self, DirKind, DirSpec, OwnedDir};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;

/// A running collector: where it listens, and how to wait for it.
#[derive(Debug)]
pub struct Running {
    /// The agent listener's bound address (useful with port 0).
    pub listen_addr: SocketAddr,
    /// The HTTP API's bound address.
    pub api_addr: SocketAddr,
    stop: CancellationToken,
    tracker: tokio_util::task::TaskTracker,
    /// Marked and locked while the collector runs.
    _dir: OwnedDir,
}

impl Running {
    /// Wait until `stop` is cancelled and every task has finished.
    pub async fn wait(self) -> Result<()> {
        self.stop.cancelled().await;
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .is_err()
        {
            warn!("some connections did not finish within 10 s of the stop; abandoning them");
        }
        info!("collector stopped");
        Ok(())
    }
}

/// What the collector keeps in its spool directory, so that one made
/// before markers existed is recognised (and anything else refused).
pub const DIR_SPEC: DirSpec = DirSpec {
    kind: DirKind::CollectorSpool,
    own_names: &["catalog.db", "catalog.db-wal", "catalog.db-shm", "catalog.db-journal"],
    any_subdir: true,
    adopt_if_any: &["catalog.db"],
    busy_hint: "",
};

/// Bind the listeners, then claim the spool directory (marker and lock,
/// `tidemark_util::owned`), open the catalog, index the spool and start
/// serving. A refused start changes nothing on disk; one that fails after
/// the claim removes what it created. The collector runs until `stop` is
/// cancelled; see [`Running::wait`].
pub async fn start(cfg: Config, stop: CancellationToken) -> Result<Running> {
    if cfg.token.is_empty() {
        anyhow::bail!("the token is empty");
    }
    // Refuse another daemon's directory, foreign files or a second
    // collector, then bind, before anything is created.
    owned::probe(&cfg.spool, &DIR_SPEC)?;
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for agents on {}: {e}", cfg.listen))?;
    let api_listener = TcpListener::bind(&cfg.api)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve the API on {}: {e}", cfg.api))?;
    let listen_addr = listener.local_addr().context("agent listener address")?;
    let api_addr = api_listener.local_addr().context("API listener address")?;
    let dir = {
        let spool = cfg.spool.clone();
        tokio::task::spawn_blocking(move || owned::claim(&spool, &DIR_SPEC))
            .await
            .context("claim the spool directory")??
    };
    if dir.adopted() {
        info!(spool = %cfg.spool.display(), "adopted a spool directory of an earlier version (marker written)");
    }
    let opened = {
        let cfg = cfg.clone();
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let shared = state::Shared::open(cfg, stop)?;
            spool::load_all(&shared)?;
            calls::load(&shared)?;
            anyhow::Ok(shared)
        })
        .await
        .context("open the spool")
        .and_then(|r| r)
    };
    let shared = match opened {
        Ok(s) => s,
        Err(e) => {
            dir.abandon();
            return Err(e);
        }
    };
    for disk in shared.all_disks() {
        forward::spawn(&shared, &disk);
    }
    let tracker = shared.tracker.clone();
    tracker.spawn(agent::accept_loop(shared.clone(), listener));
    tracker.spawn(api::serve(shared.clone(), api_listener));
    tracker.spawn(alerts::run(shared.clone()));
    cfg.security.spawn_crl_watch(shared.stop.clone());
    if let (tidemark_net::Security::Tls(t), Some(ca)) = (&cfg.security, &cfg.ca) {
        tracker.spawn(tidemark_net::enroll::renew_loop(
            t.clone(),
            tidemark_net::enroll::RenewAt::Ca(ca.clone()),
            shared.stop.clone(),
        ));
    }
    info!(
        listen = %listen_addr,
        api = %api_addr,
        target = %cfg.target,
        spool = %cfg.spool.display(),
        spool_cap = %tidemark_util::human::format_size(cfg.spool_cap),
        security = %cfg.security.describe(),
        "collector serving"
    );
    if !cfg.security.is_tls() {
        tracing::warn!(
            "--insecure-plaintext: agents and the target are not authenticated but for the token, and every byte \
             crosses in clear text"
        );
    }
    Ok(Running {
        listen_addr,
        api_addr,
        stop,
        tracker,
        _dir: dir,
    })
}

/// Run the collector until `stop` is cancelled.
pub async fn run(cfg: Config, stop: CancellationToken) -> Result<()> {
    start(cfg, stop).await?.wait().await
}
