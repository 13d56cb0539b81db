//! `tidemark rebind`: an operator's leave for a disk's next Hello to
//! rebind it (`docs/security.md`, "Operator actions"). An agent alone can
//! never replace a disk's history: its `--force-resync` to a new disk UUID
//! and a connection under another agent identity are refused until an
//! operator allows it here. The old history is kept, not deleted.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct RebindArgs {
    /// The disk id.
    disk: String,
    /// The collector's API (`HOST:PORT` or a URL).
    #[arg(long)]
    api: String,
    /// The collector's token (the operator's credential; 0600).
    #[arg(long)]
    token_file: PathBuf,
    /// Let the agent identity NAME (its certificate's name) take the disk
    /// over: a server moved to new hardware with a new identity.
    #[arg(long, value_name = "NAME")]
    owner: Option<String>,
}

/// Ask the collector for the leave; print what happens next.
pub fn rebind(a: RebindArgs) -> Result<()> {
    tidemark_wire::DiskId::parse(&a.disk).map_err(anyhow::Error::msg)?;
    if let Some(o) = &a.owner {
        tidemark_wire::DiskId::parse(o).map_err(|e| anyhow::anyhow!("--owner {o:?}: {e}"))?;
    }
    tidemark_net::tls::private_file(&a.token_file).map_err(anyhow::Error::msg)?;
    let token =
        std::fs::read_to_string(&a.token_file).with_context(|| format!("--token-file {}", a.token_file.display()))?;
    let path = match &a.owner {
        Some(o) => format!("/api/v1/disks/{}/rebind?owner={o}", a.disk),
        None => format!("/api/v1/disks/{}/rebind", a.disk),
    };
    let v = super::status::call_with(&a.api, "POST", &path, Some(token.trim()))
        .with_context(|| format!("allow a rebind of {}", a.disk))?;
    let ttl = v["valid_for_s"].as_u64().unwrap_or(0);
    outln!(
        "rebind of {} allowed for {}: its next Hello may bind it to a new disk (the agent's --force-resync){}",
        a.disk,
        tidemark_util::human::format_duration(std::time::Duration::from_secs(ttl)),
        a.owner
            .as_deref()
            .map(|o| format!(" and to agent {o}"))
            .unwrap_or_default()
    );
    outln!(
        "the old history is kept: at the target as disk {}.replaced-<old uuid>, at the collector in .kept/",
        a.disk
    );
    Ok(())
}
