//! Tactic's diagnostics on the GPU (`tactic/diag.cuh`) against the CPU's
//! measure of the same selections: after a selection on the device, each
//! (sequence, KV head, query head)'s true mass over every cached key
//! (`exact_scores`, `true_mass` on the same bf16 keys), the estimate the
//! union made, the slots selected, the clusters kept, and the tokens read
//! that follow from them against the CPU's count for the same set.

use super::report::Row;
use super::tactic::{CHECK, Fixture};
use crate::error::Result;
use tacflow_kernels::cuda::{DeviceStep, Gpu, SelectJob, SelectionHost, TacticWorkspace};
use tacflow_kernels::tactic::union::chunked_tokens_read;
use tacflow_kernels::tactic::{ClusterIndex, TacticParams, exact_scores, true_mass};

/// What the measure compares against: the step, the queries (host and
/// device), the jobs and the device's selection of them, and the CPU's
/// clusters each job selected on (`[sequence][KV head]`).
pub(super) struct Selected<'a> {
    pub ds: &'a DeviceStep,
    pub q: &'a [f32],
    pub q_dev: &'a tacflow_kernels::cuda::CudaSlice<f32>,
    pub jobs: &'a [SelectJob],
    pub got: &'a SelectionHost,
    pub clusters: &'a [Vec<ClusterIndex>],
}

/// Rows: the largest gap in true mass (at most 1e-9: the same f64 sums in
/// another order) and in estimate (none: passed through), and whether the
/// counts and the tokens read agree.
pub(super) fn measure(
    gpu: &Gpu,
    ws: &mut TacticWorkspace,
    fx: &Fixture,
    sel: &Selected<'_>,
    prm: &TacticParams,
) -> Result<Vec<Row>> {
    let shape = fx.shape();
    let (g, d, w) = (shape.group, shape.head_dim, fx.dims.qkv_dim());
    let buf = gpu.tactic_measure(ws, sel.ds, sel.q_dev, w, &fx.kv, 0, &shape, sel.jobs)?;
    let recs = gpu.tactic_diag_to_host(&buf, sel.jobs.len(), g)?;
    let (mut mass_gap, mut est_gap, mut bad_counts) = (0f64, 0f64, vec![]);
    let mut scores = vec![];
    for (i, (job, rec)) in sel.jobs.iter().zip(&recs).enumerate() {
        let (s, h) = (job.row, job.head);
        let keys = fx.keys(0, s, h);
        let slots = &sel.got.slots[i];
        for k in 0..g {
            let qh = &sel.q[s * w + (h * g + k) * d..][..d];
            exact_scores(&keys, qh, job.ctx_len, &mut scores);
            mass_gap = mass_gap.max((rec.mass[k] - true_mass(&scores, slots)).abs());
            est_gap = est_gap.max((rec.est[k] - f64::from(sel.got.est_mass[i][k])).abs());
        }
        let kept = sel.clusters[s][h].clusters();
        if rec.selected != slots.len() || rec.clusters != kept {
            bad_counts.push(format!(
                "job {i}: {} selected, {} clusters (want {}, {kept})",
                rec.selected,
                rec.clusters,
                slots.len()
            ));
        }
        let read = chunked_tokens_read(rec.selected, rec.clusters, d, prm);
        let want = chunked_tokens_read(slots.len(), kept, d, prm);
        if read != want {
            bad_counts.push(format!("job {i}: {read} tokens read, want {want}"));
        }
    }
    let mut counts = Row::at_most(
        CHECK,
        "diagnostics counts",
        "mismatches",
        bad_counts.len() as f64,
        0.0,
    );
    if !bad_counts.is_empty() {
        counts = counts.with_note(bad_counts[..bad_counts.len().min(3)].join("; "));
    }
    Ok(vec![
        Row::at_most(CHECK, "diagnostics true mass", "max_abs", mass_gap, 1e-9),
        Row::at_most(CHECK, "diagnostics estimate", "max_abs", est_gap, 0.0),
        counts,
    ])
}
