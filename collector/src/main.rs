//! The `tidemark-collector` binary: command line, logging, runtime, signals.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use serde::Deserialize;
use tidemark_collector::config::{read_token, Config, DEFAULT_SPOOL_CAP};
use tidemark_util::human::parse_size;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "tidemark-collector",
    version,
    about = "Tidemark collector: receive change streams from agents, spool them durably, forward them packed to the target",
    override_usage = "tidemark-collector --listen HOST:PORT --spool DIR --target HOST:PORT --api HOST:PORT \
                      --token-file FILE (--tls DIR | --insecure-plaintext) [OPTIONS]\n       \
                      tidemark-collector --config FILE [OPTIONS]",
    after_help = "--listen, --spool, --target, --api, --token-file and --tls (or --insecure-plaintext) are required \
                  unless the --config file gives them.\n\n\
                  Examples:\n  \
                  tidemark-collector --listen 0.0.0.0:7700 --spool /srv/tidemark/spool --target dr.example:7800 \\\n      \
                  --api 127.0.0.1:7780 --token-file /etc/tidemark/token --tls /etc/tidemark/tls --spool-cap 64G\n  \
                  tidemark-collector --config /etc/tidemark/collector.toml"
)]
struct Cli {
    /// TOML file with any of the keys below (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where agents connect (HOST:PORT).
    #[arg(long)]
    listen: Option<String>,
    /// Spool directory (catalog.db and one folder per disk).
    #[arg(long)]
    spool: Option<PathBuf>,
    /// The target (HOST:PORT).
    #[arg(long)]
    target: Option<String>,
    /// The HTTP status API (HOST:PORT).
    #[arg(long)]
    api: Option<String>,
    /// File holding the shared token (surrounding whitespace is ignored).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Spool size at which agents are no longer read (e.g. 8G; default 8G).
    #[arg(long)]
    spool_cap: Option<String>,
    /// The collector's identity folder (`tidemark ca issue --role
    /// collector`): agents connect over mutual TLS with agent certificates
    /// of the same CA, and the target must hold a target certificate.
    #[arg(long, value_name = "DIR")]
    tls: Option<PathBuf>,
    /// Both hops in clear text, unauthenticated but for the token (said in
    /// status and logs).
    #[arg(long)]
    insecure_plaintext: bool,
    /// Serve enrollment and renewal with the CA in CADIR (`tidemark ca
    /// init`): agents trade one-time tokens (`tidemark enroll`) for
    /// certificates, and renew them, on the agent port.
    #[arg(long, value_name = "CADIR")]
    ca: Option<PathBuf>,
    /// Most disk ids this collector registers (default 1024); a new disk
    /// beyond is refused by name.
    #[arg(long)]
    max_disks: Option<usize>,
    /// API tokens with roles (viewer, operator, admin), one per line, made
    /// by `tidemark api-token add`; read again when it changes.
    #[arg(long, value_name = "FILE")]
    api_tokens: Option<PathBuf>,
    /// Serve the API in plain HTTP although the hops use TLS (bearer
    /// tokens then cross in clear text: for a loopback-only API).
    #[arg(long)]
    api_insecure_plaintext: bool,
    /// Raise the `rpo` alert when a disk's oldest write not yet at the
    /// target is older than this (e.g. 15m, the default; critical at twice).
    #[arg(long, value_name = "DUR")]
    alert_rpo: Option<String>,
    /// POST every alert raised or cleared to this URL (JSON; retried with
    /// backoff, never holding up replication).
    #[arg(long, value_name = "URL")]
    alert_webhook: Option<String>,
}

/// The configuration file: the same keys as the flags.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    listen: Option<String>,
    spool: Option<PathBuf>,
    target: Option<String>,
    api: Option<String>,
    token_file: Option<PathBuf>,
    spool_cap: Option<String>,
    tls: Option<PathBuf>,
    insecure_plaintext: bool,
    ca: Option<PathBuf>,
    max_disks: Option<usize>,
    api_tokens: Option<PathBuf>,
    api_insecure_plaintext: bool,
    alert_rpo: Option<String>,
    alert_webhook: Option<String>,
}

fn build(cli: Cli) -> Result<Config> {
    let file: FileConfig = match &cli.config {
        Some(p) => {
            let s = std::fs::read_to_string(p).with_context(|| format!("read config {}", p.display()))?;
            toml::from_str(&s).map_err(|e| anyhow::anyhow!("config {}: {}", p.display(), e.message()))?
        }
        None => FileConfig::default(),
    };
    let need = |flag: &str, key: &str| format!("--{flag} is required (or `{key}` in the config file)");
    let listen = cli.listen.or(file.listen).with_context(|| need("listen", "listen"))?;
    let spool = cli.spool.or(file.spool).with_context(|| need("spool", "spool"))?;
    let target = cli.target.or(file.target).with_context(|| need("target", "target"))?;
    let api = cli.api.or(file.api).with_context(|| need("api", "api"))?;
    let token_file = cli
        .token_file
        .or(file.token_file)
        .with_context(|| need("token-file", "token_file"))?;
    let token = read_token(&token_file)?;
    let mut cfg = Config::new(listen, spool, target, api, token);
    cfg.spool_cap = match cli.spool_cap.or(file.spool_cap) {
        Some(s) => parse_size(&s).context("--spool-cap")?,
        None => DEFAULT_SPOOL_CAP,
    };
    if cfg.spool_cap == 0 {
        anyhow::bail!("--spool-cap must be more than 0");
    }
    let tls = cli.tls.or(file.tls);
    let ca = cli.ca.or(file.ca);
    if let Some(dir) = tls.as_deref().filter(|d| tidemark_net::enroll::awaiting_enrollment(d)) {
        // The collector holds the CA: its own token is redeemed there.
        let Some(ca) = &ca else {
            anyhow::bail!(
                "--tls {}: the folder holds an enrollment token and no certificate yet; a collector redeems it with \
                 the CA it serves (--ca CADIR), or is issued one (tidemark ca issue --role collector)",
                dir.display()
            );
        };
        let id = tidemark_net::enroll::enroll_locally(dir, ca).map_err(|e| anyhow::anyhow!("enrollment: {e}"))?;
        tracing::info!(identity = %id, folder = %dir.display(), "enrolled at the CA: certificate issued");
    }
    cfg.security = tidemark_net::Security::from_flags(
        tls.as_deref(),
        cli.insecure_plaintext || file.insecure_plaintext,
        tidemark_net::PeerRole::Collector,
    )
    .map_err(anyhow::Error::msg)?;
    if let Some(n) = cli.max_disks.or(file.max_disks) {
        if n == 0 {
            anyhow::bail!("--max-disks must be at least 1");
        }
        cfg.max_disks = n;
    }
    if let Some(p) = cli.api_tokens.or(file.api_tokens) {
        let t = tidemark_net::apitokens::ApiTokens::load(&p).map_err(|e| anyhow::anyhow!("--api-tokens: {e}"))?;
        cfg.api_tokens = Some(std::sync::Arc::new(t));
    }
    cfg.api_plaintext = cli.api_insecure_plaintext || file.api_insecure_plaintext;
    if let Some(d) = cli.alert_rpo.or(file.alert_rpo) {
        let d = tidemark_util::human::parse_duration(&d).map_err(|e| anyhow::anyhow!("--alert-rpo {d:?}: {e}"))?;
        if d.is_zero() {
            anyhow::bail!("--alert-rpo must be more than 0");
        }
        cfg.alert_rpo = d;
    }
    if let Some(u) = cli.alert_webhook.or(file.alert_webhook) {
        if !u.starts_with("http://") || u.contains(char::is_whitespace) {
            anyhow::bail!(
                "--alert-webhook {u:?}: give an http:// URL (https webhooks are not built yet: use a relay on the host)"
            );
        }
        cfg.alert_webhook = Some(u);
    }
    if cfg.api_plaintext && !cfg.security.is_tls() {
        anyhow::bail!("--api-insecure-plaintext is for a collector with --tls (without, the API is plain HTTP anyway)");
    }
    if let Some(ca) = ca {
        let tidemark_net::Security::Tls(tls) = &cfg.security else {
            anyhow::bail!("--ca (enrollment) needs --tls: tokens and certificates never cross in clear text");
        };
        tidemark_net::ca::Ca::load(&ca).map_err(|e| anyhow::anyhow!("--ca {}: {e}", ca.display()))?;
        tls.serve_enrollment(&ca).map_err(anyhow::Error::msg)?;
        cfg.ca = Some(ca);
    }
    Ok(cfg)
}

async fn run(cfg: Config) -> Result<()> {
    let stop = CancellationToken::new();
    tidemark_util::service::cancel_on_signals(&stop).context("install SIGINT/SIGTERM handlers")?;
    tidemark_collector::run(cfg, stop).await
}

fn main() -> ExitCode {
    // Logging; a panic (a failpoint's `panic` included) aborts; failpoints.
    let _service = tidemark_util::service::start();
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
            eprintln!("tidemark-collector: error: {}", tidemark_util::owned::report(e.chain()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_keys_flags_override_and_unknown_keys_refused() {
        let d = tempfile::tempdir().unwrap();
        let tok = d.path().join("token");
        std::fs::write(&tok, "t\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o600)).unwrap();
        let conf = d.path().join("c.toml");
        std::fs::write(
            &conf,
            format!(
                "listen = \"127.0.0.1:7700\"\nspool = \"/srv/spool\"\ntarget = \"dr:7800\"\napi = \"127.0.0.1:7780\"\n\
                 token_file = \"{}\"\nspool_cap = \"2G\"\ninsecure_plaintext = true\n",
                tok.display()
            ),
        )
        .unwrap();
        let cfg = build(Cli::parse_from(["c", "--config", conf.to_str().unwrap()])).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:7700");
        assert_eq!(cfg.spool, PathBuf::from("/srv/spool"));
        assert_eq!(cfg.target, "dr:7800");
        assert_eq!(cfg.spool_cap, 2 << 30);
        assert_eq!(cfg.token, b"t");
        let cli = Cli::parse_from([
            "c",
            "--config",
            conf.to_str().unwrap(),
            "--spool-cap",
            "8G",
            "--api",
            "0.0.0.0:1",
        ]);
        let cfg = build(cli).unwrap();
        assert_eq!(cfg.spool_cap, 8 << 30);
        assert_eq!(cfg.api, "0.0.0.0:1");
        std::fs::write(&conf, "listen = \"x:1\"\nspool_kap = \"1G\"\n").unwrap();
        let e = build(Cli::parse_from(["c", "--config", conf.to_str().unwrap()])).unwrap_err();
        assert!(e.to_string().contains("spool_kap"), "{e}");
        let e = build(Cli::parse_from(["c", "--listen", "x:1"])).unwrap_err();
        assert!(e.to_string().contains("--spool is required"), "{e}");
    }
}
