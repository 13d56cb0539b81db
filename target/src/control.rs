//! The daemon's control socket, `DIR/control.sock`: JSON lines, one reply
//! line per request, for the recovery tools while the daemon owns the data
//! directory.
//!
//! ```text
//!  {"op":"points","disk":D}                        → {"ok":true,"points":[{seq,time_ns,kind,tag}…]}
//!  {"op":"pin","disk":D,"at":AtSpec[,"stop":true]} → {"ok":true,"point":{…}}   pinned until unpin or close
//!  {"op":"unpin","disk":D,"seq":N}                 → {"ok":true}
//!  {"op":"failover","disk":D,"point":{…},"output":F} → {"ok":true}  applying to D has stopped
//!  {"op":"drain","disk":D,"timeout_ms":N}          → {"ok":true,"applied_seq":N,"held_seq":N,"agent_answered":B}
//!  {"op":"status"}                                 → {"ok":true,"disks":[DiskState…]}
//!  {"op":"metrics"}                                → {"ok":true,"metrics":"<Prometheus text>"}
//!  {"op":"drill","disk":D}                         → {"ok":true,"drill":{…}}   once it has run (crate::drill)
//!  {"op":"drills","disk":D[,"limit":N]}            → {"ok":true,"drills":[…],"last_verified":{…}|null}
//!  anything else, or a failure                     → {"ok":false,"error":"…"}
//! ```
//!
//! A pin belongs to its connection: closing the connection (a tool that
//! exits or dies) releases it. Pinning resolves the point and pins it under
//! the pins lock that expiry holds while it deletes, so a point cannot
//! expire between being chosen and being pinned. `latest` is the applied
//! state; pinning it records it as a point under the disk's apply lock, so
//! that every later overwrite is captured for it.
//!
//! `"stop":true` (failover) first stops applying to the disk (a batch being
//! applied finishes), so the point chosen is the replica's final state. If
//! the connection closes before the `failover` op records it, applying
//! resumes: an export that failed or was interrupted changes nothing.
//!
//! `drain` is a barrier: it asks the collector, over the disk's connection,
//! for the highest seq it or the agent holds, then waits until the replica
//! has applied it. It fails naming what is missing (no collector
//! connected, or the seqs not yet applied when the time is up).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::recovery::{self, AtSpec, Point};
use crate::retention;
use crate::session::Shared;

/// How long a drain waits for the collector's answer to its question.
const PROBE_WAIT: Duration = Duration::from_secs(15);

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Req {
    Points {
        disk: String,
    },
    Pin {
        disk: String,
        at: AtSpec,
        #[serde(default)]
        stop: bool,
    },
    Unpin {
        disk: String,
        seq: u64,
    },
    Failover {
        disk: String,
        point: Point,
        output: String,
    },
    Drain {
        disk: String,
        timeout_ms: u64,
    },
    Status,
    Metrics,
    /// A drill now (`tidemark drill`); answers when it has finished.
    Drill {
        disk: String,
    },
    /// The disk's newest drills (`tidemark drill --history`).
    Drills {
        disk: String,
        #[serde(default = "default_drills")]
        limit: u32,
    },
}

fn default_drills() -> u32 {
    20
}

/// Bind the control socket at `path` (`DIR/control.sock`, made free by
/// `OwnedDir::free_socket_path`: a stale socket is removed only in the
/// target's own, locked data directory).
pub(crate) fn bind(path: &Path) -> std::io::Result<UnixListener> {
    UnixListener::bind(path)
}

/// Serve the control socket until `stop`.
pub(crate) async fn serve(listener: UnixListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => match a {
                Ok((s, _)) => {
                    tokio::spawn(conn(s, shared.clone(), stop.clone()));
                }
                Err(e) => {
                    warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let _ = std::fs::remove_file(shared.cfg.data_dir.join(recovery::CONTROL_SOCKET));
}

/// Longest request line.
const MAX_REQUEST: u64 = 64 * 1024;

/// One request line (None: the client closed); a line longer than
/// [`MAX_REQUEST`] or not UTF-8 is an error, and the connection ends.
async fn read_request(rd: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> Result<Option<String>, String> {
    let mut buf = Vec::new();
    let n = tokio::io::AsyncReadExt::take(&mut *rd, MAX_REQUEST + 1)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| format!("reading the request: {e}"))?;
    if n == 0 {
        return Ok(None);
    }
    // Without a newline: too long, or the client closed after a last line.
    if buf.last() != Some(&b'\n') && n as u64 > MAX_REQUEST {
        return Err(format!("a request line is at most {MAX_REQUEST} bytes"));
    }
    String::from_utf8(buf)
        .map(|l| Some(l.trim_end().to_string()))
        .map_err(|_| "the request is not UTF-8".to_string())
}

async fn conn(s: UnixStream, shared: Arc<Shared>, stop: CancellationToken) {
    let (rd, mut wr) = s.into_split();
    let mut rd = BufReader::new(rd);
    let mut pins: Vec<(String, u64)> = Vec::new();
    let mut stopped: Vec<String> = Vec::new();
    loop {
        let line = tokio::select! {
            _ = stop.cancelled() => break,
            l = read_request(&mut rd) => match l {
                Ok(Some(l)) => l,
                Ok(None) => break,
                Err(e) => {
                    let _ = wr.write_all(format!("{}\n", json!({"ok": false, "error": e})).as_bytes()).await;
                    break;
                }
            },
        };
        let reply = match serde_json::from_str::<Req>(&line) {
            Ok(req) => handle(req, &shared, &mut pins, &mut stopped)
                .await
                .unwrap_or_else(|e| json!({"ok": false, "error": format!("{e:#}")})),
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        let mut out = reply.to_string();
        out.push('\n');
        if wr.write_all(out.as_bytes()).await.is_err() {
            break;
        }
    }
    for (disk, seq) in pins {
        debug!(disk, seq, "view closed: unpinned");
        retention::unpin(&shared.pins, &disk, seq);
    }
    for disk in stopped {
        // Another failover of the disk may have been recorded meanwhile.
        let (dir, d) = (shared.cfg.data_dir.clone(), disk.clone());
        let recorded = blocking(move || {
            let conn = crate::catalog::open_read_only(&dir)?;
            Ok(crate::catalog::Catalog::row(&conn, &d)?.is_some_and(|r| r.failed_over))
        })
        .await;
        match recorded {
            Ok(false) => {
                warn!(disk = %disk, "a failover was abandoned before it was recorded: applying again");
                shared.resume_applying(&disk);
            }
            Ok(true) => {
                info!(disk = %disk, "a failover was abandoned, but the disk was failed over before: it stays stopped")
            }
            Err(e) => {
                warn!(disk = %disk, "a failover was abandoned; cannot tell whether the disk was failed over ({e:#}): it stays stopped until the target restarts")
            }
        }
    }
}

/// Run `f` on a blocking thread (catalog reads, file work).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

async fn handle(
    req: Req,
    shared: &Arc<Shared>,
    pins: &mut Vec<(String, u64)>,
    stopped: &mut Vec<String>,
) -> anyhow::Result<Value> {
    let dir = shared.cfg.data_dir.clone();
    match req {
        Req::Points { disk } => {
            let pts = blocking(move || Ok(recovery::points_direct(&dir, &disk)?)).await?;
            Ok(json!({"ok": true, "points": pts}))
        }
        Req::Pin { disk, at, stop } => {
            if stop {
                // Check the disk exists before stopping anything.
                let (d, dir2) = (disk.clone(), dir.clone());
                blocking(move || Ok(recovery::points_direct(&dir2, &d).map(drop)?)).await?;
                if !stopped.contains(&disk) {
                    shared.stop_applying(&disk);
                    stopped.push(disk.clone());
                }
                // A batch being applied right now finishes; none starts after it.
                let until = Instant::now() + Duration::from_secs(60);
                while shared.applying(&disk) {
                    if Instant::now() >= until {
                        anyhow::bail!("disk {disk}: a batch is still being applied after 60 s; try again");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let sh = shared.clone();
            let d = disk.clone();
            let p = blocking(move || {
                // No batch between its point tail and its commit while the
                // applied state becomes a point.
                let lock = sh.apply_lock(&d);
                let _applying = lock.lock().unwrap_or_else(|e| e.into_inner());
                // Under the lock expiry deletes under: chosen and pinned at once.
                let mut map = sh.pins.lock();
                let pts = recovery::points_direct(&dir, &d)?;
                let p = recovery::select(&pts, &at)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("disk {d}: {}", recovery::describe(&at)))?;
                if p.latest {
                    crate::catalog::Catalog::open(&dir)?.insert_point(&d, &p)?;
                }
                retention::pin(&mut map, &d, p.seq);
                Ok(p)
            })
            .await?;
            info!(disk = %disk, seq = p.seq, "view opened: point pinned");
            pins.push((disk, p.seq));
            Ok(json!({"ok": true, "point": p}))
        }
        Req::Unpin { disk, seq } => {
            if let Some(i) = pins.iter().position(|(d, s)| *d == disk && *s == seq) {
                pins.swap_remove(i);
                retention::unpin(&shared.pins, &disk, seq);
            }
            Ok(json!({"ok": true}))
        }
        Req::Failover { disk, point, output } => {
            shared.stop_applying(&disk);
            let d = disk.clone();
            let p = point.clone();
            blocking(move || {
                let mut c = crate::catalog::Catalog::open(&dir)?;
                c.record_failover(&d, &p, &output)?;
                Ok(())
            })
            .await?;
            stopped.retain(|d| *d != disk);
            // A batch being applied right now finishes (its point is after
            // any point a view could have chosen); none starts after it.
            let until = Instant::now() + Duration::from_secs(60);
            while shared.applying(&disk) && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            warn!(disk = %disk, seq = point.seq, "failed over: replication to this disk has stopped");
            Ok(json!({"ok": true}))
        }
        Req::Drain { disk, timeout_ms } => {
            let until = Instant::now() + Duration::from_millis(timeout_ms);
            let Some(probe) = shared.probe(&disk) else {
                let (d, dir2) = (disk.clone(), dir.clone());
                let applied = blocking(move || {
                    let pts = recovery::points_direct(&dir2, &d)?;
                    Ok(pts.iter().rev().find(|p| p.latest).map(|p| p.seq))
                })
                .await?;
                anyhow::bail!(
                    "disk {disk}: no collector is connected for it, so nothing can confirm that the replica holds every acknowledged write{}; start the collector (or reconnect it), or fail over with --no-drain to accept the replica as it is",
                    applied.map(|s| format!(" (it has applied seq {s})")).unwrap_or_default()
                );
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            probe
                .send(tx)
                .map_err(|_| anyhow::anyhow!("disk {disk}: the collector's connection ended; try again"))?;
            let held = match tokio::time::timeout(PROBE_WAIT.min(until.saturating_duration_since(Instant::now())), rx).await {
                Ok(Ok(h)) => h,
                Ok(Err(_)) => anyhow::bail!("disk {disk}: the collector's connection ended before it answered; try again"),
                Err(_) => anyhow::bail!(
                    "disk {disk}: the collector did not say what it holds within {} s (an older collector does not answer); fail over with --no-drain to accept the replica as it is",
                    PROBE_WAIT.as_secs()
                ),
            };
            if held.agent_mode != tidemark_wire::frame::AgentMode::Streaming {
                anyhow::bail!(
                    "disk {disk}: the agent {} in {} mode: it holds writes that are not in its journal yet (bitmap) or is syncing, so seq {} is not everything; wait until it streams again (tidemark wait), or fail over with --no-drain to accept the replica as it is",
                    if held.agent_answered { "is" } else { "was last" },
                    held.agent_mode.name(),
                    held.seq
                );
            }
            loop {
                let applied = shared.settled_seq(&disk);
                if applied.is_some_and(|a| a >= held.seq) {
                    return Ok(json!({
                        "ok": true,
                        "applied_seq": applied,
                        "held_seq": held.seq,
                        "agent_answered": held.agent_answered,
                    }));
                }
                if Instant::now() >= until {
                    let a =
                        applied.map_or_else(|| "nothing (its connection ended)".to_string(), |a| format!("seq {a}"));
                    anyhow::bail!(
                        "disk {disk}: not drained within {} ms: the {} holds up to seq {}, the replica has applied {a}",
                        timeout_ms,
                        if held.agent_answered {
                            "agent"
                        } else {
                            "collector (the agent did not answer)"
                        },
                        held.seq
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Req::Status => {
            let disks = blocking(move || Ok(crate::catalog::disk_states(&dir)?)).await?;
            Ok(json!({"ok": true, "disks": disks}))
        }
        Req::Metrics => {
            let sh = shared.clone();
            let text = blocking(move || Ok(crate::http::scrape(&sh)?)).await?;
            Ok(json!({"ok": true, "metrics": text}))
        }
        Req::Drill { disk } => {
            let d = crate::drill::run(shared.clone(), disk, "cli").await?;
            Ok(json!({"ok": true, "drill": d}))
        }
        Req::Drills { disk, limit } => {
            let call = tidemark_wire::call::Call::Drills { limit };
            let mut v = crate::calls::answer(shared.clone(), disk, call)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            v["ok"] = json!(true);
            Ok(v)
        }
    }
}
