//! Enrollment and renewal, the client side (`docs/security.md`): an
//! identity folder holding `ca.pem` and a one-time `enroll.token` (from
//! `tidemark enroll`) gets its key made here and trades the token, at the
//! collector, for its certificate; an identity with a third or less of its
//! lifetime left trades its current certificate for a new one with a new
//! key. The collector's side is in the collector (`--ca CADIR`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tidemark_wire::frame::{Frame, MAX_CRL_PEM, MAX_ENROLL_PEM};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::ca::ENROLL_TOKEN_FILE;
use crate::tls::{check_issued, private_file, Identity, PeerRole, Tls, CA_FILE, CERT_FILE, KEY_FILE};

/// How long an enrollment or renewal exchange may take in all.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The folder holds an enrollment token and no certificate yet.
pub fn awaiting_enrollment(dir: &Path) -> bool {
    !dir.join(CERT_FILE).exists() && dir.join(ENROLL_TOKEN_FILE).exists()
}

/// Trade the folder's enrollment token at the collector `addr` for a
/// certificate: the key is made here, the collector must hold a collector
/// identity of the folder's CA. On success the folder holds `key.pem`
/// (0600) and `cert.pem`, and the token is gone.
pub async fn enroll(dir: &Path, addr: &str) -> Result<Identity, String> {
    let token_file = dir.join(ENROLL_TOKEN_FILE);
    private_file(&token_file)?;
    let token = std::fs::read_to_string(&token_file)
        .map_err(|e| format!("read {}: {e}", token_file.display()))?
        .trim()
        .to_string();
    let ca = std::fs::read(dir.join(CA_FILE)).map_err(|e| format!("read {}: {e}", dir.join(CA_FILE).display()))?;
    let config = crate::tls::collector_client_config(&ca, &dir.join(CA_FILE))?;
    let key = rcgen::KeyPair::generate().map_err(|e| format!("generate a key: {e}"))?;
    let exchange = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let sni = ServerName::try_from("collector.tidemark").map_err(|e| e.to_string())?;
        let s = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(sni, tcp)
            .await
            .map_err(|e| format!("TLS handshake with the collector: {e}"))?;
        let (mut r, mut w) = tokio::io::split(s);
        trade(&mut r, &mut w, token, key.public_key_raw()).await
    };
    let (cert_pem, _) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer from {addr} within {} s", EXCHANGE_TIMEOUT.as_secs()))??;
    let id = store(dir, &ca, &key, &cert_pem, None)?;
    crate::tls::remove_secret(&token_file)?;
    Ok(id)
}

/// Renew `tls`'s identity at the collector `addr` (authenticated by the
/// current certificate): a new key, a new certificate of the same
/// identity, written over the old ones; the services read them at their
/// next connection.
pub async fn renew(tls: &Tls, addr: &str) -> Result<(), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("generate a key: {e}"))?;
    let exchange = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let c = tls.connect(tcp, PeerRole::Collector, None).await?;
        let (mut r, mut w) = (c.reader, c.writer);
        trade(&mut r, &mut w, String::new(), key.public_key_raw()).await
    };
    let (cert_pem, _) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer from {addr} within {} s", EXCHANGE_TIMEOUT.as_secs()))??;
    let ca =
        std::fs::read(tls.dir.join(CA_FILE)).map_err(|e| format!("read {}: {e}", tls.dir.join(CA_FILE).display()))?;
    store(&tls.dir, &ca, &key, &cert_pem, Some(&tls.me)).map(|_| ())
}

/// How often a service looks at its identity's validity for renewal.
pub const RENEW_CHECK: Duration = Duration::from_secs(600);

/// Trade the enrollment token of `dir` at the collector `addr`, retrying
/// (backing off to 2 s, each new failure logged once) until it works or
/// `stop`; then the identity, which must be of `role`, is loaded. None:
/// stopped. Agents, targets and collectors enroll this way.
pub async fn enroll_until_done(
    dir: &Path,
    addr: &str,
    role: PeerRole,
    stop: &tokio_util::sync::CancellationToken,
) -> Option<Result<crate::Security, String>> {
    let mut wait = Duration::from_millis(100);
    let mut logged = String::new();
    loop {
        match enroll(dir, addr).await {
            Ok(id) => {
                tracing::info!(identity = %id, folder = %dir.display(), "enrolled: certificate received");
                return Some(crate::Security::from_flags(Some(dir), false, role));
            }
            Err(e) => {
                if logged != e {
                    tracing::warn!(collector = %addr, "enrollment failed: {e}; retrying");
                    logged = e;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Where an identity is renewed.
pub enum RenewAt {
    /// At this collector (`HOST:PORT`), over a connection authenticated
    /// with the current certificate.
    Collector(String),
    /// At the CA in this folder, held by this service (a collector's `--ca`).
    Ca(std::path::PathBuf),
}

/// Renew `tls`'s identity `at` the collector or the CA whenever a third or
/// less of its lifetime is left (looked at every [`RENEW_CHECK`] and at
/// start), until `stop`.
pub async fn renew_loop(tls: Arc<Tls>, at: RenewAt, stop: tokio_util::sync::CancellationToken) {
    loop {
        let now = i64::try_from(tidemark_util::now_ns() / 1_000_000_000).unwrap_or(0);
        match renewal_due(&tls.dir, now) {
            Ok(false) => {}
            Ok(true) => {
                let r = match &at {
                    RenewAt::Collector(addr) => renew(&tls, addr).await,
                    RenewAt::Ca(dir) => {
                        let (t, dir) = (tls.clone(), dir.clone());
                        tokio::task::spawn_blocking(move || renew_at_ca(&t, &dir))
                            .await
                            .unwrap_or_else(|e| Err(e.to_string()))
                    }
                };
                match r {
                    Ok(()) => tracing::info!(identity = %tls.me, "certificate renewed (used from the next connection)"),
                    Err(e) => tracing::warn!(identity = %tls.me, "certificate renewal failed: {e} (retried)"),
                }
            }
            Err(e) => tracing::warn!("cannot tell when the certificate expires: {e}"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RENEW_CHECK) => {}
        }
    }
}

/// Renew `tls`'s identity at the CA in `ca_dir`: a new key, a new
/// certificate of the same identity, written over the old ones.
fn renew_at_ca(tls: &Tls, ca_dir: &Path) -> Result<(), String> {
    let ca = crate::ca::Ca::load(ca_dir)?;
    let key = rcgen::KeyPair::generate().map_err(|e| format!("generate a key: {e}"))?;
    let (cert_pem, _) = ca.issue(&tls.me, &key, RENEWED_LIFETIME.as_secs())?;
    store(&tls.dir, ca.pem.as_bytes(), &key, &cert_pem, Some(&tls.me)).map(|_| ())
}

/// How often a target asks the CA's collector for its revocation list.
pub const CRL_FETCH_TARGET: Duration = Duration::from_secs(10);
/// How often an agent does (there are many agents).
pub const CRL_FETCH_AGENT: Duration = Duration::from_secs(60);

/// Ask the collector `addr` (over a connection authenticated with `tls`)
/// for the CA's revocation list (empty: nothing revoked yet).
pub async fn fetch_crl(tls: &Tls, addr: &str) -> Result<String, String> {
    let exchange = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let mut c = tls.connect(tcp, PeerRole::Collector, None).await?;
        crate::write_frame(&mut c.writer, &Frame::Crl { pem: String::new() })
            .await
            .map_err(|e| format!("ask for the revocation list: {e}"))?;
        let max = u32::try_from(MAX_CRL_PEM + 16).unwrap_or(u32::MAX);
        match crate::read_frame(&mut c.reader, max).await {
            Ok(Some(Frame::Crl { pem })) => Ok(pem),
            Ok(Some(Frame::Error { code, reason })) => Err(format!("the collector refused ({code}): {reason}")),
            Ok(Some(f)) => Err(format!(
                "the collector answered {} instead of a revocation list",
                f.name()
            )),
            Ok(None) => Err("the collector closed the connection without an answer".into()),
            Err(e) => Err(format!("reading the collector's answer: {e}")),
        }
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer from {addr} within {} s", EXCHANGE_TIMEOUT.as_secs()))?
}

/// Make `pem` (a revocation list from the CA's collector) `tls`'s
/// `crl.pem` if it is the CA's and differs from the one held: true if it
/// was written (the service reads it within [`crate::tls::CRL_POLL`]). A
/// list the CA did not sign (checked by verifying this identity's own
/// certificate with it) is refused and nothing changes; an empty one
/// changes nothing (lists only grow).
pub fn adopt_crl(tls: &Tls, pem: &str) -> Result<bool, String> {
    if pem.trim().is_empty() {
        return Ok(false);
    }
    let path = tls.dir.join(crate::tls::CRL_FILE);
    if std::fs::read_to_string(&path).is_ok_and(|held| held == pem) {
        return Ok(false);
    }
    let crls = rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the revocation list received: {e}"))?;
    if crls.is_empty() {
        return Err("the revocation list received holds no list".into());
    }
    let own = tls
        .loaded
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .certs[0]
        .clone();
    crate::tls::check_crls(&tls.roots, &tls.provider, &crls, &own)
        .map_err(|e| format!("the revocation list received is {e}"))?;
    tidemark_util::crashsafe::write_atomic(&path, pem.as_bytes())
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(true)
}

/// Fetch the CA's revocation list from the collector `addr` every `every`
/// and adopt it ([`adopt_crl`]), until `stop`. A collector
/// that does not hold the CA answers that it has none: said once, at
/// debug.
pub async fn crl_fetch_loop(tls: Arc<Tls>, addr: String, every: Duration, stop: tokio_util::sync::CancellationToken) {
    let mut last_error = String::new();
    loop {
        let r = match fetch_crl(&tls, &addr).await {
            Ok(pem) => adopt_crl(&tls, &pem),
            Err(e) => Err(e),
        };
        match r {
            Ok(true) => {
                last_error.clear();
                tracing::warn!(collector = %addr, "a new revocation list from the CA: in force from now on");
            }
            Ok(false) => last_error.clear(),
            Err(e) if e != last_error => {
                if e.contains("does not hold the CA") {
                    tracing::debug!(collector = %addr, "revocation list: {e}");
                } else {
                    tracing::warn!(collector = %addr, "revocation list: {e} (retried)");
                }
                last_error = e;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// How long a renewed certificate is valid.
pub const RENEWED_LIFETIME: Duration = Duration::from_secs(397 * 86_400);

/// Enroll at the CA itself (a collector that holds it, `--ca`): redeem
/// the folder's token in `ca_dir`, make the key here, issue and store, as
/// a collector would answer the same token on the wire.
pub fn enroll_locally(dir: &Path, ca_dir: &Path) -> Result<Identity, String> {
    let token_file = dir.join(ENROLL_TOKEN_FILE);
    private_file(&token_file)?;
    let token = std::fs::read_to_string(&token_file).map_err(|e| format!("read {}: {e}", token_file.display()))?;
    let e = crate::ca::redeem(ca_dir, token.trim(), tidemark_util::now_ns() / 1_000_000_000)?;
    let ca = crate::ca::Ca::load(ca_dir)?;
    let key = rcgen::KeyPair::generate().map_err(|e| format!("generate a key: {e}"))?;
    let (cert_pem, _) = ca.issue(&e.id, &key, e.cert_secs)?;
    let id = store(dir, ca.pem.as_bytes(), &key, &cert_pem, Some(&e.id))?;
    crate::tls::remove_secret(&token_file)?;
    Ok(id)
}

/// Send `Enroll`, read `Enrolled` (or the refusal).
async fn trade<R, W>(r: &mut R, w: &mut W, token: String, public_key: &[u8]) -> Result<(String, String), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    crate::write_frame(
        w,
        &Frame::Enroll {
            token,
            public_key: public_key.to_vec(),
        },
    )
    .await
    .map_err(|e| format!("send the enrollment: {e}"))?;
    let max = u32::try_from(2 * MAX_ENROLL_PEM + 16).unwrap_or(u32::MAX);
    match crate::read_frame(r, max).await {
        Ok(Some(Frame::Enrolled { cert_pem, ca_pem })) => Ok((cert_pem, ca_pem)),
        Ok(Some(Frame::Error { code, reason })) => Err(format!("the collector refused ({code}): {reason}")),
        Ok(Some(f)) => Err(format!("the collector answered {} instead of a certificate", f.name())),
        Ok(None) => Err("the collector closed the connection without an answer".into()),
        Err(e) => Err(format!("reading the collector's answer: {e}")),
    }
}

/// Check the certificate received (it chains to the folder's CA, names
/// `want` if given, and holds the key made here) and write the key (0600)
/// and the certificate, each atomically, key first.
fn store(
    dir: &Path,
    ca: &[u8],
    key: &rcgen::KeyPair,
    cert_pem: &str,
    want: Option<&Identity>,
) -> Result<Identity, String> {
    let der =
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| format!("the certificate received: {e}"))?;
    let id = check_issued(ca, &der).map_err(|e| format!("the certificate received: {e}"))?;
    if want.is_some_and(|w| w != &id) {
        return Err(format!("the certificate received names {id}, not this identity"));
    }
    let spki = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| format!("the certificate received: {e}"))?
        .subject_public_key_info();
    if !spki.as_ref().ends_with(key.public_key_raw()) {
        return Err("the certificate received is not for the key made here".into());
    }
    crate::tls::write_private(&dir.join(KEY_FILE), key.serialize_pem().as_bytes())?;
    tidemark_util::crashsafe::write_atomic(&dir.join(CERT_FILE), cert_pem.as_bytes())
        .map_err(|e| format!("write {}: {e}", dir.join(CERT_FILE).display()))?;
    Ok(id)
}

/// Validity of the folder's certificate: (not before, not after), Unix
/// seconds.
pub fn validity(dir: &Path) -> Result<(i64, i64), String> {
    let p = dir.join(CERT_FILE);
    let der = CertificateDer::from_pem_file(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    cert_validity(&der).ok_or_else(|| format!("{}: no validity dates found", p.display()))
}

/// A third of the certificate's lifetime or less is left at `now`.
pub fn renewal_due(dir: &Path, now: i64) -> Result<bool, String> {
    let (nb, na) = validity(dir)?;
    Ok(now >= na - (na - nb) / 3)
}

/// The validity dates of a DER certificate (Unix seconds): the fifth
/// element of the TBSCertificate (after the optional version, the serial,
/// the signature algorithm and the issuer).
pub fn cert_validity(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after; // [0] version
    }
    for _ in 0..3 {
        rest = tlv(rest)?.2; // serial, signature, issuer
    }
    let (_, validity, _) = tlv(rest)?;
    let (t1, nb, after) = tlv(validity)?;
    let (t2, na, _) = tlv(after)?;
    Some((der_time(t1, nb)?, der_time(t2, na)?))
}

/// One DER element: (tag, contents, what follows).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&l, mut b) = b.split_first()?;
    let len = if l < 0x80 {
        usize::from(l)
    } else {
        let n = usize::from(l & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let v = b[..n].iter().fold(0usize, |a, &x| (a << 8) | usize::from(x));
        b = &b[n..];
        v
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// UTCTime (0x17, YYMMDDHHMMSSZ) or GeneralizedTime (0x18,
/// YYYYMMDDHHMMSSZ) as Unix seconds.
fn der_time(tag: u8, v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if s.len() == 12 => {
            let y: i64 = s[..2].parse().ok()?;
            (if y < 50 { 2000 + y } else { 1900 + y }, &s[2..])
        }
        0x18 if s.len() == 14 => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let n = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (mo, d, h, mi, se) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    // Days from the civil date (proleptic Gregorian).
    let y = if mo <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_dates_are_read_from_a_certificate() {
        let mut p = rcgen::CertificateParams::new(vec!["x.agent.tidemark".into()]).unwrap();
        p.not_before = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(4_102_444_800).unwrap(); // 2100: GeneralizedTime
        let k = rcgen::KeyPair::generate().unwrap();
        let c = p.self_signed(&k).unwrap();
        assert_eq!(cert_validity(c.der()), Some((1_700_000_000, 4_102_444_800)));
        assert_eq!(cert_validity(&c.der()[..40]), None);
        assert_eq!(cert_validity(b""), None);
    }
}
