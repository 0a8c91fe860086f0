//! `tacflowd bench-tactic`: Tactic's decode path on the CPU backend over
//! controlled synthetic keys (kernels/TACTIC.md, "Synthetic keys"): one
//! layer, one sequence, every KV head its own seeded heavy-tailed keys;
//! each context is decoded for `steps` steps from a clustering of
//! everything before the first, as the offline evaluation does.
//!
//! Per context: the device path's time (`Backend::tactic_attention` on the
//! CPU backend built `with_device_tactic`, whose host stand-in does the
//! kernels' work; the first step clusters) against full attention's, and
//! the selection's quality from the CPU reference (`TacticSeq`) on the same
//! keys and queries: success (query heads whose true mass reaches P), tokens
//! read and the oracle's, over the context. The device path's output is
//! checked equal to the host path's, step by step.

use super::{quantiles, write_json};
use crate::backend::cpu::{CpuBackend, CpuKv, Mat};
use crate::backend::{AttnDims, Backend, KvLayout, SeqMeta, StepMeta, TacticEntry};
use crate::error::{Error, Result};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;
use tacflow_kernels::tactic::synth::Synth;
use tacflow_kernels::tactic::{
    DecodeStep, HeadDiag, PagedKeys, TacticParams, TacticSeq, exact_scores, oracle_top_p, true_mass,
};

/// How far each step's queries turn from the construction's directions
/// (per dimension): enough that steps differ, little enough that the
/// scores keep the construction's heavy tails.
const TURN: f32 = 0.15;

#[derive(Debug, Clone)]
pub struct Options {
    /// Query heads, KV heads, head size.
    pub shape: (usize, usize, usize),
    pub contexts: Vec<usize>,
    pub steps: usize,
    pub p: f32,
    pub seed: u64,
    pub json: Option<PathBuf>,
}

/// One context's numbers.
#[derive(Debug, Clone, Default)]
struct Row {
    context: usize,
    first_ms: f64,
    step_ms: f64,
    full_ms: f64,
    success: f64,
    read: f64,
    oracle: f64,
}

/// A one-layer cache holding `n` tokens: KV head `h`'s keys from `synth[h]`,
/// seeded values; blocks in order.
fn cache(b: &CpuBackend, dims: AttnDims, synth: &[Synth], seed: u64) -> Result<(CpuKv, Vec<u32>)> {
    let n = synth[0].n;
    let blocks = n.div_ceil(16);
    let layout = KvLayout {
        num_layers: 1,
        num_blocks: blocks,
        block_size: 16,
        num_kv_heads: dims.num_kv_heads,
        head_dim: dims.head_dim,
    };
    let mut kv = b.kv_cache(&layout)?;
    let w = dims.qkv_dim();
    let d = dims.head_dim;
    let mut rows = vec![0.0f32; n * w];
    for (t, row) in rows.chunks_mut(w).enumerate() {
        for (h, sy) in synth.iter().enumerate() {
            let k = dims.q_dim() + h * d;
            row[k..k + d].copy_from_slice(&sy.keys[t * d..(t + 1) * d]);
            for j in 0..d {
                let v = tacflow_kernels::rng::random_weight(
                    seed,
                    50 + h as u64,
                    (t * d + j) as u64,
                    0.0,
                    1.0,
                );
                row[dims.q_dim() + dims.kv_dim() + h * d + j] = v;
            }
        }
    }
    let table: Vec<u32> = (0..blocks as u32).collect();
    let meta = StepMeta {
        tokens: vec![0; n],
        positions: (0..n as u32).collect(),
        slots: (0..n as u32).collect(),
        seqs: vec![SeqMeta {
            q_start: 0,
            q_len: n,
            ctx_len: n,
            block_table: table.clone(),
        }],
        logit_rows: vec![],
    };
    let qkv = Mat {
        data: rows,
        rows: n,
        cols: w,
    };
    b.kv_append(&meta, &qkv, &mut kv, 0, dims, 0..n)?;
    Ok((kv, table))
}

/// Decodes `opts.steps` steps ending at `context` and measures them.
fn measure(opts: &Options, context: usize) -> Result<Row> {
    let (nh, kvh, d) = opts.shape;
    let dims = AttnDims {
        num_heads: nh,
        num_kv_heads: kvh,
        head_dim: d,
    };
    let g = nh / kvh;
    let synth: Vec<Synth> = (0..kvh)
        .map(|h| Synth::heavy(context, (context / 8).max(1), g, d, opts.seed ^ h as u64))
        .collect();
    let b = CpuBackend::default().with_device_tactic();
    let (kv, table) = cache(&b, dims, &synth, opts.seed)?;
    let prm = TacticParams::new(opts.p);
    b.tactic_open(0, &prm, dims, 1)?;
    let mut reference = TacticSeq::new(prm, 1);
    let mut r = Row {
        context,
        ..Row::default()
    };
    let (mut steady, mut full) = (vec![], vec![]);
    let (mut hits, mut heads) = (0usize, 0usize);
    let first = context - opts.steps + 1;
    for t in 0..opts.steps {
        let ctx = first + t;
        let mut q = vec![0.0f32; dims.qkv_dim()];
        for (h, sy) in synth.iter().enumerate() {
            q[h * g * d..(h + 1) * g * d].copy_from_slice(&sy.turned(TURN, opts.seed, t as u64));
        }
        let meta = StepMeta {
            tokens: vec![0],
            positions: vec![ctx as u32 - 1],
            slots: vec![ctx as u32 - 1],
            seqs: vec![SeqMeta {
                q_start: 0,
                q_len: 1,
                ctx_len: ctx,
                block_table: table.clone(),
            }],
            logit_rows: vec![0],
        };
        let qkv = Mat {
            data: q.clone(),
            rows: 1,
            cols: dims.qkv_dim(),
        };
        let mut out = Mat {
            data: vec![0.0; dims.q_dim()],
            rows: 1,
            cols: dims.q_dim(),
        };
        let entry = TacticEntry {
            seq: 0,
            state: 0,
            row: 0,
            ctx_len: ctx,
        };
        let t0 = Instant::now();
        b.tactic_attention(&meta, &qkv, &kv, 0, dims, &[entry], &mut out, 0..1)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        b.tactic_end_step(true);
        if t == 0 {
            r.first_ms = ms;
        } else {
            steady.push(ms);
        }
        let mut dense = out.clone();
        let t0 = Instant::now();
        b.attention(&meta, &qkv, &kv, 0, dims, &mut dense, 0..1)?;
        full.push(t0.elapsed().as_secs_f64() * 1e3);
        // The reference's selection on the same keys and queries.
        let mut sel = vec![vec![]; kvh];
        let mut diag = vec![HeadDiag::default(); kvh];
        let step = DecodeStep {
            q: &q[..dims.q_dim()],
            kv: kv.layer(0),
            block_table: &table,
            ctx_len: ctx,
        };
        reference.select_layer(0, &step, &mut sel, &mut diag);
        let mut host = out.clone();
        b.sparse_attention(
            &meta,
            &qkv,
            &kv,
            0,
            dims,
            &[Some(sel.clone())],
            &mut host,
            0..1,
        )?;
        if host.data != out.data {
            return Err(Error::Backend(format!(
                "context {ctx}: the device path's output differs from the host path's"
            )));
        }
        let (mut scores, mut order) = (vec![], vec![]);
        for h in 0..kvh {
            let keys = PagedKeys {
                kv: kv.layer(0),
                block_table: &table,
                head: h,
            };
            // The oracle: each query head's smallest set, unioned.
            let mut union = vec![];
            for qh in q[h * g * d..(h + 1) * g * d].chunks(d) {
                exact_scores(&keys, qh, ctx, &mut scores);
                hits += usize::from(true_mass(&scores, &sel[h]) >= opts.p as f64);
                heads += 1;
                oracle_top_p(&scores, opts.p, &mut order, &mut union);
            }
            union.sort_unstable();
            union.dedup();
            r.read += diag[h].tokens_read / ctx as f64;
            r.oracle += union.len() as f64 / ctx as f64;
        }
    }
    let steps = (opts.steps * kvh) as f64;
    r.read /= steps;
    r.oracle /= steps;
    r.success = hits as f64 / heads.max(1) as f64;
    r.step_ms = quantiles(&mut steady).0;
    r.full_ms = quantiles(&mut full).0;
    b.tactic_close(0);
    Ok(r)
}

pub fn run(opts: &Options) -> Result<()> {
    if opts.steps == 0 || opts.contexts.iter().any(|&c| c <= opts.steps) {
        return Err(Error::Config("each context must exceed the steps".into()));
    }
    let (nh, kvh, d) = opts.shape;
    let mut rows = vec![];
    for &c in &opts.contexts {
        eprintln!("context {c}: {} decode steps", opts.steps);
        rows.push(measure(opts, c)?);
    }
    println!(
        "\nTactic on the CPU backend's device path, {nh}/{kvh}x{d}, P = {}, synthetic heavy tails (seed {})",
        opts.p, opts.seed
    );
    println!(
        "| context | first step (clusters) ms | step ms | full attention ms | success | read / ctx | oracle / ctx | read / oracle |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {:.2} | {:.3} | {:.3} | {:.1}% | {:.2}% | {:.2}% | {:.2}x |",
            r.context,
            r.first_ms,
            r.step_ms,
            r.full_ms,
            100.0 * r.success,
            100.0 * r.read,
            100.0 * r.oracle,
            r.read / r.oracle
        );
    }
    if let Some(path) = &opts.json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "context": r.context, "first_ms": r.first_ms, "step_ms": r.step_ms,
                    "full_ms": r.full_ms, "success": r.success, "read": r.read, "oracle": r.oracle,
                })
            })
            .collect();
        write_json(
            path,
            &json!({"shape": [nh, kvh, d], "p": opts.p, "seed": opts.seed, "rows": v}),
        )?;
    }
    Ok(())
}
