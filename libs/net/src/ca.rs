//! The deployment's certificate authority, as files (`docs/security.md`):
//! the CA folder (`tidemark ca init`) holds `ca.key` (0600), `ca.pem`,
//! `ca.name`, the certificates issued (`issued/`), the revocation list,
//! and the one-time enrollment tokens (`enroll/`). Issuing is here so that
//! `tidemark ca issue` and the collector (which trades an enrollment token
//! for a certificate, and renews certificates) sign the same way.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData, SerialNumber, SignatureAlgorithm,
};

use crate::tls::{check_issued, private_file, Identity, CA_FILE};

/// The CA's private key in its folder.
pub const CA_KEY_FILE: &str = "ca.key";
/// The CA's name (its certificate's common name), for signing with it.
pub const CA_NAME_FILE: &str = "ca.name";
/// Copies of every certificate issued, `NAME.ROLE.SERIAL.pem`.
pub const ISSUED_DIR: &str = "issued";
/// One-time enrollment tokens, `ID.json` (used: `ID.used`).
pub const ENROLL_DIR: &str = "enroll";
/// The enrollment token in an identity folder waiting for its first
/// certificate (0600).
pub const ENROLL_TOKEN_FILE: &str = "enroll.token";

/// A loaded CA: its key and the issuer made from it.
pub struct Ca {
    pub dir: PathBuf,
    key: KeyPair,
    issuer: rcgen::Certificate,
    /// `ca.pem` as stored.
    pub pem: String,
}

/// A public key sent by a peer for its certificate: ECDSA P-256, the
/// uncompressed point (65 bytes), as rcgen makes keys.
pub struct PeerKey(pub Vec<u8>);

impl PublicKeyData for PeerKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl PeerKey {
    /// Check the shape of a key from the wire.
    pub fn parse(raw: &[u8]) -> Result<Self, String> {
        if raw.len() != 65 || raw[0] != 4 {
            return Err(format!(
                "a public key of {} bytes; an ECDSA P-256 uncompressed point (65 bytes) is expected",
                raw.len()
            ));
        }
        Ok(Self(raw.to_vec()))
    }
}

impl Ca {
    /// Load the CA of folder `dir`.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let read = |n: &str| {
            let p = dir.join(n);
            std::fs::read_to_string(&p).map_err(|e| format!("read {}: {e}", p.display()))
        };
        private_file(&dir.join(CA_KEY_FILE))?;
        let key = KeyPair::from_pem(&read(CA_KEY_FILE)?)
            .map_err(|e| format!("{}: not a private key: {e}", dir.join(CA_KEY_FILE).display()))?;
        let pem = read(CA_FILE)?;
        let name = read(CA_NAME_FILE)?;
        // The issuer as signing needs it: the CA certificate's name and key
        // (rcgen takes the issuer's name and key identifier from these; the
        // stored ca.pem carries the same).
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.distinguished_name.push(DnType::CommonName, name.trim());
        let issuer = p.self_signed(&key).map_err(|e| format!("the CA key: {e}"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
            issuer,
            pem,
        })
    }

    /// The issuer, for signing revocation lists.
    pub fn issuer(&self) -> &rcgen::Certificate {
        &self.issuer
    }

    /// The CA's key, for signing revocation lists.
    pub fn key(&self) -> &KeyPair {
        &self.key
    }

    /// Sign a certificate for `id` and `public_key`, valid `secs` seconds,
    /// check that it chains to `ca.pem`, and keep a copy in `issued/`.
    /// Returns the certificate's PEM and its serial (hex).
    pub fn issue(&self, id: &Identity, public_key: &impl PublicKeyData, secs: u64) -> Result<(String, String), String> {
        let mut p = CertificateParams::new(vec![id.dns_name()]).map_err(|e| format!("the certificate's name: {e}"))?;
        p.distinguished_name.push(DnType::CommonName, id.name.clone());
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, id.role.name());
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        // A little slack for clocks behind this one.
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::seconds(i64::try_from(secs).unwrap_or(i64::MAX / 2));
        let serial = serial();
        p.serial_number = Some(serial.clone());
        let cert = p
            .signed_by(public_key, &self.issuer, &self.key)
            .map_err(|e| format!("sign the certificate: {e}"))?;
        // What was made must chain to the stored CA certificate (a ca.key or
        // ca.name that does not belong to ca.pem is caught here).
        let made = check_issued(self.pem.as_bytes(), cert.der()).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        if &made != id {
            return Err(format!("the certificate made names {made}, not {id}"));
        }
        let hex: String = serial.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let kept = self
            .dir
            .join(ISSUED_DIR)
            .join(format!("{}.{}.{hex}.pem", id.name, id.role.name()));
        write_new(&kept, cert.pem().as_bytes(), 0o644)?;
        Ok((cert.pem(), hex))
    }
}

/// A random positive serial.
pub fn serial() -> SerialNumber {
    let mut b = *uuid::Uuid::new_v4().as_bytes();
    // Positive, as DER integers in certificates must be.
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

/// Write a new file with `mode` (never over an existing one), durably.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("write {}: {e}", path.display()))
}

/// A one-time enrollment token as recorded in the CA's `enroll/` folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    pub id: Identity,
    /// Unix time after which it is refused.
    pub expires: u64,
    /// How long the certificate it buys is valid, in seconds.
    pub cert_secs: u64,
}

/// Make a one-time token for `id` in the CA folder `ca`: returns the token
/// text (`tme1.ID.SECRET`); only the secret's hash is kept.
pub fn new_enrollment(ca: &Path, e: &Enrollment) -> Result<String, String> {
    let dir = ca.join(ENROLL_DIR);
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|err| format!("create {}: {err}", dir.display()))?;
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let secret = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let record = format!(
        "{}\n{}\n{}\n{}\n{}\n",
        e.id.name,
        e.id.role.name(),
        e.expires,
        e.cert_secs,
        blake3::hash(secret.as_bytes()).to_hex()
    );
    write_new(&dir.join(format!("{id}.json")), record.as_bytes(), 0o600)?;
    Ok(format!("tme1.{id}.{secret}"))
}

/// Use up the token `token` of the CA folder `ca`: the first caller wins
/// (the record is renamed, atomically); a second use, an unknown or
/// expired token, or a wrong secret is refused with the reason. The
/// record is renamed before the secret is compared only when it matches,
/// so a wrong guess does not burn a real token.
pub fn redeem(ca: &Path, token: &str, now: u64) -> Result<Enrollment, String> {
    let mut parts = token.trim().split('.');
    let (Some("tme1"), Some(id), Some(secret), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("not an enrollment token (tme1.ID.SECRET)".into());
    };
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("not an enrollment token (a bad id)".into());
    }
    let dir = ca.join(ENROLL_DIR);
    let live = dir.join(format!("{id}.json"));
    let used = dir.join(format!("{id}.used"));
    let text = match std::fs::read_to_string(&live) {
        Ok(t) => t,
        Err(_) if used.exists() => return Err(format!("enrollment token {id} was used already")),
        Err(_) => return Err(format!("no enrollment token {id} at this CA")),
    };
    let lines: Vec<&str> = text.lines().collect();
    let [name, role, expires, cert_secs, hash] = lines[..] else {
        return Err(format!("{}: a damaged token record", live.display()));
    };
    let bad = |w: &str| format!("{}: a damaged token record ({w})", live.display());
    let role = crate::tls::PeerRole::parse(role).ok_or_else(|| bad("role"))?;
    let e = Enrollment {
        id: Identity::new(name, role).map_err(|_| bad("name"))?,
        expires: expires.parse().map_err(|_| bad("expiry"))?,
        cert_secs: cert_secs.parse().map_err(|_| bad("lifetime"))?,
    };
    let want = blake3::Hash::from_hex(hash).map_err(|_| bad("hash"))?;
    // blake3::Hash compares in constant time.
    if blake3::hash(secret.as_bytes()) != want {
        return Err(format!("enrollment token {id}: wrong secret"));
    }
    if now > e.expires {
        return Err(format!("enrollment token {id} expired"));
    }
    std::fs::rename(&live, &used).map_err(|_| format!("enrollment token {id} was used already"))?;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::PeerRole;

    #[test]
    fn a_token_is_used_once_and_a_wrong_secret_burns_nothing() {
        let d = tempfile::tempdir().unwrap();
        let e = Enrollment {
            id: Identity::new("web-1", PeerRole::Agent).unwrap(),
            expires: 2_000,
            cert_secs: 3_600,
        };
        let t = new_enrollment(d.path(), &e).unwrap();
        let wrong = format!("{}0", &t[..t.len() - 1]);
        let wrong = if wrong == t {
            format!("{}1", &t[..t.len() - 1])
        } else {
            wrong
        };
        assert!(redeem(d.path(), &wrong, 1_000).unwrap_err().contains("wrong secret"));
        assert!(redeem(d.path(), &t, 3_000).unwrap_err().contains("expired"));
        assert_eq!(redeem(d.path(), &t, 1_000).unwrap(), e);
        assert!(redeem(d.path(), &t, 1_000).unwrap_err().contains("used already"));
        assert!(redeem(d.path(), "tme1.x.y", 1_000).unwrap_err().contains("bad id"));
        assert!(redeem(d.path(), "hello", 1_000).is_err());
    }
}
