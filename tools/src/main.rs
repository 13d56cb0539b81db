//! `tidemark`: the operator's command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(
    name = "tidemark",
    version,
    about = "Tidemark: continuous data protection for block devices"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Inspect or replay an agent's change journal.
    #[command(subcommand)]
    Journal(cmd::journal::JournalCmd),
    /// Ask a running agent for its status (mode, seqs, journal use).
    AgentStatus(cmd::agent::AgentStatusArgs),
    /// Replication status of every disk, from the collector's API.
    Status(cmd::status::StatusArgs),
    /// Wait until a disk's replica has caught up with its source.
    Wait(cmd::status::WaitArgs),
    /// Insert a consistency tag through the agent (with --freeze: application-consistent).
    Tag(cmd::tag::TagArgs),
    /// List a disk's recovery points (time, seq, kind, tag).
    Points(cmd::points::PointsArgs),
    /// Serve a recovery point over NBD (and mount its filesystem) until signalled.
    Mount(cmd::mount::MountArgs),
    /// Materialize a recovery point as a disk image and record the failover.
    Failover(cmd::failover::FailoverArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Journal(c) => cmd::journal::run(c),
        Cmd::AgentStatus(a) => cmd::agent::status(a),
        Cmd::Status(a) => cmd::status::status(a),
        Cmd::Wait(a) => cmd::status::wait(a),
        Cmd::Tag(a) => cmd::tag::tag(a),
        Cmd::Points(a) => cmd::points::points(a),
        Cmd::Mount(a) => cmd::mount::mount(a),
        Cmd::Failover(a) => cmd::failover::failover(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
