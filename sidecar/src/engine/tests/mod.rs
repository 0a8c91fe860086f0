//! Engine tests over the built-in `tiny` model on a fault-injecting CPU
//! backend: fixtures, and a snapshot of everything a step may change.

mod device;
mod named;
mod prompt_logprobs;
mod schedules;
mod sparse;
mod step;
mod sweep;

use super::kv_cache::BlockAllocator;
use super::sparse::PolicyState;
use super::step::{LogitsTarget, StepWork};
use super::{Engine, KvCapacity, SeqKey};
use crate::backend::cpu::CpuBackend;
use crate::backend::faults::Faulty;
use crate::model::ModelSpec;
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tacflow_ipc::{
    AttentionPolicy, DType, HostRegion, SamplingParams, StepEntry, StepResult, TensorView,
};

pub type TestEngine = Engine<Faulty<CpuBackend>>;

pub const SESSION: u64 = 1;
pub const VOCAB: usize = 512;

/// A `tiny` engine (seeded weights) with `blocks` KV blocks.
pub fn engine(blocks: usize) -> TestEngine {
    let spec = ModelSpec::parse("tiny", 7).unwrap();
    let (config, src) = spec.open().unwrap();
    let backend = Faulty::new(CpuBackend::default());
    Engine::new(
        backend,
        &config,
        src.as_ref(),
        KvCapacity::Blocks(blocks),
        None,
        |_, _| {},
    )
    .unwrap()
}

pub fn key(seq: u64) -> SeqKey {
    SeqKey {
        session: SESSION,
        seq,
    }
}

/// `n` seeded tokens in the vocabulary.
pub fn tokens(seed: u64, n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| (tacflow_kernels::rng::bits(seed, 99, i) % VOCAB as u64) as u32)
        .collect()
}

pub fn open(e: &mut TestEngine, seq: u64, policy: AttentionPolicy, diagnostics: bool) {
    let sampling = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        top_k: 0,
        seed: Some(1000 + seq),
        logprobs: 3,
        ..SamplingParams::default()
    };
    e.open_sequence(key(seq), policy, sampling, diagnostics)
        .unwrap();
}

pub fn entry(seq: u64, tokens: Vec<u32>, sample: bool) -> StepEntry {
    StepEntry {
        seq_id: seq,
        tokens,
        positions: None,
        sample,
        logits: None,
        blocks: None,
    }
}

pub fn work(entries: Vec<StepEntry>) -> StepWork {
    let logits = vec![None; entries.len()];
    StepWork {
        session: SESSION,
        entries,
        logits,
    }
}

/// Runs one sampling entry alone; it must succeed.
pub fn feed(e: &mut TestEngine, seq: u64, toks: Vec<u32>) -> StepResult {
    e.step(&work(vec![entry(seq, toks, true)]))
        .unwrap()
        .remove(0)
}

/// A host region over a fresh unlinked file, with an f32 `[rows, vocab]`
/// logits view at its start.
pub fn logits_target(rows: usize) -> LogitsTarget {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Relaxed);
    let path = std::env::temp_dir().join(format!("tacflow-logits-{}-{n}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    let bytes = (rows * VOCAB * 4) as u64;
    file.set_len(bytes).unwrap();
    let region = HostRegion::from_fd(OwnedFd::from(file), bytes, "logits".into()).unwrap();
    LogitsTarget {
        region: Arc::new(region),
        view: TensorView {
            offset: 0,
            dtype: DType::F32,
            shape: vec![rows as u64, VOCAB as u64],
            strides: vec![VOCAB as u64, 1],
        },
    }
}

/// The logits a target holds.
pub fn read_logits(t: &LogitsTarget) -> Vec<f32> {
    let mut bytes = vec![0u8; t.region.size() as usize];
    t.region.read_bytes(0, &mut bytes).unwrap();
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// One sequence as a client could ever observe it, and the bookkeeping
/// behind it.
#[derive(Debug, PartialEq)]
pub struct SeqSnap {
    pub len: usize,
    pub table: Vec<u32>,
    /// The allocator's refcount of each block of the table.
    pub refcounts: Vec<u32>,
    pub policy: AttentionPolicy,
    pub state: String,
    pub tokens: Vec<u32>,
    pub prompt_len: Option<usize>,
    /// The row kept for the next prompt chunk (`prompt_logprobs`).
    pub prompt_row: Option<Vec<f32>>,
}

/// Everything a step may change.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub seqs: BTreeMap<u64, SeqSnap>,
    pub alloc: BlockAllocator,
    pub totals: String,
    /// steps, prefill tokens, decode tokens, free blocks, sequences.
    pub counters: [u64; 5],
    pub attention: String,
}

/// A policy state, every field that carries across steps (not the
/// selector's scratch buffers).
pub fn state_of(s: &PolicyState) -> String {
    match s {
        PolicyState::Tactic(t) => format!("tactic {:?} {:?}", t.params, t.index),
        other => format!("{other:?}"),
    }
}

pub fn snapshot(e: &TestEngine) -> Snapshot {
    let seqs = e
        .seqs
        .iter()
        .map(|(k, s)| {
            let snap = SeqSnap {
                len: s.len,
                table: s.table.clone(),
                refcounts: s.table.iter().map(|&b| e.alloc.refcount(b)).collect(),
                policy: s.policy.clone(),
                state: state_of(&s.state),
                tokens: s.tokens.clone(),
                prompt_len: s.prompt_len,
                prompt_row: s.prompt_row.clone(),
            };
            (k.seq, snap)
        })
        .collect();
    let g = &e.gauges;
    Snapshot {
        seqs,
        alloc: e.alloc.clone(),
        totals: format!("{:?}", e.policy_totals),
        counters: [
            g.steps.load(Relaxed),
            g.prefill_tokens.load(Relaxed),
            g.decode_tokens.load(Relaxed),
            g.kv_free_blocks.load(Relaxed),
            g.sequences.load(Relaxed),
        ],
        attention: format!("{:?}", g.attention.lock().unwrap()),
    }
}
