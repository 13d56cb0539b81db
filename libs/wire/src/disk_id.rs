//! Disk ids: what a protected disk is called at every hop, and the name of
//! its folder in the collector's spool and in the target's data directory.
//! So the rule is strict: 1–64 of `[A-Za-z0-9._-]`, and not `.` or `..`.
//!
//! An id is checked once, where it enters a program (the agent's
//! `--disk-id`, a Hello frame, a catalog row): a [`DiskId`] cannot hold
//! anything else, so the code behind those edges never checks again.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

/// A valid disk id (see the module documentation). Formats, `{:?}`
/// included, as the plain string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskId(String);

/// Why a string is not a disk id; the message names the id and the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiskIdError {
    /// Empty, or longer than [`DiskId::MAX_LEN`] bytes.
    #[error("disk id {0:?} must be 1 to 64 characters long")]
    Length(String),
    /// A character outside `[A-Za-z0-9._-]`.
    #[error("disk id {id:?} contains {c:?}; only letters, digits, '.', '_' and '-' are allowed")]
    Char { id: String, c: char },
    /// `.` or `..`, which name directories, not a disk's folder.
    #[error("disk id {0:?} is not allowed")]
    Reserved(String),
}

impl DiskId {
    /// Longest id, in bytes (one length byte in a Hello).
    pub const MAX_LEN: usize = 64;

    /// Check `id` against the rule.
    pub fn parse(id: &str) -> Result<Self, DiskIdError> {
        if id.is_empty() || id.len() > Self::MAX_LEN {
            return Err(DiskIdError::Length(id.to_string()));
        }
        if let Some(c) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(DiskIdError::Char { id: id.to_string(), c });
        }
        if id == "." || id == ".." {
            return Err(DiskIdError::Reserved(id.to_string()));
        }
        Ok(Self(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DiskId {
    type Err = DiskIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for DiskId {
    type Error = DiskIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<DiskId> for String {
    fn from(id: DiskId) -> Self {
        id.0
    }
}

impl Deref for DiskId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for DiskId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::path::Path> for DiskId {
    fn as_ref(&self) -> &std::path::Path {
        self.0.as_ref()
    }
}

impl Borrow<str> for DiskId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for DiskId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for DiskId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for DiskId {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<DiskId> for String {
    fn eq(&self, other: &DiskId) -> bool {
        *self == other.0
    }
}

impl PartialEq<DiskId> for str {
    fn eq(&self, other: &DiskId) -> bool {
        self == other.0
    }
}

impl PartialEq<DiskId> for &str {
    fn eq(&self, other: &DiskId) -> bool {
        *self == other.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_ids() {
        assert!(DiskId::parse("db-01.vol_a").is_ok());
        assert!(DiskId::parse("").is_err());
        assert!(DiskId::parse(&"a".repeat(65)).is_err());
        assert!(DiskId::parse("a/b").unwrap_err().to_string().contains("'/'"));
        assert!(DiskId::parse("..").is_err());
    }

    #[test]
    fn messages_name_the_id_and_the_rule() {
        let e = |s: &str| DiskId::parse(s).unwrap_err().to_string();
        assert_eq!(e(""), "disk id \"\" must be 1 to 64 characters long");
        assert_eq!(
            e("sp ace"),
            "disk id \"sp ace\" contains ' '; only letters, digits, '.', '_' and '-' are allowed"
        );
        assert_eq!(
            e("é"),
            "disk id \"é\" contains 'é'; only letters, digits, '.', '_' and '-' are allowed"
        );
        assert_eq!(e("."), "disk id \".\" is not allowed");
        let id: DiskId = "x".repeat(64).parse().unwrap();
        assert_eq!(id.len(), 64);
        assert_eq!(id, "x".repeat(64));
        let id = DiskId::parse("db").unwrap();
        assert_eq!(
            (format!("{id}"), format!("{id:?}")),
            ("db".to_string(), "\"db\"".to_string())
        );
    }
}
