//! The control socket (`STATE/control.sock`): one JSON request per line,
//! one JSON reply per line. Today it answers `{"cmd":"status"}` and
//! `{"cmd":"metrics"}` (Prometheus text in the `metrics` key); tag
//! requests join with the recovery tooling.

use std::path::PathBuf;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::shim::Shim;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    cmd: String,
}

/// Answer one request line.
pub fn handle(shim: &Shim, line: &str) -> String {
    let reply = match serde_json::from_str::<Request>(line) {
        Ok(r) if r.cmd == "status" => serde_json::json!({"ok": true, "status": shim.status()}),
        Ok(r) if r.cmd == "metrics" => serde_json::json!({"ok": true, "metrics": shim.metrics()}),
        Ok(r) => {
            serde_json::json!({"ok": false, "error": format!("unknown command {:?} (known: status, metrics)", r.cmd)})
        }
        Err(e) => serde_json::json!({"ok": false, "error": format!("malformed request: {e}")}),
    };
    reply.to_string()
}

/// Serve the control socket until `stop` is cancelled.
pub async fn serve(path: PathBuf, shim: Shim, stop: CancellationToken) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
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
                let mut out = handle(&shim, &line);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ListenAddr, ProtectConfig};

    #[test]
    fn answers_status_metrics_and_refuses_garbage() {
        let d = tempfile::tempdir().unwrap();
        let cfg = ProtectConfig {
            disk: d.path().join("d.img"),
            state: d.path().join("st"),
            listen: ListenAddr::Unix(d.path().join("s")),
            disk_id: "ctl".into(),
            create_size: Some(1 << 20),
            journal_cap: None,
            bench_consume: false,
            ship: None,
        };
        let o = crate::run::open(&cfg).unwrap();
        let v: serde_json::Value = serde_json::from_str(&handle(&o.shim, r#"{"cmd":"status"}"#)).unwrap();
        assert_eq!(v["status"]["disk_id"], "ctl");
        assert_eq!(v["status"]["mode"], "journal");
        let v: serde_json::Value = serde_json::from_str(&handle(&o.shim, r#"{"cmd":"metrics"}"#)).unwrap();
        assert!(v["metrics"]
            .as_str()
            .unwrap()
            .contains("tidemark_agent_writes_total{disk=\"ctl\"} 0"));
        let v: serde_json::Value = serde_json::from_str(&handle(&o.shim, r#"{"cmd":"launch"}"#)).unwrap();
        assert!(v["error"].as_str().unwrap().contains("unknown command"));
        let v: serde_json::Value = serde_json::from_str(&handle(&o.shim, "not json")).unwrap();
        assert!(v["error"].as_str().unwrap().contains("malformed request"));
    }
}
