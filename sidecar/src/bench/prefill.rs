//! `tacflowd bench-prefill`: the attention of prefill steps, on the decode
//! kernel (every query token a row of its own, the daemon's default) and on
//! the tensor-core prefill kernel (`experimental_prefill_attention`), in
//! the same run on the same cache: microseconds, TFLOP/s of the causal
//! attention, the speedup, and how far apart the two outputs are; and the
//! lab's variant of the prefill kernel (q and p rounded to bf16 once, as
//! FlashAttention does, against the daemon's hi + lo halves: what the
//! precision costs).
//!
//! A case is `SEQS:CHUNK:CONTEXT[:DECODES]`: `SEQS` sequences each
//! appending a chunk of `CHUNK` tokens so that it holds `CONTEXT` after the
//! step (a whole prompt when equal), and optionally `DECODES` decode rows
//! at 4096 tokens in the same step (a mixed step). Pages in random order.
//! FLOPs: 4 x head size x query heads per (row, visible key).

use super::{device_line, quantiles, shuffled, time_each, write_json};
use crate::bench::attention::BenchShape;
use crate::error::{Error, Result};
use serde_json::json;
use std::path::PathBuf;
use tacflow_kernels::cuda::{AttnIo, AttnOverride, DeviceStep, Gpu, KvCache, StepArrays};
use tacflow_kernels::rng::random_weight;

/// `(seqs, chunk, context, decode rows)` of the default run.
pub const CASES: [(usize, usize, usize, usize); 7] = [
    (1, 512, 512, 0),
    (1, 2048, 2048, 0),
    (1, 8192, 8192, 0),
    (1, 512, 32_768, 0),
    (8, 1024, 1024, 0),
    (4, 512, 8192, 0),
    (2, 512, 4096, 64),
];

/// Context of the decode rows of a mixed case.
const DECODE_CONTEXT: usize = 4096;

#[derive(Debug, Clone)]
pub struct Options {
    pub shape: BenchShape,
    pub cases: Vec<(usize, usize, usize, usize)>,
    pub json: Option<PathBuf>,
    pub seed: u64,
}

/// One case on the device.
struct CaseData {
    kv: KvCache,
    step: DeviceStep,
    qkv: tacflow_kernels::cuda::CudaSlice<f32>,
    out: tacflow_kernels::cuda::CudaSlice<f32>,
    /// Σ over rows of the keys each row sees.
    visible: u64,
}

/// The step's arrays: each sequence's chunk rows, then the decode rows.
fn step_arrays(
    (seqs, chunk, ctx, decodes): (usize, usize, usize, usize),
    order: &[u32],
) -> StepArrays {
    let mut a = StepArrays::default();
    let mut next = 0;
    let mut add = |a: &mut StepArrays, len: usize, rows: usize| {
        let pages = len.div_ceil(16);
        let off = a.tables.len() as u32;
        a.tables.extend_from_slice(&order[next..next + pages]);
        next += pages;
        for i in len - rows..len {
            a.tokens.push(0);
            a.positions.push(i as u32);
            a.slots.push(0);
            a.kv_len.push(i as u32 + 1);
            a.table_off.push(off);
        }
    };
    for _ in 0..seqs {
        add(&mut a, ctx, chunk);
    }
    for _ in 0..decodes {
        add(&mut a, DECODE_CONTEXT, 1);
    }
    a
}

fn prepare(
    gpu: &Gpu,
    s: BenchShape,
    case: (usize, usize, usize, usize),
    seed: u64,
) -> Result<CaseData> {
    let (seqs, chunk, ctx, decodes) = case;
    if chunk == 0 || chunk > ctx {
        return Err(Error::Config(format!(
            "bench-prefill: a chunk of {chunk} tokens in a context of {ctx}"
        )));
    }
    let blocks = seqs * ctx.div_ceil(16) + decodes * DECODE_CONTEXT.div_ceil(16);
    let mut kv = gpu.kv_cache(1, blocks, s.kv_heads, s.head_dim)?;
    let n = kv.layer_elems();
    gpu.random_bf16(&mut kv.k, n, seed, 11, 0.0, 1.0)?;
    gpu.random_bf16(&mut kv.v, n, seed, 12, 0.0, 1.0)?;
    let a = step_arrays(case, &shuffled(blocks, seed));
    let visible = a.kv_len.iter().map(|&l| l as u64).sum();
    let rows = a.tokens.len();
    let w = (s.heads + 2 * s.kv_heads) * s.head_dim;
    let q: Vec<f32> = (0..(rows * w) as u64)
        .map(|i| random_weight(seed, 13, i, 0.0, 1.0))
        .collect();
    Ok(CaseData {
        kv,
        step: DeviceStep::upload(gpu, &a)?,
        qkv: gpu.upload(&q)?,
        out: gpu.alloc(rows * s.heads * s.head_dim)?,
        visible,
    })
}

/// Which attention a timing runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Every row on the decode kernel (the daemon's default).
    Decode,
    /// Chunks on the prefill kernel (`experimental_prefill_attention`).
    Prefill,
    /// Chunks on the lab's bf16 variant of it.
    PrefillBf16,
}

/// Median, p10, p90 microseconds of one path over `iters` launches, and its
/// output.
fn time_path(
    gpu: &Gpu,
    s: BenchShape,
    d: &mut CaseData,
    path: Path,
    iters: usize,
) -> Result<((f64, f64, f64), Vec<f32>)> {
    let shape = s.attn();
    let launch = |d: &mut CaseData| -> Result<()> {
        let io = AttnIo {
            qkv: d.qkv.as_view(),
            kv: &d.kv,
            layer: 0,
            out: d.out.as_view_mut(),
        };
        match path {
            Path::Decode => {
                gpu.attention(&d.step, io, shape, AttnOverride::default())?;
            }
            Path::Prefill | Path::PrefillBf16 => {
                let bf16 = path == Path::PrefillBf16;
                gpu.attention_with_prefill_kernel((&d.step).into(), io, shape, bf16)?;
            }
        }
        Ok(())
    };
    for _ in 0..3 {
        launch(d)?;
    }
    let mut us = time_each(gpu, iters, |_| launch(d))?;
    let out = gpu.download(&d.out, d.out.len())?;
    Ok((quantiles(&mut us), out))
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let n: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let d: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (n / d.max(1e-300)).sqrt()
}

pub fn run(opts: &Options) -> Result<()> {
    let s = opts.shape;
    s.attn().check()?;
    let mut gpu = Gpu::new(0)?;
    gpu.load_lab()?;
    println!(
        "bench-prefill on {}: {} query heads over {} KV heads of {}",
        device_line(&gpu),
        s.heads,
        s.kv_heads,
        s.head_dim
    );
    let mut table = vec![];
    let mut rows = vec![];
    for &case in &opts.cases {
        let (seqs, chunk, ctx, decodes) = case;
        let mut d = prepare(&gpu, s, case, opts.seed)?;
        let flop = 4.0 * (s.head_dim * s.heads) as f64 * d.visible as f64;
        let iters = (2e-3 * 1e12 / flop.max(1.0)).clamp(5.0, 200.0) as usize;
        let (dec, want) = time_path(&gpu, s, &mut d, Path::Decode, iters)?;
        let (pre, got) = time_path(&gpu, s, &mut d, Path::Prefill, iters)?;
        let (fast, got_bf16) = time_path(&gpu, s, &mut d, Path::PrefillBf16, iters)?;
        let (gap, gap_bf16) = (rel(&got, &want), rel(&got_bf16, &want));
        // The decode and prefill kernels both keep q and p to ~2^-17; the
        // bf16 variant is held to the bf16 tolerance's order.
        if gap.is_nan() || gap > 1e-3 || gap_bf16.is_nan() || gap_bf16 > 5e-2 {
            return Err(Error::Backend(format!(
                "bench-prefill {seqs}:{chunk}:{ctx}:{decodes}: the prefill kernel is {gap:.1e} from the decode kernel, its bf16 variant {gap_bf16:.1e}"
            )));
        }
        let tf = |us: f64| flop / (us * 1e-6) / 1e12;
        let line = format!(
            "| {seqs} x {chunk} @ {ctx} | {decodes} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}x | {gap:.1e} | {:.1} | {:.1} | {gap_bf16:.1e} |",
            dec.0,
            tf(dec.0),
            pre.0,
            tf(pre.0),
            dec.0 / pre.0,
            fast.0,
            tf(fast.0),
        );
        println!("{line}");
        table.push(line);
        rows.push(json!({
            "seqs": seqs, "chunk": chunk, "context": ctx, "decodes": decodes,
            "flop": flop,
            "decode_kernel_us": {"median": dec.0, "p10": dec.1, "p90": dec.2},
            "prefill_kernel_us": {"median": pre.0, "p10": pre.1, "p90": pre.2},
            "prefill_bf16_us": {"median": fast.0, "p10": fast.1, "p90": fast.2},
            "speedup": dec.0 / pre.0,
            "rel_gap": gap,
            "rel_gap_bf16": gap_bf16,
        }));
    }
    println!(
        "\n| case | decode rows | decode kernel µs | TFLOP/s | prefill kernel µs | TFLOP/s | speedup | apart | bf16 variant µs | TFLOP/s | apart |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for l in &table {
        println!("{l}");
    }
    if let Some(path) = &opts.json {
        let shape = json!({"heads": s.heads, "kv_heads": s.kv_heads, "head_dim": s.head_dim});
        write_json(
            path,
            &json!({"device": device_line(&gpu), "shape": shape, "cases": rows}),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mixed_case_has_its_chunks_then_its_decode_rows() {
        let order: Vec<u32> = (0..800).collect();
        let a = step_arrays((2, 20, 40, 3), &order);
        assert_eq!(a.tokens.len(), 2 * 20 + 3);
        assert_eq!(&a.kv_len[..3], &[21, 22, 23]);
        assert_eq!(a.kv_len[39], 40);
        assert_eq!(&a.kv_len[40..], &[4096, 4096, 4096]);
        assert_eq!(
            a.table_off[20], 3,
            "the second sequence's table after the first's 3 pages"
        );
        assert_eq!(a.tables.len(), 2 * 3 + 3 * 256);
    }
}
