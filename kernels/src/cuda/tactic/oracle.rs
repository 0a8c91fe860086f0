//! Launches of the `oracle_top_p` baseline (`tactic/oracle.cuh`): the
//! exact smallest set reaching `P` per query head, the union over the
//! group, left in the workspace as a selection that [`Gpu::tactic_attend`]
//! and [`Gpu::tactic_measure`] read as they read Tactic's.

use super::select::{SelProblem, check_queries, job_in_step};
use super::{TacticShape, TacticWorkspace, bases, u32_of};
use crate::cuda::device::Gpu;
use crate::cuda::kv::KvCache;
use crate::cuda::step::DeviceStep;
use crate::error::{Error, Result};
use crate::tactic::layout::StateLayout;
use cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig};

/// `ORACLE_THREADS`, `ORACLE_SORT_THREADS` (tactic/oracle.cuh).
const ORACLE_THREADS: usize = 256;
const ORACLE_SORT_THREADS: usize = 1024;
/// Longest sort done in shared memory (32 KiB of keys).
const SORT_SMEM: usize = 4096;

/// One (sequence, KV head) at a decode step under `oracle_top_p`.
#[derive(Debug, Clone, Copy)]
pub struct OracleJob {
    pub head: usize,
    /// The sequence's decode row in the step.
    pub row: usize,
    /// Tokens cached, this step's included.
    pub ctx_len: usize,
    /// Target mass.
    pub p: f32,
}

#[repr(C)]
struct OracleParams {
    probs: u64,
    qkv: u64,
    k: u64,
    table_off: u64,
    tables: u64,
    scores: u64,
    keys: u64,
    bitmap: u64,
    list: u64,
    list_len: u64,
    problems: u32,
    qkv_stride: u32,
    kv_heads: u32,
    d: u32,
    group: u32,
    sort_smem: u32,
}

// SAFETY: a `#[repr(C)]` mirror of `OracleParams` in tactic/oracle.cuh
// (ten u64, then six u32: no padding).
unsafe impl DeviceRepr for OracleParams {}

/// Each job as a problem without a state, with its part of the scratch:
/// G x kpow scores and keys, ctx list slots, ctx / 32 bitmap words. The
/// totals are `[keys, list, words]`.
fn problems(jobs: &[OracleJob], shape: &TacticShape) -> Result<(Vec<SelProblem>, [usize; 3])> {
    let g = shape.group;
    let kpow = |j: &OracleJob| j.ctx_len.max(1).next_power_of_two();
    let (kbase, k_n) = bases(jobs.iter().map(|j| g * kpow(j)));
    let (lbase, l_n) = bases(jobs.iter().map(|j| j.ctx_len));
    let (wbase, w_n) = bases(jobs.iter().map(|j| j.ctx_len.div_ceil(32)));
    // The attention reads the head size from the layout; no state.
    let lay = StateLayout::new(shape.kv_heads, shape.head_dim, 0, 0);
    let probs = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| {
            Ok(SelProblem {
                state: 0,
                lay,
                head: j.head as u32,
                row: j.row as u32,
                ctx_len: u32_of(j.ctx_len, "context")?,
                cbase: 0,
                kbase: u32_of(kbase[i], "oracle sort keys")?,
                kpow: u32_of(kpow(j), "oracle sort")?,
                tbase: 0,
                lbase: u32_of(lbase[i], "oracle lists")?,
                wbase: u32_of(wbase[i], "oracle bitmaps")?,
                tkbase: 0,
                p: j.p,
                margin: 1.0,
            })
        })
        .collect::<Result<_>>()?;
    Ok((probs, [k_n, l_n, w_n]))
}

impl Gpu {
    /// Selects, for each job's KV head, the union over its query heads of
    /// the smallest sets reaching `P` (`oracle_top_p` on the CPU, ties by
    /// slot): left in `ws` for [`Gpu::tactic_attend`]. `qkv` as for
    /// [`Gpu::tactic_select`].
    #[allow(clippy::too_many_arguments)]
    pub fn tactic_oracle(
        &self,
        ws: &mut TacticWorkspace,
        step: &DeviceStep,
        qkv: &impl DevicePtr<f32>,
        qkv_stride: usize,
        kv: &KvCache,
        layer: usize,
        shape: &TacticShape,
        jobs: &[OracleJob],
    ) -> Result<()> {
        ws.sel_count = 0;
        if jobs.is_empty() {
            return Ok(());
        }
        shape.check()?;
        let (g, d) = (shape.group, shape.head_dim);
        check_queries("tactic_oracle qkv", qkv.len(), qkv_stride, shape, step)?;
        for j in jobs {
            if !job_in_step(j.head, j.row, j.ctx_len, shape, step) {
                return Err(Error::Shape(format!(
                    "oracle selection of head {} at row {} over {} tokens",
                    j.head, j.row, j.ctx_len
                )));
            }
        }
        let (probs, [k_n, l_n, w_n]) = problems(jobs, shape)?;
        let np = jobs.len();
        let probs_dev = self.upload(&probs)?;
        let (k_ptr, _) = kv.layer_ptrs(self, layer)?;
        let p = OracleParams {
            probs: self.ptr(&probs_dev),
            qkv: self.ptr(qkv),
            k: k_ptr,
            table_off: step.table_off(self),
            tables: step.tables(self),
            scores: ws.oracle_scores.at_least(self, k_n)?,
            keys: ws.keys.at_least(self, k_n)?,
            bitmap: ws.bitmap.at_least(self, w_n)?,
            list: ws.list.at_least(self, l_n)?,
            list_len: ws.list_len.at_least(self, np)?,
            problems: np as u32,
            qkv_stride: qkv_stride as u32,
            kv_heads: shape.kv_heads as u32,
            d: d as u32,
            group: g as u32,
            sort_smem: SORT_SMEM as u32,
        };
        let max_kpow = probs.iter().map(|p| p.kpow as usize).max().unwrap_or(1);
        let cfg = |grid: (usize, usize, usize), threads: usize, smem: usize| LaunchConfig {
            grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let scores = cfg(
            (max_kpow.div_ceil(ORACLE_THREADS), g, np),
            ORACLE_THREADS,
            0,
        );
        // SAFETY (every launch below): each job's row lies in the step and
        // its key count is the context (checked), its query heads lie in
        // the rows of `qkv`; the scratch holds the plan's sums (G x kpow
        // scores and keys, ctx list slots, ctx / 32 bitmap words per
        // problem, kpow a power of two covering the context); D is a head
        // size the kernels serve; the take kernel runs a warp per query
        // head (G <= 8).
        unsafe {
            self.launch("tactic_oracle_scores_bf16", scores, &p)?;
        }
        self.tactic_sort_keys(p.probs, p.keys, g, np, max_kpow)?;
        // SAFETY: as above.
        unsafe { self.launch("tactic_oracle_take_f64", cfg((np, 1, 1), 32 * g, 0), &p)? };
        ws.sel_probs = Some(probs_dev);
        ws.sel_count = np;
        Ok(())
    }
}

impl Gpu {
    /// Sorts each problem's `G x kpow` keys at `kbase` ascending
    /// (`tactic_oracle_sort_u64`, which reads only the problems, the keys
    /// and the shared-memory limit); `max_kpow` is the longest sort.
    pub(super) fn tactic_sort_keys(
        &self,
        probs: u64,
        keys: u64,
        g: usize,
        np: usize,
        max_kpow: usize,
    ) -> Result<()> {
        let p = OracleParams {
            probs,
            qkv: 0,
            k: 0,
            table_off: 0,
            tables: 0,
            scores: 0,
            keys,
            bitmap: 0,
            list: 0,
            list_len: 0,
            problems: np as u32,
            qkv_stride: 0,
            kv_heads: 0,
            d: 0,
            group: g as u32,
            sort_smem: SORT_SMEM as u32,
        };
        let cfg = LaunchConfig {
            grid_dim: (g as u32, np as u32, 1),
            block_dim: (ORACLE_SORT_THREADS as u32, 1, 1),
            shared_mem_bytes: (8 * max_kpow.min(SORT_SMEM)) as u32,
        };
        // SAFETY: `probs` holds `np` problems whose `kbase`/`kpow` (a power
        // of two, at most `max_kpow`) lie inside the `keys` allocation,
        // G x kpow each; the shared memory holds the longest sort kept there.
        unsafe { self.launch("tactic_oracle_sort_u64", cfg, &p) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_oracle_problem_gets_its_own_part_of_the_scratch() {
        let job = |ctx| OracleJob {
            head: 1,
            row: 0,
            ctx_len: ctx,
            p: 0.9,
        };
        let shape = TacticShape {
            kv_heads: 2,
            head_dim: 64,
            group: 3,
        };
        let (p, totals) = problems(&[job(100), job(1), job(33)], &shape).unwrap();
        assert_eq!(p.iter().map(|p| p.kpow).collect::<Vec<_>>(), [128, 1, 64]);
        assert_eq!(p.iter().map(|p| p.kbase).collect::<Vec<_>>(), [0, 384, 387]);
        assert_eq!(p.iter().map(|p| p.lbase).collect::<Vec<_>>(), [0, 100, 101]);
        assert_eq!(p.iter().map(|p| p.wbase).collect::<Vec<_>>(), [0, 4, 5]);
        assert_eq!(totals, [579, 134, 7]);
        assert!(p.iter().all(|p| p.state == 0 && p.lay.head_dim == 64));
    }
}
