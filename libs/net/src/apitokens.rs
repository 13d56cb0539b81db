//! API tokens with roles (`docs/security.md`, "The API"): the collector's
//! `--api-tokens FILE` lists one token per line, `NAME ROLE BLAKE3`, the
//! hash of a secret only its holder has (`tidemark api-token add` makes
//! it and writes the secret to a 0600 file). Roles are ordered: a viewer
//! reads everything (disk UUIDs included), an operator also acts on disks
//! (refresh, quiesce, tags, drills, failover), an admin also rebinds
//! disks. The file is read again whenever it changes, so adding or
//! removing a token needs no restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

/// What a caller of the API may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ApiRole {
    Viewer,
    Operator,
    Admin,
}

impl ApiRole {
    pub fn name(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Self::Viewer),
            "operator" => Some(Self::Operator),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for ApiRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One line of the tokens file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiToken {
    pub name: String,
    pub role: ApiRole,
    /// blake3 of the secret, hex.
    pub hash: String,
}

impl ApiToken {
    /// The file's line for this token.
    pub fn line(&self) -> String {
        format!("{} {} {}\n", self.name, self.role, self.hash)
    }
}

/// A new secret: 244 random bits (two v4 UUIDs, from the OS's CSPRNG), in
/// hex with a `tma1.` prefix that says what it is.
pub fn new_secret() -> String {
    format!(
        "tma1.{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The hash a tokens file keeps of `secret`.
pub fn hash_secret(secret: &[u8]) -> String {
    blake3::hash(secret).to_hex().to_string()
}

/// A token's name: 1 to 64 of `A-Za-z0-9._@-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "token name {name:?}: 1 to 64 of A-Z, a-z, 0-9, '.', '_', '@', '-'"
        ))
    }
}

/// Parse a tokens file's text (`#` comments and blank lines allowed);
/// an error names the line.
pub fn parse(text: &str) -> Result<Vec<ApiToken>, String> {
    let mut out: Vec<ApiToken> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: String| format!("line {}: {why}", i + 1);
        let parts: Vec<&str> = line.split_ascii_whitespace().collect();
        let [name, role, hash] = parts[..] else {
            return Err(bad("expected NAME ROLE BLAKE3-HEX".into()));
        };
        check_name(name).map_err(bad)?;
        let role = ApiRole::parse(role).ok_or_else(|| bad(format!("role {role:?}: viewer, operator or admin")))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("the hash is not 64 hex digits".into()));
        }
        if out.iter().any(|t| t.name == name) {
            return Err(bad(format!("token name {name:?} appears twice")));
        }
        out.push(ApiToken {
            name: name.to_string(),
            role,
            hash: hash.to_ascii_lowercase(),
        });
    }
    Ok(out)
}

/// A tokens file as a service uses it: read at start (an error then stops
/// the service) and again whenever it changes (an error then keeps the
/// tokens read before, and is logged).
pub struct ApiTokens {
    path: PathBuf,
    state: Mutex<(Stamp, Vec<ApiToken>)>,
}

impl fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiTokens({})", self.path.display())
    }
}

/// A file's (modified time, length); None: no such file.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

fn read(path: &Path) -> Result<Vec<ApiToken>, String> {
    crate::tls::private_file(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

impl ApiTokens {
    pub fn load(path: &Path) -> Result<Self, String> {
        let seen = stamp(path);
        let tokens = read(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            state: Mutex::new((seen, tokens)),
        })
    }

    /// The token whose secret is `secret`, if any (hashes compared in
    /// constant time).
    pub fn check(&self, secret: &[u8]) -> Option<(String, ApiRole)> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = stamp(&self.path);
        if now != st.0 {
            match read(&self.path) {
                Ok(t) => *st = (now, t),
                Err(e) => {
                    tracing::error!("API tokens: {e} (the tokens read before stay in force)");
                    st.0 = now;
                }
            }
        }
        let h = hash_secret(secret);
        st.1.iter()
            .find(|t| constant_time_eq(t.hash.as_bytes(), h.as_bytes()))
            .map(|t| (t.name.clone(), t.role))
    }
}

/// Compare secrets without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file_parses_and_refuses_bad_lines() {
        let h = hash_secret(b"s3cret");
        let t = parse(&format!("# tokens\n\nalice admin {h}\nbob viewer {}\n", "0".repeat(64))).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].role, ApiRole::Admin);
        assert_eq!(parse(&t[0].line()).unwrap()[0], t[0]);
        for (bad, want) in [
            (format!("alice root {h}"), "role \"root\""),
            ("alice admin abc".to_string(), "64 hex"),
            (format!("alice admin {h} extra"), "expected NAME ROLE"),
            (format!("al ice admin {h}"), "expected NAME ROLE"),
            (format!("a/b admin {h}"), "token name"),
            (
                format!("a admin {h}\na viewer {h}"),
                "line 2: token name \"a\" appears twice",
            ),
        ] {
            let e = parse(&bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert!(ApiRole::Viewer < ApiRole::Operator && ApiRole::Operator < ApiRole::Admin);
    }

    #[test]
    fn tokens_are_checked_and_reread_when_the_file_changes() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("api-tokens");
        std::fs::write(&p, format!("ops operator {}\n", hash_secret(b"one"))).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(ApiTokens::load(&p).err().unwrap().contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = ApiTokens::load(&p).unwrap();
        assert_eq!(t.check(b"one"), Some(("ops".into(), ApiRole::Operator)));
        assert_eq!(t.check(b"two"), None);
        std::fs::write(
            &p,
            format!(
                "ops operator {}\nroot admin {}\n",
                hash_secret(b"one"),
                hash_secret(b"two")
            ),
        )
        .unwrap();
        assert_eq!(t.check(b"two"), Some(("root".into(), ApiRole::Admin)));
        // A broken file keeps what was read before.
        std::fs::write(&p, "garbage\n").unwrap();
        assert_eq!(t.check(b"two"), Some(("root".into(), ApiRole::Admin)));
    }
}
