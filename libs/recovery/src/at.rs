//! `--at`: which recovery point a user asks for, in the operator's words,
//! and the tag names that `--at` can always reach.

use serde::{Deserialize, Serialize};
use tidemark_catalog::point::{format_time, Point, PointKind};
use tidemark_util::now_ns;

use crate::error::{Error, ErrorKind, Result};

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::Invalid, msg)
}

/// Which point a user asks for (`--at`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AtSpec {
    /// The replica's applied state: every record applied (a crash state of
    /// the source, offered while the disk is consistent).
    Latest,
    /// The newest point made by a flush (or a tag).
    LatestFlush,
    /// The newest application-consistent point.
    LatestApp,
    /// The point at this seq, or the last one before it.
    Seq(u64),
    /// The last point at or before this time (ns since the Unix epoch).
    Time(u64),
    /// The point carrying this tag name.
    Tag(String),
}

/// What `--at` accepts, for error messages.
pub const AT_FORMS: &str = "latest, latest-flush, latest-app, seq:N, tag:NAME, a time \
(2026-11-28T10:00:00Z, 2026-11-28 10:00 local time, 10:00 today) or a relative time (10m ago)";

impl AtSpec {
    /// Parse `latest`, `latest-flush`, `latest-app`, `seq:N`, `tag:NAME`,
    /// an RFC 3339 time (`2026-11-28T10:00:00Z`, `…+02:00`, fractions
    /// allowed), a local time (`2026-11-28 10:00[:00]`, `2026-11-28T10:00`,
    /// `10:00[:00]` today), a relative time (`10m ago`, `1h30m ago`), or a
    /// bare tag name (anything else that [`tag_name_problem`] accepts).
    pub fn parse(s: &str) -> Result<Self> {
        Self::parse_at(s, now_ns())
    }

    /// [`AtSpec::parse`] with "now" given (relative times count back from it).
    pub fn parse_at(s: &str, now_ns: u64) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(invalid(format!("--at is empty: give one of {AT_FORMS}")));
        }
        match s {
            "latest" => return Ok(Self::Latest),
            "latest-flush" => return Ok(Self::LatestFlush),
            "latest-app" => return Ok(Self::LatestApp),
            _ => {}
        }
        if let Some(n) = s.strip_prefix("seq:") {
            return n.trim().parse().map(Self::Seq).map_err(|_| {
                invalid(format!(
                    "--at {s}: \"{n}\" is not a seq number (seq:N wants a whole number)"
                ))
            });
        }
        if let Some(name) = s.strip_prefix("tag:") {
            if name.is_empty() {
                return Err(invalid(format!("--at {s}: tag:NAME wants a name")));
            }
            return Ok(Self::Tag(name.to_string()));
        }
        if let Some(ago) = s.strip_suffix(" ago").or_else(|| s.strip_suffix("ago")) {
            let d = tidemark_util::human::parse_duration(ago.trim()).map_err(|_| {
                invalid(format!(
                    "--at {s}: \"{}\" is not a duration (e.g. 10m ago, 1h30m ago)",
                    ago.trim()
                ))
            })?;
            let back = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            return Ok(Self::Time(now_ns.saturating_sub(back)));
        }
        if let Some(t) = parse_rfc3339(s) {
            return Ok(Self::Time(t));
        }
        if let Some(t) = parse_local_time(s, now_ns) {
            return Ok(Self::Time(t));
        }
        if looks_like_time(s) {
            return Err(invalid(format!(
                "--at {s} looks like a time but is not one this tool reads (2026-11-28T10:00:00Z, 2026-11-28 10:00, 10:00); \
                 use tag:{s} for a tag of that name"
            )));
        }
        Ok(Self::Tag(s.to_string()))
    }
}

/// Why `name` cannot be a tag name, if it cannot: `--at` must be able to
/// name every tag by itself, so a name that `--at` reads as something else
/// (`latest`, `seq:5`, a time, `10m ago`) or that has a `tag:` prefix is
/// refused, as are empty names, names over 255 bytes and control
/// characters.
pub fn tag_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a tag name cannot be empty".into());
    }
    if name.len() > 255 {
        return Some(format!("tag name of {} bytes: at most 255 bytes", name.len()));
    }
    if name.trim() != name {
        return Some(format!("tag name \"{name}\" starts or ends with white space"));
    }
    if name.chars().any(char::is_control) {
        return Some("a tag name cannot hold control characters".into());
    }
    if let Some(c) = tidemark_util::human::invisible_char(name) {
        return Some(format!(
            "a tag name cannot hold U+{:04X} (a bidirectional or invisible formatting character: it makes a name \
             read as another)",
            u32::from(c)
        ));
    }
    if name.starts_with("tag:") {
        return Some(format!("tag name \"{name}\" starts with tag:, which --at strips"));
    }
    match AtSpec::parse_at(name, now_ns()) {
        Ok(AtSpec::Tag(t)) if t == name => None,
        _ => Some(format!(
            "tag name \"{name}\" reads as a point spec to --at ({AT_FORMS}); choose another name"
        )),
    }
}

/// Whether `s` starts like a date or a clock time (so that a typo in one
/// is an error, not a tag name).
fn looks_like_time(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    (digits == 4 && b.get(4) == Some(&b'-')) || ((1..=2).contains(&digits) && b.get(digits) == Some(&b':'))
}

/// A time without a zone, in the local zone: `YYYY-MM-DD HH:MM[:SS[.f]]`,
/// the same with `T`, or `HH:MM[:SS]` (today).
fn parse_local_time(s: &str, now_ns: u64) -> Option<u64> {
    use chrono::{Local, NaiveDate, NaiveDateTime, NaiveTime, TimeZone};
    let naive = [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
    .or_else(|| {
        let t = ["%H:%M:%S%.f", "%H:%M"]
            .iter()
            .find_map(|f| NaiveTime::parse_from_str(s, f).ok())?;
        let secs = i64::try_from(now_ns / 1_000_000_000).ok()?;
        let today: NaiveDate = Local.timestamp_opt(secs, 0).single()?.date_naive();
        Some(today.and_time(t))
    })?;
    let local = Local.from_local_datetime(&naive).earliest()?;
    u64::try_from(local.timestamp_nanos_opt()?).ok()
}

/// Parse an RFC 3339 date-time into ns since the Unix epoch (None if it is
/// not one, or before 1970).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = b.get(r)?;
        if !t.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(t).ok()?.parse().ok()
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ns: i64 = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &s[start..i.min(start + 9)];
        frac_ns = digits.parse::<i64>().ok()? * 10i64.pow(9 - u32::try_from(digits.len()).ok()?);
    }
    let offset_s: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        c @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *c == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    u64::try_from(secs)
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(frac_ns).ok()?)
}

/// The point `at` names among `points` (sorted by seq): anything but an
/// exact point seq (or a tag) resolves to the last point at or before it.
pub fn select<'a>(points: &'a [Point], at: &AtSpec) -> Option<&'a Point> {
    match at {
        AtSpec::Latest => points.last(),
        AtSpec::LatestFlush => points.iter().rev().find(|p| !p.latest),
        AtSpec::LatestApp => points.iter().rev().find(|p| p.kind == PointKind::App),
        AtSpec::Seq(n) => points.iter().rev().find(|p| p.seq <= *n),
        AtSpec::Time(t) => points.iter().rev().find(|p| p.time_ns <= *t),
        AtSpec::Tag(name) => points.iter().find(|p| p.tag.as_deref() == Some(name.as_str())),
    }
}

/// Why no point matched `at`, in the operator's words.
pub fn describe(at: &AtSpec) -> String {
    match at {
        AtSpec::Latest => "no recovery point yet (the disk is not consistent: its initial sync or a resync has not finished, it is halted, or retention is off)".into(),
        AtSpec::LatestFlush => "no point made by a flush or a tag yet".into(),
        AtSpec::LatestApp => "no application-consistent point (take one with tidemark tag --freeze)".into(),
        AtSpec::Seq(n) => format!("no point at or before seq {n}"),
        AtSpec::Time(t) => format!("no point at or before {}", format_time(*t)),
        AtSpec::Tag(n) => format!("no point tagged \"{n}\" (tidemark points lists them)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(seq: u64, time_ns: u64, kind: PointKind, tag: Option<&str>) -> Point {
        Point {
            seq,
            time_ns,
            kind,
            tag: tag.map(str::to_string),
            latest: false,
        }
    }

    #[test]
    fn local_relative_and_reserved_forms() {
        let now = 1_800_000_000_000_000_000;
        assert_eq!(
            AtSpec::parse_at("10m ago", now).unwrap(),
            AtSpec::Time(now - 600_000_000_000)
        );
        assert_eq!(
            AtSpec::parse_at("1h30m ago", now).unwrap(),
            AtSpec::Time(now - 5_400_000_000_000)
        );
        assert!(AtSpec::parse_at("ten minutes ago", now).is_err());
        assert_eq!(AtSpec::parse("latest-flush").unwrap(), AtSpec::LatestFlush);
        // Local times are the local zone's: whatever it is, they round-trip
        // through the printed form.
        let AtSpec::Time(t) = AtSpec::parse("2026-11-28 10:00").unwrap() else {
            panic!("a local time")
        };
        assert_eq!(AtSpec::parse(&format_time(t)).unwrap(), AtSpec::Time(t));
        assert_eq!(
            AtSpec::parse("2026-11-28T10:00:30").unwrap(),
            AtSpec::Time(t + 30_000_000_000)
        );
        assert!(matches!(AtSpec::parse("10:00").unwrap(), AtSpec::Time(_)));
        assert!(AtSpec::parse("25:00").is_err(), "looks like a clock time, is not one");
        for bad in [
            "latest",
            "latest-app",
            "latest-flush",
            "seq:5",
            "tag:x",
            "10m ago",
            "2026-11-28 10:00",
            "10:00",
            "",
            " x",
            "pay\u{202E}gpj.exe",
            "a\u{2066}b",
            "zero\u{200B}width",
            "\u{FEFF}bom",
        ] {
            assert!(tag_name_problem(bad).is_some(), "{bad:?} must be refused as a tag name");
        }
        assert!(tag_name_problem("x\u{202E}y").unwrap().contains("U+202E"));
        for good in [
            "nightly",
            "before-upgrade",
            "v1.2",
            "pre_patch_2026",
            "über-nächtlich",
            "日次",
        ] {
            assert_eq!(tag_name_problem(good), None, "{good}");
        }
        let e = AtSpec::parse("seq:x").unwrap_err().to_string();
        assert!(!e.contains("Tag(") && e.contains("seq:N"), "{e}");
    }

    #[test]
    fn specs_parse_and_resolve_to_the_last_point_at_or_before() {
        assert_eq!(AtSpec::parse("latest").unwrap(), AtSpec::Latest);
        assert_eq!(AtSpec::parse("latest-app").unwrap(), AtSpec::LatestApp);
        assert_eq!(AtSpec::parse("seq:42").unwrap(), AtSpec::Seq(42));
        assert!(AtSpec::parse("seq:x").is_err());
        assert_eq!(AtSpec::parse("tag:latest").unwrap(), AtSpec::Tag("latest".into()));
        assert_eq!(
            AtSpec::parse("before-upgrade").unwrap(),
            AtSpec::Tag("before-upgrade".into())
        );
        assert_eq!(
            AtSpec::parse("1970-01-01T00:00:01.5Z").unwrap(),
            AtSpec::Time(1_500_000_000)
        );
        assert_eq!(
            AtSpec::parse("2026-11-28T12:00:00+02:00").unwrap(),
            AtSpec::parse("2026-11-28T10:00:00Z").unwrap()
        );
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951_868_800_000_000_000));
        assert!(
            AtSpec::parse("2026-13-01T00:00:00Z").is_err(),
            "looks like a time, is not one"
        );
        assert!(AtSpec::parse("").is_err());

        let pts = vec![
            p(10, 100, PointKind::Crash, None),
            p(20, 200, PointKind::App, Some("a")),
            p(30, 300, PointKind::Tag, Some("b")),
            p(40, 400, PointKind::Crash, None),
        ];
        assert_eq!(select(&pts, &AtSpec::Latest).unwrap().seq, 40);
        assert_eq!(select(&pts, &AtSpec::LatestApp).unwrap().seq, 20);
        assert_eq!(select(&pts, &AtSpec::Seq(30)).unwrap().seq, 30);
        assert_eq!(select(&pts, &AtSpec::Seq(39)).unwrap().seq, 30);
        assert!(select(&pts, &AtSpec::Seq(9)).is_none());
        assert_eq!(select(&pts, &AtSpec::Time(250)).unwrap().seq, 20);
        assert_eq!(select(&pts, &AtSpec::Tag("b".into())).unwrap().seq, 30);
        assert!(select(&pts, &AtSpec::Tag("c".into())).is_none());
        let j = serde_json::to_string(&pts[1]).unwrap();
        assert_eq!(j, r#"{"seq":20,"time_ns":200,"kind":"app","tag":"a"}"#);
    }
}
