//! Counters the executor and the I/O thread update and read (for `hello`,
//! `stats`, `health`, the systemd status line and the Prometheus endpoint)
//! without a round trip through the queue.
//!
//! Everything is a relaxed atomic: one uncontended `fetch_add` per request
//! and per step, so that counting costs nothing measurable on the latency
//! path. Readers get a consistent-enough snapshot, not a transaction.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tacflow_ipc::{ErrorCode, Kind, PolicyStats};

/// Upper bounds (seconds) of the step latency histogram's buckets; an
/// implicit `+Inf` bucket follows. From an empty step on the CPU (tens of
/// microseconds) to a long prefill on a big model (seconds).
pub const STEP_BUCKETS_S: [f64; 16] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 0.5,
    1.0, 2.5, 10.0,
];

/// A fixed-bucket latency histogram (Prometheus' cumulative form is built
/// when it is read).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket counts (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; STEP_BUCKETS_S.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

/// What a histogram held when it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative counts, one per bound of [`STEP_BUCKETS_S`], then `+Inf`.
    pub cumulative: Vec<u64>,
    pub sum_s: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = STEP_BUCKETS_S
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(STEP_BUCKETS_S.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Relaxed);
                acc
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            sum_s: self.sum_us.load(Relaxed) as f64 * 1e-6,
            count: self.count.load(Relaxed),
        }
    }
}

#[derive(Debug)]
pub struct Gauges {
    pub kv_total_blocks: AtomicU64,
    pub kv_free_blocks: AtomicU64,
    pub sequences: AtomicU64,
    pub steps: AtomicU64,
    pub prefill_tokens: AtomicU64,
    pub decode_tokens: AtomicU64,
    /// Live sessions and their regions and mapped bytes (the I/O thread
    /// owns the sessions and stores these when they change).
    pub sessions: AtomicU64,
    pub regions: AtomicU64,
    pub mapped_bytes: AtomicU64,
    /// Requests received, by kind (index: position in [`Kind::ALL`]).
    requests: [AtomicU64; Kind::ALL.len()],
    /// Error replies sent, by code (index: position in [`ErrorCode::ALL`],
    /// then one for codes this build does not know).
    errors: [AtomicU64; ErrorCode::ALL.len() + 1],
    /// How long successful steps ran on the executor (excluding their wait
    /// in the queue).
    pub step_run: Histogram,
    /// Microseconds since `start` when the executor last finished a command.
    pub last_done_us: AtomicU64,
    pub start: Instant,
    /// Attention diagnostics aggregated per policy.
    pub attention: Mutex<BTreeMap<String, PolicyStats>>,
    /// The pool of attention-only sequences, as the executor last left it.
    pub attention_pool: Mutex<tacflow_ipc::AttentionPoolInfo>,
}

impl Default for Gauges {
    fn default() -> Self {
        Gauges {
            kv_total_blocks: AtomicU64::new(0),
            kv_free_blocks: AtomicU64::new(0),
            sequences: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            prefill_tokens: AtomicU64::new(0),
            decode_tokens: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            regions: AtomicU64::new(0),
            mapped_bytes: AtomicU64::new(0),
            requests: Default::default(),
            errors: Default::default(),
            step_run: Histogram::default(),
            last_done_us: AtomicU64::new(0),
            start: Instant::now(),
            attention: Mutex::new(BTreeMap::new()),
            attention_pool: Mutex::new(Default::default()),
        }
    }
}

fn code_index(code: ErrorCode) -> usize {
    ErrorCode::ALL
        .iter()
        .position(|&c| c == code)
        .unwrap_or(ErrorCode::ALL.len())
}

impl Gauges {
    pub fn set_kv(&self, total: usize, free: usize) {
        self.kv_total_blocks.store(total as u64, Relaxed);
        self.kv_free_blocks.store(free as u64, Relaxed);
    }

    pub fn set_sequences(&self, n: usize) {
        self.sequences.store(n as u64, Relaxed);
    }

    pub fn mark_done(&self) {
        self.last_done_us
            .store(self.start.elapsed().as_micros() as u64, Relaxed);
    }

    /// Milliseconds since the executor last finished a command.
    pub fn idle_ms(&self) -> u64 {
        let now = self.start.elapsed().as_micros() as u64;
        now.saturating_sub(self.last_done_us.load(Relaxed)) / 1000
    }

    pub fn count_request(&self, kind: Kind) {
        if let Some(i) = Kind::ALL.iter().position(|&k| k == kind) {
            self.requests[i].fetch_add(1, Relaxed);
        }
    }

    pub fn count_error(&self, code: ErrorCode) {
        self.errors[code_index(code)].fetch_add(1, Relaxed);
    }

    /// Requests received so far, by kind name (every kind, zeros included).
    pub fn requests_by_kind(&self) -> Vec<(&'static str, u64)> {
        Kind::ALL
            .iter()
            .zip(&self.requests)
            .map(|(k, n)| (k.name(), n.load(Relaxed)))
            .collect()
    }

    /// Error replies so far, by code; codes never sent are left out.
    pub fn errors_by_code(&self) -> BTreeMap<String, u64> {
        let names = ErrorCode::ALL
            .iter()
            .map(|c| c.as_str())
            .chain(std::iter::once(ErrorCode::Unknown.as_str()));
        names
            .zip(&self.errors)
            .map(|(name, n)| (name.to_owned(), n.load(Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Forgets what the start-up warm-up step counted, so that `stats` and
    /// the metrics describe client work only.
    pub fn reset_work_counters(&self) {
        for c in [&self.steps, &self.prefill_tokens, &self.decode_tokens] {
            c.store(0, Relaxed);
        }
        for b in &self.step_run.buckets {
            b.store(0, Relaxed);
        }
        self.step_run.sum_us.store(0, Relaxed);
        self.step_run.count.store(0, Relaxed);
        if let Ok(mut a) = self.attention.lock() {
            a.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_has_an_infinite_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.cumulative.len(), STEP_BUCKETS_S.len() + 1);
        assert_eq!(s.cumulative[0], 2, "50 µs is inside the first bucket");
        assert_eq!(s.cumulative[6], 3, "3 ms is in the 5 ms bucket");
        assert_eq!(s.cumulative[STEP_BUCKETS_S.len() - 1], 3);
        assert_eq!(*s.cumulative.last().unwrap(), 4);
        assert!((s.sum_s - 60.00309).abs() < 1e-9);
    }

    #[test]
    fn requests_and_errors_are_counted_by_name() {
        let g = Gauges::default();
        g.count_request(Kind::Step);
        g.count_request(Kind::Step);
        g.count_error(ErrorCode::Busy);
        g.count_error(ErrorCode::Unknown);
        let by_kind: BTreeMap<_, _> = g.requests_by_kind().into_iter().collect();
        assert_eq!(by_kind["step"], 2);
        assert_eq!(by_kind["hello"], 0);
        let errors = g.errors_by_code();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors["busy"], 1);
        assert_eq!(errors["unknown"], 1);
        g.steps.store(5, Relaxed);
        g.step_run.observe(Duration::from_millis(1));
        g.reset_work_counters();
        assert_eq!(g.steps.load(Relaxed), 0);
        assert_eq!(g.step_run.snapshot().count, 0);
    }
}
