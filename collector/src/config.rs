//! The collector's configuration: a plain struct, filled by `main.rs` from
//! the command line (or by tests directly).

use std::path::PathBuf;

/// Default spool cap: 8 GiB.
pub const DEFAULT_SPOOL_CAP: u64 = 8 << 30;

/// Everything the collector needs to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where agents connect: `HOST:PORT` (port 0 picks one; see
    /// [`crate::Running::listen_addr`]).
    pub listen: String,
    /// The spool directory: `catalog.db` and one folder per disk id.
    pub spool: PathBuf,
    /// The target: `HOST:PORT`, resolved at each connection attempt.
    pub target: String,
    /// The HTTP API: `HOST:PORT`.
    pub api: String,
    /// The shared secret agents and the target must present (not empty).
    pub token: Vec<u8>,
    /// Spool bytes at which the collector stops reading agent sockets.
    pub spool_cap: u64,
    /// Packed bytes sent to the target and not yet acknowledged, per disk.
    pub max_in_flight: u64,
    /// Dedup window, in 4 KiB blocks (the target's must match).
    pub window_blocks: u32,
    /// zstd level for packed batches.
    pub zstd_level: i32,
    /// Mutual TLS with the collector's identity, on both sides (agents
    /// present agent certificates; the target must hold a target one), or
    /// plaintext. `main.rs` asks for an explicit choice; this default is
    /// plaintext.
    pub security: tidemark_net::Security,
    /// The CA folder, when this collector serves enrollment and renewal
    /// (its TLS listener then lets clients without a certificate send an
    /// `Enroll`, and nothing else).
    pub ca: Option<PathBuf>,
    /// Most disk ids registered (a new one beyond is refused).
    pub max_disks: usize,
    /// API tokens with roles (`tidemark api-token add`), besides the
    /// collector's own token (an admin's).
    pub api_tokens: Option<std::sync::Arc<tidemark_net::apitokens::ApiTokens>>,
    /// Serve the API in plain HTTP although the hops use TLS (an explicit
    /// operator choice: bearer tokens then cross in clear text).
    pub api_plaintext: bool,
    /// Raise the `rpo` alert when a disk's oldest write not yet at the
    /// target is older than this (critical at twice).
    pub alert_rpo: std::time::Duration,
    /// POST every alert raised or cleared here (JSON), if set.
    pub alert_webhook: Option<String>,
    /// The site this collector serves (its name in the API, the console
    /// and webhook deliveries); default: the host's name.
    pub site: String,
    /// TLS for an https webhook (its CA roots; the URL's host is checked).
    pub alert_webhook_tls: Option<std::sync::Arc<tokio_rustls::rustls::ClientConfig>>,
}

/// Default of [`Config::max_disks`].
pub const DEFAULT_MAX_DISKS: usize = 1024;

impl Config {
    /// A configuration with the defaults for everything but the addresses,
    /// the spool and the token.
    pub fn new(
        listen: impl Into<String>,
        spool: impl Into<PathBuf>,
        target: impl Into<String>,
        api: impl Into<String>,
        token: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            listen: listen.into(),
            spool: spool.into(),
            target: target.into(),
            api: api.into(),
            token: token.into(),
            spool_cap: DEFAULT_SPOOL_CAP,
            max_in_flight: 16 << 20,
            window_blocks: tidemark_wire::pack::DEFAULT_WINDOW_BLOCKS,
            zstd_level: 3,
            security: tidemark_net::Security::Plaintext,
            ca: None,
            max_disks: DEFAULT_MAX_DISKS,
            api_tokens: None,
            api_plaintext: false,
            alert_rpo: crate::alerts::DEFAULT_RPO,
            alert_webhook: None,
            alert_webhook_tls: None,
            site: default_site(),
        }
    }
}

/// Read a token file: surrounding whitespace is stripped; an empty token is
/// an error.
pub fn read_token(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    tidemark_net::tls::private_file(path).map_err(anyhow::Error::msg)?;
    let raw = std::fs::read(path).with_context(|| format!("read token file {}", path.display()))?;
    let t = raw.trim_ascii();
    if t.is_empty() {
        anyhow::bail!("token file {} is empty", path.display());
    }
    if t.len() > tidemark_wire::frame::MAX_TOKEN {
        anyhow::bail!(
            "token in {} is longer than {} bytes",
            path.display(),
            tidemark_wire::frame::MAX_TOKEN
        );
    }
    Ok(t.to_vec())
}

/// The host's name, or `site`.
pub fn default_site() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "site".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_trimmed_and_must_not_be_empty() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        std::fs::write(&p, " \n s3cret \t\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token(&p).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&p).unwrap(), b"s3cret");
        std::fs::write(&p, " \n\t").unwrap();
        assert!(read_token(&p).unwrap_err().to_string().contains("empty"));
        assert!(read_token(&d.path().join("missing")).is_err());
    }
}
