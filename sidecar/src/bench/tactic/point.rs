//! One `bench-tactic` point: a batch of sequences' keys in one cache on
//! the device, the same keys in a CPU cache for the reference (every
//! sequence on the CPU backend, the first `quality_seqs` on a GPU), then
//! per P `steps` decode steps of the whole batch through
//! `Backend::tactic_attention`, timed against `Backend::attention`.

use super::device::Device;
use super::keys::SeqKeys;
use super::report::Row;
use super::{Keys, Options};
use crate::backend::cpu::{CpuBackend, CpuKv, Mat};
use crate::backend::{AttnDims, Backend, KvLayout, SeqMeta, StepMeta, TacticEntry};
use crate::bench::quantiles;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::time::Instant;
use tacflow_kernels::tactic::synth::Calibration;
use tacflow_kernels::tactic::{
    DecodeStep, HeadDiag, PagedKeys, TacticParams, TacticSeq, exact_scores, oracle_top_p, true_mass,
};

const BLOCK: usize = 16;
/// Tokens appended to the caches per call while loading.
const CHUNK: usize = 2048;

pub struct Point<'a> {
    pub keys: Keys,
    pub shape: (usize, usize, usize),
    /// Batches measured, each over the first sequences of the largest:
    /// the keys are made and loaded once.
    pub batches: &'a [usize],
    /// Sequence `s`'s keys and queries.
    pub make: &'a (dyn Fn(usize) -> Result<SeqKeys> + Sync),
}

/// What is kept of a sequence once its keys are in the caches.
struct Seq {
    queries: Vec<Vec<f32>>,
    calibration: Vec<Calibration>,
}

/// The caches of a point: the device's (every sequence) and the CPU
/// reference's (the first `tables.len()` sequences).
struct Caches<K> {
    n: usize,
    kv: K,
    host: CpuKv,
    /// Block tables, the device's cache and the host's alike: sequence `s`
    /// owns blocks `s * bps ..`.
    tables: Vec<Vec<u32>>,
    seqs: Vec<Seq>,
}

fn layout(dims: AttnDims, blocks: usize) -> KvLayout {
    KvLayout {
        num_layers: 1,
        num_blocks: blocks,
        block_size: BLOCK,
        num_kv_heads: dims.num_kv_heads,
        head_dim: dims.head_dim,
    }
}

/// Appends tokens `t0..t1` of a sequence with block table `table`.
fn append<B: Backend>(
    b: &B,
    act: &B::Act,
    kv: &mut B::Kv,
    dims: AttnDims,
    table: &[u32],
    t0: usize,
    t1: usize,
) -> Result<()> {
    let r = t1 - t0;
    let meta = StepMeta {
        tokens: vec![0; r],
        positions: (t0 as u32..t1 as u32).collect(),
        slots: (t0..t1)
            .map(|t| table[t / BLOCK] * BLOCK as u32 + (t % BLOCK) as u32)
            .collect(),
        seqs: vec![SeqMeta {
            q_start: 0,
            q_len: r,
            ctx_len: t1,
            block_table: table.to_vec(),
        }],
        logit_rows: vec![],
    };
    let step = b.begin_step(&meta)?;
    b.kv_append(&step, act, kv, 0, dims, 0..r)
}

fn load<D: Device>(
    dev: &D,
    p: &Point,
    dims: AttnDims,
    qn: usize,
) -> Result<Caches<<D::B as Backend>::Kv>> {
    let nh = dims.num_heads;
    let first = (p.make)(0)?;
    let n = first.n;
    let bps = n.div_ceil(BLOCK);
    let b = dev.backend();
    let batch = p.batches.iter().copied().max().unwrap_or(1);
    let mut kv = b.kv_cache(&layout(dims, batch * bps))?;
    let cpu = CpuBackend::default();
    let mut host = cpu.kv_cache(&layout(dims, qn * bps))?;
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| (s * bps..(s + 1) * bps).map(|x| x as u32).collect())
        .collect();
    let mut seqs = vec![];
    let mut next = Some(first);
    for (s, table) in tables.iter().enumerate() {
        let sk = match next.take() {
            Some(k) => k,
            None => (p.make)(s)?,
        };
        if sk.n != n || sk.keys.len() != dims.num_kv_heads || sk.head_dim != dims.head_dim {
            return Err(Error::Config(format!(
                "sequence {s}: {} tokens of {} KV heads x {}, not {n} of {} x {}",
                sk.n,
                sk.keys.len(),
                sk.head_dim,
                dims.num_kv_heads,
                dims.head_dim
            )));
        }
        for t0 in (0..n).step_by(CHUNK) {
            let t1 = (t0 + CHUNK).min(n);
            let rows = sk.rows(t0, t1, nh, false);
            let act = dev.upload(t1 - t0, dims.qkv_dim(), &rows)?;
            append(b, &act, &mut kv, dims, table, t0, t1)?;
            if s < qn {
                // The GPU's cache holds bf16: the reference sees the same.
                let rows = if dev.is_host() {
                    rows
                } else {
                    sk.rows(t0, t1, nh, true)
                };
                let m = Mat {
                    rows: t1 - t0,
                    cols: dims.qkv_dim(),
                    data: rows,
                };
                append(&cpu, &m, &mut host, dims, table, t0, t1)?;
            }
        }
        seqs.push(Seq {
            queries: sk.queries,
            calibration: sk.calibration,
        });
    }
    dev.sync()?;
    Ok(Caches {
        n,
        kv,
        host,
        tables,
        seqs,
    })
}

/// The point's rows, one per (batch, P).
pub fn measure<D: Device>(dev: &D, opts: &Options, p: &Point) -> Result<Vec<Row>> {
    let (nh, kvh, d) = p.shape;
    let dims = AttnDims {
        num_heads: nh,
        num_kv_heads: kvh,
        head_dim: d,
    };
    let max = p.batches.iter().copied().max().unwrap_or(1);
    let qn = |batch: usize| {
        if dev.is_host() {
            batch
        } else {
            opts.quality_seqs.clamp(1, batch)
        }
    };
    let c = load(dev, p, dims, qn(max))?;
    if c.n <= opts.steps {
        return Err(Error::Config(format!(
            "{} tokens: the context must exceed the steps",
            c.n
        )));
    }
    // On a GPU the reference's quality of the same sequences at the same
    // P is the same in every batch: measured once.
    let mut known = HashMap::new();
    let mut rows = vec![];
    for &batch in p.batches {
        eprintln!("  batch {batch}");
        for &pp in &opts.ps {
            let at = (batch, qn(batch));
            let row = decode(dev, opts, p, &c, dims, at, pp, &mut known)?;
            eprintln!("{}", super::report::line(&row));
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The reference's numbers over a point's steps.
#[derive(Default, Clone)]
struct Quality {
    hits: usize,
    heads: usize,
    read: f64,
    oracle: f64,
    /// Tokens read per step by the quality sequences, summed over steps.
    read_tokens: f64,
    max_diff: f64,
}

/// Per step: the device's and the reference's times and quality.
#[derive(Default)]
struct Acc {
    first_us: f64,
    steady: Vec<f64>,
    full: Vec<f64>,
    attn: Vec<f64>,
    /// The device's own phases (clustering, selection, attention) of the
    /// first step and of the steady ones, where it times them (CUDA).
    first_phases: Option<[f64; 3]>,
    phases: Vec<[f64; 3]>,
    q: Quality,
}

fn step_meta(c: &Caches<impl Sized>, seqs: usize, ctx: usize) -> StepMeta {
    StepMeta {
        tokens: vec![0; seqs],
        positions: vec![ctx as u32 - 1; seqs],
        slots: (0..seqs)
            .map(|s| c.tables[s][(ctx - 1) / BLOCK] * BLOCK as u32 + ((ctx - 1) % BLOCK) as u32)
            .collect(),
        seqs: (0..seqs)
            .map(|s| SeqMeta {
                q_start: s,
                q_len: 1,
                ctx_len: ctx,
                block_table: c.tables[s].clone(),
            })
            .collect(),
        logit_rows: (0..seqs as u32).collect(),
    }
}

fn qkv_rows(c: &Caches<impl Sized>, dims: AttnDims, seqs: usize, t: usize) -> Vec<f32> {
    let w = dims.qkv_dim();
    let mut q = vec![0.0f32; seqs * w];
    for (s, row) in q.chunks_mut(w).enumerate() {
        row[..dims.q_dim()].copy_from_slice(&c.seqs[s].queries[t]);
    }
    q
}

fn timed(dev: &impl Device, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    dev.sync()?;
    let t0 = Instant::now();
    f()?;
    dev.sync()?;
    Ok(t0.elapsed().as_secs_f64() * 1e6)
}

#[allow(clippy::too_many_arguments)]
fn decode<D: Device>(
    dev: &D,
    opts: &Options,
    p: &Point,
    c: &Caches<<D::B as Backend>::Kv>,
    dims: AttnDims,
    (batch, qn): (usize, usize),
    pp: f32,
    known: &mut HashMap<(u32, usize), Quality>,
) -> Result<Row> {
    let b = dev.backend();
    let prm = TacticParams::new(pp);
    let key = (pp.to_bits(), qn);
    let cached = (!dev.is_host()).then(|| known.get(&key).cloned()).flatten();
    let qn_run = if cached.is_some() { 0 } else { qn };
    for s in 0..batch {
        b.tactic_open(s as _, &prm, dims, 1)?;
    }
    let mut refs: Vec<TacticSeq> = (0..qn_run).map(|_| TacticSeq::new(prm, 1)).collect();
    let mut acc = Acc::default();
    let first = c.n - opts.steps + 1;
    let r = (|| -> Result<()> {
        for t in 0..opts.steps {
            step(
                dev,
                c,
                dims,
                qn_run,
                pp,
                first + t,
                t,
                &mut refs,
                &mut acc,
                batch,
            )?;
        }
        Ok(())
    })();
    for s in 0..batch {
        b.tactic_close(s as _);
    }
    r?;
    match cached {
        Some(q) => acc.q = q,
        None => {
            known.insert(key, acc.q.clone());
        }
    }
    Ok(row(dev, opts, p, c, dims, (batch, qn), pp, acc))
}

#[allow(clippy::too_many_arguments)]
fn step<D: Device>(
    dev: &D,
    c: &Caches<<D::B as Backend>::Kv>,
    dims: AttnDims,
    qn: usize,
    pp: f32,
    ctx: usize,
    t: usize,
    refs: &mut [TacticSeq],
    acc: &mut Acc,
    batch: usize,
) -> Result<()> {
    let b = dev.backend();
    let meta = step_meta(c, batch, ctx);
    let q = qkv_rows(c, dims, batch, t);
    let qkv = dev.upload(batch, dims.qkv_dim(), &q)?;
    let mut out = dev.backend().act(batch, dims.q_dim())?;
    let mut dense = dev.backend().act(batch, dims.q_dim())?;
    let entries: Vec<TacticEntry> = (0..batch)
        .map(|s| TacticEntry {
            seq: s,
            state: s as _,
            row: s,
            ctx_len: ctx,
            prompt_end: false,
            diagnostics: false,
            baseline: None,
        })
        .collect();
    let step = b.begin_step(&meta)?;
    let us = timed(dev, || {
        b.tactic_attention(&step, &qkv, &c.kv, 0, dims, &entries, &mut out, 0..batch)
    })?;
    b.tactic_end_step(true);
    let phases = dev.phases_us()?;
    if t == 0 {
        acc.first_us = us;
        acc.first_phases = phases;
    } else {
        acc.steady.push(us);
        acc.phases.extend(phases);
    }
    acc.full.push(timed(dev, || {
        b.attention(&step, &qkv, &c.kv, 0, dims, &mut dense, 0..batch)
    })?);
    // The reference's selections on the same keys and queries.
    let (kvh, d) = (dims.num_kv_heads, dims.head_dim);
    let g = dims.num_heads / kvh;
    let mut sels = vec![];
    for (s, rf) in refs.iter_mut().enumerate() {
        let mut sel = vec![vec![]; kvh];
        let mut diag = vec![HeadDiag::default(); kvh];
        let ds = DecodeStep {
            q: &c.seqs[s].queries[t],
            kv: c.host.layer(0),
            block_table: &c.tables[s],
            ctx_len: ctx,
        };
        rf.select_layer(0, &ds, &mut sel, &mut diag);
        for dg in &diag {
            acc.q.read += dg.tokens_read / ctx as f64;
            acc.q.read_tokens += dg.tokens_read;
        }
        sels.push(Some(sel));
    }
    // The host path over the reference's sets; on the CPU backend the
    // device path's output must equal it bit for bit.
    let cpu = CpuBackend::default();
    let hmeta = step_meta(c, qn, ctx);
    let hq = Mat {
        data: q[..qn * dims.qkv_dim()].to_vec(),
        rows: qn,
        cols: dims.qkv_dim(),
    };
    let mut hout = Mat {
        data: vec![0.0; qn * dims.q_dim()],
        rows: qn,
        cols: dims.q_dim(),
    };
    let t0 = Instant::now();
    cpu.sparse_attention(&hmeta, &hq, &c.host, 0, dims, &sels, &mut hout, 0..qn)?;
    acc.attn.push(t0.elapsed().as_secs_f64() * 1e6);
    let got = dev.download(&out)?;
    let got = &got[..qn * dims.q_dim()];
    if dev.is_host() && got != hout.data.as_slice() {
        return Err(Error::Backend(format!(
            "context {ctx}: the device path's output differs from the host path's"
        )));
    }
    let diff = got
        .iter()
        .zip(&hout.data)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    acc.q.max_diff = acc.q.max_diff.max(diff);
    // Success and the oracle per (sequence, KV head).
    let (host, tables, seqs) = (&c.host, &c.tables, &c.seqs);
    let per: Vec<(usize, usize, f64)> = (0..qn * kvh)
        .into_par_iter()
        .map(|i| {
            let (s, h) = (i / kvh, i % kvh);
            let keys = PagedKeys {
                kv: host.layer(0),
                block_table: &tables[s],
                head: h,
            };
            let sel = &sels[s].as_ref().expect("selected")[h];
            let q = &seqs[s].queries[t][h * g * d..(h + 1) * g * d];
            let (mut scores, mut order, mut union) = (vec![], vec![], vec![]);
            let mut hits = 0;
            for qh in q.chunks(d) {
                exact_scores(&keys, qh, ctx, &mut scores);
                hits += usize::from(true_mass(&scores, sel) >= pp as f64);
                oracle_top_p(&scores, pp, &mut order, &mut union);
            }
            union.sort_unstable();
            union.dedup();
            (hits, g, union.len() as f64 / ctx as f64)
        })
        .collect();
    for (h, n, o) in per {
        acc.q.hits += h;
        acc.q.heads += n;
        acc.q.oracle += o;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn row<D: Device>(
    dev: &D,
    opts: &Options,
    p: &Point,
    c: &Caches<<D::B as Backend>::Kv>,
    dims: AttnDims,
    (batch, qn): (usize, usize),
    pp: f32,
    mut acc: Acc,
) -> Row {
    let kvh = dims.num_kv_heads;
    let trials = (opts.steps * qn * kvh) as f64;
    let all_us = quantiles(&mut acc.steady).0;
    let full_us = quantiles(&mut acc.full).0;
    // Bytes a step reads: K and V rows of the tokens read, the quality
    // sequences' mean taken for every sequence of the batch.
    let row_bytes = (2 * dims.head_dim * dev.kv_value_bytes()) as f64;
    let read_bytes = acc.q.read_tokens / (opts.steps * qn) as f64 * batch as f64 * row_bytes;
    let ctx_mean = c.n as f64 - (opts.steps - 1) as f64 / 2.0;
    let full_bytes = ctx_mean * (kvh * batch) as f64 * row_bytes;
    // On the CPU the host path's sparse attention over the same sets
    // stands for the device path's attention (the same work); on the GPU
    // the device's events around its own phases say it.
    let phase = |i: usize, acc: &mut Acc| {
        let mut v: Vec<f64> = acc.phases.iter().map(|p| p[i]).collect();
        quantiles(&mut v).0
    };
    let (select_us, attn_us) = if dev.is_host() {
        let a = quantiles(&mut acc.attn).0;
        (Some(all_us - a), Some(a))
    } else if acc.phases.is_empty() {
        (None, None)
    } else {
        (Some(phase(1, &mut acc)), Some(phase(2, &mut acc)))
    };
    let cluster_ms_per_seq = match acc.first_phases {
        Some(p) => p[0] / 1e3 / batch as f64,
        None => (acc.first_us - all_us) / 1e3 / batch as f64,
    };
    let calib: Vec<f64> = c
        .seqs
        .iter()
        .flat_map(|s| s.calibration.iter().map(|k| k.fraction))
        .collect();
    Row {
        backend: dev.name(),
        keys: p.keys,
        context: c.n,
        batch,
        p: pp,
        calibrated: (!calib.is_empty()).then(|| calib.iter().sum::<f64>() / calib.len() as f64),
        oracle: acc.q.oracle / trials,
        read: acc.q.read / trials,
        success: acc.q.hits as f64 / acc.q.heads.max(1) as f64,
        quality_seqs: qn,
        select_us,
        attn_us,
        all_us,
        full_us,
        first_us: acc.first_us,
        cluster_ms_per_seq,
        read_gbps: read_bytes / (all_us * 1e-6) / 1e9,
        full_gbps: full_bytes / (full_us * 1e-6) / 1e9,
        max_diff: acc.q.max_diff,
    }
}
