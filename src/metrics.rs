//! The Prometheus text format (version 0.0.4), written by hand: fixed-bucket
//! histograms, counters and gauges over atomics, and the label escaping. The
//! node's engine metrics and the coordinator's metrics both render with
//! these, so the two `/metrics` follow the same rules.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// The `Content-Type` of a `/metrics` answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A fixed-bucket histogram of seconds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in microseconds, so it fits an atomic integer.
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The bucket bounds, in seconds.
    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    /// The cumulative count at each bound (`le`), in the order of
    /// [`Self::bounds`].
    pub fn buckets(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// The family's `# HELP` and `# TYPE` lines, then its one series.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        self.render_series(out, name, "");
    }

    /// One series of a histogram family: `labels` is empty or
    /// `key="value",…` (escaped with [`label_value`]), without braces.
    pub fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {n}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {n}", braces(labels));
    }
}

/// A family's `# HELP` and `# TYPE` lines; `kind` is `counter`, `gauge` or
/// `histogram`.
pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A whole counter or gauge family of one unlabelled series.
pub fn single(out: &mut String, name: &str, help: &str, kind: &str, value: &AtomicU64) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
}

/// A label value as the text format wants it: backslash, double quote and
/// newline escaped.
pub fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `key1="v1",key2="v2"` from pairs, values escaped.
pub fn labels(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", label_value(v)))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_series_and_escaping() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.5);
        let mut out = String::new();
        h.render_series(&mut out, "x_seconds", &labels(&[("route", "/a\"b\\")]));
        assert!(out.contains("x_seconds_bucket{route=\"/a\\\"b\\\\\",le=\"0.1\"} 0\n"));
        assert!(out.contains("x_seconds_bucket{route=\"/a\\\"b\\\\\",le=\"1\"} 1\n"));
        assert!(out.contains("x_seconds_count{route=\"/a\\\"b\\\\\"} 1\n"));
        let mut bare = String::new();
        h.render_series(&mut bare, "y", "");
        assert!(bare.contains("y_bucket{le=\"+Inf\"} 1\n"));
        assert!(bare.contains("y_sum 0.5\n"));
    }
}
