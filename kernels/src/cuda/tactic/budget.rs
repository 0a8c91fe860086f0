//! Launches of the `fixed_budget` baseline (`tactic/budget.cuh`): Quest's
//! page bounds, each query head's page order, the round-robin up to the
//! budget, left in the workspace as a selection that
//! [`Gpu::tactic_attend`] and [`Gpu::tactic_measure`] read.

use super::select::{SelProblem, check_queries, job_in_step};
use super::{TacticShape, TacticWorkspace, bases, u32_of};
use crate::cuda::device::Gpu;
use crate::cuda::kv::KvCache;
use crate::cuda::step::DeviceStep;
use crate::error::{Error, Result};
use crate::tactic::layout::StateLayout;
use cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig};

/// `BUDGET_THREADS` (tactic/budget.cuh); pages are cache blocks.
const BUDGET_THREADS: usize = 128;
const PAGE: usize = 16;

/// One (sequence, KV head) at a decode step under `fixed_budget`.
#[derive(Debug, Clone, Copy)]
pub struct BudgetJob {
    pub head: usize,
    /// The sequence's decode row in the step.
    pub row: usize,
    /// Tokens cached, this step's included.
    pub ctx_len: usize,
    /// Tokens to select (the new ones count against it).
    pub tokens: usize,
}

#[repr(C)]
struct BudgetParams {
    probs: u64,
    qkv: u64,
    k: u64,
    table_off: u64,
    tables: u64,
    budget: u64,
    keys: u64,
    taken: u64,
    bitmap: u64,
    list: u64,
    list_len: u64,
    problems: u32,
    qkv_stride: u32,
    kv_heads: u32,
    d: u32,
    group: u32,
    pad: u32,
}

// SAFETY: a `#[repr(C)]` mirror of `BudgetParams` in tactic/budget.cuh
// (eleven u64, then six u32: no padding).
unsafe impl DeviceRepr for BudgetParams {}

/// Each job as a problem without a state, with its part of the scratch:
/// G x kpow page keys (kpow: the full pages rounded up to a power of two),
/// a taken word per 32 pages, ctx list slots, ctx / 32 bitmap words. The
/// totals are `[keys, taken, list, words]`.
fn problems(jobs: &[BudgetJob], shape: &TacticShape) -> Result<(Vec<SelProblem>, [usize; 4])> {
    let g = shape.group;
    let kpow = |j: &BudgetJob| (j.ctx_len / PAGE).max(1).next_power_of_two();
    let (kbase, k_n) = bases(jobs.iter().map(|j| g * kpow(j)));
    let (tkbase, tk_n) = bases(jobs.iter().map(|j| (j.ctx_len / PAGE).div_ceil(32)));
    let (lbase, l_n) = bases(jobs.iter().map(|j| j.ctx_len));
    let (wbase, w_n) = bases(jobs.iter().map(|j| j.ctx_len.div_ceil(32)));
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
                kbase: u32_of(kbase[i], "page sort keys")?,
                kpow: u32_of(kpow(j), "page sort")?,
                tbase: 0,
                lbase: u32_of(lbase[i], "budget lists")?,
                wbase: u32_of(wbase[i], "budget bitmaps")?,
                tkbase: u32_of(tkbase[i], "pages taken")?,
                p: 0.0,
                margin: 1.0,
            })
        })
        .collect::<Result<_>>()?;
    Ok((probs, [k_n, tk_n, l_n, w_n]))
}

impl Gpu {
    /// Selects, for each job's KV head, Quest's pages up to its token
    /// budget (`tactic::fixed_budget` on the CPU: the new tokens first,
    /// then pages round-robin over the group's orders of page bound, ties
    /// by page): left in `ws` for [`Gpu::tactic_attend`]. `qkv` as for
    /// [`Gpu::tactic_select`].
    #[allow(clippy::too_many_arguments)]
    pub fn tactic_budget(
        &self,
        ws: &mut TacticWorkspace,
        step: &DeviceStep,
        qkv: &impl DevicePtr<f32>,
        qkv_stride: usize,
        kv: &KvCache,
        layer: usize,
        shape: &TacticShape,
        jobs: &[BudgetJob],
    ) -> Result<()> {
        ws.sel_count = 0;
        if jobs.is_empty() {
            return Ok(());
        }
        shape.check()?;
        let (g, d) = (shape.group, shape.head_dim);
        check_queries("tactic_budget qkv", qkv.len(), qkv_stride, shape, step)?;
        for j in jobs {
            let ok = job_in_step(j.head, j.row, j.ctx_len, shape, step)
                && u32::try_from(j.tokens).is_ok();
            if !ok {
                return Err(Error::Shape(format!(
                    "fixed_budget selection of head {} at row {} over {} tokens",
                    j.head, j.row, j.ctx_len
                )));
            }
        }
        let (probs, [k_n, tk_n, l_n, w_n]) = problems(jobs, shape)?;
        let np = jobs.len();
        let probs_dev = self.upload(&probs)?;
        let budget: Vec<u32> = jobs.iter().map(|j| j.tokens as u32).collect();
        let budget_dev = self.upload(&budget)?;
        let (k_ptr, _) = kv.layer_ptrs(self, layer)?;
        let p = BudgetParams {
            probs: self.ptr(&probs_dev),
            qkv: self.ptr(qkv),
            k: k_ptr,
            table_off: step.table_off(self),
            tables: step.tables(self),
            budget: self.ptr(&budget_dev),
            keys: ws.keys.at_least(self, k_n)?,
            taken: ws.taken.at_least(self, tk_n)?,
            bitmap: ws.bitmap.at_least(self, w_n)?,
            list: ws.list.at_least(self, l_n)?,
            list_len: ws.list_len.at_least(self, np)?,
            problems: np as u32,
            qkv_stride: qkv_stride as u32,
            kv_heads: shape.kv_heads as u32,
            d: d as u32,
            group: g as u32,
            pad: 0,
        };
        let max_kpow = probs.iter().map(|p| p.kpow as usize).max().unwrap_or(1);
        let cfg = |grid: (usize, usize), smem: usize| LaunchConfig {
            grid_dim: (grid.0 as u32, grid.1 as u32, 1),
            block_dim: (BUDGET_THREADS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY (every launch below): each job's row lies in the step and
        // its key count is the context (checked), its query heads lie in
        // the rows of `qkv`; the scratch holds the plan's sums (G x kpow
        // page keys with kpow a power of two covering the full pages, a
        // taken word per 32 pages, ctx list slots and ctx / 32 bitmap
        // words per problem); `budget` holds a count per problem; D is a
        // head size the kernels serve, G at most 8.
        unsafe { self.launch("tactic_budget_bounds_bf16", cfg((max_kpow, np), 0), &p)? };
        self.tactic_sort_keys(p.probs, p.keys, g, np, max_kpow)?;
        // SAFETY: as above.
        unsafe { self.launch("tactic_budget_take_u32", cfg((np, 1), 0), &p)? };
        // The buffers the kernels read are freed in stream order.
        drop(budget_dev);
        ws.sel_probs = Some(probs_dev);
        ws.sel_count = np;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_budget_problem_gets_its_own_part_of_the_scratch() {
        let job = |ctx| BudgetJob {
            head: 0,
            row: 0,
            ctx_len: ctx,
            tokens: 64,
        };
        let shape = TacticShape {
            kv_heads: 1,
            head_dim: 64,
            group: 2,
        };
        let (p, totals) = problems(&[job(100), job(15), job(16 * 40)], &shape).unwrap();
        // 6 full pages -> 8; none -> 1; 40 -> 64.
        assert_eq!(p.iter().map(|p| p.kpow).collect::<Vec<_>>(), [8, 1, 64]);
        assert_eq!(p.iter().map(|p| p.kbase).collect::<Vec<_>>(), [0, 16, 18]);
        assert_eq!(p.iter().map(|p| p.tkbase).collect::<Vec<_>>(), [0, 1, 1]);
        assert_eq!(totals, [146, 3, 755, 25]);
    }
}
