//! The graph path (`cuda_graphs`) on the tiny model: decode steps of two
//! batch sizes (2 rows, a bucket of its own; 5 rows, padded to 8) through
//! warm-up, capture and replays with fresh tokens, positions and contexts,
//! then past the context ceiling into a second graph. Every step's logits
//! against the same step run eagerly over the bucket's buffers (bit for
//! bit: the same kernels over the same shapes and plan), against the
//! plain eager pass (its attention plans for the step's context and its
//! GEMMs run the unpadded rows, so f32 sums go in another order:
//! `SPLIT_TOL`), and against the CPU. Then the same with bf16
//! activations (their f32 attention output kept in the backend's scratch
//! from step to step), against the CPU's bf16 twin; against the plain
//! eager pass within `BF16_TOL`, since a reordered f32 sum can round to
//! the neighbouring bf16 value.

use super::report::{BF16_TOL, LOGITS_TOL, Row, SPLIT_TOL, diff};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::graphs::WARMUP;
use crate::backend::cuda::{CudaBackend, Graphs};
use crate::backend::{Backend, KvLayout, StepMeta};
use crate::config::GpuActivations;
use crate::error::Result;
use crate::model::Model;
use crate::model::config::ModelConfig;
use crate::model::weights::RandomSource;
use tacflow_kernels::rng::bits;

const BLOCKS: usize = 64;
const PAD_BLOCK: u32 = 63;
/// Blocks each sequence owns (64 keys).
const PER_SEQ: u32 = 4;
const STEPS: usize = 16;

pub fn graphs(mut b: CudaBackend, seed: u64) -> Vec<Row> {
    // A captured stream cannot synchronise after each launch.
    b.gpu_mut().set_sync_launches(false);
    let mut rows = vec![];
    for n in [2usize, 5] {
        match batch(&b, seed, n, false) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::fail("graphs", format!("b={n}"), e.to_string())),
        }
    }
    match b.with_activations(GpuActivations::Bf16) {
        Ok(b) => {
            for n in [2usize, 5] {
                match batch(&b, seed, n, true) {
                    Ok(r) => rows.extend(r),
                    Err(e) => rows.push(Row::fail("graphs", format!("bf16 b={n}"), e.to_string())),
                }
            }
        }
        Err(e) => rows.push(Row::fail("graphs", "bf16 activations", e.to_string())),
    }
    rows
}

/// Per sequence: first length before the decode steps (the longest, 24,
/// crosses the 32-key ceiling at its ninth step).
fn start_len(i: usize) -> usize {
    24 - 3 * i
}

fn table(i: usize) -> Vec<u32> {
    (i as u32 * PER_SEQ..(i as u32 + 1) * PER_SEQ).collect()
}

/// Rows `(token, position)` of sequences, their contexts after the step
/// (sequence `i` on the blocks of `table(i)`).
fn step_meta(toks: &[Vec<u32>], from: &[usize], logits: Vec<u32>) -> StepMeta {
    let seqs: Vec<_> = toks
        .iter()
        .zip(from)
        .enumerate()
        .map(|(i, (t, &f))| (t.clone(), f, table(i)))
        .collect();
    super::lanes::step_meta(&seqs, logits)
}

fn logits<B: Backend>(b: &B, a: &B::Act, rows: usize) -> Result<Vec<f32>> {
    Ok(b.sample(a, &vec![None; rows], true)?
        .logits
        .unwrap_or_default())
}

/// Worst relative error so far; NaN on any unwritten value or mismatch.
fn worse(worst: f64, got: &[f32], want: &[f32]) -> f64 {
    let d = diff(got, want);
    if d.unwritten + d.nan_mismatch > 0 {
        return f64::NAN;
    }
    worst.max(d.rel)
}

/// `bf16`: `b` runs bf16 activations, checked against the CPU's twin.
fn batch(b: &CudaBackend, seed: u64, n: usize, bf16: bool) -> Result<Vec<Row>> {
    let config = ModelConfig::tiny();
    let src = RandomSource {
        config: config.clone(),
        seed,
    };
    let cpu = CpuBackend {
        round_to_bf16: true,
        round_activations: bf16,
        device_tactic: None,
    };
    let layout = KvLayout {
        num_layers: config.num_layers,
        num_blocks: BLOCKS,
        block_size: 16,
        num_kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
    };
    let model = Model::load(b, &config, &src, |_, _| {})?;
    let cmodel = Model::load(&cpu, &config, &src, |_, _| {})?;
    let (mut kv, mut ckv) = (b.kv_cache(&layout)?, cpu.kv_cache(&layout)?);
    let tok = |s: usize, i: usize| {
        (bits(seed, 9100 + s as u64, i as u64) % config.vocab_size as u64) as u32
    };
    let lens: Vec<usize> = (0..n).map(start_len).collect();
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|s| (0..lens[s]).map(|i| tok(s, i)).collect())
        .collect();
    let zeros = vec![0; n];
    let prefill = step_meta(&prompts, &zeros, vec![]);
    let mut a = Graphs::new(WARMUP);
    let mut eager_bucket = Graphs::new(usize::MAX);
    a.set_pad_block(PAD_BLOCK);
    eager_bucket.set_pad_block(PAD_BLOCK);
    // The prefill is not a decode step: eager with the graph path on too.
    b.swap_graphs(Some(a));
    model.forward(b, &mut kv, &prefill)?;
    cmodel.forward(&cpu, &mut ckv, &prefill)?;
    let (mut vs_bucket, mut vs_eager, mut vs_cpu) = (0.0f64, 0.0f64, 0.0f64);
    for k in 0..STEPS {
        let toks: Vec<Vec<u32>> = (0..n).map(|s| vec![tok(s, 1000 + k)]).collect();
        let from: Vec<usize> = lens.iter().map(|l| l + k).collect();
        // Odd steps: the first sequence does not sample (fewer logit rows).
        let first = (k % 2) as u32;
        let m = step_meta(&toks, &from, (first..n as u32).collect());
        let r = m.logit_rows.len();
        // The plain eager pass (no graph state), then the bucket run
        // eagerly, then the graph state under test, each writing the
        // step's K and V to the same slots.
        let a = b.swap_graphs(None);
        let plain = model.forward(b, &mut kv, &m)?;
        let plain = logits(b, &plain, r)?;
        b.swap_graphs(Some(eager_bucket));
        let on_bucket = model.forward(b, &mut kv, &m);
        eager_bucket = b.swap_graphs(a).expect("swapped in above");
        let on_bucket = logits(b, &on_bucket?, r)?;
        let replayed = model.forward(b, &mut kv, &m)?;
        let replayed = logits(b, &replayed, r)?;
        let c = cmodel.forward(&cpu, &mut ckv, &m)?;
        let c = logits(&cpu, &c, r)?;
        vs_bucket = worse(vs_bucket, &replayed, &on_bucket);
        vs_eager = worse(vs_eager, &replayed, &plain);
        vs_cpu = worse(vs_cpu, &replayed, &c);
    }
    let counts = b.graph_counts().unwrap_or_default();
    b.swap_graphs(None);
    let buckets = if n == 2 {
        "bucket 2"
    } else {
        "bucket 8, 3 padding rows"
    };
    let note = format!(
        "{STEPS} steps, {buckets}: {} warm-up/eager, {} captured, {} replayed, {} cleared",
        counts.eager, counts.captures, counts.replays, counts.clears
    );
    let label = if bf16 {
        format!("bf16 b={n}")
    } else {
        format!("b={n}")
    };
    let mut cpu_row = Row::at_most(
        "graphs",
        format!("{label} replay vs CPU"),
        "rel_err",
        vs_cpu,
        LOGITS_TOL,
    )
    .with_note(note.clone());
    if counts.captures < 2
        || counts.replays < 2
        || counts.refused > 0
        || eager_bucket.counts.eager != STEPS
    {
        cpu_row = cpu_row.failing(format!("expected two graphs captured and replayed, and every reference step eager over its bucket ({} of {STEPS}): {note}", eager_bucket.counts.eager));
    }
    Ok(vec![
        Row::at_most(
            "graphs",
            format!("{label} replay vs bucket eager"),
            "rel_err",
            vs_bucket,
            0.0,
        )
        .with_note("bit for bit"),
        Row::at_most(
            "graphs",
            format!("{label} replay vs eager"),
            "rel_err",
            vs_eager,
            if bf16 { BF16_TOL } else { SPLIT_TOL },
        )
        .with_note("other split plan and GEMM rows: f32 sums reordered"),
        cpu_row,
    ])
}
