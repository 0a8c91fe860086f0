//! Counters the executor updates and the I/O thread reads (for `hello`,
//! `stats`, `health` and metrics) without a round trip through the queue.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;
use tacflow_ipc::PolicyStats;

#[derive(Debug)]
pub struct Gauges {
    pub kv_total_blocks: AtomicU64,
    pub kv_free_blocks: AtomicU64,
    pub sequences: AtomicU64,
    pub steps: AtomicU64,
    pub prefill_tokens: AtomicU64,
    pub decode_tokens: AtomicU64,
    /// Microseconds since `start` when the executor last finished a command.
    pub last_done_us: AtomicU64,
    pub start: Instant,
    /// Attention diagnostics aggregated per policy.
    pub attention: Mutex<BTreeMap<String, PolicyStats>>,
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
            last_done_us: AtomicU64::new(0),
            start: Instant::now(),
            attention: Mutex::new(BTreeMap::new()),
        }
    }
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
}
