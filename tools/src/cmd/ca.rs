//! `tidemark ca`: the deployment's certificate authority (docs/security.md).
//! `init` makes a CA in a new folder (its key 0600, the folder 0700);
//! `issue` signs an identity — a key and a certificate naming
//! `NAME.ROLE.tidemark` — into the folder a service's `--tls` reads.
//! Certificates are made with rcgen; the services check them with rustls.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SerialNumber};
use tidemark_net::tls::{Identity, PeerRole, CA_FILE, CERT_FILE, KEY_FILE};

use tidemark_net::ca::{Ca, CA_KEY_FILE, CA_NAME_FILE, ISSUED_DIR};

#[derive(Subcommand)]
pub enum CaCmd {
    /// Create a certificate authority in a new folder (its key is 0600).
    #[command(
        override_usage = "tidemark ca init --dir CADIR [--days N]",
        after_help = "Example:\n  tidemark ca init --dir /etc/tidemark/ca"
    )]
    Init(InitArgs),
    /// Issue an identity (key + certificate) for a service's --tls folder.
    #[command(
        override_usage = "tidemark ca issue --ca CADIR NAME --role agent|collector|target --out DIR [--days N]",
        after_help = "Examples:\n  tidemark ca issue --ca /etc/tidemark/ca web-1 --role agent --out /etc/tidemark/tls\n  tidemark-agent protect ... --tls /etc/tidemark/tls"
    )]
    Issue(IssueArgs),
    /// A one-time enrollment token for NAME: its service trades it for a
    /// certificate on first contact with the collector.
    #[command(override_usage = ENROLL_USAGE, after_help = ENROLL_HELP)]
    Enroll(EnrollArgs),
    /// Revoke every certificate issued to NAME: writes CADIR/crl.pem.
    #[command(
        override_usage = "tidemark ca revoke --ca CADIR NAME [--role agent|collector|target]",
        after_help = REVOKE_HELP
    )]
    Revoke(RevokeArgs),
}

pub const ENROLL_USAGE: &str =
    "tidemark enroll --ca CADIR NAME --role agent|collector|target --out DIR [--valid DUR] [--days N]";
pub const ENROLL_HELP: &str =
    "Example:\n  tidemark enroll --ca /etc/tidemark/ca web-1 --role agent --out /tmp/web-1\n  \
    # copy /tmp/web-1 to web-1 as /etc/tidemark/tls, then:\n  \
    tidemark-agent protect ... --collector dr:7700 --tls /etc/tidemark/tls";

/// The identity an `issue` or `enroll` is for, and where it goes.
#[derive(Args)]
pub struct IdentityArgs {
    /// The CA's folder (from `tidemark ca init`; the collector serving
    /// enrollment reads the same).
    #[arg(long, value_name = "CADIR")]
    ca: PathBuf,
    /// The identity's name: 1 to 63 of a-z, 0-9 and '-' (a host name).
    name: String,
    /// What the identity may act as.
    #[arg(long, value_parser = ["agent", "collector", "target"])]
    role: String,
    /// The folder to write for the service's --tls (it must not exist, or
    /// be empty): ca.pem, and cert.pem and key.pem (issue) or enroll.token
    /// (enroll; the key is then made on the service's host).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

impl IdentityArgs {
    /// The identity named and the CA that signs it.
    fn load(&self) -> Result<(Identity, Ca)> {
        let role = PeerRole::parse(&self.role).context("--role")?;
        let id = Identity::new(&self.name, role).map_err(anyhow::Error::msg)?;
        let ca = Ca::load(&self.ca).map_err(anyhow::Error::msg)?;
        Ok((id, ca))
    }
}

#[derive(Args)]
pub struct EnrollArgs {
    #[command(flatten)]
    who: IdentityArgs,
    /// How long the token may wait for its first use.
    #[arg(long, default_value = "24h", value_parser = tidemark_util::human::parse_duration)]
    valid: std::time::Duration,
    /// How long the certificate it buys is valid (renewed automatically
    /// when a third of it is left).
    #[arg(long, default_value_t = 397, value_parser = clap::value_parser!(u32).range(1..=3650))]
    days: u32,
    /// The certificate's lifetime in seconds instead of --days (tests of renewal).
    #[arg(long, hide = true)]
    seconds: Option<u32>,
}

pub const REVOKE_HELP: &str = "Example:\n  tidemark revoke --ca /etc/tidemark/ca web-1\n\n\
    The collector holding the CA (--ca) enforces the list within 2 s and serves it: targets started with \
    --enroll-at fetch it within 10 s, agents within a minute. A service that does neither reads crl.pem \
    copied into its --tls folder (within 2 s).";

#[derive(Args)]
pub struct RevokeArgs {
    /// The CA's folder (from `tidemark ca init`).
    #[arg(long, value_name = "CADIR")]
    ca: PathBuf,
    /// The identity's name.
    name: String,
    /// Only the certificates of this role (default: every role).
    #[arg(long, value_parser = ["agent", "collector", "target"])]
    role: Option<String>,
}

#[derive(Args)]
pub struct InitArgs {
    /// The folder to create (it must not exist, or be empty).
    #[arg(long, value_name = "CADIR")]
    dir: PathBuf,
    /// How long the CA certificate is valid.
    #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
    days: u32,
}

#[derive(Args)]
pub struct IssueArgs {
    #[command(flatten)]
    who: IdentityArgs,
    /// How long the certificate is valid.
    #[arg(long, default_value_t = 397, value_parser = clap::value_parser!(u32).range(1..=3650))]
    days: u32,
    /// Valid for this many seconds instead of --days (tests of expiry).
    #[arg(long, hide = true)]
    seconds: Option<u32>,
}

pub fn run(c: CaCmd) -> Result<()> {
    match c {
        CaCmd::Init(a) => init(&a),
        CaCmd::Issue(a) => issue(&a),
        CaCmd::Revoke(a) => revoke(&a),
        CaCmd::Enroll(a) => enroll(&a),
    }
}

fn init(a: &InitArgs) -> Result<()> {
    new_private_dir(&a.dir)?;
    let key = KeyPair::generate().context("generate the CA key")?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let tag: String = uuid::Uuid::new_v4().simple().to_string().chars().take(8).collect();
    p.distinguished_name
        .push(DnType::CommonName, format!("Tidemark CA {tag}"));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, a.days);
    p.serial_number = Some(tidemark_net::ca::serial());
    let cert = p.self_signed(&key).context("sign the CA certificate")?;
    write_new(&a.dir.join(CA_KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
    write_new(
        &a.dir.join(CA_NAME_FILE),
        format!("Tidemark CA {tag}\n").as_bytes(),
        0o644,
    )?;
    write_new(&a.dir.join(CA_FILE), cert.pem().as_bytes(), 0o644)?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(a.dir.join(ISSUED_DIR))
        .with_context(|| format!("create {}", a.dir.join(ISSUED_DIR).display()))?;
    outln!(
        "CA \"Tidemark CA {tag}\" created in {} (valid {} days)",
        a.dir.display(),
        a.days
    );
    outln!(
        "its key, {}, is the deployment's master secret: keep the folder on the configuration server only",
        a.dir.join(CA_KEY_FILE).display()
    );
    outln!(
        "next: tidemark ca issue --ca {} NAME --role agent|collector|target --out DIR",
        a.dir.display()
    );
    Ok(())
}

fn issue(a: &IssueArgs) -> Result<()> {
    let (id, ca) = a.who.load()?;
    let role = id.role;
    let key = KeyPair::generate().context("generate the key")?;
    let secs = a.seconds.map_or(u64::from(a.days) * 86_400, u64::from);
    let (cert_pem, hex) = ca.issue(&id, &key, secs).map_err(anyhow::Error::msg)?;
    new_private_dir(&a.who.out)?;
    write_new(&a.who.out.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&a.who.out.join(CERT_FILE), cert_pem.as_bytes(), 0o644)?;
    write_new(&a.who.out.join(CA_FILE), ca.pem.as_bytes(), 0o644)?;
    outln!(
        "issued {id} ({}, valid {} days, serial {hex}) into {}",
        id.dns_name(),
        a.days,
        a.who.out.display()
    );
    outln!("use it with --tls {} on the {role}", a.who.out.display());
    Ok(())
}

fn enroll(a: &EnrollArgs) -> Result<()> {
    let (id, ca) = a.who.load()?;
    let role = id.role;
    let now = tidemark_util::now_ns() / 1_000_000_000;
    let e = tidemark_net::ca::Enrollment {
        id: id.clone(),
        expires: now + a.valid.as_secs(),
        cert_secs: a.seconds.map_or(u64::from(a.days) * 86_400, u64::from),
    };
    new_private_dir(&a.who.out)?;
    let token = tidemark_net::ca::new_enrollment(&a.who.ca, &e).map_err(anyhow::Error::msg)?;
    write_new(
        &a.who.out.join(tidemark_net::ca::ENROLL_TOKEN_FILE),
        format!("{token}\n").as_bytes(),
        0o600,
    )?;
    write_new(&a.who.out.join(CA_FILE), ca.pem.as_bytes(), 0o644)?;
    outln!(
        "enrollment token for {id} written to {} (valid {}, used once)",
        a.who.out.join(tidemark_net::ca::ENROLL_TOKEN_FILE).display(),
        tidemark_util::human::format_duration(a.valid)
    );
    outln!(
        "copy {} to the {role}'s host and give it as --tls: on first contact with a collector that serves \
         enrollment (--ca {}) it makes its key there and trades the token for its certificate",
        a.who.out.display(),
        a.who.ca.display()
    );
    Ok(())
}

/// The list of revoked certificates in the CA's folder, one per line:
/// `SERIAL-HEX NAME ROLE UNIX-TIME`.
const REVOKED_FILE: &str = "revoked.txt";

fn revoke(a: &RevokeArgs) -> Result<()> {
    let ca = Ca::load(&a.ca).map_err(anyhow::Error::msg)?;
    let issued = a.ca.join(ISSUED_DIR);
    let mut found = Vec::new();
    for e in std::fs::read_dir(&issued).with_context(|| format!("read {}", issued.display()))? {
        let n = e?.file_name().to_string_lossy().into_owned();
        let parts: Vec<&str> = n.trim_end_matches(".pem").split('.').collect();
        if let [name, role, hex] = parts[..] {
            if name == a.name && a.role.as_deref().is_none_or(|r| r == role) {
                found.push((hex.to_string(), role.to_string()));
            }
        }
    }
    if found.is_empty() {
        bail!(
            "no certificate was issued to {}{} by the CA in {}",
            a.name,
            a.role.as_deref().map(|r| format!(" as {r}")).unwrap_or_default(),
            a.ca.display()
        );
    }
    let list_path = a.ca.join(REVOKED_FILE);
    let mut text = match std::fs::read_to_string(&list_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("read {}", list_path.display())),
    };
    let now = time::OffsetDateTime::now_utc();
    let mut added = 0;
    for (hex, role) in &found {
        if !text.lines().any(|l| l.split(' ').next() == Some(hex.as_str())) {
            text.push_str(&format!("{hex} {} {role} {}\n", a.name, now.unix_timestamp()));
            added += 1;
        }
    }
    let mut revoked = Vec::new();
    for l in text.lines() {
        let mut f = l.split(' ');
        let (Some(hex), Some(_), Some(_), Some(at)) = (f.next(), f.next(), f.next(), f.next()) else {
            bail!(
                "{}: a line that is not SERIAL NAME ROLE TIME: {l:?}",
                list_path.display()
            );
        };
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<Vec<u8>, _>>()
            .with_context(|| format!("{}: bad serial {hex:?}", list_path.display()))?;
        let at: i64 = at
            .parse()
            .with_context(|| format!("{}: bad time {at:?}", list_path.display()))?;
        revoked.push(rcgen::RevokedCertParams {
            serial_number: SerialNumber::from_slice(&bytes),
            revocation_time: time::OffsetDateTime::from_unix_timestamp(at).unwrap_or(now),
            reason_code: None,
            invalidity_date: None,
        });
    }
    let crl = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(5),
        next_update: now + time::Duration::days(3650),
        crl_number: SerialNumber::from_slice(&now.unix_timestamp().to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(ca.issuer(), ca.key())
    .context("sign the revocation list")?;
    let pem = crl.pem().context("the revocation list as PEM")?;
    tidemark_util::crashsafe::write_atomic(&a.ca.join(REVOKED_FILE), text.as_bytes())
        .with_context(|| format!("write {}", list_path.display()))?;
    let crl_path = a.ca.join(tidemark_net::tls::CRL_FILE);
    tidemark_util::crashsafe::write_atomic(&crl_path, pem.as_bytes())
        .with_context(|| format!("write {}", crl_path.display()))?;
    outln!(
        "revoked {} certificate(s) of {} ({added} new); {} lists every revoked certificate",
        found.len(),
        a.name,
        crl_path.display()
    );
    outln!(
        "the collector holding this CA (--ca) enforces it within {} s and serves it to targets (--enroll-at) and \
         agents; a service that does not fetch it reads it copied into its --tls folder as {}: each refuses the \
         revoked identity and ends its live sessions",
        tidemark_net::tls::CRL_POLL.as_secs(),
        tidemark_net::tls::CRL_FILE
    );
    Ok(())
}

fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks behind this one.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
}

/// Create `dir` 0700, or take it if it exists empty; refuse anything else.
fn new_private_dir(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!("{} is not empty: give a new folder", dir.display());
            }
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("chmod 700 {}", dir.display()))?;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display())),
        Err(e) => Err(e).with_context(|| format!("{}", dir.display())),
    }
}

/// Write a new file with `mode` (never over an existing one), durably.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    tidemark_net::ca::write_new(path, bytes, mode).map_err(anyhow::Error::msg)
}
