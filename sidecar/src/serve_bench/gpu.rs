//! `bench-serve` on the CUDA backend: the CPU path's report, plus
//!
//! - the GEMM rate of an 8192³ bf16 GEMM on random data (f32 accumulate
//!   and output, as the daemon's GEMMs), measured in the same run on the
//!   whole device before any lane is held to a share, and from it the
//!   compute-bound optimum, GEMM rate / (2 × parameters in GEMMs) tokens/s,
//!   and the fraction of it the run reached;
//! - a timeline of the lanes measured by CUDA events: the largest step's
//!   shape replayed (once to warm up, once timed) under the plan that ran,
//!   each node between two events recorded on its lane after its waits;
//!   and beside it the cost model's prediction for the same step, lanes
//!   side by side, when a cost file exists.

use super::{Options, Ran, bench, gemm_params, largest, node_json};
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, HostData, SeqMeta, StepMeta};
use crate::config::BackendKind;
use crate::engine::Engine;
use crate::error::Result;
use crate::model::ModelSpec;
use crate::tune::profile::decode_step;
use crate::tune::{self, Shape};
use serde_json::{Value, json};
use tacflow_kernels::cuda::Mark;

/// The side of the GEMM whose rate sets the optimum.
const GEMM_N: usize = 8192;
/// Timed repetitions of it (after a warm-up); the median counts.
const GEMM_REPS: usize = 10;

pub fn run(o: &Options) -> Result<Value> {
    let config = o.config.resolved(BackendKind::Cuda);
    let (model, src) = ModelSpec::parse(&config.model, config.seed)?.open()?;
    let mut b = CudaBackend::with_lanes(0, config.gpu_lanes)?;
    let tflops = gemm_tflops(&b)?;
    tune::gpu::hold_tuned_lanes(&mut b, &config)?;
    let b = b
        .with_activations(config.activations())?
        .with_graphs(config.graphs())?;
    let capacity = crate::server::kv_capacity(&b, &config, &model);
    let mut engine = Engine::new(b, &model, src.as_ref(), capacity, None, |_, _| {})?;
    let mut ran = bench(o, &config, &mut engine, &model)?;
    let params = gemm_params(&model);
    let optimum = tflops * 1e12 / (2.0 * params as f64);
    let reached = ran.report["tokens_per_s"].as_f64().unwrap_or(0.0);
    ran.report["optimum"] = json!({
        "gemm_params": params,
        "gemm_tflops": tflops,
        "gemm": format!("{GEMM_N}^3 bf16 x bf16 -> f32, random data, median of {GEMM_REPS}"),
        "tokens_per_s": optimum,
        "fraction": reached / optimum,
    });
    let program = engine.model_program();
    ran.report["predicted"] =
        super::timeline(o, &config, engine.backend(), &model, &program, &ran, false)?;
    ran.report["timeline"] = measured(o, &mut engine, &ran)?;
    Ok(ran.report)
}

/// TFLOP/s of the 8192³ GEMM on lane 0, timed by CUDA events.
fn gemm_tflops(b: &CudaBackend) -> Result<f64> {
    let rnd = |stream| HostData::Random {
        seed: 0x6e3,
        stream,
        mean: 0.0,
        std: 1.0,
    };
    let x = b.matrix(GEMM_N, GEMM_N, rnd(1))?;
    let w = b.matrix(GEMM_N, GEMM_N, rnd(2))?;
    let gpu = b.gpu();
    let mut out = gpu.alloc::<f32>(GEMM_N * GEMM_N)?;
    let dims = (GEMM_N, GEMM_N, GEMM_N);
    gpu.gemm_nt(x.data(), w.data(), &mut out, dims)?;
    let spans = (0..GEMM_REPS)
        .map(|_| gpu.span())
        .collect::<Result<Vec<_>, _>>()?;
    for s in &spans {
        s.start(gpu)?;
        gpu.gemm_nt(x.data(), w.data(), &mut out, dims)?;
        s.stop(gpu)?;
    }
    let mut ms = spans
        .iter()
        .map(|s| s.ms())
        .collect::<Result<Vec<f64>, _>>()?;
    ms.sort_by(|a, b| a.total_cmp(b));
    let flops = 2.0 * (GEMM_N as f64).powi(3);
    Ok(flops / (ms[ms.len() / 2] * 1e-3) / 1e12)
}

/// The largest step's shape as a pass the GPU can run: its decodes at
/// `context` cached tokens and its prefill, each owning consecutive KV
/// blocks from block 0; `None` when the cache has fewer blocks.
fn replay_meta(shape: Shape, context: usize, blocks: usize) -> Option<StepMeta> {
    let mut m = decode_step(shape.decodes, context);
    let first = shape.decodes * (context + 1).div_ceil(16);
    let p = shape.prefill;
    if first + p.div_ceil(16) > blocks {
        return None;
    }
    if p > 0 {
        let table: Vec<u32> = (first..first + p.div_ceil(16)).map(|b| b as u32).collect();
        let q_start = m.tokens.len();
        for i in 0..p {
            m.tokens.push(i as u32 % 11 + 3);
            m.positions.push(i as u32);
            m.slots.push(table[i / 16] * 16 + (i % 16) as u32);
        }
        m.seqs.push(SeqMeta {
            q_start,
            q_len: p,
            ctx_len: p,
            block_table: table,
        });
        m.logit_rows.push((q_start + p - 1) as u32);
    }
    Some(m)
}

/// The largest step replayed under the plan that ran, each node timed by
/// CUDA events on its lane.
fn measured(o: &Options, engine: &mut Engine<CudaBackend>, ran: &Ran) -> Result<Value> {
    let shape = largest(&ran.steps);
    let Some(meta) = replay_meta(shape, o.input_len, engine.kv_total_blocks()) else {
        let why = format!(
            "{} needs more KV blocks than the cache's {}",
            shape.describe(o.input_len),
            engine.kv_total_blocks()
        );
        return Ok(json!({"missing": why}));
    };
    engine.observed_pass(&meta, &mut |_, _, _| Ok(()))?;
    let mut marks: Vec<(usize, bool, Mark)> = vec![];
    let base = engine.backend().gpu().mark()?;
    base.record(engine.backend().gpu())?;
    let (schedule, _) = engine.observed_pass(&meta, &mut |b, i, before| {
        let gpu = b.gpu();
        let m = gpu.mark()?;
        m.record(gpu)?;
        marks.push((i, before, m));
        Ok(())
    })?;
    engine.backend().gpu().synchronize()?;
    let mut at = vec![(0.0, 0.0); schedule.nodes.len()];
    for (i, before, m) in &marks {
        let us = m.ms_since(&base)? * 1e3;
        match before {
            true => at[*i].0 = us,
            false => at[*i].1 = us,
        }
    }
    let zero = at.iter().map(|a| a.0).fold(f64::INFINITY, f64::min);
    let nodes: Vec<Value> = schedule
        .nodes
        .iter()
        .zip(&at)
        .map(|(n, (s, e))| node_json(n, s - zero, e - zero))
        .collect();
    let span = at.iter().map(|a| a.1).fold(0.0, f64::max) - zero;
    let shares = match &ran.plan {
        crate::schedule::Plan::Tuned(t) => t.file.entry(meta.tokens.len()).shares.clone(),
        _ => vec![1.0; schedule.lanes.len()],
    };
    Ok(json!({
        "step": shape.describe(o.input_len), "lanes": schedule.lanes.len(), "shares": shares,
        "measured_us": span, "predicted_us": ran.report["predicted"]["predicted_us"],
        "source": "measured by CUDA events on each node's lane (the step replayed after the run)",
        "nodes": nodes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replayed_step_owns_consecutive_blocks_and_fits_the_cache() {
        let shape = Shape {
            decodes: 3,
            prefill: 20,
        };
        // 3 decodes at 40 cached tokens: 3 blocks each (41 tokens), then
        // the prefill's 2 blocks: 11 in all.
        assert!(
            replay_meta(shape, 40, 10).is_none(),
            "10 blocks are too few"
        );
        let m = replay_meta(shape, 40, 11).unwrap();
        assert_eq!(m.tokens.len(), 23);
        assert_eq!(m.seqs.len(), 4);
        let p = &m.seqs[3];
        assert_eq!((p.q_start, p.q_len, p.ctx_len), (3, 20, 20));
        assert_eq!(p.block_table, vec![9, 10]);
        assert_eq!(m.slots[3..], (144..164).collect::<Vec<u32>>()[..]);
        assert_eq!(m.logit_rows, vec![0, 1, 2, 22]);
        let decodes = replay_meta(
            Shape {
                decodes: 2,
                prefill: 0,
            },
            15,
            2,
        )
        .unwrap();
        assert_eq!(decodes.tokens.len(), 2);
    }
}
