//! The `tidemark-agent` binary: command line and configuration file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use tidemark_agent::config::{DiskId, ProtectConfig, ShipConfig, UblkOptions};
use tidemark_util::human::parse_size;

#[derive(Parser)]
#[command(
    name = "tidemark-agent",
    version,
    about = "Tidemark agent: protect a disk behind a journaling block shim",
    after_help = "Example:\n  tidemark-agent protect --disk /var/lib/vm/db.img --state /var/lib/tidemark/db \\\n      \
                  --listen unix:/run/tidemark/db.sock"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a protected disk over NBD and/or as a ublk block device,
    /// journaling every write.
    #[command(
        override_usage = "tidemark-agent protect --disk PATH --state DIR (--listen ADDR | --ublk) [OPTIONS]\n       \
                          tidemark-agent protect --config FILE [OPTIONS]",
        after_help = "--disk and --state are required, and --listen or --ublk (or both), unless the \
                      --config file gives them.\n\n\
                      Examples:\n  \
                      tidemark-agent protect --disk /var/lib/vm/db.img --state /var/lib/tidemark/db \\\n      \
                      --listen unix:/run/tidemark/db.sock --collector dr.example:7700 --token-file /etc/tidemark/token \\\n      \
                      --tls /etc/tidemark/tls\n  \
                      tidemark-agent protect --disk /tmp/test.img --create-size 4G --state /tmp/test.state \\\n      \
                      --listen tcp:127.0.0.1:10809\n  \
                      tidemark-agent protect --config /etc/tidemark/db.toml"
    )]
    Protect(ProtectArgs),
}

#[derive(clap::Args)]
struct ProtectArgs {
    /// TOML file with any of the keys below (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The protected disk: a regular file or a block device.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// State directory (journal, bitmap, control socket).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Where to serve NBD: unix:PATH or tcp:HOST:PORT (optional with --ublk).
    #[arg(long)]
    listen: Option<String>,
    /// Allow --listen tcp:…: NBD over TCP has no authentication and no
    /// encryption here (STARTTLS is not built); anyone who reaches the port
    /// reads and writes the disk.
    #[arg(long)]
    insecure_tcp: bool,
    /// Also (or only) serve the disk as a kernel block device /dev/ublkbN
    /// through the ublk driver (Linux 6.0+, module ublk_drv).
    #[arg(long)]
    ublk: bool,
    /// With --ublk: the device number N of /dev/ublkbN. Default: the device
    /// this state directory used last (re-attached if it is still there),
    /// else the next free one.
    #[arg(long)]
    ublk_id: Option<u32>,
    /// With --ublk: hardware queues, one server thread each (1-16, default 1).
    #[arg(long)]
    queues: Option<u16>,
    /// With --ublk: requests in flight per queue (1-4096, default 64).
    #[arg(long)]
    depth: Option<u16>,
    /// Disk id (1–64 of A-Z a-z 0-9 . _ -); default: the disk's file name.
    #[arg(long)]
    disk_id: Option<String>,
    /// Create a sparse file of this size if the disk does not exist (e.g. 4G).
    #[arg(long)]
    create_size: Option<String>,
    /// Journal size cap (e.g. 2G); default 10 % of the disk, at least 1 GiB.
    #[arg(long)]
    journal_cap: Option<String>,
    /// Ship the journal to this collector (HOST:PORT); without it the
    /// agent only journals.
    #[arg(long)]
    collector: Option<String>,
    /// File holding the collector's shared token (required with --collector).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Rebind this disk id at the collector to this disk (after the disk
    /// was replaced) and resync the whole disk.
    #[arg(long)]
    force_resync: bool,
    /// The agent's identity folder (`tidemark ca issue --role agent`): the
    /// collector is reached over mutual TLS and must hold a collector
    /// certificate of the same CA (with --collector).
    #[arg(long, value_name = "DIR")]
    tls: Option<PathBuf>,
    /// Ship to the collector in clear text, unauthenticated but for the
    /// token (said in agent-status and the log).
    #[arg(long)]
    insecure_plaintext: bool,
    /// Benchmarks only: consume the journal locally so segments recycle
    /// (refused with --collector, by `protect`).
    #[arg(long, hide = true)]
    bench_consume: bool,
}

/// The configuration file: the same keys as the flags.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    disk: Option<PathBuf>,
    state: Option<PathBuf>,
    listen: Option<String>,
    insecure_tcp: bool,
    ublk: bool,
    ublk_id: Option<u32>,
    queues: Option<u16>,
    depth: Option<u16>,
    disk_id: Option<String>,
    create_size: Option<String>,
    journal_cap: Option<String>,
    collector: Option<String>,
    token_file: Option<PathBuf>,
    force_resync: bool,
    tls: Option<PathBuf>,
    insecure_plaintext: bool,
}

fn build(a: ProtectArgs) -> Result<ProtectConfig> {
    let file: FileConfig = match &a.config {
        Some(p) => {
            let s = std::fs::read_to_string(p).with_context(|| format!("read config {}", p.display()))?;
            toml::from_str(&s).map_err(|e| anyhow::anyhow!("config {}: {}", p.display(), e.message()))?
        }
        None => FileConfig::default(),
    };
    let disk = a
        .disk
        .or(file.disk)
        .context("--disk is required (or `disk` in the config file)")?;
    let state = a
        .state
        .or(file.state)
        .context("--state is required (or `state` in the config file)")?;
    let listen = a
        .listen
        .or(file.listen)
        .map(|l| tidemark_nbd::parse_listen(&l).map_err(|e| anyhow::anyhow!("--listen: {e}")))
        .transpose()?;
    if let Some(l @ tidemark_nbd::ListenAddr::Tcp { .. }) = &listen {
        if !(a.insecure_tcp || file.insecure_tcp) {
            anyhow::bail!(
                "--listen {l}: NBD over TCP has no authentication and no encryption (anyone who reaches the port \
                 reads and writes the disk); listen on unix:PATH, or give --insecure-tcp (`insecure_tcp = true`) \
                 to accept that"
            );
        }
    }
    let ublk = if a.ublk || file.ublk {
        let d = UblkOptions::default();
        let queues = a.queues.or(file.queues).unwrap_or(d.queues);
        let depth = a.depth.or(file.depth).unwrap_or(d.depth);
        if !(1..=16).contains(&queues) {
            anyhow::bail!("--queues {queues} is out of range: give 1 to 16");
        }
        if !(1..=4096).contains(&depth) {
            anyhow::bail!("--depth {depth} is out of range: give 1 to 4096");
        }
        Some(UblkOptions {
            id: a.ublk_id.or(file.ublk_id),
            queues,
            depth,
        })
    } else {
        if a.ublk_id.is_some() || a.queues.is_some() || a.depth.is_some() {
            anyhow::bail!("--ublk-id, --queues and --depth need --ublk (or `ublk = true` in the config file)");
        }
        if file.ublk_id.is_some() || file.queues.is_some() || file.depth.is_some() {
            anyhow::bail!("`ublk_id`, `queues` and `depth` in the config file need `ublk = true`");
        }
        None
    };
    if listen.is_none() && ublk.is_none() {
        anyhow::bail!("give --listen (NBD), --ublk, or both (or `listen` / `ublk` in the config file)");
    }
    let disk_id = match a.disk_id.or(file.disk_id) {
        Some(id) => id,
        None => disk
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .context("cannot derive a disk id from the disk path; give --disk-id")?,
    };
    let disk_id = DiskId::parse(&disk_id)?;
    let size = |flag: &str, v: Option<String>| -> Result<Option<u64>> {
        v.map(|s| parse_size(&s).with_context(|| format!("--{flag}")))
            .transpose()
    };
    let ship = match a.collector.or(file.collector) {
        Some(addr) => {
            let tf = a
                .token_file
                .or(file.token_file)
                .context("--token-file is required with --collector (or `token_file` in the config file)")?;
            tidemark_net::tls::private_file(&tf).map_err(anyhow::Error::msg)?;
            let token = std::fs::read_to_string(&tf)
                .with_context(|| format!("read token file {}", tf.display()))?
                .trim()
                .as_bytes()
                .to_vec();
            if token.is_empty() {
                anyhow::bail!("token file {} is empty", tf.display());
            }
            if !addr.contains(':') {
                anyhow::bail!("--collector {addr} must be HOST:PORT");
            }
            let tls = a.tls.or(file.tls);
            let plaintext = a.insecure_plaintext || file.insecure_plaintext;
            // A folder from `tidemark enroll`: the certificate comes at the
            // first contact with the collector.
            let enroll = tls
                .clone()
                .filter(|d| !plaintext && tidemark_net::enroll::awaiting_enrollment(d));
            let security = match &enroll {
                Some(d) => {
                    tidemark_net::tls::private_file(&d.join(tidemark_net::ca::ENROLL_TOKEN_FILE))
                        .map_err(anyhow::Error::msg)?;
                    tidemark_net::Security::Plaintext
                }
                None => tidemark_net::Security::from_flags(tls.as_deref(), plaintext, tidemark_net::PeerRole::Agent)
                    .map_err(anyhow::Error::msg)?,
            };
            Some(ShipConfig {
                addr,
                token,
                force_resync: a.force_resync || file.force_resync,
                security,
                enroll,
            })
        }
        None => {
            if a.force_resync || file.force_resync {
                anyhow::bail!("--force-resync needs --collector");
            }
            if a.tls.is_some() || file.tls.is_some() || a.insecure_plaintext || file.insecure_plaintext {
                anyhow::bail!("--tls and --insecure-plaintext are for the collector connection: they need --collector");
            }
            None
        }
    };
    Ok(ProtectConfig {
        create_size: size("create-size", a.create_size.or(file.create_size))?,
        journal_cap: size("journal-cap", a.journal_cap.or(file.journal_cap))?,
        disk,
        state,
        listen,
        ublk,
        disk_id,
        bench_consume: a.bench_consume,
        ship,
    })
}

fn main() -> ExitCode {
    // Logging; a panic anywhere (a failpoint set to `panic`, or a bug) ends
    // the process at once, like a crash; failpoints (tests only).
    let service = tidemark_util::service::start();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Protect(a) => build(a).and_then(|cfg| {
            // One thread runs the protocol and small I/O: a connection's
            // requests are one task anyway, and work stealing between
            // threads only added hops (measured: 4 KiB random writes went
            // from 0.68x to 0.94x nbdkit). Large writes and fdatasyncs run on
            // the blocking pool, so they use the other cores.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("start runtime")?;
            rt.block_on(tidemark_agent::run::protect(cfg))
        }),
    };
    drop(service);
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark-agent: error: {}", tidemark_util::owned::report(e.chain()));
            ExitCode::FAILURE
        }
    }
}
