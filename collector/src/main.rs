//! The `tidemark-collector` binary: command line, logging, runtime, signals.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use tidemark_collector::config::{read_token, Config, DEFAULT_SPOOL_CAP};
use tidemark_util::human::parse_size;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "tidemark-collector",
    version,
    about = "Tidemark collector: receive change streams from agents, spool them durably, forward them packed to the target"
)]
struct Cli {
    /// Where agents connect (HOST:PORT).
    #[arg(long)]
    listen: String,
    /// Spool directory (catalog.db and one folder per disk).
    #[arg(long)]
    spool: PathBuf,
    /// The target (HOST:PORT).
    #[arg(long)]
    target: String,
    /// The HTTP status API (HOST:PORT).
    #[arg(long)]
    api: String,
    /// File holding the shared token (surrounding whitespace is ignored).
    #[arg(long)]
    token_file: PathBuf,
    /// Spool size at which agents are no longer read (e.g. 8GiB).
    #[arg(long)]
    spool_cap: Option<String>,
}

fn build(cli: Cli) -> Result<Config> {
    let token = read_token(&cli.token_file)?;
    let mut cfg = Config::new(cli.listen, cli.spool, cli.target, cli.api, token);
    cfg.spool_cap = match cli.spool_cap {
        Some(s) => parse_size(&s).context("--spool-cap")?,
        None => DEFAULT_SPOOL_CAP,
    };
    if cfg.spool_cap == 0 {
        anyhow::bail!("--spool-cap must be more than 0");
    }
    Ok(cfg)
}

async fn run(cfg: Config) -> Result<()> {
    let stop = CancellationToken::new();
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: stopping"),
                _ = int.recv() => info!("SIGINT: stopping"),
            }
            stop.cancel();
        });
    }
    tidemark_collector::run(cfg, stop).await
}

fn main() -> ExitCode {
    tidemark_util::init_logging();
    // A panic anywhere (a failpoint's `panic` action included) kills the
    // process at once, as a crash would: no unwinding into half-done state.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let r = build(cli).and_then(|cfg| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("start runtime")?;
        rt.block_on(run(cfg))
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark-collector: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
