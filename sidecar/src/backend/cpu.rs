//! The CPU backend: f32 everywhere, the reference for the GPU.
//!
//! With `round_to_bf16` the weights are rounded to bf16 precision at load
//! (then held in f32), so that the CPU computes with exactly the weights the
//! GPU holds and the two can be compared at bf16 tolerance. With
//! `round_activations` every GEMM input is rounded to bf16 first, the twin
//! of the CUDA backend's bf16 activation mode (`gpu_activations = "bf16"`),
//! whose RMSNorm, attention output and SwiGLU are written in bf16.

use super::TacticEntry;
use super::tactic::StateId;
use super::tactic::host::HostTactic;
use super::{
    AttnDims, Backend, HostData, HostLayerView, KvLayout, RowRange, SampleOutput, Selections,
    SeqMeta, StepMeta,
};
use crate::error::{Error, Result};
use half::bf16;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};
use tacflow_kernels::cpu::{self, AttnSeq, KvLayer, Processing, SampleParams};
use tacflow_kernels::tactic::TacticParams;

#[derive(Debug, Clone, Default)]
pub struct CpuBackend {
    pub round_to_bf16: bool,
    /// Rounds the input rows of every `linear` to bf16 (computing with
    /// them in f32), as the GPU's GEMMs see them in bf16 activation mode.
    pub round_activations: bool,
    /// Tactic through the device path, its kernels' work done on the host
    /// (`backend::tactic::host`); `None`: Tactic selects on host views
    /// like the other sparse policies. Shared by clones.
    pub device_tactic: Option<Arc<Mutex<HostTactic>>>,
}

/// A row-major f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// Every layer's K and V, `[num_blocks, kv_heads, block_size, head_dim]`.
#[derive(Debug)]
pub struct CpuKv {
    pub layout: KvLayout,
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl CpuKv {
    /// One layer of the cache as the CPU kernels take it.
    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        let l = self.layout;
        KvLayer {
            k: &self.k[layer],
            v: &self.v[layer],
            kv_heads: l.num_kv_heads,
            head_dim: l.head_dim,
            block_size: l.block_size,
        }
    }
}

impl Mat {
    /// The values of `rows`, row-major.
    fn rows(&self, r: &RowRange) -> &[f32] {
        &self.data[r.start * self.cols..r.end * self.cols]
    }

    fn rows_mut(&mut self, r: &RowRange) -> &mut [f32] {
        &mut self.data[r.start * self.cols..r.end * self.cols]
    }
}

/// The part of sequence `s` whose rows lie in `rows`, as the attention of
/// those rows alone sees it: its first row in the range, how many, and the
/// keys its last one sees.
fn seq_part(s: &SeqMeta, rows: &RowRange) -> Option<(usize, usize, usize)> {
    let start = s.q_start.max(rows.start);
    let end = (s.q_start + s.q_len).min(rows.end);
    (start < end).then(|| (start, end - start, s.ctx_len - (s.q_start + s.q_len - end)))
}

impl CpuBackend {
    fn to_f32(&self, n: usize, data: HostData<'_>) -> Result<Vec<f32>> {
        if let Some(len) = data.host_len()
            && len != n
        {
            return Err(Error::BadModel(format!(
                "tensor has {len} values, expected {n}"
            )));
        }
        let mut v = data.to_f32(n);
        if self.round_to_bf16 {
            v.par_iter_mut()
                .for_each(|x| *x = bf16::from_f32(*x).to_f32());
        }
        Ok(v)
    }
}

impl CpuBackend {
    /// The backend with Tactic run through the device path on the host
    /// (the `device_tactic` field).
    pub fn with_device_tactic(mut self) -> CpuBackend {
        self.device_tactic = Some(Arc::new(Mutex::new(HostTactic::new())));
        self
    }

    fn host_tactic(&self) -> Result<std::sync::MutexGuard<'_, HostTactic>> {
        let t = self
            .device_tactic
            .as_ref()
            .ok_or_else(|| Error::Backend("Tactic runs on host views here".into()))?;
        // A poisoned lock only means a panic elsewhere; the states are
        // whole (every change is staged until the step ends).
        Ok(t.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The entries' selections (the device path's, on the host), per
    /// sequence of the step.
    fn tactic_select(
        &self,
        step: &StepMeta,
        qkv: &Mat,
        kv: &CpuKv,
        layer: usize,
        d: AttnDims,
        entries: &[TacticEntry],
    ) -> Result<Vec<Option<Vec<Vec<u32>>>>> {
        let at = super::tactic::host::HostLayer {
            layer,
            kv: kv.layer(layer),
            meta: step,
            qkv: &qkv.data,
            row_len: qkv.cols,
            group: d.num_heads / d.num_kv_heads,
        };
        let mut sel = vec![None; step.seqs.len()];
        for (seq, s) in self.host_tactic()?.select(&at, entries)? {
            sel[seq] = Some(s);
        }
        Ok(sel)
    }
}

impl Backend for CpuBackend {
    type Act = Mat;
    type Matrix = Mat;
    type Vector = Vec<f32>;
    type Kv = CpuKv;
    type Step = StepMeta;
    /// The CPU runs each op as it is issued: nothing to order.
    type Event = ();

    fn describe(&self) -> (String, String) {
        (
            "cpu".into(),
            format!("{} threads", rayon::current_num_threads()),
        )
    }

    fn weight_dtype(&self) -> &'static str {
        if self.round_to_bf16 {
            "bf16-rounded f32"
        } else {
            "f32"
        }
    }

    /// f32, rounded to bf16 values or not.
    fn weight_bytes(&self) -> usize {
        4
    }

    fn free_memory(&self) -> Option<usize> {
        None
    }

    fn kv_block_bytes(&self, layout: &KvLayout) -> usize {
        2 * layout.num_layers * layout.block_elems() * 4
    }

    fn matrix(&self, rows: usize, cols: usize, data: HostData<'_>) -> Result<Mat> {
        Ok(Mat {
            data: self.to_f32(rows * cols, data)?,
            rows,
            cols,
        })
    }

    fn vector(&self, len: usize, data: HostData<'_>) -> Result<Vec<f32>> {
        self.to_f32(len, data)
    }

    fn constants(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn kv_cache(&self, layout: &KvLayout) -> Result<CpuKv> {
        let n = layout.num_blocks * layout.block_elems();
        Ok(CpuKv {
            layout: *layout,
            k: (0..layout.num_layers).map(|_| vec![0.0; n]).collect(),
            v: (0..layout.num_layers).map(|_| vec![0.0; n]).collect(),
        })
    }

    fn act(&self, rows: usize, cols: usize) -> Result<Mat> {
        Ok(Mat {
            data: vec![0.0; rows * cols],
            rows,
            cols,
        })
    }

    fn begin_step(&self, meta: &StepMeta) -> Result<StepMeta> {
        Ok(meta.clone())
    }

    fn lanes(&self) -> usize {
        usize::MAX
    }

    fn use_lane(&self, _lane: usize) -> Result<()> {
        Ok(())
    }

    fn new_event(&self) -> Result<()> {
        Ok(())
    }

    fn signal(&self, _event: &()) -> Result<()> {
        Ok(())
    }

    fn wait(&self, _event: &()) -> Result<()> {
        Ok(())
    }

    fn embed(&self, step: &StepMeta, table: &Mat, out: &mut Mat, rows: RowRange) -> Result<()> {
        let tokens = &step.tokens[rows.clone()];
        cpu::embed(&table.data, table.cols, tokens, out.rows_mut(&rows));
        Ok(())
    }

    fn rmsnorm(
        &self,
        x: &Mat,
        w: &Vec<f32>,
        eps: f32,
        out: &mut Mat,
        rows: RowRange,
    ) -> Result<()> {
        cpu::rmsnorm(x.rows(&rows), w, eps, out.rows_mut(&rows));
        Ok(())
    }

    fn linear(&self, x: &Mat, w: &Mat, out: &mut Mat, rows: RowRange) -> Result<()> {
        debug_assert_eq!(x.cols, w.cols);
        let m = rows.len();
        let (xr, or) = (x.rows(&rows), out.rows_mut(&rows));
        if self.round_activations {
            let xb: Vec<f32> = xr.par_iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            cpu::matmul_nt(&xb, &w.data, or, m, w.rows, w.cols);
            return Ok(());
        }
        cpu::matmul_nt(xr, &w.data, or, m, w.rows, w.cols);
        Ok(())
    }

    fn add_bias(&self, x: &mut Mat, b: &Vec<f32>, rows: RowRange) -> Result<()> {
        cpu::add_bias(x.rows_mut(&rows), b);
        Ok(())
    }

    fn rope(
        &self,
        step: &StepMeta,
        qkv: &mut Mat,
        inv_freq: &Vec<f32>,
        d: AttnDims,
        rows: RowRange,
    ) -> Result<()> {
        // q and k heads are adjacent in the fused row: rotate them together.
        let heads = d.num_heads + d.num_kv_heads;
        let cols = qkv.cols;
        let positions = &step.positions[rows.clone()];
        let data = qkv.rows_mut(&rows);
        cpu::rope(data, cols, 0, heads, d.head_dim, positions, inv_freq);
        Ok(())
    }

    fn kv_append(
        &self,
        step: &StepMeta,
        qkv: &Mat,
        kv: &mut CpuKv,
        layer: usize,
        d: AttnDims,
        rows: RowRange,
    ) -> Result<()> {
        let l = kv.layout;
        cpu::kv_append(
            &mut kv.k[layer],
            &mut kv.v[layer],
            (l.num_kv_heads, l.block_size, l.head_dim),
            qkv.rows(&rows),
            qkv.cols,
            d.q_dim(),
            &step.slots[rows],
        );
        Ok(())
    }

    fn attention(
        &self,
        step: &StepMeta,
        qkv: &Mat,
        kv: &CpuKv,
        layer: usize,
        d: AttnDims,
        out: &mut Mat,
        rows: RowRange,
    ) -> Result<()> {
        self.sparse_attention(step, qkv, kv, layer, d, &[], out, rows)
    }

    fn supports_sparse(&self) -> bool {
        true
    }

    fn host_view<'a>(
        &self,
        qkv: &'a Mat,
        kv: &'a CpuKv,
        layer: usize,
    ) -> Option<HostLayerView<'a>> {
        Some(HostLayerView {
            qkv: &qkv.data,
            row_len: qkv.cols,
            kv: kv.layer(layer),
        })
    }

    fn sparse_attention(
        &self,
        step: &StepMeta,
        qkv: &Mat,
        kv: &CpuKv,
        layer: usize,
        d: AttnDims,
        selections: &Selections,
        out: &mut Mat,
        rows: RowRange,
    ) -> Result<()> {
        let seqs: Vec<AttnSeq<'_>> = step
            .seqs
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let (q_start, q_len, ctx_len) = seq_part(s, &rows)?;
                Some(AttnSeq {
                    q_start,
                    q_len,
                    ctx_len,
                    block_table: &s.block_table,
                    selection: selections.get(i).and_then(|x| x.as_deref()),
                })
            })
            .collect();
        cpu::paged_attention(
            &qkv.data,
            qkv.cols,
            d.num_heads,
            &kv.layer(layer),
            &seqs,
            &mut out.data,
        );
        Ok(())
    }

    fn device_tactic(&self) -> bool {
        self.device_tactic.is_some()
    }

    fn device_baselines(&self) -> bool {
        self.device_tactic.is_some()
    }

    fn tactic_open(
        &self,
        id: StateId,
        params: &TacticParams,
        dims: AttnDims,
        layers: usize,
    ) -> Result<()> {
        self.host_tactic()?.dev.open(id, params, dims, layers)
    }

    fn tactic_fork(&self, parent: StateId, child: StateId) -> Result<()> {
        self.host_tactic()?.dev.fork(parent, child)
    }

    fn tactic_reset(&self, id: StateId) {
        if let Ok(mut t) = self.host_tactic() {
            t.dev.reset(id);
        }
    }

    fn tactic_close(&self, id: StateId) {
        if let Ok(mut t) = self.host_tactic() {
            t.dev.close(id);
        }
    }

    fn tactic_attention(
        &self,
        step: &StepMeta,
        qkv: &Mat,
        kv: &CpuKv,
        layer: usize,
        d: AttnDims,
        entries: &[TacticEntry],
        out: &mut Mat,
        rows: RowRange,
    ) -> Result<()> {
        let sel = self.tactic_select(step, qkv, kv, layer, d, entries)?;
        self.sparse_attention(step, qkv, kv, layer, d, &sel, out, rows)
    }

    fn tactic_diagnostics(&self) -> Result<Vec<super::tactic::TacticMeasure>> {
        Ok(std::mem::take(&mut self.host_tactic()?.measured))
    }

    fn tactic_end_step(&self, commit: bool) {
        if let Ok(mut t) = self.host_tactic() {
            t.dev.end_step(commit);
            t.measured.clear();
        }
    }

    fn tactic_bytes(&self) -> usize {
        self.host_tactic().map_or(0, |t| t.dev.live_bytes())
    }

    fn add(&self, x: &mut Mat, y: &Mat, rows: RowRange) -> Result<()> {
        cpu::add_inplace(x.rows_mut(&rows), y.rows(&rows));
        Ok(())
    }

    fn silu_mul(&self, gate_up: &Mat, out: &mut Mat, rows: RowRange) -> Result<()> {
        let cols = out.cols;
        cpu::silu_mul(gate_up.rows(&rows), cols, out.rows_mut(&rows));
        Ok(())
    }

    fn add_rmsnorm(
        &self,
        x: &mut Mat,
        y: &Mat,
        w: &Vec<f32>,
        eps: f32,
        out: &mut Mat,
        rows: RowRange,
    ) -> Result<()> {
        let o = out.rows_mut(&rows);
        cpu::fused::add_rmsnorm(x.rows_mut(&rows), y.rows(&rows), w, eps, o);
        Ok(())
    }

    fn rope_kv_append(
        &self,
        step: &StepMeta,
        qkv: &mut Mat,
        inv_freq: &Vec<f32>,
        kv: &mut CpuKv,
        layer: usize,
        d: AttnDims,
        rows: RowRange,
    ) -> Result<()> {
        let l = kv.layout;
        let cols = qkv.cols;
        let cache = cpu::fused::KvLayerMut {
            k: &mut kv.k[layer],
            v: &mut kv.v[layer],
            kv_heads: l.num_kv_heads,
            block_size: l.block_size,
            head_dim: l.head_dim,
        };
        cpu::fused::rope_kv_append(
            qkv.rows_mut(&rows),
            cols,
            d.num_heads,
            &step.positions[rows.clone()],
            &step.slots[rows],
            inv_freq,
            cache,
        );
        Ok(())
    }

    fn gather_rows(&self, step: &StepMeta, x: &Mat, out: &mut Mat, rows: RowRange) -> Result<()> {
        for i in rows {
            let r = step.logit_rows[i] as usize;
            out.data[i * x.cols..(i + 1) * x.cols]
                .copy_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(())
    }

    fn sample(
        &self,
        logits: &Mat,
        params: &[Option<SampleParams>],
        want_logits: bool,
    ) -> Result<SampleOutput> {
        let sampled = params
            .par_iter()
            .enumerate()
            .map(|(i, p)| {
                p.as_ref()
                    .map(|p| cpu::sample(&logits.data[i * logits.cols..(i + 1) * logits.cols], p))
            })
            .collect();
        Ok(SampleOutput {
            sampled,
            logits: want_logits.then(|| logits.data.clone()),
        })
    }

    fn sample_processed(
        &self,
        logits: &Mat,
        params: &[Option<SampleParams>],
        procs: &[Option<Processing>],
        want_logits: bool,
    ) -> Result<SampleOutput> {
        let cols = logits.cols;
        let sampled = params
            .par_iter()
            .zip(procs)
            .enumerate()
            .map(|(i, (p, proc))| {
                let row = &logits.data[i * cols..(i + 1) * cols];
                match (p, proc) {
                    (Some(p), Some(proc)) => Some(cpu::sample_processed(row, p, proc)),
                    (Some(p), None) => Some(cpu::sample(row, p)),
                    (None, _) => None,
                }
            })
            .collect();
        Ok(SampleOutput {
            sampled,
            logits: want_logits.then(|| logits.data.clone()),
        })
    }

    fn supports_processing(&self) -> bool {
        true
    }

    fn copy_blocks(&self, kv: &mut CpuKv, pairs: &[(u32, u32)]) -> Result<()> {
        let n = kv.layout.block_elems();
        for layer in kv.k.iter_mut().chain(kv.v.iter_mut()) {
            for &(src, dst) in pairs {
                let (s, d) = (src as usize * n, dst as usize * n);
                layer.copy_within(s..s + n, d);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "cpu_tests.rs"]
mod tests;
