//! Tactic on the GPU (`experimental_gpu_tactic`): the sequences' states in
//! device memory ([`TacticDevice`] over the [`Gpu`]), and an attention node
//! of a step with Tactic decode rows as launches only: the states the rule
//! grows are clustered (`Gpu::tactic_cluster`), every entry's KV heads
//! select (`Gpu::tactic_select`) and attend their selection
//! (`Gpu::tactic_attend`); the node's other rows attend in full. Nothing
//! is read back: a step still synchronises only at sampling, unless a
//! sequence asked for diagnostics: then each node also measures its
//! selections (`Gpu::tactic_measure`), and the engine reads the records
//! back once, after the forward pass (`GpuTactic::take_measures`).
//!
//! Experimental until a GPU run of `tacflowd selfcheck --groups tactic`
//! verifies the kernels (kernels/TACTIC.md, "On the GPU").

use super::{Act, CudaBackend, check};
use crate::backend::tactic::driver::{Planned, TacticDevice, cluster_jobs, select_jobs};
use crate::backend::tactic::{DeviceMemory, MeasureAt, Selector, TacticMeasure};
use crate::backend::{AttnDims, Backend, RowRange, TacticEntry};
use crate::config::GpuActivations;
use crate::error::{Error, Result};
use tacflow_kernels::cuda::{
    CudaSlice, DeviceStep, Gpu, KvCache, SelectJob, TacticShape, TacticWorkspace,
};

/// The backend's Tactic states and the kernels' scratch.
#[derive(Debug, Default)]
pub struct GpuTactic {
    pub dev: TacticDevice<Gpu>,
    pub ws: TacticWorkspace,
    /// This step's diagnostics, on the device until the step reads them.
    pub measured: Vec<Measured>,
    /// Events around the phases of Tactic's nodes (`bench-tactic`; off in
    /// the daemon): see [`PhaseMarks`].
    pub phases: Option<PhaseMarks>,
}

/// Events at the boundaries of a Tactic attention node's phases
/// (clustering, selection, diagnostics and sparse attention), recorded on
/// its lane; the milliseconds of each phase summed over the nodes since
/// they were last read.
#[derive(Debug, Default)]
pub struct PhaseMarks {
    /// Pairs of marks per node and phase, waiting to be read.
    pending: Vec<[tacflow_kernels::cuda::Mark; 4]>,
}

impl PhaseMarks {
    /// Milliseconds of (clustering, selection, attention) summed over the
    /// nodes recorded since the last call (waits for their events).
    pub fn take_ms(&mut self) -> tacflow_kernels::Result<[f64; 3]> {
        let mut sum = [0.0; 3];
        for m in self.pending.drain(..) {
            for (i, s) in sum.iter_mut().enumerate() {
                *s += m[i + 1].ms_since(&m[i])?;
            }
        }
        Ok(sum)
    }
}

/// One attention node's diagnostics records (`Gpu::tactic_measure`), with
/// what each record measures: its entry, layer and KV head, and what
/// selected (for the estimate and the tokens read), `None` where the
/// entry did not ask for diagnostics (the launch measures every job of
/// the node's selection).
#[derive(Debug)]
pub struct Measured {
    buf: CudaSlice<f64>,
    jobs: Vec<Option<(MeasureAt, Selector)>>,
    head_dim: usize,
    group: usize,
}

/// The states live in stream-ordered allocations of the current lane (the
/// option runs on one lane).
impl DeviceMemory for Gpu {
    type Buf = CudaSlice<u8>;

    fn alloc_zeroed(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        Ok(Gpu::alloc_zeroed::<u8>(self, bytes)?)
    }

    fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        Ok(Gpu::alloc::<u8>(self, bytes)?)
    }

    fn copy(
        &self,
        src: &CudaSlice<u8>,
        src_off: u64,
        dst: &mut CudaSlice<u8>,
        dst_off: u64,
        bytes: u64,
    ) -> Result<()> {
        let (s, d, n) = (src_off as usize, dst_off as usize, bytes as usize);
        check(s + n <= src.len() && d + n <= dst.len(), || {
            format!("a Tactic state copy of {n} bytes out of bounds")
        })?;
        self.stream()
            .memcpy_dtod(&src.slice(s..s + n), &mut dst.slice_mut(d..d + n))
            .map_err(|e| Error::Backend(format!("cuMemcpyDtoDAsync: {e}")))
    }

    fn addr(&self, buf: &CudaSlice<u8>) -> u64 {
        self.ptr(buf)
    }
}

impl CudaBackend {
    /// The backend with Tactic served on the GPU when `on`
    /// (`experimental_gpu_tactic`): one lane, f32 activations.
    pub fn with_gpu_tactic(mut self, on: bool) -> Result<CudaBackend> {
        if !on {
            return Ok(self);
        }
        check(self.gpu.lanes() == 1, || {
            format!(
                "experimental_gpu_tactic runs on one lane, not {}",
                self.gpu.lanes()
            )
        })?;
        check(self.activations == GpuActivations::Split, || {
            "experimental_gpu_tactic runs with gpu_activations = \"split\"".into()
        })?;
        tracing::warn!(
            "experimental_gpu_tactic: the sparse policies run on kernels not yet verified on a GPU"
        );
        self.tactic = Some(std::cell::RefCell::new(GpuTactic::default()));
        Ok(self)
    }

    /// Times the phases of Tactic's nodes from now on (`bench-tactic`):
    /// events around clustering, selection and attention, read by
    /// [`CudaBackend::tactic_phases_ms`].
    pub fn time_tactic_phases(&self) -> Result<()> {
        self.gpu_tactic()?.phases = Some(PhaseMarks::default());
        Ok(())
    }

    /// Milliseconds of (clustering, selection, diagnostics and sparse
    /// attention) of the Tactic nodes since the last call, when timed.
    pub fn tactic_phases_ms(&self) -> Result<Option<[f64; 3]>> {
        let mut t = self.gpu_tactic()?;
        Ok(t.phases.as_mut().map(PhaseMarks::take_ms).transpose()?)
    }

    pub(super) fn gpu_tactic(&self) -> Result<std::cell::RefMut<'_, GpuTactic>> {
        self.tactic
            .as_ref()
            .map(std::cell::RefCell::borrow_mut)
            .ok_or_else(|| Error::Backend("this backend serves full attention only".into()))
    }

    /// [`Backend::tactic_attention`]: the other rows of `rows` in full
    /// (runs between the decode entries' rows; a prompt's end attends in
    /// full), then the Tactic entries' clustering (a prompt's end only
    /// clusters), selection and sparse attention, then the baselines'
    /// (`baselines.rs`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tactic_attention_rows(
        &self,
        step: &DeviceStep,
        qkv: &Act,
        kv: &KvCache,
        layer: usize,
        d: AttnDims,
        entries: &[TacticEntry],
        out: &mut Act,
        rows: RowRange,
    ) -> Result<()> {
        for run in full_runs(&rows, entries) {
            self.attention(step, qkv, kv, layer, d, out, run)?;
        }
        if entries.is_empty() {
            return Ok(());
        }
        let shape = TacticShape {
            kv_heads: d.num_kv_heads,
            head_dim: d.head_dim,
            group: d.num_heads / d.num_kv_heads,
        };
        let (baselines, tactic): (Vec<TacticEntry>, Vec<TacticEntry>) =
            entries.iter().partition(|e| e.baseline.is_some());
        let mut t = self.gpu_tactic()?;
        let node = Node {
            step,
            qkv,
            kv,
            layer,
            shape,
        };
        if !tactic.is_empty() {
            let timed = t.phases.is_some();
            let mark = |on: bool| -> Result<Option<tacflow_kernels::cuda::Mark>> {
                if !on {
                    return Ok(None);
                }
                let m = self.gpu.mark()?;
                m.record(&self.gpu)?;
                Ok(Some(m))
            };
            let m0 = mark(timed)?;
            let GpuTactic { dev, ws, .. } = &mut *t;
            let planned = dev.plan(&self.gpu, layer, &tactic)?;
            for (km, jobs) in cluster_jobs(&planned, shape.kv_heads) {
                self.gpu
                    .tactic_cluster(ws, step, kv, layer, &shape, &jobs, &km)?;
            }
            let m1 = mark(timed)?;
            let jobs = select_jobs(&planned, shape.kv_heads);
            if !jobs.is_empty() {
                let q = qkv.f32("tactic attention")?;
                self.gpu
                    .tactic_select(ws, step, q, qkv.cols, kv, layer, &shape, &jobs)?;
            }
            let m2 = mark(timed)?;
            if !jobs.is_empty() {
                let measure = measured_jobs(&planned, layer, shape.kv_heads);
                self.attend_selected(&mut t, &node, &jobs, measure, out, &rows)?;
            }
            if let (Some(m0), Some(m1), Some(m2), Some(m3)) = (m0, m1, m2, mark(timed)?)
                && let Some(p) = t.phases.as_mut()
            {
                p.pending.push([m0, m1, m2, m3]);
            }
        }
        if !baselines.is_empty() {
            self.baseline_rows(&mut t, &node, &baselines, out, &rows)?;
        }
        Ok(())
    }

    /// The last selection's diagnostics (where an entry asked for them:
    /// `measure` holds a `Some`) and its sparse attention.
    pub(super) fn attend_selected(
        &self,
        t: &mut GpuTactic,
        n: &Node<'_>,
        jobs: &[SelectJob],
        measure: Vec<Option<(MeasureAt, Selector)>>,
        out: &mut Act,
        rows: &RowRange,
    ) -> Result<()> {
        let q = n.qkv.f32("tactic attention")?;
        let (gpu, shape) = (&self.gpu, &n.shape);
        if measure.iter().any(Option::is_some) {
            let buf =
                gpu.tactic_measure(&mut t.ws, n.step, q, n.qkv.cols, n.kv, n.layer, shape, jobs)?;
            t.measured.push(Measured {
                buf,
                jobs: measure,
                head_dim: shape.head_dim,
                group: shape.group,
            });
        }
        let cols = out.cols;
        let mut o = self.out_rows(out, rows)?;
        Ok(gpu.tactic_attend(
            &mut t.ws, n.step, q, n.qkv.cols, n.kv, n.layer, shape, jobs, &mut o, rows.start, cols,
        )?)
    }
}

/// What an attention node's launches share.
pub(super) struct Node<'a> {
    pub step: &'a DeviceStep,
    pub qkv: &'a Act,
    pub kv: &'a KvCache,
    pub layer: usize,
    pub shape: TacticShape,
}

impl GpuTactic {
    /// [`Backend::tactic_diagnostics`]: this step's records brought back
    /// (the wait the diagnostic mode adds), those of the entries that
    /// asked for them as measures.
    pub fn take_measures(&mut self, gpu: &Gpu) -> Result<Vec<TacticMeasure>> {
        let mut out = vec![];
        for m in std::mem::take(&mut self.measured) {
            let recs = gpu.tactic_diag_to_host(&m.buf, m.jobs.len(), m.group)?;
            for (rec, job) in recs.iter().zip(&m.jobs) {
                if let Some((at, how)) = job {
                    out.push(TacticMeasure::from_device(*at, rec, m.head_dim, how));
                }
            }
        }
        Ok(out)
    }
}

/// What each job of [`select_jobs`] measures (in its order), where its
/// entry asked for diagnostics.
fn measured_jobs(
    planned: &[Planned],
    layer: usize,
    kv_heads: usize,
) -> Vec<Option<(MeasureAt, Selector)>> {
    planned
        .iter()
        .filter(|p| !p.entry.prompt_end)
        .flat_map(|p| {
            (0..kv_heads).map(move |head| {
                let e = p.entry;
                e.diagnostics.then_some((
                    MeasureAt {
                        seq: e.seq,
                        layer,
                        head,
                        ctx_len: e.ctx_len,
                    },
                    Selector::Tactic(p.plan.params),
                ))
            })
        })
        .collect()
}

/// The maximal runs of `rows` that hold no decode entry's row (a prompt's
/// end attends in full).
fn full_runs(rows: &RowRange, entries: &[TacticEntry]) -> Vec<RowRange> {
    let mut marks: Vec<usize> = entries
        .iter()
        .filter(|e| !e.prompt_end)
        .map(|e| e.row)
        .collect();
    marks.sort_unstable();
    let mut out = vec![];
    let mut at = rows.start;
    for r in marks.into_iter().filter(|r| rows.contains(r)) {
        if r > at {
            out.push(at..r);
        }
        at = r + 1;
    }
    if at < rows.end {
        out.push(at..rows.end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(row: usize) -> TacticEntry {
        TacticEntry {
            seq: 0,
            state: 0,
            row,
            ctx_len: 1,
            prompt_end: false,
            diagnostics: false,
            baseline: None,
        }
    }

    #[test]
    fn the_rows_between_entries_attend_in_full() {
        assert_eq!(full_runs(&(0..10), &[at(3), at(0), at(9)]), [1..3, 4..9]);
        let end = TacticEntry {
            prompt_end: true,
            ..at(5)
        };
        assert_eq!(full_runs(&(0..10), &[at(3), end]), [0..3, 4..10]);
        assert_eq!(full_runs(&(2..6), &[]), vec![(2..6)]);
        assert_eq!(full_runs(&(2..4), &[at(2), at(3)]), Vec::<RowRange>::new());
        assert_eq!(full_runs(&(5..8), &[at(1), at(6)]), [5..6, 7..8]);
    }
}
