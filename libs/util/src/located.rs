//! Where an error happened, as typed fields rather than words formatted
//! into its message by hand: the disk, the seq, the operation, the path and
//! the offset. The error types of the formats and the recovery state embed
//! a [`Where`] and implement [`Located`], so every caller adds context the
//! same way (`.disk(id).seq(n)`) and every message reads the same way:
//!
//! ```text
//! disk vm1, seq 42: write /data/vm1/replica.raw at offset 4096: No space left on device
//! └── disk, seq ──┘ └─ op ┘ └──────── path ──────────┘ └ offset ┘  └── source ─────────┘
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

/// The typed context of an error; every field is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Where {
    pub disk: Option<String>,
    pub seq: Option<u64>,
    /// What was being done (`open`, `write`, `fsync`, `read at byte 512 of`).
    pub op: Option<String>,
    pub path: Option<PathBuf>,
    pub offset: Option<u64>,
}

impl Where {
    /// Render `self`, then `message` and `source` (either may be empty),
    /// as the error's Display.
    pub fn render(&self, f: &mut fmt::Formatter<'_>, message: &str, source: Option<&dyn fmt::Display>) -> fmt::Result {
        let mut sep = "";
        if let Some(d) = &self.disk {
            write!(f, "disk {d}")?;
            sep = ", ";
        }
        if let Some(s) = self.seq {
            write!(f, "{sep}seq {s}")?;
            sep = ", ";
        }
        if !sep.is_empty() {
            sep = ": ";
        }
        // op, path and offset read as one phrase.
        let mut phrase = false;
        if let Some(op) = &self.op {
            write!(f, "{sep}{op}")?;
            phrase = true;
        }
        if let Some(p) = &self.path {
            let gap = if phrase { " " } else { sep };
            write!(f, "{gap}{}", p.display())?;
            phrase = true;
        }
        if let Some(o) = self.offset {
            let gap = if phrase { " " } else { sep };
            write!(f, "{gap}at offset {o}")?;
            phrase = true;
        }
        if phrase {
            sep = ": ";
        }
        if !message.is_empty() {
            write!(f, "{sep}{message}")?;
            sep = ": ";
        }
        if let Some(s) = source {
            write!(f, "{sep}{s}")?;
        }
        Ok(())
    }
}

/// An error that carries a [`Where`]: the builder methods add context.
pub trait Located: Sized {
    fn at_mut(&mut self) -> &mut Where;

    /// The disk it happened to (kept if one is set already).
    fn disk(mut self, id: &str) -> Self {
        let at = self.at_mut();
        if at.disk.is_none() {
            at.disk = Some(id.to_string());
        }
        self
    }

    /// The record it happened at (kept if one is set already).
    fn seq(mut self, seq: u64) -> Self {
        self.at_mut().seq.get_or_insert(seq);
        self
    }

    fn op(mut self, op: impl Into<String>) -> Self {
        self.at_mut().op = Some(op.into());
        self
    }

    fn path(mut self, path: &Path) -> Self {
        self.at_mut().path = Some(path.to_path_buf());
        self
    }

    fn offset(mut self, offset: u64) -> Self {
        self.at_mut().offset = Some(offset);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct E(Where, &'static str, Option<&'static str>);
    impl fmt::Display for E {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.0
                .render(f, self.1, self.2.as_ref().map(|s| s as &dyn fmt::Display))
        }
    }
    impl Located for E {
        fn at_mut(&mut self) -> &mut Where {
            &mut self.0
        }
    }

    fn e(msg: &'static str, src: Option<&'static str>) -> E {
        E(Where::default(), msg, src)
    }

    #[test]
    fn renders_every_combination_readably() {
        assert_eq!(e("boom", None).to_string(), "boom");
        assert_eq!(e("", Some("EIO")).to_string(), "EIO");
        assert_eq!(e("bad magic", None).disk("vm1").to_string(), "disk vm1: bad magic");
        assert_eq!(
            e("", Some("ENOSPC"))
                .disk("vm1")
                .seq(42)
                .op("write")
                .path(Path::new("/r.raw"))
                .offset(4096)
                .to_string(),
            "disk vm1, seq 42: write /r.raw at offset 4096: ENOSPC"
        );
        assert_eq!(
            e("bad magic", None).path(Path::new("/u/1.undo")).to_string(),
            "/u/1.undo: bad magic"
        );
        assert_eq!(
            e("torn", None).seq(7).offset(12).to_string(),
            "seq 7: at offset 12: torn"
        );
        // The first disk and seq set win (the innermost knows best).
        assert_eq!(
            e("x", None).seq(1).seq(2).disk("a").disk("b").to_string(),
            "disk a, seq 1: x"
        );
    }
}
