//! Engine counters and histograms, readable at any time and rendered in the
//! Prometheus text format ([`crate::metrics`]).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Shared with the coordinator's metrics: one writer of the text format.
pub use crate::metrics::Histogram;

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
    /// Admitted requests whose prompt was looked up in the prefix cache.
    pub prefix_cache_lookups: AtomicU64,
    /// Lookups that restored at least one block.
    pub prefix_cache_hits: AtomicU64,
    /// Prompt tokens restored from the prefix cache instead of prefilled.
    pub prefix_cache_tokens: AtomicU64,
    /// Bytes of KV rows the prefix cache holds.
    pub prefix_cache_bytes: AtomicU64,
    /// Blocks the prefix cache holds.
    pub prefix_cache_blocks: AtomicU64,
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
            prefix_cache_lookups: AtomicU64::new(0),
            prefix_cache_hits: AtomicU64::new(0),
            prefix_cache_tokens: AtomicU64::new(0),
            prefix_cache_bytes: AtomicU64::new(0),
            prefix_cache_blocks: AtomicU64::new(0),
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
        counter(
            &mut out,
            "sgl_prefix_cache_lookups_total",
            "Prompts looked up in the prefix cache.",
            &self.prefix_cache_lookups,
        );
        counter(
            &mut out,
            "sgl_prefix_cache_hits_total",
            "Prompts that found a cached prefix.",
            &self.prefix_cache_hits,
        );
        counter(
            &mut out,
            "sgl_prefix_cache_tokens_total",
            "Prompt tokens restored from the prefix cache instead of prefilled.",
            &self.prefix_cache_tokens,
        );
        gauge(
            &mut out,
            "sgl_prefix_cache_bytes",
            "Bytes of KV rows the prefix cache holds.",
            &self.prefix_cache_bytes,
        );
        gauge(
            &mut out,
            "sgl_prefix_cache_blocks",
            "Token blocks the prefix cache holds.",
            &self.prefix_cache_blocks,
        );
        // The ratio too, for dashboards that do not divide counters.
        let lookups = self.prefix_cache_lookups.load(Ordering::Relaxed);
        let hits = self.prefix_cache_hits.load(Ordering::Relaxed);
        let ratio = if lookups == 0 {
            0.0
        } else {
            hits as f64 / lookups as f64
        };
        let _ = writeln!(
            out,
            "# HELP sgl_prefix_cache_hit_ratio Hits over lookups of the prefix cache.\n\
             # TYPE sgl_prefix_cache_hit_ratio gauge\n\
             sgl_prefix_cache_hit_ratio{{model=\"{model}\"}} {ratio}"
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
