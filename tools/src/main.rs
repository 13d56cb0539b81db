//! `tidemark`: the operator's command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[macro_use]
mod out;
mod cmd;

#[derive(Parser)]
#[command(
    name = "tidemark",
    version,
    about = "Tidemark: continuous data protection for block devices",
    after_help = "Examples:\n  tidemark status --api 127.0.0.1:7702\n  tidemark status --api 127.0.0.1:7702 --check --max-lag 2m\n  tidemark tag --agent /var/lib/tidemark/db before-upgrade\n  tidemark points --data /srv/replicas db"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// The deployment's CA certificate (an identity folder's ca.pem): the
    /// collector's API is then reached over HTTPS, and must hold a
    /// collector certificate of this CA.
    #[arg(long, global = true, value_name = "FILE", env = "TIDEMARK_API_CA")]
    api_ca: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// The deployment's certificate authority: create it, issue identities.
    #[command(subcommand)]
    Ca(cmd::ca::CaCmd),
    /// Inspect or replay an agent's change journal.
    #[command(subcommand)]
    Journal(cmd::journal::JournalCmd),
    /// Ask a running agent for its status (mode, seqs, journal use).
    #[command(
        override_usage = "tidemark agent-status --agent STATE_DIR [--json | --metrics]",
        after_help = "Examples:\n  tidemark agent-status --agent /var/lib/tidemark/db\n  tidemark agent-status --agent /var/lib/tidemark/db --json"
    )]
    AgentStatus(cmd::agent::AgentStatusArgs),
    /// Replication status of every disk, from the collector's API.
    #[command(
        override_usage = "tidemark status (--api URL | --data DIR | both) [--json] [--check [--max-lag DUR]]",
        after_help = "Examples:\n  tidemark status --api 127.0.0.1:7702\n  tidemark status --api 127.0.0.1:7702 --data /srv/replicas --json\n  tidemark status --api 127.0.0.1:7702 --check --max-lag 2m   # exit 0 ok, 1 warning, 2 critical"
    )]
    Status(cmd::status::StatusArgs),
    /// Wait until a disk's replica has caught up with its source.
    #[command(
        override_usage = "tidemark wait --api URL DISK [--timeout DUR]",
        after_help = "Example:\n  tidemark wait --api 127.0.0.1:7702 db --timeout 10m"
    )]
    Wait(cmd::status::WaitArgs),
    /// Insert a consistency tag through the agent (with --freeze: application-consistent).
    #[command(
        override_usage = "tidemark tag --agent STATE_DIR NAME [--freeze MOUNTPOINT] [--timeout DUR]",
        after_help = "Examples:\n  tidemark tag --agent /var/lib/tidemark/db before-upgrade\n  tidemark tag --agent /var/lib/tidemark/db nightly --freeze /mnt/db --timeout 20s\n\nA retry with the same name reports the tag already inserted (its seq) and succeeds."
    )]
    Tag(cmd::tag::TagArgs),
    /// List a disk's recovery points (time, seq, kind, tag).
    #[command(
        override_usage = "tidemark points --data DIR DISK [--json]",
        after_help = "Example:\n  tidemark points --data /srv/replicas db"
    )]
    Points(cmd::points::PointsArgs),
    /// Prove a disk's newest point recovers: check its filesystems on a throwaway layer (the running target does it).
    #[command(
        override_usage = "tidemark drill --data DIR DISK [--verbose] [--json]\n       tidemark drill --data DIR DISK --history [--limit N] [--verbose] [--json]",
        after_help = "Examples:\n  tidemark drill --data /srv/replicas db\n  tidemark drill --data /srv/replicas db --history\n\nExit status: 0 passed (or nothing checkable: skipped, with the reason), 1 failed or could not run."
    )]
    Drill(cmd::drill::DrillArgs),
    /// Serve a recovery point over NBD (and mount its filesystem) until signalled.
    #[command(
        override_usage = "tidemark mount --data DIR DISK --at SPEC --listen unix:SOCK [--writable] [--mountpoint DIR]",
        after_help = "Examples:\n  tidemark mount --data /srv/replicas db --at latest-app --listen unix:/run/db-view.sock\n  tidemark mount --data /srv/replicas db --at before-upgrade --listen unix:/run/db-view.sock --writable --mountpoint /mnt/drill"
    )]
    Mount(cmd::mount::MountArgs),
    /// Materialize a recovery point as a disk image and record the failover.
    #[command(
        override_usage = "tidemark failover --data DIR DISK --at SPEC --output FILE [--format raw|vmdk-flat|vmdk-sparse|vmdk-stream] [--force] [--no-drain]",
        after_help = "Examples:\n  # writes stopped, tidemark wait returned: nothing acknowledged is lost\n  tidemark failover --data /srv/replicas db --at latest --output /srv/recovered/db.vmdk --format vmdk-sparse\n  # the primary site is gone with its collector: take what the replica holds\n  tidemark failover --data /srv/replicas db --at latest --no-drain --output /srv/recovered/db.raw\n  # an earlier point: a tag, a time, or a relative time\n  tidemark failover --data /srv/replicas db --at '2h ago' --output db-2h.raw"
    )]
    Failover(cmd::failover::FailoverArgs),
    /// Make the old source's disk the replica of its failed-over copy, so
    /// the way back resyncs only what differs (docs/failback.md).
    #[command(
        override_usage = "tidemark reprotect --data DIR DISK --replica FILE (--agent-state DIR | --discard-divergent) [--discard-divergent]",
        after_help = "Example (site A is back; its agent is stopped; the failed-over copy runs on site B):\n  tidemark reprotect --data /srv/replicas db --replica /dev/vg0/db.raw --agent-state /var/lib/tidemark/db\n  tidemark-target --data /srv/replicas --listen 0.0.0.0:7790 --token-file /etc/tidemark/token"
    )]
    Reprotect(cmd::reprotect::ReprotectArgs),
    /// Resync a disk's whole replica by hash-compare: both read, only what differs sent.
    #[command(
        override_usage = "tidemark resync --agent STATE_DIR DISK --compare",
        after_help = "Example:\n  tidemark resync --agent /var/lib/tidemark/db db --compare\n  tidemark agent-status --agent /var/lib/tidemark/db   # progress; 'hash-compared' says how much was equal"
    )]
    Resync(cmd::resync::ResyncArgs),
    /// A one-time enrollment token: the service trades it for its certificate on first contact.
    #[command(override_usage = cmd::ca::ENROLL_USAGE, after_help = cmd::ca::ENROLL_HELP)]
    Enroll(cmd::ca::EnrollArgs),
    /// Revoke every certificate issued to an identity (writes CADIR/crl.pem).
    #[command(
        override_usage = "tidemark revoke --ca CADIR NAME [--role agent|collector|target]",
        after_help = cmd::ca::REVOKE_HELP
    )]
    Revoke(cmd::ca::RevokeArgs),
    /// Allow a disk's next Hello to rebind it (new disk UUID, or another agent identity).
    #[command(
        override_usage = "tidemark rebind DISK --api URL --token-file FILE [--owner NAME]",
        after_help = "Example:\n  tidemark rebind db --api 127.0.0.1:7702 --token-file /etc/tidemark/token\n  tidemark-agent protect ... --force-resync   # then, within the hour"
    )]
    Rebind(cmd::rebind::RebindArgs),
    /// The collector's event log: links, syncs, resyncs and operator actions.
    #[command(
        override_usage = "tidemark events [DISK] --api URL [--limit N] [--json]",
        after_help = "Example:\n  tidemark events --api 127.0.0.1:7702\n  tidemark events db --api 127.0.0.1:7702 --limit 200"
    )]
    Events(cmd::events::EventsArgs),
    /// API tokens with roles (viewer, operator, admin) for the collector's --api-tokens file.
    #[command(subcommand)]
    ApiToken(cmd::apitoken::ApiTokenCmd),
    /// Take writes again on a disk quiesced by a planned failover that did not go ahead.
    #[command(override_usage = "tidemark resume --agent STATE_DIR DISK")]
    Resume(cmd::resync::ResumeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cmd::status::set_api_ca(cli.api_ca);
    let r = match cli.cmd {
        Cmd::Status(a) => cmd::status::status(a),
        Cmd::Journal(c) => cmd::journal::run(c).map(ok),
        Cmd::Ca(c) => cmd::ca::run(c).map(ok),
        Cmd::AgentStatus(a) => cmd::agent::status(a).map(ok),
        Cmd::Wait(a) => cmd::status::wait(a).map(ok),
        Cmd::Tag(a) => cmd::tag::tag(a).map(ok),
        Cmd::Points(a) => cmd::points::points(a).map(ok),
        Cmd::Drill(a) => cmd::drill::drill(a).map(ok),
        Cmd::Mount(a) => cmd::mount::mount(a).map(ok),
        Cmd::Failover(a) => cmd::failover::failover(a).map(ok),
        Cmd::Reprotect(a) => cmd::reprotect::reprotect(a).map(ok),
        Cmd::Resync(a) => cmd::resync::resync(a).map(ok),
        Cmd::Resume(a) => cmd::resync::resume(a).map(ok),
        Cmd::Rebind(a) => cmd::rebind::rebind(a).map(ok),
        Cmd::Events(a) => cmd::events::events(a).map(ok),
        Cmd::Revoke(a) => cmd::ca::run(cmd::ca::CaCmd::Revoke(a)).map(ok),
        Cmd::Enroll(a) => cmd::ca::run(cmd::ca::CaCmd::Enroll(a)).map(ok),
        Cmd::ApiToken(c) => cmd::apitoken::run(c).map(ok),
    };
    let code = match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tidemark: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // Output the reader closed early (`| head -1`) is not a failure; any
    // other trouble writing it is.
    if let Some(e) = out::failure() {
        eprintln!("tidemark: error: cannot write the output: {e}");
        return ExitCode::FAILURE;
    }
    code
}

fn ok(_: ()) -> ExitCode {
    ExitCode::SUCCESS
}
