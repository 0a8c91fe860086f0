//! `tacflowd bench-decode`: one decode step of a model with seeded random
//! weights generated on the GPU (`random:llama-3-8b` by default) at each
//! batch size, every sequence holding `context` cached tokens in pages of
//! random order (random bf16 K and V: decode reads them exactly as it reads
//! a prefilled cache, and no prefill has to run first).
//!
//! Two times per batch, the median of `steps` steps after a warm-up:
//! * `step`: the host's wall time of a whole step as the executor runs it
//!   (the step's metadata uploaded, the forward pass, greedy sampling, the
//!   tokens back on the host);
//! * `gpu`: the forward pass and sampling enqueued behind a kernel that
//!   holds the stream until the host has issued all of it, timed by events:
//!   the device's own time with no launch gap. `step - gpu` is what the
//!   host's launches and the synchronisation cost.
//!
//! The end-to-end numbers (through the daemon and the Python client) and
//! the floor of each step come from `bench/decode/run.py`.

use super::{device_line, quantiles, shuffled, write_json};
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, KvLayout, SeqMeta, StepMeta};
use crate::error::Result;
use crate::model::{Model, ModelSpec};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;
use tacflow_kernels::cpu::SampleParams;

#[derive(Debug, Clone)]
pub struct Options {
    pub model: String,
    pub batches: Vec<usize>,
    pub context: usize,
    pub steps: usize,
    pub json: Option<PathBuf>,
    pub seed: u64,
}

/// A decode step of `batch` sequences with `context` cached tokens each,
/// sequence `s` owning blocks `tables[s]`: one new token per sequence.
fn decode_meta(batch: usize, context: usize, tables: &[Vec<u32>]) -> StepMeta {
    let mut m = StepMeta::default();
    for (s, t) in tables.iter().take(batch).enumerate() {
        m.tokens.push((s * 7919 % 1000) as u32);
        m.positions.push(context as u32);
        m.slots.push(t[context / 16] * 16 + (context % 16) as u32);
        m.seqs.push(SeqMeta {
            q_start: s,
            q_len: 1,
            ctx_len: context + 1,
            block_table: t.clone(),
        });
        m.logit_rows.push(s as u32);
    }
    m
}

pub fn run(opts: &Options) -> Result<()> {
    let mut b = CudaBackend::new(0)?;
    b.gpu_mut().load_lab()?;
    println!("bench-decode on {}", device_line(b.gpu()));
    let spec = ModelSpec::parse(&opts.model, opts.seed)?;
    let (config, src) = spec.open()?;
    let t0 = Instant::now();
    let model = Model::load(&b, &config, src.as_ref(), |_, _| {})?;
    println!(
        "{} loaded in {:.1} s",
        config.name,
        t0.elapsed().as_secs_f64()
    );
    let max_batch = opts.batches.iter().copied().max().unwrap_or(1);
    let per_seq = (opts.context + 1).div_ceil(16);
    let layout = KvLayout {
        num_layers: config.num_layers,
        num_blocks: max_batch * per_seq,
        block_size: 16,
        num_kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
    };
    let mut kv = b.kv_cache(&layout)?;
    let n = kv.layers * kv.layer_elems();
    b.gpu().random_bf16(&mut kv.k, n, opts.seed, 21, 0.0, 1.0)?;
    b.gpu().random_bf16(&mut kv.v, n, opts.seed, 22, 0.0, 1.0)?;
    let order = shuffled(layout.num_blocks, opts.seed);
    let tables: Vec<Vec<u32>> = order.chunks(per_seq).map(|c| c.to_vec()).collect();
    let mut rows = vec![];
    let mut table = vec![];
    for &batch in &opts.batches {
        let meta = decode_meta(batch, opts.context, &tables);
        let params = vec![Some(SampleParams::greedy()); batch];
        let step = |kv: &mut _| -> Result<()> {
            let logits = model.forward(&b, kv, &meta)?;
            b.sample(&logits, &params, false)?;
            Ok(())
        };
        for _ in 0..3 {
            step(&mut kv)?;
        }
        let mut wall = vec![];
        for _ in 0..opts.steps {
            let t = Instant::now();
            step(&mut kv)?;
            wall.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let mut gpu_ms = vec![];
        let span = b.gpu().span()?;
        for _ in 0..opts.steps.min(10) {
            b.gpu().spin_wait(30_000_000)?;
            span.start(b.gpu())?;
            let logits = model.forward(&b, &mut kv, &meta)?;
            // Sampling's own launch is inside the span; its copy back to
            // the host (a synchronisation) follows the end mark.
            let _ = b.sample_until(&logits, &params, || span.stop(b.gpu()))?;
            gpu_ms.push(span.ms()?);
        }
        let (step_ms, step_p10, step_p90) = quantiles(&mut wall);
        let (gpu_med, _, _) = quantiles(&mut gpu_ms);
        table.push(format!(
            "{batch:>6} {:>8} {step_ms:>10.2} {step_p10:>10.2} {step_p90:>10.2} {gpu_med:>10.2} {:>9.2}",
            opts.context,
            step_ms - gpu_med
        ));
        rows.push(json!({
            "batch": batch, "context": opts.context, "step_ms": step_ms,
            "step_p10_ms": step_p10, "step_p90_ms": step_p90, "gpu_ms": gpu_med,
            "launch_overhead_ms": step_ms - gpu_med,
        }));
    }
    println!(
        "\n{:>6} {:>8} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "batch", "context", "step_ms", "p10_ms", "p90_ms", "gpu_ms", "host_ms"
    );
    for l in &table {
        println!("{l}");
    }
    if let Some(path) = &opts.json {
        write_json(
            path,
            &json!({"device": device_line(b.gpu()), "model": config.name, "results": rows}),
        )?;
    }
    Ok(())
}
