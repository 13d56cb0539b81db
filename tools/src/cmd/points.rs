//! `tidemark points`, and what `mount` and `failover` share with it: the
//! `--at` spec, recovery points as the tools print them, and the
//! [`Image`] a view is read through.
//!
//! Everything that touches the target's data goes through
//! `tidemark_target::recovery` (`docs/recovery.md`), which owns the
//! catalog, the undo data and the pinning of views; this module only
//! adapts it. Until that API is built into this binary (cargo feature
//! `recovery`), the functions that need it say so instead.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args)]
pub struct PointsArgs {
    /// The target's data directory.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The disk id.
    disk: String,
    /// Print one JSON object: {"points":[{"seq","time","kind","tag"}]}.
    #[arg(long)]
    json: bool,
}

/// What makes a point a recovery point.
#[cfg_attr(not(feature = "recovery"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A FLUSH boundary: crash-consistent.
    Crash,
    /// A tag inserted with the filesystem frozen: application-consistent.
    App,
    /// A tag inserted without a freeze: crash-consistent, named.
    Tag,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Crash => "crash",
            Kind::App => "app",
            Kind::Tag => "tag",
        }
    }
}

/// A recovery point as the tools show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointInfo {
    pub seq: u64,
    /// Unix time in ns (the agent's clock when the record was journaled).
    pub time_ns: u64,
    pub kind: Kind,
    pub tag: Option<String>,
}

impl PointInfo {
    /// `seq 42, 2026-…+01:00, app, tag "nightly"`.
    pub fn describe(&self) -> String {
        let tag = self.tag.as_ref().map(|t| format!(", tag {t:?}")).unwrap_or_default();
        format!(
            "seq {}, {}, {}{tag}",
            self.seq,
            format_time(self.time_ns),
            self.kind.as_str()
        )
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "seq": self.seq,
            "time": format_time(self.time_ns),
            "kind": self.kind.as_str(),
            "tag": self.tag,
        })
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

/// Which point `--at` names (the target's `AtSpec`, parsed here until the
/// target's own parser lands).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum At {
    /// The newest point.
    Latest,
    /// The newest application-consistent point.
    LatestApp,
    /// The point at this seq, or the last one before it.
    Seq(u64),
    /// The last point at or before this Unix time (ns).
    Time(u64),
    /// The tag of this name.
    Tag(String),
}

impl At {
    /// `latest`, `latest-app`, `seq:N`, an RFC 3339 time, `tag:NAME`, or
    /// any other text as a tag name.
    pub fn parse(s: &str) -> Result<At> {
        if s.is_empty() {
            bail!("empty point spec (want latest, latest-app, seq:N, an RFC 3339 time or a tag name)");
        }
        if let Some(n) = s.strip_prefix("seq:") {
            let n = n
                .parse::<u64>()
                .with_context(|| format!("{s:?}: seq:N wants a whole number"))?;
            return Ok(At::Seq(n));
        }
        if let Some(t) = s.strip_prefix("tag:") {
            if t.is_empty() {
                bail!("{s:?}: tag:NAME wants a name");
            }
            return Ok(At::Tag(t.to_string()));
        }
        match s {
            "latest" => return Ok(At::Latest),
            "latest-app" => return Ok(At::LatestApp),
            _ => {}
        }
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
            let ns = t
                .timestamp_nanos_opt()
                .and_then(|n| u64::try_from(n).ok())
                .with_context(|| format!("{s:?}: time out of range"))?;
            return Ok(At::Time(ns));
        }
        Ok(At::Tag(s.to_string()))
    }
}

/// A disk image read at random offsets: a pinned view of a recovery
/// point, or a plain raw file (`--image`).
pub trait Image: Send + Sync + 'static {
    fn size(&self) -> u64;
    /// Fill `buf` from `offset` (`offset + buf.len() <= size`).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Extents `(offset, len, data)` covering `[offset, offset+len)`;
    /// `data == false` reads as zeros.
    fn allocated(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>>;
}

/// A raw image file, read-only.
pub struct FileImage {
    file: File,
    size: u64,
}

impl FileImage {
    pub fn open(path: &Path) -> Result<FileImage> {
        let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
        let size =
            tidemark_util::fileops::backing_size(&file).with_context(|| format!("size of {}", path.display()))?;
        Ok(FileImage { file, size })
    }
}

impl Image for FileImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn allocated(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        let runs = match tidemark_util::fileops::allocation(&self.file, offset, len, 1024) {
            Ok(r) => r,
            // A block device or a filesystem without SEEK_DATA: all data.
            Err(_) => return Ok(vec![(offset, len, true)]),
        };
        let mut pos = offset;
        let mut out = Vec::with_capacity(runs.len() + 1);
        for (l, hole) in runs {
            out.push((pos, l, !hole));
            pos += l;
        }
        if pos < offset + len {
            out.push((pos, offset + len - pos, true));
        }
        Ok(out)
    }
}

#[cfg(feature = "recovery")]
mod api {
    //! The adapter to `tidemark_target::recovery`.
    use super::*;
    use tidemark_target::recovery as r;

    fn point(p: &r::Point) -> PointInfo {
        PointInfo {
            seq: p.seq,
            time_ns: p.time_ns,
            kind: match p.kind {
                r::PointKind::Crash => Kind::Crash,
                r::PointKind::App => Kind::App,
                r::PointKind::Tag => Kind::Tag,
            },
            tag: p.tag.clone(),
        }
    }

    fn spec(at: &At) -> r::AtSpec {
        match at {
            At::Latest => r::AtSpec::Latest,
            At::LatestApp => r::AtSpec::LatestApp,
            At::Seq(n) => r::AtSpec::Seq(*n),
            At::Time(t) => r::AtSpec::Time(*t),
            At::Tag(t) => r::AtSpec::Tag(t.clone()),
        }
    }

    struct ViewImage(r::View);

    impl Image for ViewImage {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.0.read_at(buf, offset)
        }
        fn allocated(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
            self.0.allocated(offset, len)
        }
    }

    pub fn list(data: &Path, disk: &str) -> Result<Vec<PointInfo>> {
        Ok(r::points(data, disk)?.iter().map(point).collect())
    }

    pub fn open_view(data: &Path, disk: &str, at: &At) -> Result<(Arc<dyn Image>, PointInfo)> {
        let v = r::View::open(data, disk, &spec(at))?;
        let p = point(v.point());
        Ok((Arc::new(ViewImage(v)), p))
    }

    pub fn record_failover(data: &Path, disk: &str, p: &PointInfo, output: &Path) -> Result<()> {
        let rp = r::Point {
            seq: p.seq,
            time_ns: p.time_ns,
            kind: match p.kind {
                Kind::Crash => r::PointKind::Crash,
                Kind::App => r::PointKind::App,
                Kind::Tag => r::PointKind::Tag,
            },
            tag: p.tag.clone(),
        };
        r::record_failover(data, disk, &rp, output)
    }

    pub fn drain(data: &Path, disk: &str, timeout: std::time::Duration) -> Result<u64> {
        r::drain(data, disk, timeout)
    }
}

#[cfg(not(feature = "recovery"))]
mod api {
    //! Stand-ins until `tidemark_target::recovery` is built in.
    use super::*;

    fn missing<T>() -> Result<T> {
        bail!("this tidemark was built without the target's recovery API (cargo feature `recovery` of tidemark-tools); only `--image FILE` works")
    }

    pub fn list(_data: &Path, _disk: &str) -> Result<Vec<PointInfo>> {
        missing()
    }

    pub fn open_view(_data: &Path, _disk: &str, _at: &At) -> Result<(Arc<dyn Image>, PointInfo)> {
        missing()
    }

    pub fn record_failover(_data: &Path, _disk: &str, _p: &PointInfo, _output: &Path) -> Result<()> {
        missing()
    }

    pub fn drain(_data: &Path, _disk: &str, _timeout: std::time::Duration) -> Result<u64> {
        missing()
    }
}

pub use api::{drain, open_view, record_failover};

/// What `mount` and `failover` read: a recovery point (`--data`, `DISK`,
/// `--at`) and which point it is, or a raw image file (`--image`).
pub fn open_source(
    data: Option<&Path>,
    disk: Option<&str>,
    at: Option<&str>,
    image: Option<&Path>,
) -> Result<(Arc<dyn Image>, Option<PointInfo>)> {
    if let Some(i) = image {
        return Ok((Arc::new(FileImage::open(i)?), None));
    }
    let (Some(data), Some(disk), Some(at)) = (data, disk, at) else {
        bail!("name the point: --data DIR DISK --at SPEC");
    };
    let spec = At::parse(at).with_context(|| format!("--at {at}"))?;
    let (img, p) =
        open_view(data, disk, &spec).with_context(|| format!("open {disk} at {at} in {}", data.display()))?;
    Ok((img, Some(p)))
}

/// The disk's recovery points, oldest first.
pub fn list(data: &Path, disk: &str) -> Result<Vec<PointInfo>> {
    api::list(data, disk).with_context(|| format!("list the recovery points of {disk} in {}", data.display()))
}

pub fn points(a: PointsArgs) -> Result<()> {
    let pts = list(&a.data, &a.disk)?;
    if a.json {
        let v: Vec<_> = pts.iter().map(PointInfo::to_json).collect();
        outln!("{}", serde_json::json!({ "points": v }));
        return Ok(());
    }
    if pts.is_empty() {
        outln!("no recovery points for {}", a.disk);
        return Ok(());
    }
    let rows: Vec<[String; 4]> = pts
        .iter()
        .map(|p| {
            [
                format_time(p.time_ns),
                p.seq.to_string(),
                p.kind.as_str().to_string(),
                p.tag.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let w = |i: usize, h: &str| rows.iter().map(|r| r[i].len()).max().unwrap_or(0).max(h.len());
    let (w0, w1, w2) = (w(0, "TIME"), w(1, "SEQ"), w(2, "KIND"));
    outln!("{:<w0$}  {:>w1$}  {:<w2$}  TAG", "TIME", "SEQ", "KIND");
    for r in rows {
        outln!("{:<w0$}  {:>w1$}  {:<w2$}  {}", r[0], r[1], r[2], r[3]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spec() {
        assert_eq!(At::parse("latest").unwrap(), At::Latest);
        assert_eq!(At::parse("latest-app").unwrap(), At::LatestApp);
        assert_eq!(At::parse("seq:42").unwrap(), At::Seq(42));
        assert!(At::parse("seq:x").is_err());
        assert!(At::parse("seq:-1").is_err());
        assert!(At::parse("").is_err());
        assert!(At::parse("tag:").is_err());
        assert_eq!(
            At::parse("2026-01-02T03:04:05.5Z").unwrap(),
            At::Time(1_767_323_045_500_000_000)
        );
        assert_eq!(
            At::parse("2026-01-02T04:04:05+01:00").unwrap(),
            At::Time(1_767_323_045_000_000_000)
        );
        assert_eq!(At::parse("nightly").unwrap(), At::Tag("nightly".into()));
        // A tag whose name reads as another spec.
        assert_eq!(At::parse("tag:latest").unwrap(), At::Tag("latest".into()));
        assert_eq!(At::parse("tag:seq:3").unwrap(), At::Tag("seq:3".into()));
    }

    #[test]
    fn printed_times_parse_back_exactly() {
        for ns in [0u64, 1_767_323_045_000_000_000, 1_767_323_045_123_456_789] {
            assert_eq!(
                At::parse(&format_time(ns)).unwrap(),
                At::Time(ns),
                "{}",
                format_time(ns)
            );
        }
    }

    #[test]
    fn json_has_the_documented_keys() {
        let p = PointInfo {
            seq: 7,
            time_ns: 1_767_323_045_000_000_000,
            kind: Kind::App,
            tag: Some("t".into()),
        };
        let v = p.to_json();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["kind"], "app");
        assert_eq!(v["tag"], "t");
        assert!(v["time"].as_str().unwrap().starts_with("2026-01-02T"));
        assert!(p.describe().contains("seq 7"));
    }

    #[test]
    fn file_image_reports_holes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        let img = FileImage::open(&p).unwrap();
        assert_eq!(img.size(), 4 << 20);
        let ext = img.allocated(0, 4 << 20).unwrap();
        assert_eq!(ext.iter().map(|e| e.1).sum::<u64>(), 4 << 20);
        assert!(ext.iter().any(|e| e.2 && e.0 <= 1 << 20 && e.0 + e.1 > 1 << 20));
        let mut b = [0u8; 4];
        img.read_at(&mut b, 1 << 20).unwrap();
        assert_eq!(b, [7; 4]);
    }
}
