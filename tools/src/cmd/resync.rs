//! `tidemark resync --agent STATE DISK --compare` and `tidemark resume`.
//!
//! `tidemark resync --agent STATE DISK --compare`: ask a running agent to
//! resync the whole disk by hash-compare (`docs/failback.md`, section 4):
//! both the disk and its replica are read, and only the 64 KiB chunks whose
//! blake3 differ are sent. For when the operator doubts the replica (a
//! restored backup written under the agent, a suspected bit rot), not for
//! routine use: the replica is not consistent until it is done.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

#[derive(Args)]
pub struct ResyncArgs {
    /// The agent's state directory (the agent must be running).
    #[arg(long, value_name = "STATE_DIR")]
    agent: PathBuf,
    /// The disk id (checked against the agent's).
    disk: tidemark_wire::DiskId,
    /// Compare the whole disk with the replica, chunk by chunk, and send
    /// only what differs (the only kind of whole-disk resync there is).
    #[arg(long)]
    compare: bool,
}

/// The status of the agent at `state`, which must protect `disk`.
fn agent_of(state: &std::path::Path, disk: &tidemark_wire::DiskId) -> Result<serde_json::Value> {
    let status = super::agent::request(state, &json!({"cmd": "status"}))?;
    let id = status["status"]["disk_id"].as_str().unwrap_or_default();
    if id != disk.as_str() {
        bail!(
            "the agent at {} protects disk {id:?}, not {:?}",
            state.display(),
            disk.as_str()
        );
    }
    Ok(status)
}

pub fn resync(a: ResyncArgs) -> Result<()> {
    if !a.compare {
        bail!("say how: --compare (hash-compare the whole disk with its replica, sending only what differs)");
    }
    agent_of(&a.agent, &a.disk)?;
    let r = super::agent::request(&a.agent, &json!({"cmd": "resync-compare"}))?;
    outln!(
        "hash-compare resync of {} recorded (full resync #{}); follow it with tidemark agent-status --agent {}",
        a.disk.as_str(),
        r["full_resyncs"].as_u64().unwrap_or(0),
        a.agent.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct ResumeArgs {
    /// The agent's state directory (the agent must be running).
    #[arg(long, value_name = "STATE_DIR")]
    agent: PathBuf,
    /// The disk id (checked against the agent's).
    disk: tidemark_wire::DiskId,
}

/// `tidemark resume --agent STATE DISK`: take writes again after a quiesce
/// (`failover --planned`) whose failback did not go ahead.
pub fn resume(a: ResumeArgs) -> Result<()> {
    let status = agent_of(&a.agent, &a.disk)?;
    if status["status"]["quiesced_at_seq"].is_null() {
        outln!("{} is not quiesced: it takes writes", a.disk.as_str());
        return Ok(());
    }
    super::agent::request(&a.agent, &json!({"cmd": "resume"}))?;
    outln!("{} takes writes again", a.disk.as_str());
    Ok(())
}
