//! `tidemark points`, and what `mount` and `failover` share with it:
//! recovery points as the tools print them, and the [`Image`] a view is
//! read through.
//!
//! Everything that touches the target's data goes through
//! `tidemark_target::recovery` (`docs/recovery.md`), which owns the
//! catalog, the undo data, the `--at` parser and the pinning of views.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use tidemark_target::recovery as r;

pub use tidemark_target::recovery::{format_time, AtSpec as At, Point as PointInfo};

#[derive(Args)]
#[command(
    after_help = "Examples:\n  tidemark points --data /var/lib/tidemark/target db1\n  tidemark points --data /var/lib/tidemark/target db1 --json"
)]
pub struct PointsArgs {
    /// The target's data directory.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The disk id.
    disk: String,
    /// Print one JSON object: {"points":[{"seq","time","kind","tag","latest"}]}.
    #[arg(long)]
    json: bool,
}

/// A point as `points --json` prints it.
pub fn point_json(p: &PointInfo) -> serde_json::Value {
    serde_json::json!({
        "seq": p.seq,
        "time": format_time(p.time_ns),
        "kind": p.kind.as_str(),
        "tag": p.tag,
        "latest": p.latest,
    })
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

/// Open a pinned view of `disk` at `at`.
pub fn open_view(data: &Path, disk: &str, at: &At) -> Result<(Arc<dyn Image>, PointInfo)> {
    let v = r::View::open(data, disk, at)?;
    let p = v.point().clone();
    Ok((Arc::new(ViewImage(v)), p))
}

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
    let spec = At::parse(at)?;
    let (img, p) = open_view(data, disk, &spec)?;
    Ok((img, Some(p)))
}

/// The disk's recovery points, oldest first.
pub fn list(data: &Path, disk: &str) -> Result<Vec<PointInfo>> {
    r::points(data, disk)
}

pub fn points(a: PointsArgs) -> Result<()> {
    let pts = list(&a.data, &a.disk)?;
    if a.json {
        let v: Vec<_> = pts.iter().map(point_json).collect();
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
                match (&p.tag, p.latest) {
                    (Some(t), _) => t.clone(),
                    (None, true) => "(latest: every applied write)".to_string(),
                    (None, false) => String::new(),
                },
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
