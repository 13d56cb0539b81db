//! The control socket (`STATE/control.sock`): one JSON request per line,
//! one JSON reply per line. It answers `{"cmd":"status"}`,
//! `{"cmd":"metrics"}` (Prometheus text in the `metrics` key) and
//! `{"cmd":"tag","name":…,"app_consistent":bool}`, which journals a Tag
//! record and replies with its seq once it is durable, and
//! `{"cmd":"resync-compare"}`, which records a full resync of the whole
//! disk, hash-compared with the replica (`tidemark resync --compare`), and
//! `{"cmd":"resume"}`, which takes writes again after a quiesce (a planned
//! failback that did not happen: `tidemark resume`).
//!
//! Tag names are unique per disk: the names already used live in
//! `STATE/tags.json` (the target refuses a duplicate too, but only after
//! the stream got there). A tag request may carry `deadline_ns` (Unix
//! time): `tidemark tag --freeze` thaws the filesystem at its deadline, so
//! a tag journaled after it would claim a consistency it does not have;
//! past the deadline the request is refused and nothing is journaled.
//!
//! A name already used is refused with the tag that holds it in
//! `existing` (`{"seq","app_consistent","time_ns"}`): `tidemark tag`
//! retried after a lost answer learns that its tag is in, and at which
//! seq. Since requests are serialised, a request with a deadline in the
//! past answers "what became of my earlier request for this name": the
//! tag (`existing`) or a refusal that journals nothing.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tidemark_wire::record::MAX_TAG_LEN;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::shim::Shim;
use crate::status::Status;

/// File in the state directory holding the tag names used on this disk.
pub const TAGS_FILE: &str = "tags.json";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    cmd: String,
    /// `tag`: the tag name.
    #[serde(default)]
    name: Option<String>,
    /// `tag`: mark the point application-consistent.
    #[serde(default)]
    app_consistent: bool,
    /// `tag`: refuse if this Unix time (ns) has passed before journaling.
    #[serde(default)]
    deadline_ns: Option<u64>,
}

/// One tag journaled by this agent (`STATE/tags.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TagEntry {
    pub name: String,
    pub seq: u64,
    pub app_consistent: bool,
    pub time_ns: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TagBook {
    tags: Vec<TagEntry>,
}

/// Serialises tag requests: check the name, journal, record the name.
static TAG_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The tags journaled on the disk whose state directory is `state`.
pub fn read_tags(state: &Path) -> std::io::Result<Vec<TagEntry>> {
    let path = state.join(TAGS_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice::<TagBook>(&b).map(|t| t.tags).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is damaged: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Check a tag name: 1..=255 bytes of UTF-8 (a `String` already is UTF-8),
/// no control characters (they would garble every listing).
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the tag name is empty".into());
    }
    if name.len() > MAX_TAG_LEN as usize {
        return Err(format!(
            "the tag name is {} bytes long; at most {MAX_TAG_LEN} bytes of UTF-8 are allowed",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("the tag name contains control characters".into());
    }
    if let Some(c) = tidemark_util::human::invisible_char(name) {
        return Err(format!(
            "the tag name contains U+{:04X}, a bidirectional or invisible formatting character",
            u32::from(c)
        ));
    }
    Ok(())
}

/// Why a tag request was refused, and the tag already holding its name.
pub(crate) struct Refused {
    pub(crate) error: String,
    pub(crate) existing: Option<TagEntry>,
}

impl From<String> for Refused {
    fn from(error: String) -> Refused {
        Refused { error, existing: None }
    }
}

impl From<&str> for Refused {
    fn from(error: &str) -> Refused {
        error.to_string().into()
    }
}

/// Journal a tag, make it durable, remember its name; the seq or why not.
pub(crate) async fn tag(
    shim: &Shim,
    name: &str,
    app_consistent: bool,
    deadline_ns: Option<u64>,
) -> Result<u64, Refused> {
    check_name(name)?;
    let state = shim.inner().state_dir.clone();
    let _guard = TAG_LOCK.lock().await;
    let mut tags = read_tags(&state).map_err(|e| format!("cannot read the used tag names: {e}"))?;
    if let Some(t) = tags.iter().find(|t| t.name == name) {
        return Err(Refused {
            error: format!("tag name {name:?} is already used on this disk (seq {})", t.seq),
            existing: Some(t.clone()),
        });
    }
    let now = crate::now_ns();
    if deadline_ns.is_some_and(|d| now >= d) {
        return Err("the tag's deadline passed before it could be journaled (the filesystem is thawed by now); nothing was journaled".into());
    }
    let seq = shim
        .tag(name, app_consistent)
        .map_err(|e| format!("cannot journal the tag: {e}"))?;
    // Durable before the reply: a tag the user was told about survives a crash.
    shim.sync_all()
        .await
        .map_err(|e| format!("tag journaled at seq {seq} but not made durable: {e}"))?;
    tags.push(TagEntry {
        name: name.to_string(),
        seq,
        app_consistent,
        time_ns: now,
    });
    let body = serde_json::to_vec_pretty(&TagBook { tags }).map_err(|e| e.to_string())?;
    if let Err(e) = tidemark_util::crashsafe::write_atomic(&state.join(TAGS_FILE), &body) {
        // The tag is in the stream; only the local uniqueness check lost
        // it (the target still refuses a duplicate).
        warn!(disk = %shim.inner().disk_id, seq, "tag {name:?} journaled but {TAGS_FILE} not updated: {e}");
    }
    info!(disk = %shim.inner().disk_id, seq, app_consistent, "tag {name:?} journaled");
    // Tests: an answer that comes late (`return(MS)`), the lock still held.
    if let Some(ms) = fail::eval("agent-tag-slow-answer", |a| a.and_then(|a| a.parse::<u64>().ok())).flatten() {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    Ok(seq)
}

/// Record a full resync, durably; the sync driver runs it as a whole-disk
/// sync that compares each chunk with the replica's hash and sends only
/// what differs. Returns the full resyncs counted so far.
async fn resync_compare(shim: &Shim) -> Result<u64, String> {
    if shim
        .inner()
        .link
        .collector
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_none()
    {
        return Err("this agent ships to no collector (--collector): there is no replica to compare with".into());
    }
    let s = shim.clone();
    let f = tokio::task::spawn_blocking(move || crate::sync::begin_whole(&s, crate::sync_state::SyncKind::Full))
        .await
        .map_err(|e| format!("resync task: {e}"))?
        .map_err(|e| format!("cannot record the resync: {e:#}"))?;
    info!(disk = %shim.inner().disk_id, "a hash-compare resync of the whole disk was asked for");
    Ok(f.full_resyncs)
}

/// Answer one request line.
pub async fn handle(shim: &Shim, line: &str) -> String {
    let reply = match serde_json::from_str::<Request>(line) {
        Ok(r) if r.cmd == "status" => serde_json::json!({"ok": true, "status": Status::of(shim)}),
        Ok(r) if r.cmd == "metrics" => serde_json::json!({"ok": true, "metrics": crate::metrics::render(shim)}),
        Ok(r) if r.cmd == "tag" => match r.name {
            None => serde_json::json!({"ok": false, "error": "tag needs a \"name\""}),
            Some(name) => match tag(shim, &name, r.app_consistent, r.deadline_ns).await {
                Ok(seq) => serde_json::json!({"ok": true, "seq": seq}),
                Err(Refused { error, existing: None }) => serde_json::json!({"ok": false, "error": error}),
                Err(Refused {
                    error,
                    existing: Some(t),
                }) => serde_json::json!({
                    "ok": false,
                    "error": error,
                    "existing": {"seq": t.seq, "app_consistent": t.app_consistent, "time_ns": t.time_ns},
                }),
            },
        },
        Ok(r) if r.cmd == "resume" => match shim.resume() {
            Ok(()) => serde_json::json!({"ok": true}),
            Err(e) => serde_json::json!({"ok": false, "error": format!("cannot lift the quiesce: {e}")}),
        },
        Ok(r) if r.cmd == "resync-compare" => match resync_compare(shim).await {
            Ok(full_resyncs) => serde_json::json!({"ok": true, "full_resyncs": full_resyncs}),
            Err(e) => serde_json::json!({"ok": false, "error": e}),
        },
        Ok(r) => serde_json::json!({
            "ok": false,
            "error": format!("unknown command {:?} (known: status, metrics, tag, resync-compare, resume)", r.cmd)
        }),
        Err(e) => serde_json::json!({"ok": false, "error": format!("malformed request: {e}")}),
    };
    reply.to_string()
}

/// Serve the control socket until `stop` is cancelled.
/// Create the control socket at `path` (from `StateDir::free_control_path`,
/// which removed a stale one in the agent's own directory). Done before
/// the agent serves, so a path it cannot bind (a read-only directory) stops
/// the start with the reason. `protect` has already refused a path too long
/// for a unix socket.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    UnixListener::bind(path).map_err(|e| anyhow::anyhow!("cannot create the control socket {}: {e}", path.display()))
}

/// Answer control requests on `listener` (from [`bind`] at `path`) until
/// `stop`; removes the socket file then.
pub async fn serve(listener: UnixListener, path: PathBuf, shim: Shim, stop: CancellationToken) -> std::io::Result<()> {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r?,
        };
        let shim = shim.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd.take(1 << 16)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut out = handle(&shim, &line).await;
                out.push('\n');
                if wr.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
            debug!("control connection closed");
        });
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}
