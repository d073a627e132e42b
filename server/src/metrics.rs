//! Prometheus metrics, kept in atomics and rendered by hand in the text exposition format
//! (a dependency would buy little for a dozen series).
//!
//! The HTTP layer counts requests by endpoint and status; the engine thread records
//! latencies, gauges and token counters.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Buckets (seconds) for time to first token and engine steps.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets (seconds) for the gap between consecutive tokens.
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A cumulative histogram.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: Vec<AtomicU64>,
    /// Sum in nanoseconds, so it fits an atomic integer.
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            acc += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        acc += self.counts[self.bounds.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {acc}");
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {acc}");
    }
}

/// Every series the server exports.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub step_duration: Histogram,
    /// Sequences holding a slot (prefilling or decoding).
    pub running: AtomicU64,
    /// Requests queued for a slot.
    pub waiting: AtomicU64,
    pub pool_bytes: AtomicU64,
    /// `pool_bytes` split: Liger recurrent memories, Liger window caches, softmax KV caches.
    pub pool_recurrent_bytes: AtomicU64,
    pub pool_window_bytes: AtomicU64,
    pub pool_global_bytes: AtomicU64,
    pub pool_kv_cache_bytes: AtomicU64,
    pub pool_slots_in_use: AtomicU64,
    pub pool_capacity: AtomicU64,
    /// Prompt tokens run through the model (a prompt shared by `n` choices counts once).
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Speculative decoding: tokens drafted, and those the model agreed with.
    pub draft_tokens: AtomicU64,
    pub accepted_draft_tokens: AtomicU64,
    pub steps: AtomicU64,
    /// Steps that ran decodes beside prompt chunks (each such step delays the decoding
    /// streams by a chunk's time).
    pub mixed_steps: AtomicU64,
    pub step_failures: AtomicU64,
    /// Requests dropped because their client went away.
    pub cancelled: AtomicU64,
    /// The conversation state cache (mirrors of its own counters, published each step).
    pub state_cache_hits: AtomicU64,
    pub state_cache_misses: AtomicU64,
    pub state_cache_hit_tokens: AtomicU64,
    pub state_cache_evictions: AtomicU64,
    pub state_cache_bytes: AtomicU64,
    pub state_cache_entries: AtomicU64,
    pub state_cache_write_failures: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            time_to_first_token: Histogram::new(LATENCY_BUCKETS),
            inter_token_latency: Histogram::new(ITL_BUCKETS),
            step_duration: Histogram::new(LATENCY_BUCKETS),
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            pool_bytes: AtomicU64::new(0),
            pool_recurrent_bytes: AtomicU64::new(0),
            pool_window_bytes: AtomicU64::new(0),
            pool_global_bytes: AtomicU64::new(0),
            pool_kv_cache_bytes: AtomicU64::new(0),
            pool_slots_in_use: AtomicU64::new(0),
            pool_capacity: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            draft_tokens: AtomicU64::new(0),
            accepted_draft_tokens: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            mixed_steps: AtomicU64::new(0),
            step_failures: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            state_cache_hits: AtomicU64::new(0),
            state_cache_misses: AtomicU64::new(0),
            state_cache_hit_tokens: AtomicU64::new(0),
            state_cache_evictions: AtomicU64::new(0),
            state_cache_bytes: AtomicU64::new(0),
            state_cache_entries: AtomicU64::new(0),
            state_cache_write_failures: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((endpoint.to_string(), status)).or_insert(0) += 1;
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP liger_requests_total HTTP requests by endpoint and status code.\n# TYPE liger_requests_total counter"
        );
        for ((endpoint, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let endpoint = endpoint.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(
                out,
                "liger_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        self.time_to_first_token.render(
            &mut out,
            "liger_time_to_first_token_seconds",
            "Time from submission to the first generated token.",
        );
        self.inter_token_latency.render(
            &mut out,
            "liger_inter_token_latency_seconds",
            "Time between a request's decode steps (one per step: the tokens a speculative step accepts arrive together).",
        );
        self.step_duration.render(
            &mut out,
            "liger_engine_step_seconds",
            "Duration of one batched engine step.",
        );
        let series: [(&str, &str, &str, &AtomicU64); 20] = [
            (
                "liger_running_sequences",
                "gauge",
                "Sequences holding a state slot.",
                &self.running,
            ),
            (
                "liger_waiting_requests",
                "gauge",
                "Requests waiting for a state slot.",
                &self.waiting,
            ),
            (
                "liger_state_pool_bytes",
                "gauge",
                "Bytes held by sequence states in use.",
                &self.pool_bytes,
            ),
            (
                "liger_state_pool_slots_in_use",
                "gauge",
                "State slots leased.",
                &self.pool_slots_in_use,
            ),
            (
                "liger_state_pool_slots",
                "gauge",
                "State slots in the pool.",
                &self.pool_capacity,
            ),
            (
                "liger_prompt_tokens_total",
                "counter",
                "Prompt tokens processed by the model.",
                &self.prompt_tokens,
            ),
            (
                "liger_generation_tokens_total",
                "counter",
                "Tokens generated.",
                &self.generation_tokens,
            ),
            (
                "liger_spec_decode_draft_tokens_total",
                "counter",
                "Tokens drafted for speculative decoding.",
                &self.draft_tokens,
            ),
            (
                "liger_spec_decode_accepted_tokens_total",
                "counter",
                "Drafted tokens the model agreed with.",
                &self.accepted_draft_tokens,
            ),
            (
                "liger_engine_steps_total",
                "counter",
                "Batched engine steps run.",
                &self.steps,
            ),
            (
                "liger_engine_mixed_steps_total",
                "counter",
                "Engine steps that ran decodes beside prompt chunks.",
                &self.mixed_steps,
            ),
            (
                "liger_engine_step_failures_total",
                "counter",
                "Engine steps whose forward pass failed.",
                &self.step_failures,
            ),
            (
                "liger_cancelled_requests_total",
                "counter",
                "Requests dropped after the client went away.",
                &self.cancelled,
            ),
            (
                "liger_state_cache_hits_total",
                "counter",
                "Requests that resumed from a cached state.",
                &self.state_cache_hits,
            ),
            (
                "liger_state_cache_misses_total",
                "counter",
                "Requests that found no cached prefix of their prompt.",
                &self.state_cache_misses,
            ),
            (
                "liger_state_cache_hit_tokens_total",
                "counter",
                "Prompt tokens not recomputed thanks to the state cache.",
                &self.state_cache_hit_tokens,
            ),
            (
                "liger_state_cache_evictions_total",
                "counter",
                "Snapshots evicted from memory to stay within --state-cache-mb.",
                &self.state_cache_evictions,
            ),
            (
                "liger_state_cache_bytes",
                "gauge",
                "Bytes of state snapshots held in memory.",
                &self.state_cache_bytes,
            ),
            (
                "liger_state_cache_entries",
                "gauge",
                "State snapshots held in memory.",
                &self.state_cache_entries,
            ),
            (
                "liger_state_cache_write_failures_total",
                "counter",
                "State snapshots that could not be written to --state-cache-dir (full or gone).",
                &self.state_cache_write_failures,
            ),
        ];
        for (name, kind, help, v) in series {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP liger_state_pool_bytes_by_kind Bytes held by sequence states in use, by what holds them.\n# TYPE liger_state_pool_bytes_by_kind gauge"
        );
        for (kind, v) in [
            ("recurrent", &self.pool_recurrent_bytes),
            ("window", &self.pool_window_bytes),
            ("global", &self.pool_global_bytes),
            ("kv_cache", &self.pool_kv_cache_bytes),
        ] {
            let _ = writeln!(
                out,
                "liger_state_pool_bytes_by_kind{{kind=\"{kind}\"}} {}",
                v.load(Relaxed)
            );
        }
        out
    }
}

/// Reads one un-labelled sample from rendered metrics (for tests and tools).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let m = Metrics::default();
        m.record_request("/v1/completions", 200);
        m.record_request("/v1/completions", 200);
        m.prompt_tokens.fetch_add(7, Relaxed);
        m.time_to_first_token.observe(Duration::from_millis(3));
        m.time_to_first_token.observe(Duration::from_secs(100));
        let text = m.render();
        assert!(
            text.contains("liger_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2")
        );
        assert_eq!(sample(&text, "liger_prompt_tokens_total"), Some(7.0));
        assert!(text.contains("liger_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("liger_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2"));
        assert_eq!(
            sample(&text, "liger_time_to_first_token_seconds_count"),
            Some(2.0)
        );
    }
}
