//! Profiling each op kind of the cost model at several row counts and
//! shares of the device, through the backend's own op calls on weights of
//! the model's shapes (seeded random values: an op's time does not depend
//! on them).
//!
//! What a share is depends on the backend: on the CPU, a rayon pool of that
//! fraction of the threads (at least one); on the GPU, SMs given to the
//! lane by the configured mechanism (`gpu.rs`, which times by CUDA events
//! instead of the host clock).

use crate::backend::cpu::CpuBackend;
use crate::backend::{AttnDims, Backend, HostData, KvLayout, SeqMeta, StepMeta};
use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::schedule::search::{CostPoint, OpKind};
use std::time::{Duration, Instant};

/// How long each point is timed at least, after one warm-up call.
const MIN_TIME: Duration = Duration::from_millis(20);

/// Work to run on a share of the device (a CPU share runs it in a pool of
/// its own threads).
pub type Job<'a> = dyn FnMut() -> Result<()> + Send + 'a;

/// Runs a closure on a share of the device.
pub trait Shares {
    /// The shares this device can give, ascending, the last 1.0.
    fn levels(&self) -> Vec<f64>;
    /// Runs `f` on `share` of the device.
    fn run(&self, share: f64, f: &mut Job<'_>) -> Result<()>;
}

/// CPU threads: a pool of each thread count from 1 to all of them (at most
/// four levels, evenly spread).
pub struct CpuThreads {
    pools: Vec<(f64, rayon::ThreadPool)>,
}

impl CpuThreads {
    pub fn new() -> Result<CpuThreads> {
        let all = rayon::current_num_threads().max(1);
        let mut counts: Vec<usize> = (1..=4).map(|i| (all * i).div_ceil(4)).collect();
        counts.dedup();
        let pools = counts
            .into_iter()
            .map(|n| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build();
                let pool = pool.map_err(|e| crate::error::Error::Backend(e.to_string()))?;
                Ok((n as f64 / all as f64, pool))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CpuThreads { pools })
    }
}

impl Shares for CpuThreads {
    fn levels(&self) -> Vec<f64> {
        self.pools.iter().map(|p| p.0).collect()
    }

    fn run(&self, share: f64, f: &mut Job<'_>) -> Result<()> {
        let pool = self.pools.iter().find(|p| (p.0 - share).abs() < 1e-9);
        let pool = pool.expect("a share from levels()");
        pool.1.install(f)
    }
}

/// A decode step of `batch` sequences with `context` cached tokens each,
/// sequence `s` owning consecutive blocks.
pub fn decode_step(batch: usize, context: usize) -> StepMeta {
    let per_seq = (context + 1).div_ceil(16);
    let mut m = StepMeta::default();
    for s in 0..batch {
        let table: Vec<u32> = (0..per_seq).map(|i| (s * per_seq + i) as u32).collect();
        m.tokens.push((s % 7) as u32 + 3);
        m.positions.push(context as u32);
        m.slots
            .push(table[context / 16] * 16 + (context % 16) as u32);
        m.seqs.push(SeqMeta {
            q_start: s,
            q_len: 1,
            ctx_len: context + 1,
            block_table: table,
        });
        m.logit_rows.push(s as u32);
    }
    m
}

/// The microseconds of one call of `f` on `share`: the median of runs
/// after a warm-up, at least [`MIN_TIME`] of them.
fn time(shares: &dyn Shares, share: f64, f: &mut Job<'_>) -> Result<f64> {
    let mut samples = vec![];
    shares.run(share, &mut || {
        f()?;
        let start = Instant::now();
        while samples.len() < 3 || start.elapsed() < MIN_TIME {
            let t = Instant::now();
            f()?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(())
    })?;
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples[samples.len() / 2])
}

/// Each GEMM of the forward pass: its kind, output and input width.
pub fn gemms(c: &ModelConfig) -> [(OpKind, usize, usize); 5] {
    let (hidden, inter) = (c.hidden_size, c.intermediate_size);
    [
        (OpKind::Qkv, c.qkv_dim(), hidden),
        (OpKind::OProj, hidden, c.q_dim()),
        (OpKind::GateUp, 2 * inter, hidden),
        (OpKind::Down, hidden, inter),
        (OpKind::LmHead, c.vocab_size, hidden),
    ]
}

/// The KV layout of one layer holding `rows` decode sequences of `context`
/// cached tokens ([`decode_step`]'s blocks).
pub fn kv_layout(c: &ModelConfig, rows: usize, context: usize) -> KvLayout {
    KvLayout {
        num_layers: 1,
        num_blocks: rows * (context + 1).div_ceil(16),
        block_size: 16,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    }
}

/// What to profile.
#[derive(Debug, Clone)]
pub struct Grid {
    pub rows: Vec<usize>,
    /// Cached tokens of each decode sequence when attention is timed.
    pub context: usize,
}

/// Every op kind at every row count and share: the cost file's points.
/// `progress` gets a line per op kind.
pub fn profile(
    b: &CpuBackend,
    c: &ModelConfig,
    grid: &Grid,
    shares: &dyn Shares,
    mut progress: impl FnMut(&str),
) -> Result<Vec<CostPoint>> {
    let max_rows = grid.rows.iter().copied().max().unwrap_or(1);
    let rnd = |stream| HostData::Random {
        seed: 0x7e5e,
        stream,
        mean: 0.0,
        std: 0.02,
    };
    let hidden = c.hidden_size;
    let gemms = gemms(c);
    let mut points = vec![];
    let mut add = |op, rows, sm_share, us| {
        points.push(CostPoint {
            op,
            rows,
            sm_share,
            us,
        })
    };
    for (i, &(kind, out, inp)) in gemms.iter().enumerate() {
        let w = b.matrix(out, inp, rnd(i as u64))?;
        let x = b.act(max_rows, inp)?;
        let mut y = b.act(max_rows, out)?;
        for &rows in &grid.rows {
            for share in shares.levels() {
                let us = time(shares, share, &mut || b.linear(&x, &w, &mut y, 0..rows))?;
                add(kind, rows, share, us);
            }
        }
        progress(&format!("profiled {kind:?} ({out}x{inp})"));
    }
    let norm = b.vector(hidden, rnd(9))?;
    let x = b.act(max_rows, hidden)?;
    let mut h = b.act(max_rows, hidden)?;
    for &rows in &grid.rows {
        for share in shares.levels() {
            let mut f = || b.rmsnorm(&x, &norm, c.rms_norm_eps, &mut h, 0..rows);
            add(OpKind::Rowwise, rows, share, time(shares, share, &mut f)?);
        }
    }
    progress("profiled Rowwise (an RMSNorm stands for every row-wise op)");
    for &rows in &grid.rows {
        let us = attention(b, c, rows, grid.context, shares)?;
        for (share, us) in us {
            add(OpKind::Attention, rows, share, us);
        }
    }
    progress(&format!(
        "profiled Attention (decode rows at {} cached tokens)",
        grid.context
    ));
    Ok(points)
}

/// Decode attention of `rows` sequences at `context` cached tokens, per share.
fn attention(
    b: &CpuBackend,
    c: &ModelConfig,
    rows: usize,
    context: usize,
    shares: &dyn Shares,
) -> Result<Vec<(f64, f64)>> {
    let meta = decode_step(rows, context);
    let kv = b.kv_cache(&kv_layout(c, rows, context))?;
    let step = b.begin_step(&meta)?;
    let dims = AttnDims {
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    };
    let qkv = b.act(rows, c.qkv_dim())?;
    let mut out = b.act(rows, c.q_dim())?;
    let mut f = || b.attention(&step, &qkv, &kv, 0, dims, &mut out, 0..rows);
    shares
        .levels()
        .into_iter()
        .map(|s| Ok((s, time(shares, s, &mut f)?)))
        .collect()
}
