//! Launch wrapper of `sampling.cu`: one CTA per logits row.

use super::device::{Gpu, check_len};
use crate::cpu::{SampleParams, Sampled, rank_from_top, rank_of};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};

/// Most top log-probabilities one row reports (`MAX_TOP` in sampling.cu).
pub const MAX_TOP: usize = 64;

/// Up to this many rows whose rank the top list cannot tell are brought back
/// one by one; more, and the whole logits come back in one copy.
const RANK_ROWS_ALONE: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SampleRow {
    seed: u64,
    position: u64,
    inv_temp: f32,
    top_p: f32,
    top_k: u32,
    logprobs: u32,
    mode: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SampleOut {
    token: u32,
    logprob: f32,
    n_top: u32,
    pad: u32,
    top_id: [u32; MAX_TOP],
    top_lp: [f32; MAX_TOP],
}

impl Default for SampleOut {
    fn default() -> Self {
        SampleOut {
            token: 0,
            logprob: 0.0,
            n_top: 0,
            pad: 0,
            top_id: [0; MAX_TOP],
            top_lp: [0.0; MAX_TOP],
        }
    }
}

#[repr(C)]
struct SampleArgs {
    logits: u64,
    params: u64,
    out: u64,
    rows: u32,
    vocab: u32,
}

// SAFETY: `#[repr(C)]` mirrors of the structs in sampling.cu.
unsafe impl DeviceRepr for SampleRow {}
unsafe impl DeviceRepr for SampleOut {}
unsafe impl DeviceRepr for SampleArgs {}

fn row_of(p: &Option<SampleParams>) -> SampleRow {
    match p {
        None => SampleRow::default(),
        Some(p) => SampleRow {
            seed: p.seed,
            position: p.position,
            // The host's `1.0 / temperature`, so both sides scale alike.
            inv_temp: if p.is_greedy() {
                0.0
            } else {
                1.0 / p.temperature
            },
            top_p: p.top_p,
            top_k: p.top_k,
            logprobs: p.logprobs.min(MAX_TOP as u32),
            mode: if p.is_greedy() { 1 } else { 2 },
            pad: 0,
        },
    }
}

impl Gpu {
    /// Samples the rows of `logits` (`[rows, vocab]` f32) whose params are
    /// `Some`, as `crate::cpu::sample` does.
    pub fn sample(
        &self,
        logits: &CudaSlice<f32>,
        vocab: usize,
        params: &[Option<SampleParams>],
    ) -> Result<Vec<Option<Sampled>>> {
        self.sample_with(logits, vocab, params, || Ok(()))
    }

    /// [`Gpu::sample`], calling `launched` once the sampling kernel is
    /// issued and before its results are copied back (benchmarks mark the
    /// end of the device's work there).
    pub fn sample_with(
        &self,
        logits: &CudaSlice<f32>,
        vocab: usize,
        params: &[Option<SampleParams>],
        launched: impl FnOnce() -> Result<()>,
    ) -> Result<Vec<Option<Sampled>>> {
        let rows = params.len();
        if rows == 0 || params.iter().all(Option::is_none) {
            return Ok(vec![None; rows]);
        }
        check_len("sample logits", logits.len(), rows * vocab)?;
        if vocab == 0 || vocab > u32::MAX as usize / 2 || rows > i32::MAX as usize {
            return Err(Error::Unsupported(format!(
                "sampling {rows} rows of {vocab}"
            )));
        }
        let host_rows: Vec<SampleRow> = params.iter().map(row_of).collect();
        let dev_rows = self.upload(&host_rows)?;
        let out = self.alloc::<SampleOut>(rows)?;
        let a = SampleArgs {
            logits: self.ptr(logits),
            params: self.ptr(&dev_rows),
            out: self.ptr(&out),
            rows: rows as u32,
            vocab: vocab as u32,
        };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: logits hold rows x vocab f32 (checked), params and out
        // one entry per row; the kernel touches row blockIdx.x only.
        unsafe { self.launch("sample_f32", cfg, &a)? };
        launched()?;
        let outs = self.download(&out, rows)?;
        let mut sampled: Vec<Option<Sampled>> = params
            .iter()
            .zip(outs)
            .map(|(p, o)| {
                p.as_ref().map(|p| {
                    let top: Vec<(u32, f32)> = (0..(o.n_top as usize).min(MAX_TOP))
                        .map(|i| (o.top_id[i], o.top_lp[i]))
                        .collect();
                    Sampled {
                        token: o.token,
                        logprob: o.logprob,
                        rank: (p.logprobs > 0)
                            .then(|| rank_from_top(o.token, o.logprob, &top))
                            .flatten(),
                        top,
                    }
                })
            })
            .collect();
        // A rank the best tokens cannot tell (the token not among them, or
        // tied with one): counted on the host over the row, brought back
        // alone, or with every other row when many need it (one copy).
        let open: Vec<usize> = (0..rows)
            .filter(|&i| {
                params[i].is_some_and(|p| p.logprobs > 0)
                    && sampled[i].as_ref().is_some_and(|s| s.rank.is_none())
            })
            .collect();
        let all = if open.len() > RANK_ROWS_ALONE {
            Some(self.download(logits, rows * vocab)?)
        } else {
            None
        };
        for i in open {
            let row = match &all {
                Some(all) => all[i * vocab..(i + 1) * vocab].to_vec(),
                None => self.download_range(logits, i * vocab, vocab)?,
            };
            if let Some(s) = sampled[i].as_mut() {
                s.rank = Some(rank_of(&row, s.token));
            }
        }
        Ok(sampled)
    }
}
