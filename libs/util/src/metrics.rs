//! The one metrics renderer of the three services: each declares its
//! metrics once, as a [`Registry`] of [`Metric`]s, and renders a scrape by
//! giving values for them; the output is the Prometheus text format
//! (version 0.0.4).
//!
//! Why not the `prometheus` or `metrics` crate: the services keep their
//! numbers where they are used (atomics, the catalog, the spool state) and
//! read them at scrape time, so a registry of live handles adds a second
//! copy of every number; what is needed is one place that declares names,
//! kinds and help texts, escapes labels, and can tell which declared metric
//! a scrape left out ([`Registry::missing`], which each service's tests
//! call). That is this file.
//!
//! ```
//! use tidemark_util::metrics::{Metric, Registry};
//! const WRITES: Metric = Metric::counter("writes_total", "Write requests.");
//! const LAG: Metric = Metric::gauge("lag_seconds", "Replication lag.");
//! const REG: Registry = Registry::new("tidemark_demo", &[WRITES, LAG]);
//! let text = REG.render(|s| {
//!     s.put(&WRITES, 5u64);
//!     s.put_disk(&LAG, "db1", 0.25);
//! });
//! assert!(text.contains("tidemark_demo_writes_total 5\n"));
//! assert!(text.contains("tidemark_demo_lag_seconds{disk=\"db1\"} 0.25\n"));
//! assert!(REG.missing(&text).is_empty());
//! ```

use std::fmt::Write as _;

/// Declare a service's metrics once: a `const` per metric and the
/// [`Registry`] that lists them, in that order.
///
/// ```
/// tidemark_util::declare_metrics! {
///     pub REGISTRY = "tidemark_demo" {
///         WRITES: counter("writes_total", "Write requests.");
///         LAG: gauge("lag_seconds", "Replication lag.");
///     }
/// }
/// assert_eq!(REGISTRY.metrics().len(), 2);
/// assert_eq!(WRITES.name, "writes_total");
/// ```
#[macro_export]
macro_rules! declare_metrics {
    ($vis:vis $registry:ident = $prefix:literal { $($name:ident: $kind:ident($metric:literal, $help:literal);)* }) => {
        $(const $name: $crate::metrics::Metric = $crate::metrics::Metric::$kind($metric, $help);)*
        /// Every metric this service exports.
        $vis const $registry: $crate::metrics::Registry = $crate::metrics::Registry::new($prefix, &[$($name),*]);
    };
}

/// A counter only goes up (until a restart); a gauge is a level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
        }
    }
}

/// One declared metric: its name without the service prefix
/// (`<what>_<unit>`, counters end in `_total`), kind and help text.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

impl Metric {
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: Kind::Counter,
            help,
        }
    }

    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: Kind::Gauge,
            help,
        }
    }
}

/// A sample's value: integers print exactly (seqs beyond 2^53 too).
#[derive(Clone, Copy, Debug)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Self::Int(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Self::Int(u64::from(v))
    }
}

/// A service's declared metrics, all named `<prefix>_<name>`.
#[derive(Clone, Copy, Debug)]
pub struct Registry {
    prefix: &'static str,
    metrics: &'static [Metric],
}

impl Registry {
    pub const fn new(prefix: &'static str, metrics: &'static [Metric]) -> Self {
        Self { prefix, metrics }
    }

    /// The declared metrics.
    pub fn metrics(&self) -> &'static [Metric] {
        self.metrics
    }

    /// One scrape: `fill` gives the samples; they are printed grouped by
    /// metric, in declaration order, each with its HELP and TYPE lines.
    /// A sample of a metric this registry does not declare is dropped (and
    /// is a bug: debug builds panic, so tests find it).
    pub fn render(&self, fill: impl FnOnce(&mut Samples)) -> String {
        let mut s = Samples {
            reg: self,
            rows: vec![Vec::new(); self.metrics.len()],
        };
        fill(&mut s);
        let mut out = String::new();
        for (m, rows) in self.metrics.iter().zip(&s.rows) {
            let name = format!("{}_{}", self.prefix, m.name);
            let _ = writeln!(out, "# HELP {name} {}", m.help);
            let _ = writeln!(out, "# TYPE {name} {}", m.kind.name());
            for (labels, v) in rows {
                out.push_str(&name);
                out.push_str(labels);
                match v {
                    Value::Int(i) => {
                        let _ = writeln!(out, " {i}");
                    }
                    Value::Float(f) => {
                        let _ = writeln!(out, " {f}");
                    }
                }
            }
        }
        out
    }

    /// The declared metrics that have no sample in `text` (a scrape of
    /// this registry): each service's test renders a scrape with a disk
    /// present and asserts this is empty.
    pub fn missing(&self, text: &str) -> Vec<String> {
        self.metrics
            .iter()
            .map(|m| format!("{}_{}", self.prefix, m.name))
            .filter(|name| !has_sample(text, name))
            .collect()
    }
}

/// The metric families in a scrape `text` (from the HTTP endpoint or a
/// control socket) that have a `# TYPE` line but no sample: every family
/// a [`Registry`] declares gets one, so an integration test of a running
/// service asserts this is empty once a disk is present.
pub fn unsampled(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .filter(|name| !has_sample(text, name))
        .map(str::to_string)
        .collect()
}

/// Whether `text` has a sample line of the metric `name` (not one of a
/// metric whose name merely starts with it).
fn has_sample(text: &str, name: &str) -> bool {
    text.lines().any(|l| {
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
    })
}

/// The samples of one scrape (see [`Registry::render`]).
#[derive(Debug)]
pub struct Samples<'a> {
    reg: &'a Registry,
    /// Per declared metric: (rendered labels, value).
    rows: Vec<Vec<(String, Value)>>,
}

impl Samples<'_> {
    /// A sample without labels.
    pub fn put(&mut self, m: &Metric, v: impl Into<Value>) {
        self.push(m, String::new(), v.into());
    }

    /// A sample labelled with its disk.
    pub fn put_disk(&mut self, m: &Metric, disk: &str, v: impl Into<Value>) {
        self.push(m, format!("{{disk=\"{}\"}}", escape(disk)), v.into());
    }

    fn push(&mut self, m: &Metric, labels: String, v: Value) {
        match self.reg.metrics.iter().position(|d| d.name == m.name) {
            Some(i) => self.rows[i].push((labels, v)),
            None => debug_assert!(false, "metric {} is not declared in {}", m.name, self.reg.prefix),
        }
    }
}

/// A label value as the text format wants it: backslash, quote and newline
/// escaped.
pub fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Metric = Metric::counter("a_total", "A.");
    const B: Metric = Metric::gauge("b_bytes", "B.");
    const REG: Registry = Registry::new("t", &[A, B]);

    #[test]
    fn groups_by_metric_in_declaration_order() {
        let text = REG.render(|s| {
            s.put_disk(&B, "x", 1u64);
            s.put(&A, 2u64);
            s.put_disk(&B, "y\"z", 1.5);
        });
        assert_eq!(
            text,
            "# HELP t_a_total A.\n# TYPE t_a_total counter\nt_a_total 2\n\
             # HELP t_b_bytes B.\n# TYPE t_b_bytes gauge\nt_b_bytes{disk=\"x\"} 1\nt_b_bytes{disk=\"y\\\"z\"} 1.5\n"
        );
    }

    #[test]
    fn missing_names_metrics_without_samples() {
        let text = REG.render(|s| s.put(&A, 1u64));
        assert_eq!(REG.missing(&text), vec!["t_b_bytes".to_string()]);
        assert_eq!(unsampled(&text), vec!["t_b_bytes".to_string()]);
        // A name that only prefixes another does not count.
        const AB: Metric = Metric::gauge("a", "prefix of a_total");
        const R2: Registry = Registry::new("t", &[AB, A]);
        let text = R2.render(|s| s.put(&A, 1u64));
        assert_eq!(R2.missing(&text), vec!["t_a".to_string()]);
    }

    #[test]
    fn integers_print_exactly() {
        let text = REG.render(|s| s.put(&A, u64::MAX));
        assert!(text.contains("t_a_total 18446744073709551615\n"));
    }
}
