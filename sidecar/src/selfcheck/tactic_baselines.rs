//! The baselines' kernels on the GPU against the CPU reference, on the
//! Tactic fixture's keys and queries (one layer): `oracle_top_p`
//! (`Gpu::tactic_oracle`) against the union of `oracle_top_p` on
//! `exact_scores`, `fixed_budget` (`Gpu::tactic_budget`) against
//! `fixed_budget` on `PageBounds` over the full pages, as
//! `engine::sparse::select_layer` selects; for each, the sparse attention
//! over the device's selection and its diagnostics' true masses.

use super::Ctx;
use super::report::Row;
use super::tactic::{CHECK, Fixture, SetTally, attend, decode_meta};
use crate::backend::Backend;
use crate::error::Result;
use tacflow_kernels::cuda::{
    BudgetJob, CudaSlice, DeviceStep, OracleJob, SelectJob, TacticWorkspace,
};
use tacflow_kernels::tactic::layout::StateLayout;
use tacflow_kernels::tactic::{PageBounds, exact_scores, fixed_budget, oracle_top_p, true_mass};

/// Query heads, KV heads, head size.
type Heads = (usize, usize, usize);

const P: f32 = 0.9;
const BUDGET: usize = 64;

pub fn baselines(cx: &mut Ctx, heads: Heads, lens: &[usize]) -> Result<Vec<Row>> {
    let fx = Fixture::new(cx, heads, 1, lens)?;
    let gpu = cx.b.gpu();
    let (kvh, d) = (fx.dims.num_kv_heads, fx.dims.head_dim);
    let q = fx.queries(0, 0, cx.seed);
    let ds: DeviceStep = cx.b.begin_step(&decode_meta(lens, &fx.tables))?;
    let q_dev = gpu.upload(&q)?;
    let jobs: Vec<SelectJob> = (0..lens.len())
        .flat_map(|s| (0..kvh).map(move |h| (s, h)))
        .map(|(s, h)| SelectJob {
            state: 0,
            layout: StateLayout::new(kvh, d, 0, 0),
            head: h,
            row: s,
            ctx_len: lens[s],
            p: P,
            margin: 1.0,
        })
        .collect();
    let case = Case {
        fx: &fx,
        ds: &ds,
        q: &q,
        q_dev: &q_dev,
        jobs: &jobs,
    };
    let mut ws = TacticWorkspace::default();
    let mut rows = oracle(cx, &case, &mut ws)?;
    rows.extend(budget(cx, &case, &mut ws)?);
    Ok(rows)
}

/// One step's inputs, shared by both baselines.
struct Case<'a> {
    fx: &'a Fixture,
    ds: &'a DeviceStep,
    q: &'a [f32],
    q_dev: &'a CudaSlice<f32>,
    /// Per (sequence, KV head): its row, head and context.
    jobs: &'a [SelectJob],
}

impl Case<'_> {
    /// The group's query rows of `(s, h)`.
    fn qg(&self, s: usize, h: usize) -> &[f32] {
        let (w, g, d) = (
            self.fx.dims.qkv_dim(),
            self.fx.shape().group,
            self.fx.dims.head_dim,
        );
        &self.q[s * w + h * g * d..s * w + (h + 1) * g * d]
    }
}

fn oracle(cx: &Ctx, c: &Case<'_>, ws: &mut TacticWorkspace) -> Result<Vec<Row>> {
    let gpu = cx.b.gpu();
    let (shape, w, d) = (c.fx.shape(), c.fx.dims.qkv_dim(), c.fx.dims.head_dim);
    let jobs: Vec<OracleJob> = c
        .jobs
        .iter()
        .map(|j| OracleJob {
            head: j.head,
            row: j.row,
            ctx_len: j.ctx_len,
            p: P,
        })
        .collect();
    gpu.tactic_oracle(ws, c.ds, c.q_dev, w, &c.fx.kv, 0, &shape, &jobs)?;
    let want = |s: usize, h: usize| {
        let (mut sc, mut order, mut sel) = (vec![], vec![], vec![]);
        for qh in c.qg(s, h).chunks_exact(d) {
            exact_scores(
                &c.fx.keys(0, s, h),
                qh,
                c.jobs[s * shape.kv_heads].ctx_len,
                &mut sc,
            );
            oracle_top_p(&sc, P, &mut order, &mut sel);
        }
        sel.sort_unstable();
        sel.dedup();
        sel
    };
    checked(cx, c, ws, "oracle_top_p", &want)
}

fn budget(cx: &Ctx, c: &Case<'_>, ws: &mut TacticWorkspace) -> Result<Vec<Row>> {
    let gpu = cx.b.gpu();
    let (shape, w) = (c.fx.shape(), c.fx.dims.qkv_dim());
    let jobs: Vec<BudgetJob> = c
        .jobs
        .iter()
        .map(|j| BudgetJob {
            head: j.head,
            row: j.row,
            ctx_len: j.ctx_len,
            tokens: BUDGET,
        })
        .collect();
    gpu.tactic_budget(ws, c.ds, c.q_dev, w, &c.fx.kv, 0, &shape, &jobs)?;
    let want = |s: usize, h: usize| {
        let ctx = c.jobs[s * shape.kv_heads].ctx_len;
        let bounds = PageBounds::build(&c.fx.keys(0, s, h), (ctx / 16) * 16, 16);
        let mut out = vec![];
        fixed_budget(&bounds, c.qg(s, h), ctx, BUDGET, &mut out);
        out
    };
    checked(cx, c, ws, "fixed_budget", &want)
}

/// The rows of one baseline's selection: its sets, its attention, its
/// diagnostics.
fn checked(
    cx: &Ctx,
    c: &Case<'_>,
    ws: &mut TacticWorkspace,
    what: &str,
    want: &dyn Fn(usize, usize) -> Vec<u32>,
) -> Result<Vec<Row>> {
    let mut rows = vec![];
    let sel = compared(cx, c.fx, c.ds, c.q, c.jobs, ws, what, want, &mut rows)?;
    rows.push(masses(cx, c, ws, &sel, what)?);
    Ok(rows)
}

/// The device's selection brought back and compared with `want` per
/// (sequence, KV head) (at least 99.9% equal, every difference a near-tie),
/// then the sparse attention over it; returns the selection.
#[allow(clippy::too_many_arguments)]
fn compared(
    cx: &Ctx,
    fx: &Fixture,
    ds: &DeviceStep,
    q: &[f32],
    jobs: &[SelectJob],
    ws: &mut TacticWorkspace,
    what: &str,
    want: &dyn Fn(usize, usize) -> Vec<u32>,
    rows: &mut Vec<Row>,
) -> Result<Vec<Vec<u32>>> {
    let gpu = cx.b.gpu();
    let ctx: Vec<usize> = jobs.iter().map(|j| j.ctx_len).collect();
    let got = gpu.tactic_slots_to_host(ws, &ctx)?;
    let (w, g, d) = (fx.dims.qkv_dim(), fx.shape().group, fx.dims.head_dim);
    let mut sets = SetTally::default();
    for (j, slots) in jobs.iter().zip(&got) {
        let (s, h) = (j.row, j.head);
        let qg = &q[s * w + h * g * d..s * w + (h + 1) * g * d];
        sets.add(slots, &want(s, h), &fx.keys(0, s, h), qg, j.ctx_len);
    }
    rows.extend(sets.rows(what));
    let mut att = attend(cx, fx, ds, q, jobs, ws, &got)?;
    att.case = format!("{what}: {}", att.case);
    rows.push(att);
    Ok(got)
}

/// The diagnostics kernel over the device's selection `sel`: its true
/// masses against the CPU's over the same sets.
fn masses(
    cx: &Ctx,
    c: &Case<'_>,
    ws: &mut TacticWorkspace,
    sel: &[Vec<u32>],
    what: &str,
) -> Result<Row> {
    let (gpu, shape) = (cx.b.gpu(), c.fx.shape());
    let (g, d, w) = (shape.group, shape.head_dim, c.fx.dims.qkv_dim());
    let buf = gpu.tactic_measure(ws, c.ds, c.q_dev, w, &c.fx.kv, 0, &shape, c.jobs)?;
    let recs = gpu.tactic_diag_to_host(&buf, c.jobs.len(), g)?;
    let (mut gap, mut scores) = (0f64, vec![]);
    for ((j, rec), slots) in c.jobs.iter().zip(&recs).zip(sel) {
        for k in 0..g {
            let qh = &c.q[j.row * w + (j.head * g + k) * d..][..d];
            exact_scores(&c.fx.keys(0, j.row, j.head), qh, j.ctx_len, &mut scores);
            gap = gap.max((rec.mass[k] - true_mass(&scores, slots)).abs());
        }
        if rec.selected != slots.len() || rec.clusters != 0 {
            gap = f64::INFINITY;
        }
    }
    Ok(Row::at_most(
        CHECK,
        format!("{what}: diagnostics true mass"),
        "max_abs",
        gap,
        1e-9,
    ))
}
