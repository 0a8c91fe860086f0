//! GPU benchmarks behind hidden `tacflowd` subcommands (bench/RESULTS.md): each
//! reports against a ceiling measured in the same run, prints a table last
//! and can write its numbers as JSON for `bench/*/run.py`, which adds the
//! peer library (torch) measured in the same device call.
//!
//! | benchmark | file |
//! | --- | --- |
//! | paged decode attention vs the copy bandwidth (`bench-attention`) | [`attention`] |
//! | a whole decode step of a Llama-3-8B-shaped model (`bench-decode`) | [`decode`] |
//! | prefill attention: the decode kernel against the tensor-core prefill kernel (`bench-prefill`) | [`prefill`] |
//! | the subcommands' arguments and dispatch (hidden, flattened into `tacflowd`'s) | [`cli`] |
//! | Tactic's device path (CPU or CUDA) vs full attention, batches, controlled or captured keys (`bench-tactic`) | [`tactic`] |

pub mod attention;
pub mod cli;
pub mod decode;
pub mod prefill;
pub mod tactic;

use crate::error::{Error, Result};
use half::bf16;
use tacflow_kernels::cuda::{CudaSlice, Gpu};
use tacflow_kernels::rng::bits;

/// Median, 10th and 90th percentile of `v` (sorted in place).
pub fn quantiles(v: &mut [f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.1), at(0.9))
}

/// Times `reps` calls of `f` (given the call's index) one by one, CUDA
/// events around each: the microseconds of each.
pub fn time_each<E>(
    gpu: &Gpu,
    reps: usize,
    mut f: impl FnMut(usize) -> std::result::Result<(), E>,
) -> Result<Vec<f64>>
where
    crate::error::Error: From<E>,
{
    let spans = (0..reps)
        .map(|_| gpu.span())
        .collect::<Result<Vec<_>, _>>()?;
    for (i, s) in spans.iter().enumerate() {
        s.start(gpu)?;
        f(i)?;
        s.stop(gpu)?;
    }
    spans.iter().map(|s| Ok(s.ms()? * 1e3)).collect()
}

/// The device-to-device copy bandwidth, bytes read plus written per second:
/// a copy of `bytes` (at least 1 GiB to measure HBM, not L2), median of
/// `reps` after a warm-up. Returns (median, all samples) in bytes/s.
pub fn copy_bandwidth(gpu: &Gpu, bytes: usize, reps: usize) -> Result<(f64, Vec<f64>)> {
    let n = bytes / 2;
    let mut src: CudaSlice<bf16> = gpu.alloc(n)?;
    gpu.random_bf16(&mut src, n, 0x7ac7, 1, 0.0, 1.0)?;
    let mut dst: CudaSlice<bf16> = gpu.alloc(n)?;
    for _ in 0..3 {
        gpu.copy_d2d(&src, &mut dst)?;
    }
    let mut rates: Vec<f64> = time_each(gpu, reps, |_| gpu.copy_d2d(&src, &mut dst))?
        .into_iter()
        .map(|us| 2.0 * (2 * n) as f64 / (us * 1e-6))
        .collect();
    let all = rates.clone();
    Ok((quantiles(&mut rates).0, all))
}

/// The read bandwidth: every byte of a `bytes` buffer read once by
/// `read_ceiling`, median of `reps`. Returns (median, all samples) in
/// bytes/s.
pub fn read_bandwidth(gpu: &Gpu, bytes: usize, reps: usize) -> Result<(f64, Vec<f64>)> {
    let n = bytes / 2;
    let mut src: CudaSlice<bf16> = gpu.alloc(n)?;
    gpu.random_bf16(&mut src, n, 0x7ac7, 2, 0.0, 1.0)?;
    let mut sink: CudaSlice<f32> = gpu.alloc(1)?;
    for _ in 0..3 {
        gpu.read_all(&src, &mut sink)?;
    }
    let mut rates: Vec<f64> = time_each(gpu, reps, |_| gpu.read_all(&src, &mut sink))?
        .into_iter()
        .map(|us| (2 * n) as f64 / (us * 1e-6))
        .collect();
    let all = rates.clone();
    Ok((quantiles(&mut rates).0, all))
}

/// A random permutation of `0..n` (seeded Fisher-Yates).
pub fn shuffled(n: usize, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = (bits(seed, 77, i as u64) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// The card in words, as `nvidia-smi` would not tell a log reader the
/// kernel's view.
pub fn device_line(gpu: &Gpu) -> String {
    let i = gpu.info();
    format!(
        "{} ({}, {} SMs, {:.1} GiB)",
        i.name,
        i.arch,
        i.sm_count,
        i.total_memory as f64 / (1u64 << 30) as f64
    )
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &std::path::Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Backend(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| Error::Backend(format!("{}: {e}", path.display())))
}
