//! Sampling on identical logits: greedy tokens identical (ties to the
//! lowest id, NaN never wins), seeded temperature / top-k / top-p draws
//! identical (the CPU reference and the GPU compute the same integer
//! masses, so every draw must agree), log-probabilities and top-k lists
//! equal, logits returned bit for bit.

use super::report::Row;
use super::{Ctx, case};
use crate::backend::Backend;
use crate::error::Result;
use tacflow_kernels::cpu::{Processing, SampleParams};

struct Config {
    vocab: usize,
    rows: usize,
    sigma: f32,
    temperature: f32,
    top_p: f32,
    top_k: u32,
    logprobs: u32,
    /// Round logits to multiples of this (0: don't), to create many ties.
    quantum: f32,
}

fn configs() -> Vec<Config> {
    let c = |vocab, rows, sigma, temperature, top_p, top_k, logprobs, quantum| Config {
        vocab,
        rows,
        sigma,
        temperature,
        top_p,
        top_k,
        logprobs,
        quantum,
    };
    vec![
        c(128_256, 64, 3.0, 0.0, 1.0, 0, 5, 0.0),
        c(128_256, 16, 3.0, 0.0, 1.0, 0, 3, 0.5),
        c(128_256, 96, 3.0, 1.0, 0.9, 0, 20, 0.0),
        c(128_256, 48, 1.0, 0.7, 1.0, 0, 0, 0.0),
        c(49_152, 96, 8.0, 1.5, 0.5, 50, 5, 0.0),
        c(49_152, 32, 3.0, 1.0, 0.0, 0, 1, 0.0),
        c(49_152, 64, 3.0, 1.0, 0.95, 0, 64, 0.25),
        c(1000, 64, 2.0, 1.0, 0.95, 1000, 64, 0.0),
        c(100, 32, 0.5, 1.0, 1.0, 1, 3, 0.0),
    ]
}

pub fn sampling(cx: &mut Ctx) -> Vec<Row> {
    let mut rows = vec![];
    for c in configs() {
        let name = format!(
            "V={} T={} p={} k={} lp={}{}",
            c.vocab,
            c.temperature,
            c.top_p,
            c.top_k,
            c.logprobs,
            if c.quantum > 0.0 { " ties" } else { "" }
        );
        case(&mut rows, "sampling", name, || run_config(cx, &c));
    }
    // 6 rows: the processed ones come back one by one; 48: in one copy.
    for (n, want_logits) in [(6, false), (48, false), (48, true)] {
        let name = format!("vLLM processing, {n} rows, logits returned: {want_logits}");
        case(&mut rows, "sampling", name, || {
            run_processing(cx, n, want_logits)
        });
    }
    rows
}

/// vLLM's processing (penalties, logit bias, `min_p`) on some rows of a
/// step, plain sampling on others, none on the rest: the backend's
/// `sample_processed` against the CPU backend's on the same logits, token
/// for token (the processed rows come back to the host and go through the
/// CPU reference: this checks which rows do, and that the others are the
/// device sampler's).
fn run_processing(cx: &mut Ctx, n: usize, want_logits: bool) -> Result<Row> {
    let vocab = 49_152usize;
    let x = cx.rand(n * vocab, 0.0, 3.0);
    let ids = |r: usize, k: usize, salt: usize| -> Vec<u32> {
        (0..k)
            .map(|j| ((r * 7919 + j * 104_729 + salt) % vocab) as u32)
            .collect()
    };
    let params: Vec<Option<SampleParams>> = (0..n)
        .map(|r| {
            (r % 6 != 5).then_some(SampleParams {
                temperature: [0.0, 0.8, 1.0][r % 3],
                top_p: if r % 4 == 0 { 0.9 } else { 1.0 },
                top_k: if r % 5 == 0 { 40 } else { 0 },
                seed: cx.seed ^ (r as u64 * 0x51ed),
                position: r as u64 * 3 + 2,
                logprobs: 5,
            })
        })
        .collect();
    let procs: Vec<Option<Processing>> = (0..n)
        .map(|r| {
            (r % 3 != 1).then(|| Processing {
                min_p: if r % 2 == 0 { 0.05 } else { 0.0 },
                presence_penalty: 0.5,
                frequency_penalty: 0.25 * (r % 4) as f32,
                repetition_penalty: 1.0 + 0.1 * (r % 3) as f32,
                logit_bias: ids(r, 4, 17).into_iter().map(|t| (t, 2.5)).collect(),
                prompt: ids(r, 64, 3),
                output: ids(r, 1 + r % 16, 5),
            })
        })
        .collect();
    let a = cx.b.act_from_host(n, vocab, &x, false)?;
    let got = cx.b.sample_processed(&a, &params, &procs, want_logits)?;
    let cpu_b = crate::backend::cpu::CpuBackend::default();
    let cpu_a = crate::backend::cpu::Mat {
        data: x.clone(),
        rows: n,
        cols: vocab,
    };
    let want = cpu_b.sample_processed(&cpu_a, &params, &procs, want_logits)?;
    let wrong = got
        .sampled
        .iter()
        .zip(&want.sampled)
        .filter(|(g, w)| match (g, w) {
            (Some(g), Some(w)) => {
                g.token != w.token
                    || g.rank != w.rank
                    || (g.logprob - w.logprob).abs() > 1e-4 * (1.0 + w.logprob.abs())
            }
            (g, w) => g.is_some() != w.is_some(),
        })
        .count();
    let mut row = Row::at_most("sampling", "", "mismatches", wrong as f64, 0.0).with_note(format!(
        "{} rows, {} processed",
        n,
        procs.iter().filter(|p| p.is_some()).count()
    ));
    if want_logits && first_difference(&got.logits, &x).is_some() {
        row = row.failing("logits returned differ from the input");
    }
    if !want_logits && got.logits.is_some() {
        row = row.failing("logits returned unasked");
    }
    Ok(row)
}

fn logits_for(cx: &mut Ctx, c: &Config) -> Vec<f32> {
    let mut x = cx.rand(c.rows * c.vocab, 0.0, c.sigma);
    if c.quantum > 0.0 {
        x.iter_mut()
            .for_each(|v| *v = (*v / c.quantum).round() * c.quantum);
    }
    if c.temperature == 0.0 {
        // Plant ties at the maximum, -inf entries, and one NaN (never wins).
        for r in 0..c.rows {
            let row = &mut x[r * c.vocab..(r + 1) * c.vocab];
            let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) + 1.0;
            let (a, b) = ((r * 7919) % c.vocab, (r * 104_729 + 13) % c.vocab);
            row[a] = top;
            row[b] = top;
            row[(r * 31) % c.vocab] = f32::NEG_INFINITY;
            if r == 1 {
                row[c.vocab - 1] = f32::NAN;
            }
        }
    }
    x
}

fn run_config(cx: &mut Ctx, c: &Config) -> Result<Row> {
    let x = logits_for(cx, c);
    let params: Vec<Option<SampleParams>> = (0..c.rows)
        .map(|r| {
            (r % 9 != 4).then_some(SampleParams {
                temperature: c.temperature,
                top_p: c.top_p,
                top_k: c.top_k,
                seed: cx.seed ^ (r as u64 * 0x9e37),
                position: r as u64 * 7 + 1,
                logprobs: c.logprobs,
            })
        })
        .collect();
    let a = cx.b.act_from_host(c.rows, c.vocab, &x, false)?;
    let got = cx.b.sample(&a, &params, true)?;
    let cpu_b = crate::backend::cpu::CpuBackend::default();
    let cpu_a = crate::backend::cpu::Mat {
        data: x.clone(),
        rows: c.rows,
        cols: c.vocab,
    };
    let want = cpu_b.sample(&cpu_a, &params, true)?;
    let (mut wrong, mut lp_err, mut top_wrong) = (0, 0.0f64, 0);
    for (r, (g, w)) in got.sampled.iter().zip(&want.sampled).enumerate() {
        let (Some(g), Some(w)) = (g, w) else {
            if g.is_some() != w.is_some() {
                wrong += 1;
            }
            continue;
        };
        if g.token != w.token {
            eprintln!("  row {r}: GPU token {} vs CPU {}", g.token, w.token);
            wrong += 1;
            continue;
        }
        let close = |a: f32, b: f32| {
            (a.is_nan() && b.is_nan()) || ((a - b).abs() as f64) <= 1e-4 * (1.0 + b.abs() as f64)
        };
        if !close(g.logprob, w.logprob) {
            lp_err = lp_err.max((g.logprob - w.logprob).abs() as f64);
        }
        let same_top = g.rank == w.rank
            && g.top.len() == w.top.len()
            && g.top
                .iter()
                .zip(&w.top)
                .all(|(a, b)| a.0 == b.0 && close(a.1, b.1));
        top_wrong += usize::from(!same_top);
    }
    // Bits, not ==: the planted NaN must come back as it went.
    let (gpu_logits, cpu_logits) = (
        first_difference(&got.logits, &x),
        first_difference(&want.logits, &x),
    );
    let logits_exact = gpu_logits.is_none() && cpu_logits.is_none();
    let draws = params.iter().filter(|p| p.is_some()).count();
    let mut row = Row::at_most("sampling", "", "mismatches", wrong as f64, 0.0)
        .with_note(format!("{draws} rows"));
    if lp_err > 0.0 || top_wrong > 0 || !logits_exact {
        row = row.failing(format!(
            "logprob err {lp_err:.2e}, {top_wrong} top-k lists or ranks differ, logits returned: GPU {}, CPU {}",
            gpu_logits.as_deref().unwrap_or("exact"),
            cpu_logits.as_deref().unwrap_or("exact"),
        ));
    }
    Ok(row)
}

/// Where returned logits first differ from the input, bit for bit.
fn first_difference(l: &Option<Vec<f32>>, x: &[f32]) -> Option<String> {
    let Some(l) = l else {
        return Some("none returned".into());
    };
    if l.len() != x.len() {
        return Some(format!("{} values for {}", l.len(), x.len()));
    }
    let i = l
        .iter()
        .zip(x)
        .position(|(a, b)| a.to_bits() != b.to_bits())?;
    let n = l
        .iter()
        .zip(x)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    Some(format!(
        "{n} differ, first [{i}] {:#010x} for {:#010x}",
        l[i].to_bits(),
        x[i].to_bits()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returned_logits_compare_by_bits() {
        let x = [1.0, f32::NAN, f32::NEG_INFINITY];
        assert_eq!(first_difference(&Some(x.to_vec()), &x), None);
        let d = first_difference(&Some(vec![1.0, 0.0, f32::NEG_INFINITY]), &x).unwrap();
        assert!(d.starts_with("1 differ, first [1]"), "{d}");
        assert!(first_difference(&None, &x).is_some());
    }
}
