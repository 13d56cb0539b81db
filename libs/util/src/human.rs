//! Human-readable sizes and durations, both ways.
//!
//! Sizes accept a number with an optional binary suffix (`512`, `64K`,
//! `1.5GiB`, `10M`); `K`, `KB` and `KiB` all mean 1024. Durations accept
//! `500ms`, `30s`, `5m`, `24h`, `7d`, or combinations like `1h30m`.

use std::time::Duration;

/// A size or duration that could not be parsed; the message names it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} {input:?}: {why}")]
pub struct ParseError {
    what: &'static str,
    input: String,
    why: &'static str,
}

fn err(what: &'static str, input: &str, why: &'static str) -> ParseError {
    ParseError {
        what,
        input: input.to_string(),
        why,
    }
}

/// Parse a size such as `64M` or `1GiB` into bytes.
pub fn parse_size(s: &str) -> Result<u64, ParseError> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(err("size", s, "expected a number, e.g. 64M or 1GiB"));
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(err("size", s, "unknown unit (use B, K, M, G or T)")),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(|| err("size", s, "too large"));
    }
    let f: f64 = num.parse().map_err(|_| err("size", s, "not a number"))?;
    let v = f * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(err("size", s, "out of range"));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(v as u64)
}

/// Format bytes with a binary unit: `0 B`, `4.0 KiB`, `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", UNITS[i])
}

/// Parse a duration such as `30s`, `24h` or `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(err("duration", s, "empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let n_end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if n_end == 0 {
            return Err(err("duration", s, "expected a number, e.g. 30s or 24h"));
        }
        let n: u64 = rest[..n_end]
            .parse()
            .map_err(|_| err("duration", s, "number too large"))?;
        rest = &rest[n_end..];
        let u_end = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..u_end];
        rest = &rest[u_end..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" | "" => Duration::from_secs(n),
            "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            _ => return Err(err("duration", s, "unknown unit (use ms, s, m, h or d)")),
        };
        total = total.saturating_add(d);
    }
    Ok(total)
}

/// Format a duration compactly: `850ms`, `42s`, `3m12s`, `5h02m`, `2d04h`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        return if d.is_zero() {
            "0s".to_string()
        } else {
            format!("{}ms", d.as_millis())
        };
    }
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A Unix time (seconds) as `2026-12-07 05:12:03 UTC`: the proleptic
/// Gregorian date from the day count (days-from-civil inverted), so that
/// messages need no time-zone database.
pub fn format_unix_time(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Shift to an era starting 0000-03-01 so that leap days end a year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// The first bidirectional override, isolate or mark, zero-width
/// character or byte-order mark in `name`, if any: characters that change
/// how a name reads without being seen (a "Trojan Source" name listed as
/// another). Tag names refuse them where they are made.
pub fn invisible_char(name: &str) -> Option<char> {
    name.chars().find(|c| {
        matches!(
            c,
            '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_times() {
        assert_eq!(format_unix_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_unix_time(1_796_620_323), "2026-12-07 05:12:03 UTC");
        assert_eq!(format_unix_time(-1), "1969-12-31 23:59:59 UTC");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size(" 10 MB ").unwrap(), 10 << 20);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("10X").unwrap_err().to_string().contains("unknown unit"));
        assert!(parse_size("99999999999999999999T").is_err());
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(1 << 30), "1.0 GiB");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(format_duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(format_duration(Duration::from_millis(850)), "850ms");
    }
}
