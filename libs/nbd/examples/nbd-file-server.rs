//! Serves a plain file (or block device) over NBD.
//!
//! ```text
//! nbd-file-server [--read-only] [--name NAME] [--single-thread] FILE unix:SOCK|tcp:HOST:PORT
//! ```
//!
//! `--single-thread` runs everything on one thread (a current-thread tokio
//! runtime): a little faster for a single client, no parallelism across
//! clients.
//!
//! The export is available under NAME (default: the file's name) and under
//! the empty name. SIGINT/SIGTERM stop it gracefully: in-flight requests are
//! answered, then the file is fsynced. Logs go to stderr (RUST_LOG=debug for
//! one line per connection).

use std::sync::Arc;

use anyhow::{bail, Context};
use tidemark_nbd::{bind, parse_listen, serve, FileBackend};
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: nbd-file-server [--read-only] [--name NAME] [--single-thread] FILE unix:SOCK|tcp:HOST:PORT";

fn main() -> anyhow::Result<()> {
    tidemark_util::init_logging();

    let mut read_only = false;
    let mut single_thread = false;
    let mut name = None;
    let mut positional = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--read-only" => read_only = true,
            "--single-thread" => single_thread = true,
            "--name" => name = Some(args.next().context(USAGE)?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            _ if a.starts_with('-') => bail!("unknown option {a}\n{USAGE}"),
            _ => positional.push(a),
        }
    }
    let [file, listen] = positional.as_slice() else {
        bail!("{USAGE}");
    };
    let addr = parse_listen(listen)?;
    let mut backend = FileBackend::open(file, read_only).with_context(|| format!("opening {file}"))?;
    if let Some(n) = name {
        backend.info_mut().name = n;
    }
    let backend = Arc::new(backend);

    let rt = if single_thread {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    }
    .context("starting tokio")?;
    rt.block_on(async {
        let listener = bind(&addr).await?;
        let shutdown = CancellationToken::new();
        tidemark_util::service::cancel_on_signals(&shutdown).context("catching SIGINT/SIGTERM")?;
        tracing::info!(export = %backend_name(&backend), size = backend_size(&backend), "serving {file} on {addr}");
        serve(listener, Arc::clone(&backend), shutdown)
            .await
            .context("serving")?;
        if let tidemark_nbd::ListenAddr::Unix(p) = &addr {
            let _ = std::fs::remove_file(p);
        }
        if !read_only {
            backend.file().sync_all().context("final fsync")?;
        }
        anyhow::Ok(())
    })
}

fn backend_name(b: &FileBackend) -> String {
    use tidemark_nbd::Backend;
    b.info().name
}

fn backend_size(b: &FileBackend) -> u64 {
    use tidemark_nbd::Backend;
    b.info().size
}
