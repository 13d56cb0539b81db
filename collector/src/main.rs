//! The `tidemark-collector` binary: command line, logging, runtime, signals.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use serde::Deserialize;
use tidemark_collector::config::{read_token, Config};
use tidemark_util::human::{parse_duration, parse_size};
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
    /// For an https:// webhook: the CA certificates (PEM) its server's
    /// certificate must chain to (default: the system's bundle,
    /// /etc/ssl/certs/ca-certificates.crt).
    #[arg(long, value_name = "FILE")]
    alert_webhook_ca: Option<PathBuf>,
    /// The site's name, shown by the API, the console and the alerts
    /// (default: the host's name).
    #[arg(long, value_name = "NAME")]
    site: Option<String>,
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
    alert_webhook_ca: Option<PathBuf>,
    site: Option<String>,
}

/// Where each setting came from, so that an error names what the operator
/// wrote: the flag, or the key and its file.
struct Origin<'a> {
    config: Option<&'a Path>,
}

impl Origin<'_> {
    /// The flag's value, else the file's, with its name for messages
    /// (`--spool-cap`, or `` `spool_cap` in config FILE``).
    fn pick<T>(&self, flag: &str, cli: Option<T>, file: Option<T>) -> Option<(T, String)> {
        match (cli, file) {
            (Some(v), _) => Some((v, format!("--{flag}"))),
            (None, Some(v)) => {
                let key = flag.replace('-', "_");
                let path = self.config.map_or_else(String::new, |p| p.display().to_string());
                Some((v, format!("`{key}` in config {path}")))
            }
            (None, None) => None,
        }
    }

    /// A required setting: when neither gives it, the error names the flag
    /// and the key (and the file that lacks it).
    fn need<T>(&self, flag: &str, cli: Option<T>, file: Option<T>) -> Result<T> {
        let key = flag.replace('-', "_");
        match (cli.or(file), self.config) {
            (Some(v), _) => Ok(v),
            (None, Some(p)) => bail!("--{flag} is required: config {} has no `{key}` key", p.display()),
            (None, None) => bail!("--{flag} is required (or `{key}` in a --config file)"),
        }
    }
}

/// Read the configuration file. A malformed file, an unknown key or a
/// value of the wrong type is refused naming the file, the line and the key.
fn read_config(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read config {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let mut at = String::new();
        if let Some(start) = e.span().and_then(|r| text.get(..r.start)) {
            let n = start.matches('\n').count();
            at = format!(", line {}", n + 1);
            // The key of that line, unless the message names it already
            // (as it does an unknown one).
            let key = text
                .lines()
                .nth(n)
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim());
            if let Some(key) = key.filter(|k| !k.is_empty() && !e.message().contains(&format!("`{k}`"))) {
                at.push_str(&format!(", `{key}`"));
            }
        }
        anyhow!(
            "config {}{at}: {}",
            path.display(),
            e.message().trim_end().replace('\n', ", ")
        )
    })
}

fn build(cli: Cli) -> Result<Config> {
    let file = match &cli.config {
        Some(p) => read_config(p)?,
        None => FileConfig::default(),
    };
    let o = Origin {
        config: cli.config.as_deref(),
    };
    let listen = o.need("listen", cli.listen, file.listen)?;
    let spool = o.need("spool", cli.spool, file.spool)?;
    let target = o.need("target", cli.target, file.target)?;
    let api = o.need("api", cli.api, file.api)?;
    let token_file = o.need("token-file", cli.token_file, file.token_file)?;
    let token = read_token(&token_file)?;
    let mut cfg = Config::new(listen, spool, target, api, token);
    if let Some((s, name)) = o.pick("spool-cap", cli.spool_cap, file.spool_cap) {
        cfg.spool_cap = parse_size(&s).context(name.clone())?;
        if cfg.spool_cap == 0 {
            bail!("{name} must be more than 0");
        }
    }
    let tls = cli.tls.or(file.tls);
    let plaintext = cli.insecure_plaintext || file.insecure_plaintext;
    if tls.is_none() && !plaintext {
        bail!(
            "no transport security given: --tls DIR (an identity from tidemark ca issue --role collector) or, to \
             send everything in clear text, --insecure-plaintext{}",
            o.config.map_or_else(String::new, |p| format!(
                " (or `tls` or `insecure_plaintext = true` in config {})",
                p.display()
            ))
        );
    }
    let ca = o.pick("ca", cli.ca, file.ca);
    if let Some(dir) = tls.as_deref().filter(|d| tidemark_net::enroll::awaiting_enrollment(d)) {
        // The collector holds the CA: its own token is redeemed there.
        let Some((ca, _)) = &ca else {
            bail!(
                "--tls {}: the folder holds an enrollment token and no certificate yet; a collector redeems it with \
                 the CA it serves (--ca CADIR), or is issued one (tidemark ca issue --role collector)",
                dir.display()
            );
        };
        let id = tidemark_net::enroll::enroll_locally(dir, ca).map_err(|e| anyhow!("enrollment: {e}"))?;
        tracing::info!(identity = %id, folder = %dir.display(), "enrolled at the CA: certificate issued");
    }
    cfg.security = tidemark_net::Security::from_flags(tls.as_deref(), plaintext, tidemark_net::PeerRole::Collector)
        .map_err(anyhow::Error::msg)?;
    if let Some((n, name)) = o.pick("max-disks", cli.max_disks, file.max_disks) {
        if n == 0 {
            bail!("{name} must be at least 1");
        }
        cfg.max_disks = n;
    }
    if let Some((p, name)) = o.pick("api-tokens", cli.api_tokens, file.api_tokens) {
        let t = tidemark_net::apitokens::ApiTokens::load(&p).map_err(|e| anyhow!("{name}: {e}"))?;
        cfg.api_tokens = Some(std::sync::Arc::new(t));
    }
    cfg.api_plaintext = cli.api_insecure_plaintext || file.api_insecure_plaintext;
    if let Some((d, name)) = o.pick("alert-rpo", cli.alert_rpo, file.alert_rpo) {
        let d = parse_duration(&d).map_err(|e| anyhow!("{name} {d:?}: {e}"))?;
        if d.is_zero() {
            bail!("{name} must be more than 0");
        }
        cfg.alert_rpo = d;
    }
    if let Some((u, name)) = o.pick("alert-webhook", cli.alert_webhook, file.alert_webhook) {
        if !(u.starts_with("http://") || u.starts_with("https://")) || u.contains(char::is_whitespace) {
            bail!("{name} {u:?}: give an http:// or https:// URL");
        }
        cfg.alert_webhook = Some(u);
    }
    if let Some((n, name)) = o.pick("site", cli.site, file.site) {
        if n.is_empty() || n.len() > 64 || n.chars().any(|c| c.is_control()) {
            bail!("{name} {n:?}: 1 to 64 characters, no control characters");
        }
        cfg.site = n;
    }
    let webhook_ca = o.pick("alert-webhook-ca", cli.alert_webhook_ca, file.alert_webhook_ca);
    if cfg.alert_webhook.as_deref().is_some_and(|u| u.starts_with("https://")) {
        let (ca, name) = webhook_ca.unwrap_or_else(|| {
            (
                PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
                "the system's CA bundle".to_string(),
            )
        });
        let tls = tidemark_net::https::web_client_config(&ca).map_err(|e| anyhow!("{name}: {e}"))?;
        cfg.alert_webhook_tls = Some(tls);
    } else if let Some((_, name)) = webhook_ca {
        bail!("{name} is for an https:// --alert-webhook");
    }
    if cfg.api_plaintext && !cfg.security.is_tls() {
        bail!("--api-insecure-plaintext is for a collector with --tls (without, the API is plain HTTP anyway)");
    }
    if let Some((ca, name)) = ca {
        let tidemark_net::Security::Tls(tls) = &cfg.security else {
            bail!("--ca (enrollment) needs --tls: tokens and certificates never cross in clear text");
        };
        tidemark_net::ca::Ca::load(&ca).map_err(|e| anyhow!("{name} {}: {e}", ca.display()))?;
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
    use std::os::unix::fs::PermissionsExt;

    /// A folder with a token, an API tokens file and a config file holding
    /// every key (those of TLS and enrollment aside: they need a CA, and
    /// tests/tests/deploy.rs starts a collector from the example's).
    struct Setup {
        dir: tempfile::TempDir,
        conf: PathBuf,
        /// The flags that say what the config file says.
        flags: Vec<String>,
    }

    impl Setup {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let tok = d.join("token");
            std::fs::write(&tok, "t\n").unwrap();
            std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o600)).unwrap();
            let api_tokens = d.join("api-tokens");
            let hash = tidemark_net::apitokens::hash_secret(b"s3cret");
            std::fs::write(&api_tokens, format!("ops operator {hash}\n")).unwrap();
            std::fs::set_permissions(&api_tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
            let pairs = [
                ("listen", "127.0.0.1:7700".to_string()),
                ("spool", "/srv/spool".into()),
                ("target", "dr:7800".into()),
                ("api", "127.0.0.1:7780".into()),
                ("token_file", tok.display().to_string()),
                ("spool_cap", "2G".into()),
                ("max_disks", "7".into()),
                ("api_tokens", api_tokens.display().to_string()),
                ("alert_rpo", "90s".into()),
                ("alert_webhook", "http://alerts.example:9093/tm".into()),
            ];
            let mut text = String::new();
            let mut flags = vec!["c".to_string(), "--insecure-plaintext".into()];
            for (k, v) in pairs {
                if k == "max_disks" {
                    text.push_str(&format!("{k} = {v}\n"));
                } else {
                    text.push_str(&format!("{k} = {v:?}\n"));
                }
                flags.push(format!("--{}", k.replace('_', "-")));
                flags.push(v);
            }
            text.push_str("insecure_plaintext = true\n");
            let conf = d.join("collector.toml");
            std::fs::write(&conf, text).unwrap();
            Self { dir, conf, flags }
        }

        fn conf_str(&self) -> &str {
            self.conf.to_str().unwrap()
        }

        /// The config file with `key`'s line dropped and `extra` added.
        fn edit(&self, key: &str, extra: &str) {
            let text = std::fs::read_to_string(&self.conf).unwrap();
            let mut kept: String = text
                .lines()
                .filter(|l| !l.starts_with(&format!("{key} =")))
                .map(|l| format!("{l}\n"))
                .collect();
            kept.push_str(extra);
            std::fs::write(&self.conf, kept).unwrap();
        }

        /// `build` with `--config` and these flags.
        fn build(&self, flags: &[&str]) -> Result<Config> {
            let mut args = vec!["c", "--config", self.conf_str()];
            args.extend_from_slice(flags);
            build(Cli::parse_from(args))
        }

        /// The whole error of `build` with `--config` and these flags.
        fn error(&self, flags: &[&str]) -> String {
            format!("{:#}", self.build(flags).unwrap_err())
        }
    }

    #[test]
    fn a_full_file_gives_what_the_flags_give() {
        let s = Setup::new();
        let cfg = s.build(&[]).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:7700");
        assert_eq!(cfg.spool, PathBuf::from("/srv/spool"));
        assert_eq!(cfg.target, "dr:7800");
        assert_eq!(cfg.api, "127.0.0.1:7780");
        assert_eq!(cfg.token, b"t");
        assert_eq!(cfg.spool_cap, 2 << 30);
        assert_eq!(cfg.max_disks, 7);
        let tokens = cfg.api_tokens.as_ref().expect("api_tokens");
        assert!(tokens.check(b"s3cret").is_some());
        assert_eq!(cfg.alert_rpo, std::time::Duration::from_secs(90));
        assert_eq!(cfg.alert_webhook.as_deref(), Some("http://alerts.example:9093/tm"));
        assert!(!cfg.security.is_tls());
        assert!(!cfg.api_plaintext);
        let by_flags = build(Cli::parse_from(&s.flags)).unwrap();
        assert_eq!(format!("{cfg:?}"), format!("{by_flags:?}"));
        // The defaults when the file gives only what is required.
        for k in ["spool_cap", "max_disks", "api_tokens", "alert_rpo", "alert_webhook"] {
            s.edit(k, "");
        }
        let cfg = s.build(&[]).unwrap();
        assert_eq!(cfg.spool_cap, tidemark_collector::config::DEFAULT_SPOOL_CAP);
        assert_eq!(cfg.max_disks, tidemark_collector::config::DEFAULT_MAX_DISKS);
        assert!(cfg.api_tokens.is_none() && cfg.alert_webhook.is_none());
    }

    #[test]
    fn flags_override_the_file() {
        let s = Setup::new();
        let cfg = s
            .build(&[
                "--listen",
                "0.0.0.0:1",
                "--spool",
                "/other",
                "--target",
                "t2:1",
                "--api",
                "0.0.0.0:2",
                "--spool-cap",
                "8G",
                "--max-disks",
                "3",
                "--alert-rpo",
                "1h",
                "--alert-webhook",
                "http://h/x",
            ])
            .unwrap();
        assert_eq!(
            (cfg.listen.as_str(), cfg.target.as_str(), cfg.api.as_str()),
            ("0.0.0.0:1", "t2:1", "0.0.0.0:2")
        );
        assert_eq!(cfg.spool, PathBuf::from("/other"));
        assert_eq!((cfg.spool_cap, cfg.max_disks), (8 << 30, 3));
        assert_eq!(cfg.alert_rpo, std::time::Duration::from_secs(3600));
        assert_eq!(cfg.alert_webhook.as_deref(), Some("http://h/x"));
        // A flag's bad value is named by the flag, not by the file's key.
        let e = s.error(&["--spool-cap", "lots"]);
        assert!(
            e.contains("--spool-cap: invalid size \"lots\"") && !e.contains("spool_cap"),
            "{e}"
        );
        // The token file too.
        let other = s.dir.path().join("token2");
        std::fs::write(&other, "u").unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(s.build(&["--token-file", other.to_str().unwrap()]).unwrap().token, b"u");
    }

    #[test]
    fn unknown_keys_are_refused_naming_the_key_and_the_file() {
        let s = Setup::new();
        let good = std::fs::read_to_string(&s.conf).unwrap();
        for (extra, key) in [
            ("spool_kap = \"1G\"\n", "spool_kap"),
            ("spool-cap = \"1G\"\n", "spool-cap"),
            ("[alerts]\nrpo = \"1m\"\n", "alerts"),
        ] {
            std::fs::write(&s.conf, format!("{good}{extra}")).unwrap();
            let e = s.error(&[]);
            assert!(e.contains(&format!("unknown field `{key}`")), "{e}");
            assert!(e.contains(s.conf_str()), "{e}");
        }
        // Not TOML at all: the file and the line.
        std::fs::write(&s.conf, "listen = \"x:1\"\nspool = = 2\ntarget = \"t:1\"\n").unwrap();
        let e = s.error(&[]);
        assert!(e.contains(s.conf_str()) && e.contains("line 2"), "{e}");
    }

    #[test]
    fn a_missing_required_key_is_named() {
        for (key, flag) in [
            ("listen", "--listen"),
            ("spool", "--spool"),
            ("target", "--target"),
            ("api", "--api"),
            ("token_file", "--token-file"),
        ] {
            let s = Setup::new();
            s.edit(key, "");
            let e = s.error(&[]);
            assert!(e.contains(&format!("{flag} is required")), "{e}");
            assert!(
                e.contains(&format!("has no `{key}` key")) && e.contains(s.conf_str()),
                "{e}"
            );
            // The flag stands in for the key.
            let v = s
                .flags
                .iter()
                .position(|f| f == flag)
                .map(|i| s.flags[i + 1].clone())
                .unwrap();
            s.build(&[flag, &v]).unwrap();
        }
        // Without a file, the message says a file may give it.
        let e = format!("{:#}", build(Cli::parse_from(["c", "--listen", "x:1"])).unwrap_err());
        assert!(e.contains("--spool is required (or `spool` in a --config file)"), "{e}");
        // Neither TLS nor plaintext: the choice is the operator's, by flag or key.
        let s = Setup::new();
        s.edit("insecure_plaintext", "");
        let e = s.error(&[]);
        assert!(
            e.contains("--insecure-plaintext") && e.contains("`tls`") && e.contains("`insecure_plaintext = true`"),
            "{e}"
        );
        assert!(!s.build(&["--insecure-plaintext"]).unwrap().security.is_tls());
    }

    #[test]
    fn a_bad_value_is_named_by_its_key() {
        let s = Setup::new();
        let cases = [
            ("spool_cap", "spool_cap = \"12Q\"\n", "`spool_cap`"),
            ("spool_cap", "spool_cap = \"0\"\n", "`spool_cap` in"),
            ("spool_cap", "spool_cap = 5\n", "`spool_cap`"),
            ("alert_rpo", "alert_rpo = \"soon\"\n", "`alert_rpo` in"),
            ("alert_rpo", "alert_rpo = \"0s\"\n", "must be more than 0"),
            ("alert_webhook", "alert_webhook = \"ftp://x\"\n", "`alert_webhook` in"),
            ("max_disks", "max_disks = 0\n", "`max_disks` in"),
            ("max_disks", "max_disks = \"many\"\n", "`max_disks`"),
            ("max_disks", "max_disks = -1\n", "`max_disks`"),
            (
                "insecure_plaintext",
                "insecure_plaintext = \"yes\"\n",
                "`insecure_plaintext`",
            ),
            ("listen", "listen = 7700\n", "`listen`"),
            ("api_tokens", "api_tokens = \"/no/such/file\"\n", "`api_tokens` in"),
        ];
        let good = std::fs::read_to_string(&s.conf).unwrap();
        for (key, line, want) in cases {
            s.edit(key, line);
            let e = s.error(&[]);
            assert!(e.contains(want) && e.contains(s.conf_str()), "{line}: {e}");
            std::fs::write(&s.conf, &good).unwrap();
        }
        // Choices that exclude each other, one of them from the file.
        s.edit("", "tls = \"/etc/tidemark/tls-collector\"\n");
        assert!(s.error(&[]).contains("exclude each other"));
        std::fs::write(&s.conf, &good).unwrap();
        s.edit("", "ca = \"/etc/tidemark/ca\"\n");
        assert!(s.error(&[]).contains("--ca (enrollment) needs --tls"));
        std::fs::write(&s.conf, &good).unwrap();
        s.edit("", "api_insecure_plaintext = true\n");
        assert!(s
            .error(&[])
            .contains("--api-insecure-plaintext is for a collector with --tls"));
    }
}
