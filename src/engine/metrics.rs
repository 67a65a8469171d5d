//! Engine counters and histograms, readable at any time and rendered in the
//! Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

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
    fn new(bounds: &'static [f64]) -> Self {
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

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const TTFT_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const ITL_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// What the engine has done so far.
#[derive(Debug)]
pub struct Metrics {
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub requests_started: AtomicU64,
    pub requests_finished: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub queue_depth: AtomicU64,
    pub active_sequences: AtomicU64,
    pub ttft: Histogram,
    pub inter_token: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            requests_started: AtomicU64::new(0),
            requests_finished: AtomicU64::new(0),
            requests_cancelled: AtomicU64::new(0),
            requests_rejected: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            active_sequences: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BOUNDS),
            inter_token: Histogram::new(ITL_BOUNDS),
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render_prometheus(&self, model: &str) -> String {
        let mut out = String::new();
        let model = model.replace(['\\', '"', '\n'], "_");
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(
                out,
                "{name}{{model=\"{model}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(
                out,
                "{name}{{model=\"{model}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        };
        counter(
            &mut out,
            "sgl_prompt_tokens_total",
            "Prompt tokens processed.",
            &self.prompt_tokens,
        );
        counter(
            &mut out,
            "sgl_completion_tokens_total",
            "Completion tokens generated.",
            &self.completion_tokens,
        );
        counter(
            &mut out,
            "sgl_requests_started_total",
            "Requests admitted to the engine.",
            &self.requests_started,
        );
        counter(
            &mut out,
            "sgl_requests_finished_total",
            "Requests that ran to a finish reason.",
            &self.requests_finished,
        );
        counter(
            &mut out,
            "sgl_requests_cancelled_total",
            "Requests dropped because the client went away.",
            &self.requests_cancelled,
        );
        counter(
            &mut out,
            "sgl_requests_rejected_total",
            "Requests refused because the queue was full.",
            &self.requests_rejected,
        );
        gauge(
            &mut out,
            "sgl_queue_depth",
            "Requests waiting for a batch slot.",
            &self.queue_depth,
        );
        gauge(
            &mut out,
            "sgl_active_sequences",
            "Sequences in the running batch.",
            &self.active_sequences,
        );
        self.ttft.render(
            &mut out,
            "sgl_time_to_first_token_seconds",
            "Time from submission to the first token.",
        );
        self.inter_token.render(
            &mut out,
            "sgl_inter_token_seconds",
            "Time between consecutive tokens of a stream.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.ttft.observe(0.02);
        m.ttft.observe(2.0);
        let text = m.render_prometheus("m");
        assert!(text.contains("sgl_time_to_first_token_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("sgl_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("sgl_time_to_first_token_seconds_count 2"));
    }
}
