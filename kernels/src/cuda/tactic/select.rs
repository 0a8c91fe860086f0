//! Launches of the selection (`tactic/select.cuh`, `tactic/union.cuh`) and
//! of the sparse attention over it (`tactic/sparse.cuh`).

use super::{TacticShape, TacticWorkspace, bases, check_layout, u32_of};
use crate::cuda::device::{Gpu, check_len, ready_shared_memory};
use crate::cuda::kv::KvCache;
use crate::cuda::step::DeviceStep;
use crate::error::{Error, Result};
use crate::tactic::layout::StateLayout;
use cudarc::driver::{CudaFunction, CudaViewMut, DevicePtr, DeviceRepr, LaunchConfig};
use std::collections::HashMap;

/// `SEL_THREADS`, `RANK_THREADS`, `UNION_WARPS` (tactic/select.cuh) and
/// `SPARSE_WARPS` (tactic/sparse.cuh).
const SEL_THREADS: usize = 128;
const RANK_THREADS: usize = 1024;
const UNION_WARPS: usize = crate::tactic::union::UNION_CHUNK;
const SPARSE_WARPS: usize = 4;
/// Longest sort done in shared memory (64 KiB of keys: 8192 clusters, a
/// 131072-token context at 16 a cluster); longer ones sort in place in
/// global memory, with a barrier's wait on L2 between every two passes.
const SORT_SMEM: usize = 8192;
/// CTAs the sparse attention aims for (a few waves of an H100/H200), and
/// the fewest selected slots worth a split of their own.
const SPARSE_TARGET_CTAS: usize = 1056;
const SPARSE_MIN_SPLIT: usize = 64;
const MAX_SPLITS: usize = 64;

/// One (sequence, KV head) at a decode step: select on its state, attend
/// the selection.
#[derive(Debug, Clone, Copy)]
pub struct SelectJob {
    pub state: u64,
    pub layout: StateLayout,
    pub head: usize,
    /// The sequence's decode row in the step.
    pub row: usize,
    /// Tokens cached, this step's included.
    pub ctx_len: usize,
    /// Target mass and margin (`TacticParams`).
    pub p: f32,
    pub margin: f32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct SelProblem {
    pub(super) state: u64,
    pub(super) lay: StateLayout,
    pub(super) head: u32,
    pub(super) row: u32,
    pub(super) ctx_len: u32,
    pub(super) cbase: u32,
    pub(super) kbase: u32,
    pub(super) kpow: u32,
    pub(super) tbase: u32,
    pub(super) lbase: u32,
    pub(super) wbase: u32,
    pub(super) tkbase: u32,
    pub(super) p: f32,
    pub(super) margin: f32,
}

#[repr(C)]
struct SelParams {
    probs: u64,
    qkv: u64,
    k: u64,
    table_off: u64,
    tables: u64,
    qs: u64,
    qvar: u64,
    refs: u64,
    lest: u64,
    keys: u64,
    tail: u64,
    bitmap: u64,
    taken: u64,
    list: u64,
    list_len: u64,
    est: u64,
    problems: u32,
    qkv_stride: u32,
    kv_heads: u32,
    d: u32,
    group: u32,
    sort_smem: u32,
}

#[repr(C)]
struct SparseParams {
    probs: u64,
    qkv: u64,
    k: u64,
    v: u64,
    table_off: u64,
    tables: u64,
    list: u64,
    list_len: u64,
    part_acc: u64,
    part_ml: u64,
    out: u64,
    problems: u32,
    qkv_stride: u32,
    kv_heads: u32,
    group: u32,
    splits: u32,
    out_row0: u32,
    out_stride: u32,
    pad: u32,
}

// SAFETY: `#[repr(C)]` mirrors of the structs in tactic/select.cuh and
// tactic/sparse.cuh.
unsafe impl DeviceRepr for SelProblem {}
unsafe impl DeviceRepr for SelParams {}
unsafe impl DeviceRepr for SparseParams {}

/// A selection brought back to the host (the self-check compares it with
/// the CPU's): per job, its slots in ascending order and each query
/// head's estimated mass.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionHost {
    pub slots: Vec<Vec<u32>>,
    pub est_mass: Vec<Vec<f32>>,
}

/// Each job's part of the selection scratch.
fn problems(jobs: &[SelectJob], g: usize) -> Result<(Vec<SelProblem>, [usize; 6])> {
    let tail = |j: &SelectJob| j.ctx_len - j.layout.len as usize;
    let kpow = |j: &SelectJob| (j.layout.cap as usize).max(1).next_power_of_two();
    let (cbase, c_n) = bases(jobs.iter().map(|j| g * j.layout.cap as usize));
    let (kbase, k_n) = bases(jobs.iter().map(|j| g * kpow(j)));
    let (tbase, t_n) = bases(jobs.iter().map(|j| g * tail(j)));
    let (lbase, l_n) = bases(jobs.iter().map(|j| j.ctx_len));
    let (wbase, w_n) = bases(jobs.iter().map(|j| j.ctx_len.div_ceil(32)));
    let (tkbase, tk_n) = bases(jobs.iter().map(|j| (j.layout.cap as usize).div_ceil(32)));
    let probs = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| {
            Ok(SelProblem {
                state: j.state,
                lay: j.layout,
                head: j.head as u32,
                row: j.row as u32,
                ctx_len: u32_of(j.ctx_len, "context")?,
                cbase: u32_of(cbase[i], "Tactic estimates")?,
                kbase: u32_of(kbase[i], "Tactic rank keys")?,
                kpow: u32_of(kpow(j), "Tactic sort")?,
                tbase: u32_of(tbase[i], "Tactic tail")?,
                lbase: u32_of(lbase[i], "Tactic lists")?,
                wbase: u32_of(wbase[i], "Tactic bitmaps")?,
                tkbase: u32_of(tkbase[i], "Tactic taken")?,
                p: j.p,
                margin: j.margin,
            })
        })
        .collect::<Result<_>>()?;
    Ok((probs, [c_n, k_n, t_n, l_n, w_n, tk_n]))
}

fn check_job(j: &SelectJob, shape: &TacticShape, step: &DeviceStep) -> Result<()> {
    check_layout(&j.layout, shape)?;
    let ok =
        job_in_step(j.head, j.row, j.ctx_len, shape, step) && j.ctx_len > j.layout.len as usize;
    if !ok {
        return Err(Error::Shape(format!(
            "Tactic selection of head {} at row {} over {} tokens, {} clustered",
            j.head, j.row, j.ctx_len, j.layout.len
        )));
    }
    Ok(())
}

/// Whether a decode job's KV head and row lie in the step and its context
/// is that row's key count (what every selection launch checks of its
/// jobs before their kernels index the step by them).
pub(super) fn job_in_step(
    head: usize,
    row: usize,
    ctx_len: usize,
    shape: &TacticShape,
    step: &DeviceStep,
) -> bool {
    head < shape.kv_heads && row < step.rows && ctx_len >= 1 && ctx_len == step.kv_len[row] as usize
}

/// The launch's fused rows hold the step's rows, `qkv_stride` wide, with
/// every KV head's query heads inside a row (the selections and their
/// diagnostics read q from them).
pub(super) fn check_queries(
    what: &str,
    qkv_len: usize,
    qkv_stride: usize,
    shape: &TacticShape,
    step: &DeviceStep,
) -> Result<()> {
    check_len(what, qkv_len, step.rows * qkv_stride)?;
    if shape.kv_heads * shape.group * shape.head_dim > qkv_stride {
        return Err(Error::Shape(format!(
            "{what}: query heads overflow the rows"
        )));
    }
    Ok(())
}

/// Raises the rank kernel's dynamic shared-memory limit to its longest
/// sort in shared memory (past the 48 KiB a launch gets unasked).
pub(crate) fn rank_shared_memory(funcs: &HashMap<String, CudaFunction>) -> Result<()> {
    const NAME: &str = "tactic_sel_rank_u64";
    if let Some(f) = funcs.get(NAME) {
        ready_shared_memory(f, NAME, RANK_THREADS, 8 * SORT_SMEM)?;
    }
    Ok(())
}

/// Splits of the sparse attention: enough CTAs for a few waves over all
/// problems, none shorter than `SPARSE_MIN_SPLIT` of the longest context.
fn splits_for(problems: usize, max_ctx: usize) -> usize {
    let want = SPARSE_TARGET_CTAS.div_ceil(problems.max(1));
    want.min(max_ctx.div_ceil(SPARSE_MIN_SPLIT))
        .clamp(1, MAX_SPLITS)
}

impl Gpu {
    /// Selects the slots each job's KV head attends at this decode step
    /// (`select_group` on the CPU, in the chunked formulation of
    /// `tactic::union`): they stay in `ws` for [`Gpu::tactic_attend`].
    /// `qkv` is the step's fused rows from row 0, `qkv_stride` wide, with
    /// the query heads of KV head `h` at columns `h * group * D..`.
    #[allow(clippy::too_many_arguments)]
    pub fn tactic_select(
        &self,
        ws: &mut TacticWorkspace,
        step: &DeviceStep,
        qkv: &impl DevicePtr<f32>,
        qkv_stride: usize,
        kv: &KvCache,
        layer: usize,
        shape: &TacticShape,
        jobs: &[SelectJob],
    ) -> Result<()> {
        ws.sel_count = 0;
        if jobs.is_empty() {
            return Ok(());
        }
        shape.check()?;
        let (g, d) = (shape.group, shape.head_dim);
        check_queries("tactic_select qkv", qkv.len(), qkv_stride, shape, step)?;
        for j in jobs {
            check_job(j, shape, step)?;
        }
        let (probs, [c_n, k_n, t_n, l_n, w_n, tk_n]) = problems(jobs, g)?;
        let np = jobs.len();
        let probs_dev = self.upload(&probs)?;
        let (k_ptr, _) = kv.layer_ptrs(self, layer)?;
        let p = SelParams {
            probs: self.ptr(&probs_dev),
            qkv: self.ptr(qkv),
            k: k_ptr,
            table_off: step.table_off(self),
            tables: step.tables(self),
            qs: ws.qs.at_least(self, np * g * d)?,
            qvar: ws.qvar.at_least(self, np * g)?,
            refs: ws.refs.at_least(self, np * g)?,
            lest: ws.lest.at_least(self, c_n)?,
            keys: ws.keys.at_least(self, k_n)?,
            tail: ws.tail.at_least(self, t_n)?,
            bitmap: ws.bitmap.at_least(self, w_n)?,
            taken: ws.taken.at_least(self, tk_n)?,
            list: ws.list.at_least(self, l_n)?,
            list_len: ws.list_len.at_least(self, np)?,
            est: ws.est.at_least(self, np * g)?,
            problems: np as u32,
            qkv_stride: qkv_stride as u32,
            kv_heads: shape.kv_heads as u32,
            d: d as u32,
            group: g as u32,
            sort_smem: SORT_SMEM as u32,
        };
        let max_kpow = probs.iter().map(|p| p.kpow as usize).max().unwrap_or(1);
        let cfg = |grid: (usize, usize, usize), threads: usize, smem: usize| LaunchConfig {
            grid_dim: (grid.0.max(1) as u32, grid.1 as u32, grid.2 as u32),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY (every launch below): each problem's state holds its
        // layout (checked against the model), has clustered fewer slots
        // than its context, and its row's key count is the context; the
        // query heads of its KV head lie inside the rows of `qkv`; the
        // scratch holds the sums the plan gave (G x cap estimates, G x
        // kpow rank keys, G x tail scores, ctx list slots and ctx / 32
        // bitmap words, cap / 32 taken words, per problem); D is one of
        // the head sizes the kernels serve (a multiple of 32, at most 256).
        unsafe {
            self.launch("tactic_sel_prep_bf16", cfg((g, np, 1), SEL_THREADS, 0), &p)?;
            let score = cfg((max_kpow.div_ceil(SEL_THREADS), g, np), SEL_THREADS, 0);
            self.launch("tactic_sel_score_f32", score, &p)?;
            let smem = 8 * max_kpow.min(SORT_SMEM);
            self.launch(
                "tactic_sel_rank_u64",
                cfg((g, np, 1), RANK_THREADS, smem),
                &p,
            )?;
            self.launch(
                "tactic_sel_union_bf16",
                cfg((np, 1, 1), 32 * UNION_WARPS, 0),
                &p,
            )?;
        }
        ws.sel_probs = Some(probs_dev);
        ws.sel_count = np;
        Ok(())
    }

    /// Attention of each job's query heads over the slots the last
    /// [`Gpu::tactic_select`] chose (the same jobs), written to `out`:
    /// rows `out_row0..` of an output `out_stride` wide (query head `q` at
    /// columns `q * D..`).
    #[allow(clippy::too_many_arguments)]
    pub fn tactic_attend(
        &self,
        ws: &mut TacticWorkspace,
        step: &DeviceStep,
        qkv: &impl DevicePtr<f32>,
        qkv_stride: usize,
        kv: &KvCache,
        layer: usize,
        shape: &TacticShape,
        jobs: &[SelectJob],
        out: &mut CudaViewMut<'_, f32>,
        out_row0: usize,
        out_stride: usize,
    ) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        if ws.sel_count != jobs.len() {
            return Err(Error::Shape(format!(
                "Tactic attention over {} jobs after a selection of {}",
                jobs.len(),
                ws.sel_count
            )));
        }
        let (g, d, np) = (shape.group, shape.head_dim, jobs.len());
        let last_row = jobs.iter().map(|j| j.row).max().unwrap_or(0);
        let first_row = jobs.iter().map(|j| j.row).min().unwrap_or(0);
        if first_row < out_row0 || shape.kv_heads * g * d > out_stride {
            return Err(Error::Shape("Tactic attention: output rows".into()));
        }
        check_len(
            "tactic_attend out",
            out.len(),
            (last_row + 1 - out_row0) * out_stride,
        )?;
        check_len("tactic_attend qkv", qkv.len(), step.rows * qkv_stride)?;
        let max_ctx = jobs.iter().map(|j| j.ctx_len).max().unwrap_or(1);
        let splits = splits_for(np, max_ctx);
        let (k_ptr, v_ptr) = kv.layer_ptrs(self, layer)?;
        let probs = ws.sel_probs.as_ref().expect("set with sel_count");
        let p = SparseParams {
            probs: self.ptr(probs),
            qkv: self.ptr(qkv),
            k: k_ptr,
            v: v_ptr,
            table_off: step.table_off(self),
            tables: step.tables(self),
            list: self.ptr(ws.list.get()?),
            list_len: self.ptr(ws.list_len.get()?),
            part_acc: ws.part_acc.at_least(self, np * splits * g * d)?,
            part_ml: ws.part_ml.at_least(self, np * splits * g * 2)?,
            out: self.ptr_mut(out),
            problems: np as u32,
            qkv_stride: qkv_stride as u32,
            kv_heads: shape.kv_heads as u32,
            group: g as u32,
            splits: splits as u32,
            out_row0: out_row0 as u32,
            out_stride: out_stride as u32,
            pad: 0,
        };
        let kernel = format!("tactic_attention_d{d}_bf16");
        let cta = LaunchConfig {
            grid_dim: (splits as u32, np as u32, 1),
            block_dim: (32 * SPARSE_WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let merge = LaunchConfig {
            grid_dim: (g as u32, np as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the problems and lists are the last selection's, over
        // the same jobs (counted above), each list inside its context's
        // slots; the partials hold problems x splits x G x (D + 2) floats;
        // every job's row lies in the output view (checked), whose rows
        // are `out_stride` wide with this KV head's query heads inside.
        unsafe {
            self.launch(&kernel, cta, &p)?;
            self.launch("tactic_attention_merge_f32", merge, &p)
        }
    }

    /// The last selection's slots on the host (self-check), per job of
    /// context `ctx_lens[i]`: any selection's, a baseline's included.
    pub fn tactic_slots_to_host(
        &self,
        ws: &TacticWorkspace,
        ctx_lens: &[usize],
    ) -> Result<Vec<Vec<u32>>> {
        let np = ctx_lens.len();
        if ws.sel_count != np {
            return Err(Error::Shape("no selection of these jobs to read".into()));
        }
        let lens = self.download(ws.list_len.get()?, np)?;
        let (lbase, total) = bases(ctx_lens.iter().copied());
        let list = self.download(ws.list.get()?, total)?;
        Ok((0..np)
            .map(|i| list[lbase[i]..lbase[i] + lens[i] as usize].to_vec())
            .collect())
    }

    /// The last selection's slots and estimates on the host (self-check).
    pub fn tactic_selection_to_host(
        &self,
        ws: &TacticWorkspace,
        jobs: &[SelectJob],
        group: usize,
    ) -> Result<SelectionHost> {
        let np = jobs.len();
        if ws.sel_count != np {
            return Err(Error::Shape("no selection of these jobs to read".into()));
        }
        let lens = self.download(ws.list_len.get()?, np)?;
        let (lbase, total) = bases(jobs.iter().map(|j| j.ctx_len));
        let list = self.download(ws.list.get()?, total)?;
        let est = self.download(ws.est.get()?, np * group)?;
        Ok(SelectionHost {
            slots: (0..np)
                .map(|i| list[lbase[i]..lbase[i] + lens[i] as usize].to_vec())
                .collect(),
            est_mass: est.chunks(group).map(<[f32]>::to_vec).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_problem_gets_its_own_part_of_the_selection_scratch() {
        let job = |cap, len, ctx| SelectJob {
            state: 0,
            layout: StateLayout::new(2, 64, cap, len),
            head: 1,
            row: 0,
            ctx_len: ctx,
            p: 0.9,
            margin: 1.0,
        };
        let (p, totals) = problems(&[job(7, 99, 101), job(0, 0, 1), job(40, 600, 650)], 3).unwrap();
        assert_eq!(p.iter().map(|p| p.cbase).collect::<Vec<_>>(), [0, 21, 21]);
        assert_eq!(p.iter().map(|p| p.kpow).collect::<Vec<_>>(), [8, 1, 64]);
        assert_eq!(p.iter().map(|p| p.kbase).collect::<Vec<_>>(), [0, 24, 27]);
        assert_eq!(p.iter().map(|p| p.tbase).collect::<Vec<_>>(), [0, 6, 9]);
        assert_eq!(p.iter().map(|p| p.lbase).collect::<Vec<_>>(), [0, 101, 102]);
        assert_eq!(p.iter().map(|p| p.wbase).collect::<Vec<_>>(), [0, 4, 5]);
        assert_eq!(totals, [141, 219, 159, 752, 26, 3]);
    }

    #[test]
    fn splits_fill_the_device_without_tiny_ones() {
        assert_eq!(splits_for(1, 100_000), MAX_SPLITS);
        assert_eq!(splits_for(1, 100), 2);
        assert_eq!(splits_for(96, 8000), 11);
        assert_eq!(splits_for(5000, 8000), 1);
    }
}
