//! The `tidemark-target` binary: command line, configuration file, signals.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Deserialize;
use tidemark_target::retention::OnFull;
use tidemark_target::Config;
use tidemark_util::human::{parse_duration, parse_size};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "tidemark-target",
    version,
    about = "Tidemark target: apply replicated disk streams to replicas (raw or VMDK)",
    override_usage = "tidemark-target --listen HOST:PORT --data DIR --token-file FILE (--tls DIR | --insecure-plaintext) [OPTIONS]\n       \
                      tidemark-target --config FILE [OPTIONS]",
    after_help = "--listen, --data, --token-file and --tls (or --insecure-plaintext) are required unless the --config file \
                  gives them.\n\n\
                  Examples:\n  \
                  tidemark-target --listen 0.0.0.0:7800 --data /srv/tidemark/data --token-file /etc/tidemark/token \
                  --tls /etc/tidemark/tls\n  \
                  tidemark-target --listen 0.0.0.0:7800 --data /srv/tidemark/data --token-file /etc/tidemark/token \\\n      \
                  --tls /etc/tidemark/tls --retention-window 72h --retention-max 500G --on-full prune\n  \
                  tidemark-target --config /etc/tidemark/target.toml"
)]
struct Cli {
    /// TOML file with any of the keys below (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where to accept collector connections (HOST:PORT).
    #[arg(long)]
    listen: Option<String>,
    /// Data directory: catalog.db and one folder per disk.
    #[arg(long)]
    data: Option<PathBuf>,
    /// File holding the shared token (surrounding whitespace is stripped).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// New disks: keep recovery points this long (e.g. 24h, 90m; 0 turns
    /// retention off). Default 24h.
    #[arg(long, value_name = "DUR")]
    retention_window: Option<String>,
    /// New disks: cap on undo data (e.g. 50G). Default: no cap.
    #[arg(long, value_name = "SIZE")]
    retention_max: Option<String>,
    /// New disks: at the cap, prune the oldest points or stop applying.
    #[arg(long, value_name = "prune|stop")]
    on_full: Option<String>,
    /// New disks: at most one crash-consistent point per this much time
    /// (default 1s).
    #[arg(long, value_name = "DUR")]
    point_interval: Option<String>,
    /// New disks: the replica's format (default raw). VMDK sizes are the
    /// disk's rounded up to 512 bytes.
    #[arg(long, value_name = "raw|vmdk-flat|vmdk-sparse")]
    format: Option<String>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (default: only
    /// through the control socket's `metrics` op).
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// The target's identity folder (`tidemark ca issue --role target`):
    /// collectors connect over mutual TLS with collector certificates of
    /// the same CA.
    #[arg(long, value_name = "DIR")]
    tls: Option<PathBuf>,
    /// Take collector connections in clear text, unauthenticated but for
    /// the token (say so in status and logs).
    #[arg(long)]
    insecure_plaintext: bool,
    /// The collector (its agent port, HOST:PORT) where this target trades
    /// the enrollment token of its --tls folder (`tidemark enroll --role
    /// target`) for its certificate, and renews it before it expires.
    #[arg(long, value_name = "HOST:PORT")]
    enroll_at: Option<String>,
}

/// The configuration file: the same keys as the flags.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    listen: Option<String>,
    data: Option<PathBuf>,
    token_file: Option<PathBuf>,
    retention_window: Option<String>,
    retention_max: Option<String>,
    on_full: Option<String>,
    point_interval: Option<String>,
    format: Option<String>,
    metrics: Option<String>,
    tls: Option<PathBuf>,
    insecure_plaintext: bool,
    enroll_at: Option<String>,
}

/// Enrollment and renewal at a collector: the identity folder (None: it
/// holds a certificate already) and the collector's address.
#[derive(Debug)]
struct Enroll {
    awaiting: Option<PathBuf>,
    at: String,
}

fn read_token(path: &Path) -> Result<Vec<u8>> {
    tidemark_net::tls::private_file(path).map_err(anyhow::Error::msg)?;
    let raw = std::fs::read(path).with_context(|| format!("read token file {}", path.display()))?;
    let token = raw.trim_ascii();
    if token.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    Ok(token.to_vec())
}

fn build(cli: Cli) -> Result<(Config, Option<Enroll>)> {
    let file: FileConfig = match &cli.config {
        Some(p) => {
            let s = std::fs::read_to_string(p).with_context(|| format!("read config {}", p.display()))?;
            toml::from_str(&s).map_err(|e| anyhow::anyhow!("config {}: {}", p.display(), e.message()))?
        }
        None => FileConfig::default(),
    };
    let listen = cli
        .listen
        .or(file.listen)
        .context("--listen is required (or `listen` in the config file)")?;
    let data = cli
        .data
        .or(file.data)
        .context("--data is required (or `data` in the config file)")?;
    let token_file = cli
        .token_file
        .or(file.token_file)
        .context("--token-file is required (or `token_file` in the config file)")?;
    let mut cfg = Config::new(listen, data, read_token(&token_file)?);
    let p = &mut cfg.retention;
    if let Some(w) = cli.retention_window.or(file.retention_window) {
        p.window = parse_duration(&w).context("--retention-window")?;
    }
    if let Some(m) = cli.retention_max.or(file.retention_max) {
        p.max_bytes = Some(parse_size(&m).context("--retention-max")?);
    }
    if let Some(o) = cli.on_full.or(file.on_full) {
        p.on_full = o.parse::<OnFull>().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    if let Some(i) = cli.point_interval.or(file.point_interval) {
        p.point_interval = parse_duration(&i).context("--point-interval")?;
    }
    if let Some(f) = cli.format.or(file.format) {
        cfg.format = f.parse().map_err(|e| anyhow::anyhow!("--format: {e}"))?;
    }
    cfg.metrics_listen = cli.metrics.or(file.metrics);
    let tls = cli.tls.or(file.tls);
    let plaintext = cli.insecure_plaintext || file.insecure_plaintext;
    let enroll = match (cli.enroll_at.or(file.enroll_at), &tls) {
        (None, _) => None,
        (Some(_), None) => bail!("--enroll-at needs --tls DIR (the folder tidemark enroll wrote)"),
        (Some(at), Some(dir)) => Some(Enroll {
            awaiting: tidemark_net::enroll::awaiting_enrollment(dir).then(|| dir.clone()),
            at,
        }),
    };
    if enroll.as_ref().is_some_and(|e| e.awaiting.is_some()) {
        if plaintext {
            bail!("--tls and --insecure-plaintext exclude each other");
        }
    } else {
        if let Some(dir) = tls.as_deref().filter(|d| tidemark_net::enroll::awaiting_enrollment(d)) {
            bail!(
                "--tls {}: the folder holds an enrollment token and no certificate yet: give --enroll-at \
                 COLLECTOR:PORT to trade it",
                dir.display()
            );
        }
        cfg.security = tidemark_net::Security::from_flags(tls.as_deref(), plaintext, tidemark_net::PeerRole::Target)
            .map_err(anyhow::Error::msg)?;
    }
    Ok((cfg, enroll))
}

async fn serve(mut cfg: Config, enroll: Option<Enroll>) -> Result<()> {
    let stop = CancellationToken::new();
    tidemark_util::service::cancel_on_signals(&stop).context("install SIGINT/SIGTERM handlers")?;
    if let Some(e) = &enroll {
        if let Some(dir) = &e.awaiting {
            tracing::info!(collector = %e.at, "enrolling: trading the token of {} for a certificate", dir.display());
            match tidemark_net::enroll::enroll_until_done(dir, &e.at, tidemark_net::PeerRole::Target, &stop).await {
                Some(r) => cfg.security = r.map_err(anyhow::Error::msg)?,
                None => return Ok(()),
            }
        }
        if let tidemark_net::Security::Tls(t) = &cfg.security {
            tokio::spawn(tidemark_net::enroll::renew_loop(
                t.clone(),
                tidemark_net::enroll::RenewAt::Collector(e.at.clone()),
                stop.clone(),
            ));
            tokio::spawn(tidemark_net::enroll::crl_fetch_loop(
                t.clone(),
                e.at.clone(),
                tidemark_net::enroll::CRL_FETCH_TARGET,
                stop.clone(),
            ));
        }
    }
    let target = tidemark_target::Target::bind(cfg).await.context("cannot start")?;
    target.serve(stop).await.context("serve")?;
    Ok(())
}

fn main() -> ExitCode {
    // Logging; a failpoint's `panic` action (FAILPOINTS=target-after-fsync=panic)
    // ends the process at once, like kill -9; failpoints.
    let _service = tidemark_util::service::start();
    let r = build(Cli::parse()).and_then(|(cfg, enroll)| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("start runtime")?;
        rt.block_on(serve(cfg, enroll))
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark-target: error: {}", tidemark_util::owned::report(e.chain()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_target::replica::ReplicaFormat;

    #[test]
    fn retention_flags_and_keys() {
        let d = tempfile::tempdir().unwrap();
        let tok = d.path().join("token");
        std::fs::write(&tok, "t").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o600)).unwrap();
        let conf = d.path().join("t.toml");
        std::fs::write(
            &conf,
            format!(
                "listen = \"127.0.0.1:0\"\ndata = \"/x\"\ntoken_file = {:?}\nretention_window = \"2h\"\non_full = \"stop\"\n\
                 insecure_plaintext = true\n",
                tok.display().to_string()
            ),
        )
        .unwrap();
        let cli = Cli::parse_from([
            "t",
            "--config",
            conf.to_str().unwrap(),
            "--retention-max",
            "1G",
            "--point-interval",
            "5s",
        ]);
        let cfg = build(cli).unwrap().0;
        assert_eq!(cfg.retention.window, std::time::Duration::from_secs(7200));
        assert_eq!(cfg.retention.max_bytes, Some(1 << 30));
        assert_eq!(cfg.retention.on_full, OnFull::Stop);
        assert_eq!(cfg.retention.point_interval, std::time::Duration::from_secs(5));
        assert_eq!(cfg.format, ReplicaFormat::Raw, "the default");
        let cli = Cli::parse_from(["t", "--config", conf.to_str().unwrap(), "--format", "vmdk-sparse"]);
        assert_eq!(build(cli).unwrap().0.format, ReplicaFormat::VmdkSparse);
        let cli = Cli::parse_from(["t", "--config", conf.to_str().unwrap(), "--format", "qcow2"]);
        assert!(build(cli).unwrap_err().to_string().contains("unknown replica format"));
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("format = \"vmdk-flat\"\n");
        std::fs::write(&conf, text).unwrap();
        let cli = Cli::parse_from(["t", "--config", conf.to_str().unwrap()]);
        assert_eq!(build(cli).unwrap().0.format, ReplicaFormat::VmdkFlat);
        assert!(!build(Cli::parse_from(["t", "--config", conf.to_str().unwrap()]))
            .unwrap()
            .0
            .security
            .is_tls());
        // Neither TLS nor plaintext: the choice is the operator's to make.
        let plain = std::fs::read_to_string(&conf)
            .unwrap()
            .replace("insecure_plaintext = true\n", "");
        let bare = d.path().join("bare.toml");
        std::fs::write(&bare, plain).unwrap();
        let e = build(Cli::parse_from(["t", "--config", bare.to_str().unwrap()])).unwrap_err();
        assert!(e.to_string().contains("--insecure-plaintext"), "{e}");
        let cli = Cli::parse_from(["t", "--config", conf.to_str().unwrap(), "--on-full", "maybe"]);
        assert!(build(cli).unwrap_err().to_string().contains("prune or stop"));
        std::fs::write(&conf, "retention = 3\n").unwrap();
        let cli = Cli::parse_from(["t", "--config", conf.to_str().unwrap()]);
        assert!(build(cli).unwrap_err().to_string().contains("unknown field"));
    }

    #[test]
    fn token_file_is_trimmed_and_must_not_be_empty() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token");
        std::fs::write(&p, "  s3cret \n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(read_token(&p).unwrap_err().to_string().contains("mode 0640"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&p).unwrap(), b"s3cret");
        std::fs::write(&p, " \n\t").unwrap();
        assert!(read_token(&p).unwrap_err().to_string().contains("empty"));
        assert!(read_token(&d.path().join("missing")).is_err());
    }
}
