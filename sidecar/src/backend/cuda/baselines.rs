//! The baselines on the GPU (`experimental_gpu_tactic`): the entries of an
//! attention node that run `oracle_top_p` or `fixed_budget` select with
//! their kernels (`Gpu::tactic_oracle`, `Gpu::tactic_budget`: no state,
//! everything from this step's keys) and attend their selection with
//! Tactic's sparse attention; their diagnostics as Tactic's.

use super::tactic::{GpuTactic, Node};
use super::{Act, CudaBackend};
use crate::backend::tactic::{MeasureAt, Selector};
use crate::backend::{Baseline, RowRange, TacticEntry};
use crate::error::Result;
use tacflow_kernels::cuda::{BudgetJob, OracleJob, SelectJob, TacticShape};
use tacflow_kernels::tactic::layout::StateLayout;

impl CudaBackend {
    /// The node's baseline entries: the oracle's selected and attended,
    /// then the fixed budget's.
    pub(super) fn baseline_rows(
        &self,
        t: &mut GpuTactic,
        n: &Node<'_>,
        entries: &[TacticEntry],
        out: &mut Act,
        rows: &RowRange,
    ) -> Result<()> {
        let (kvh, shape) = (n.shape.kv_heads, &n.shape);
        let q = n.qkv.f32("baseline attention")?;
        let (step, kv, cols) = (n.step, n.kv, n.qkv.cols);
        let oracle: Vec<OracleJob> = jobs(entries, kvh)
            .filter_map(|(e, head)| match e.baseline {
                Some(Baseline::Oracle { p }) => Some(OracleJob {
                    head,
                    row: e.row,
                    ctx_len: e.ctx_len,
                    p,
                }),
                _ => None,
            })
            .collect();
        if !oracle.is_empty() {
            let gpu = &self.gpu;
            gpu.tactic_oracle(&mut t.ws, step, q, cols, kv, n.layer, shape, &oracle)?;
            let sel: Vec<SelectJob> = oracle
                .iter()
                .map(|j| as_select_job(j.head, j.row, j.ctx_len, shape))
                .collect();
            let m = measured(entries, n.layer, kvh, |b| {
                matches!(b, Baseline::Oracle { .. })
            });
            self.attend_selected(t, n, &sel, m, out, rows)?;
        }
        let budget: Vec<BudgetJob> = jobs(entries, kvh)
            .filter_map(|(e, head)| match e.baseline {
                Some(Baseline::Budget { tokens }) => Some(BudgetJob {
                    head,
                    row: e.row,
                    ctx_len: e.ctx_len,
                    tokens,
                }),
                _ => None,
            })
            .collect();
        if !budget.is_empty() {
            let gpu = &self.gpu;
            gpu.tactic_budget(&mut t.ws, step, q, cols, kv, n.layer, shape, &budget)?;
            let sel: Vec<SelectJob> = budget
                .iter()
                .map(|j| as_select_job(j.head, j.row, j.ctx_len, shape))
                .collect();
            let m = measured(entries, n.layer, kvh, |b| {
                matches!(b, Baseline::Budget { .. })
            });
            self.attend_selected(t, n, &sel, m, out, rows)?;
        }
        Ok(())
    }
}

/// Every (entry, KV head), in entry order.
fn jobs(entries: &[TacticEntry], kv_heads: usize) -> impl Iterator<Item = (&TacticEntry, usize)> {
    entries
        .iter()
        .flat_map(move |e| (0..kv_heads).map(move |h| (e, h)))
}

/// A baseline's job as the attention and the diagnostics name it (they
/// read only its row, head and context; the selection left its problems).
fn as_select_job(head: usize, row: usize, ctx_len: usize, shape: &TacticShape) -> SelectJob {
    SelectJob {
        state: 0,
        layout: StateLayout::new(shape.kv_heads, shape.head_dim, 0, 0),
        head,
        row,
        ctx_len,
        p: 1.0,
        margin: 1.0,
    }
}

/// What each job of the entries whose baseline `this` picks measures (in
/// the jobs' order), where its entry asked for diagnostics.
fn measured(
    entries: &[TacticEntry],
    layer: usize,
    kv_heads: usize,
    this: impl Fn(&Baseline) -> bool,
) -> Vec<Option<(MeasureAt, Selector)>> {
    jobs(entries, kv_heads)
        .filter_map(|(e, head)| {
            let b = e.baseline.filter(|b| this(b))?;
            let at = MeasureAt {
                seq: e.seq,
                layer,
                head,
                ctx_len: e.ctx_len,
            };
            Some(e.diagnostics.then_some((at, Selector::Baseline(b))))
        })
        .collect()
}
