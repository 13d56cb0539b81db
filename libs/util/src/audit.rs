//! The append-only audit log (`docs/security.md`, "Audit log"): one JSON
//! line per operator action — who, what, on which disk, when, and the
//! result — appended with `O_APPEND`, made durable before the call
//! returns, in a file only its owner may read or write (0600).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The audit log's file name in a service's state directory.
pub const AUDIT_FILE: &str = "audit.log";

/// One audit entry.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Who acted: an identity, `token holder from ADDR`, or a local user.
    pub who: &'a str,
    /// The action (`rebind`, `quiesce`, `failover`, `mount`…).
    pub action: &'a str,
    /// What it acted on (a disk id).
    pub subject: &'a str,
    /// The result, or details.
    pub result: &'a str,
}

/// Append `e` to `path` durably (created 0600 if missing).
pub fn append(path: &Path, e: &Entry<'_>) -> std::io::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let line = serde_json::json!({
        "time": crate::human::format_unix_time(i64::try_from(now.as_secs()).unwrap_or(i64::MAX)),
        "unix": now.as_secs(),
        "who": e.who,
        "action": e.action,
        "subject": e.subject,
        "result": e.result,
    });
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    let mut text = line.to_string();
    text.push('\n');
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn entries_are_appended_one_json_line_each_and_private() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(AUDIT_FILE);
        for (i, who) in ["alice", "bob \"quoted\"\n"].iter().enumerate() {
            let e = Entry {
                who,
                action: "rebind",
                subject: "db",
                result: &format!("ok {i}"),
            };
            append(&p, &e).unwrap();
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[1]["who"], "bob \"quoted\"\n");
        assert_eq!(lines[0]["result"], "ok 0");
        assert!(lines[0]["time"].as_str().unwrap().ends_with(" UTC"));
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
