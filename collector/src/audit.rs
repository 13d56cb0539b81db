//! The collector's audit log, `<spool>/audit.log` (`docs/security.md`):
//! every operator action through the API and every rebind it allowed.

use tidemark_util::audit::{append, Entry, AUDIT_FILE};
use tracing::{error, info};

use crate::catalog::Severity;
use crate::state::Shared;

/// Record an action durably; a failure to record is logged at error (the
/// action itself has happened or been refused already).
pub(crate) fn record(shared: &Shared, who: &str, action: &str, subject: &str, result: &str) {
    let e = Entry {
        who,
        action,
        subject,
        result,
    };
    let severity = if result.starts_with("refused") {
        Severity::Warning
    } else {
        Severity::Info
    };
    // The event log shows it too (GET /api/v1/events); the audit file is
    // the durable, append-only record.
    shared.event(
        tidemark_wire::DiskId::parse(subject).ok().map(|_| subject),
        "operator",
        severity,
        &format!("{action} {subject}: {result}"),
        Some(who),
    );
    let path = shared.cfg.spool.join(AUDIT_FILE);
    match append(&path, &e) {
        Ok(()) => info!(who, action, subject, result, "audit"),
        Err(err) => error!(who, action, subject, result, "audit log {}: {err}", path.display()),
    }
}
