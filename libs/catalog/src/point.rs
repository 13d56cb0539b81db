//! Recovery points: what the catalog records and every tool lists.

use serde::{Deserialize, Serialize};

/// What makes a recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PointKind {
    /// A Flush while the disk was consistent: crash-consistent.
    Crash,
    /// A Tag with FLAG_APP_CONSISTENT (taken under fsfreeze / VSS).
    App,
    /// A Tag without it: a named crash-consistent point.
    Tag,
}

impl PointKind {
    /// The name in the catalog and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Crash => "crash",
            Self::App => "app",
            Self::Tag => "tag",
        }
    }

    /// The kind named `s` in the catalog.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "crash" => Some(Self::Crash),
            "app" => Some(Self::App),
            "tag" => Some(Self::Tag),
            _ => None,
        }
    }
}

/// A recovery point: the replica as it was after applying `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Point {
    pub seq: u64,
    /// Source time of the record that made it (ns since the Unix epoch).
    pub time_ns: u64,
    pub kind: PointKind,
    /// The tag's name (App and Tag points).
    pub tag: Option<String>,
    /// This point is the replica's applied state, newer than every
    /// recorded point (`--at latest`), and not recorded in the catalog.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub latest: bool,
}

impl Point {
    /// `seq 42, 2026-…+01:00, app, tag "nightly"` (`latest` for the
    /// applied state).
    pub fn describe(&self) -> String {
        let tag = self.tag.as_ref().map(|t| format!(", tag \"{t}\"")).unwrap_or_default();
        let latest = if self.latest {
            " (latest: every applied write)"
        } else {
            ""
        };
        format!(
            "seq {}, {}, {}{tag}{latest}",
            self.seq,
            format_time(self.time_ns),
            self.kind.as_str()
        )
    }
}

/// Local time, RFC 3339, with as many fractional digits as it needs so
/// that `--at TIME` given a printed time resolves to that very point.
pub fn format_time(ns: u64) -> String {
    let secs = i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX);
    let sub = u32::try_from(ns % 1_000_000_000).unwrap_or(0);
    match chrono::DateTime::from_timestamp(secs, sub) {
        Some(t) => t
            .with_timezone(&chrono::Local)
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false),
        None => format!("@{ns}ns"),
    }
}
