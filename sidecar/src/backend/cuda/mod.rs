//! The CUDA backend: the decoder's ops on one GPU through the kernels of
//! `tacflow_kernels::cuda`.
//!
//! Precision: weights and the KV cache are bf16; every activation (the
//! residual stream, normed rows, q/k/v, the attention and SwiGLU outputs,
//! logits) is f32. A GEMM takes its f32 input as two bf16 halves (`hi`,
//! `lo = x - hi`) stacked as twice the rows, so cuBLAS's bf16 tensor cores
//! see the input to ~2^-17: rounding GEMM inputs to bf16 instead put
//! SmolLM2's decode logits 3.5e-2 from the f32 reference (measured by
//! emulating it on the CPU), against 1.2e-2 with only the KV cache in bf16.
//! An activation is allocated by the op that first writes it ([`Act`]),
//! so the model code stays dtype-free. Vectors (norm weights, biases) are
//! held in f32 with bf16-rounded values, like the CPU backend's
//! `round_to_bf16`; [`Backend::constants`] (RoPE frequencies) stay exact.
//!
//! In bf16 activation mode (`GpuActivations::Bf16`, off by default) the
//! GEMMs' inputs are bf16 instead, as serving engines run them: RMSNorm
//! writes bf16, the attention output is cast to bf16, SwiGLU writes bf16
//! (`silu_mul_bf16`), and `linear` reads them with no split (one GEMM,
//! bf16 x bf16 -> f32). The residual stream, q/k/v and logits stay f32.
//! The CPU backend's `round_activations` is its twin. It runs on one lane
//! for now (several lanes allocate every activation up front, in f32).
//!
//! Row ranges and lanes: every row-wise op runs over a range of its
//! activation's rows, on views that start at the range's first row
//! ([`act`]), and the step's per-row arrays seen from that row
//! (`StepRows`); the whole range issues exactly the launches of a
//! whole-activation op. With `gpu_lanes` > 1 the ops go to the current lane
//! (`tacflow_kernels::cuda::lane` says what orders what); activations are
//! then allocated when created, on lane 0, so that no op allocates inside a
//! multi-lane schedule, where the memory would be ordered on one lane only.
//!
//! | piece | file |
//! | --- | --- |
//! | the backend, its host-side helpers | this file |
//! | activations, matrices, vectors, row views | [`act`] |
//! | the ops (`Backend`) | [`ops`] |
//! | a step's per-row key counts and tables | [`step`] |
//! | decode steps as CUDA graphs (`cuda_graphs`) | [`graphs`] |
//! | Tactic's states and sparse attention (`experimental_gpu_tactic`) | [`tactic`] |

mod act;
mod baselines;
pub mod graphs;
mod ops;
mod step;
pub mod tactic;

pub use act::{Act, Matrix, Vector};
pub use graphs::{GraphCounts, Graphs};

use super::{AttnDims, HostData, RowRange};
use crate::config::GpuActivations;
use crate::error::{Error, Result};
use act::ActBuf;
use half::bf16;
use rayon::prelude::*;
use tacflow_kernels::cpu::SampleParams;
use tacflow_kernels::cuda::prefill::PrefillSplit;
use tacflow_kernels::cuda::{
    AttnIo, AttnOverride, AttnPlan, AttnShape, BufferPool, CudaSlice, CudaViewMut, DeviceStep, Gpu,
    KvCache, Pooled, RmsOut, row_view_mut,
};

/// Whether a usable GPU is present: its name, or why not.
pub fn probe() -> Result<String, String> {
    tacflow_kernels::cuda::probe().map_err(|e| e.to_string())
}

/// Device memory kept out of the KV cache's share for cuBLAS, modules and
/// the allocator's slack.
const RESERVE_BYTES: usize = 1 << 30;

pub struct CudaBackend {
    gpu: Gpu,
    /// f32 activation buffers, reused from step to step.
    pool: BufferPool,
    /// The dtype of GEMM inputs (the module doc).
    activations: GpuActivations,
    /// The graph path's buckets, steps and graphs; `None` when off. A
    /// `RefCell` because the ops take `&self`; only the executor thread
    /// touches it.
    graphs: std::cell::RefCell<Option<Graphs>>,
    /// bf16 activations: the attention kernel's f32 output before its cast
    /// to bf16. Kept from step to step, so that a captured graph's address
    /// of it stays valid; it grows, never shrinks, and a regrowth counts as
    /// a workspace regrowth (every graph is dropped and captured again).
    attn_f32: std::cell::RefCell<Option<Pooled>>,
    /// Tactic's states and scratch with `experimental_gpu_tactic`; `None`
    /// (sparse policies refused) without it.
    tactic: Option<std::cell::RefCell<tactic::GpuTactic>>,
    /// Prefill chunks on the tensor-core prefill kernel
    /// (`experimental_prefill_attention`), else every row on the decode
    /// kernel.
    prefill_kernel: bool,
}

impl CudaBackend {
    /// Opens device `ordinal` with one lane and compiles (or loads cached)
    /// kernels.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        CudaBackend::with_lanes(ordinal, 1)
    }

    /// [`CudaBackend::new`] with `lanes` lanes (`gpu_lanes`).
    pub fn with_lanes(ordinal: usize, lanes: usize) -> Result<CudaBackend> {
        Ok(CudaBackend {
            gpu: Gpu::with_lanes(ordinal, lanes)?,
            pool: BufferPool::default(),
            activations: GpuActivations::Split,
            graphs: Default::default(),
            attn_f32: Default::default(),
            tactic: None,
            prefill_kernel: false,
        })
    }

    /// The backend with its GEMM inputs in `mode` (the module doc); bf16
    /// runs on one lane only, for now.
    pub fn with_activations(mut self, mode: GpuActivations) -> Result<CudaBackend> {
        check(
            mode == GpuActivations::Split || self.gpu.lanes() == 1,
            || {
                format!(
                    "bf16 activations run on one lane for now, not {}",
                    self.gpu.lanes()
                )
            },
        )?;
        self.activations = mode;
        Ok(self)
    }

    /// The backend with the kernel that faults on purpose loaded, for
    /// fault injection's `illegal_address` (test builds only).
    #[cfg(feature = "fault-injection")]
    pub fn with_fault_kernel(mut self) -> Result<CudaBackend> {
        self.gpu.load_fault()?;
        Ok(self)
    }

    /// The backend with prefill chunks on the tensor-core prefill kernel
    /// when `on` (`experimental_prefill_attention`).
    pub fn with_prefill_kernel(mut self, on: bool) -> CudaBackend {
        if on {
            tracing::warn!(
                "experimental_prefill_attention: prefill chunks run on a kernel not yet verified on a GPU"
            );
        }
        self.prefill_kernel = on;
        self
    }

    /// Whether prefill chunks run on the tensor-core prefill kernel.
    pub fn prefill_kernel(&self) -> bool {
        self.prefill_kernel
    }

    /// Frees the reused activation buffers (before a lane they were
    /// allocated on is rebuilt in a green context: `tune`'s profile).
    pub fn release_pooled(&self) {
        self.pool.clear();
    }

    /// Whether GEMM inputs are bf16 (the module doc).
    pub fn bf16_activations(&self) -> bool {
        self.bf16_acts()
    }

    pub(super) fn bf16_acts(&self) -> bool {
        self.activations == GpuActivations::Bf16
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn gpu_mut(&mut self) -> &mut Gpu {
        &mut self.gpu
    }

    /// An activation filled from the host, in `dtype` (tests, self-check).
    pub fn act_from_host(&self, rows: usize, cols: usize, data: &[f32], bf16: bool) -> Result<Act> {
        check(data.len() == rows * cols, || {
            format!("{} values for {rows} x {cols}", data.len())
        })?;
        let buf = if bf16 {
            ActBuf::Bf16(self.gpu.upload(&to_bf16(data))?)
        } else {
            let mut b = self.pool.take(&self.gpu, data.len())?;
            self.gpu.upload_into(data, &mut b)?;
            ActBuf::F32(b)
        };
        Ok(Act { rows, cols, buf })
    }

    /// An activation's values as f32 (bf16 widened).
    pub fn act_to_host(&self, a: &Act) -> Result<Vec<f32>> {
        let n = a.rows * a.cols;
        Ok(match &a.buf {
            ActBuf::Empty => return Err(Error::Backend("reading an unwritten activation".into())),
            ActBuf::F32(s) => self.gpu.download(s, n)?,
            ActBuf::Bf16(s) => self
                .gpu
                .download(s, n)?
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        })
    }

    /// An activation of NaNs in `dtype`, so a check sees what an op left
    /// unwritten.
    pub fn act_poisoned(&self, rows: usize, cols: usize, bf16: bool) -> Result<Act> {
        let n = rows * cols;
        let buf = if bf16 {
            ActBuf::Bf16(self.gpu.alloc_poisoned(n)?)
        } else {
            let mut b = self.pool.take(&self.gpu, n)?;
            self.gpu.poison(&mut b)?;
            ActBuf::F32(b)
        };
        Ok(Act { rows, cols, buf })
    }

    /// A weight matrix's bf16 values.
    pub fn matrix_to_host(&self, m: &Matrix) -> Result<Vec<bf16>> {
        Ok(self.gpu.download(&m.data, m.rows * m.cols)?)
    }

    /// Every layer's K and V as f32, `[layer][num_blocks * block_elems]`.
    pub fn kv_to_host(&self, kv: &KvCache) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = kv.layers * kv.layer_elems();
        let widen = |s: &CudaSlice<bf16>| -> Result<Vec<f32>> {
            Ok(self
                .gpu
                .download(s, n)?
                .iter()
                .map(|x| x.to_f32())
                .collect())
        };
        Ok((widen(&kv.k)?, widen(&kv.v)?))
    }

    /// Fills the whole cache with NaN (self-check: unwritten slots show).
    pub fn kv_poison(&self, kv: &mut KvCache) -> Result<()> {
        self.gpu.poison(&mut kv.k)?;
        self.gpu.poison(&mut kv.v)?;
        Ok(())
    }

    /// Counters of the attention split workspace not at rest between launches
    /// (`Gpu::attention_workspace_unsettled`); self-check.
    pub fn attention_workspace_unsettled(&self) -> Result<usize> {
        Ok(self.gpu.attention_workspace_unsettled()?)
    }

    /// [`Backend::attention`] with its plan overridden (self-check);
    /// returns how the launch was cut.
    pub fn attention_forced(
        &self,
        step: &DeviceStep,
        src: (&Act, &KvCache, usize),
        d: AttnDims,
        out: &mut Act,
        force: AttnOverride,
    ) -> Result<AttnPlan> {
        self.attention_rows(step, src, d, out, force, 0..step.rows)
    }

    /// [`CudaBackend::attention_forced`] over rows `rows` of the step.
    pub fn attention_rows(
        &self,
        step: &DeviceStep,
        src: (&Act, &KvCache, usize),
        d: AttnDims,
        out: &mut Act,
        force: AttnOverride,
        rows: RowRange,
    ) -> Result<AttnPlan> {
        let part = step.rows(rows.clone())?;
        let (io, shape) = self.attention_io(step, src, d, out, rows)?;
        Ok(self.gpu.attention(part, io, shape, force)?)
    }

    /// [`Backend::attention`]'s launches over rows `rows`: with the
    /// prefill kernel on, its chunks there and the other rows on the
    /// decode kernel; else every row on the decode kernel.
    pub(super) fn attention_launches(
        &self,
        step: &DeviceStep,
        src: (&Act, &KvCache, usize),
        d: AttnDims,
        out: &mut Act,
        rows: RowRange,
    ) -> Result<()> {
        if !self.prefill_kernel {
            self.attention_rows(step, src, d, out, AttnOverride::default(), rows)?;
            return Ok(());
        }
        self.attention_prefill_rows(step, src, d, out, rows)?;
        Ok(())
    }

    /// The rows `rows` with the prefill kernel on their chunks (whatever
    /// the option; self-check); returns how they were split.
    pub fn attention_prefill_rows(
        &self,
        step: &DeviceStep,
        src: (&Act, &KvCache, usize),
        d: AttnDims,
        out: &mut Act,
        rows: RowRange,
    ) -> Result<PrefillSplit> {
        let part = step.rows(rows.clone())?;
        let (io, shape) = self.attention_io(step, src, d, out, rows)?;
        Ok(self.gpu.attention_with_prefill(part, io, shape)?)
    }

    /// [`CudaBackend::attention_forced`] with the kernel chosen by hand
    /// (the lab's self-check cases; `Gpu::load_lab` first).
    #[cfg(feature = "lab")]
    pub fn attention_lab(
        &self,
        step: &DeviceStep,
        src: (&Act, &KvCache, usize),
        d: AttnDims,
        out: &mut Act,
        force: tacflow_kernels::cuda::lab::AttnForce,
    ) -> Result<AttnPlan> {
        let (io, shape) = self.attention_io(step, src, d, out, 0..step.rows)?;
        Ok(self.gpu.attention_forced(step, io, shape, force)?)
    }

    /// What an attention launch over `rows` reads and writes, and the
    /// kernels' view of its shape, the rows checked.
    fn attention_io<'a>(
        &self,
        step: &DeviceStep,
        (qkv, kv, layer): (&'a Act, &'a KvCache, usize),
        d: AttnDims,
        out: &'a mut Act,
        rows: RowRange,
    ) -> Result<(AttnIo<'a>, AttnShape)> {
        check(
            qkv.rows == step.rows && out.rows == step.rows && out.cols == d.q_dim(),
            || "attention: shapes".into(),
        )?;
        let shape = AttnShape {
            num_heads: d.num_heads,
            kv_heads: d.num_kv_heads,
            head_dim: d.head_dim,
            qkv_stride: qkv.cols,
        };
        let io = AttnIo {
            qkv: qkv.rows_f32("attention", &rows)?,
            kv,
            layer,
            out: self.out_rows(out, &rows)?,
        };
        Ok((io, shape))
    }

    /// Greedy or seeded sampling of every row of `logits` as
    /// [`Backend::sample`] does (no logits back), calling `launched` once
    /// the device has all of it (benchmarks: the end mark of the GPU time).
    pub fn sample_until(
        &self,
        logits: &Act,
        params: &[Option<SampleParams>],
        launched: impl FnOnce() -> tacflow_kernels::Result<()>,
    ) -> Result<Vec<Option<tacflow_kernels::cpu::Sampled>>> {
        check(params.len() == logits.rows, || {
            "sample: one parameter set per row".into()
        })?;
        let l = logits.f32("sample")?;
        // The logits may come from any lane.
        self.gpu.join_lanes()?;
        Ok(self.gpu.sample_with(l, logits.cols, params, launched)?)
    }

    /// Activation buffers waiting for reuse (benchmarks).
    pub fn pooled_buffers(&self) -> usize {
        self.pool.cached()
    }

    /// Rows `rows` of `a` to write as f32, its buffer allocated first if
    /// it has none of that dtype. Only with one lane: inside a multi-lane
    /// schedule the allocation would be ordered on one lane's stream only,
    /// so with several lanes [`Backend::act`] allocates up front, on lane 0
    /// before the schedule forks, and an op that would allocate is refused.
    fn out_rows<'a>(&self, a: &'a mut Act, rows: &RowRange) -> Result<CudaViewMut<'a, f32>> {
        a.in_range("output", rows)?;
        let n = a.rows * a.cols;
        if !matches!(&a.buf, ActBuf::F32(s) if s.len() >= n) {
            check(self.gpu.lanes() == 1, || {
                format!(
                    "an op allocating its f32 output with {} lanes (activations are allocated when created then)",
                    self.gpu.lanes()
                )
            })?;
            a.buf = ActBuf::F32(self.pool.take(&self.gpu, n)?);
        }
        let cols = a.cols;
        match &mut a.buf {
            ActBuf::F32(s) => Ok(row_view_mut(s, rows, cols)?),
            _ => unreachable!("just allocated as f32"),
        }
    }
}

impl CudaBackend {
    /// The attention scratch (`attn_f32`) as an f32 activation of
    /// `rows x cols`, regrown when too small; hand it back with
    /// [`CudaBackend::keep_attention_scratch`].
    pub(super) fn attention_scratch(&self, rows: usize, cols: usize) -> Result<Act> {
        let n = rows * cols;
        let buf = match self.attn_f32.borrow_mut().take() {
            Some(b) if b.len() >= n => b,
            old => {
                // The old buffer goes back to the pool (one lane: in stream
                // order); a graph that held it must not replay.
                drop(old);
                self.gpu.note_workspace_regrowth();
                self.pool.take(&self.gpu, n)?
            }
        };
        Ok(Act {
            rows,
            cols,
            buf: ActBuf::F32(buf),
        })
    }

    pub(super) fn keep_attention_scratch(&self, a: Act) {
        if let ActBuf::F32(b) = a.buf {
            *self.attn_f32.borrow_mut() = Some(b);
        }
    }

    /// Rows `rows` of `a` to write as bf16, its buffer allocated first if
    /// it has none of that dtype (one lane only: bf16 mode's rule).
    fn out_rows_bf16<'a>(&self, a: &'a mut Act, rows: &RowRange) -> Result<CudaViewMut<'a, bf16>> {
        a.in_range("output", rows)?;
        let n = a.rows * a.cols;
        if !matches!(&a.buf, ActBuf::Bf16(s) if s.len() >= n) {
            check(self.gpu.lanes() == 1, || {
                "a bf16 output allocated with several lanes".to_owned()
            })?;
            a.buf = ActBuf::Bf16(self.gpu.alloc(n)?);
        }
        let cols = a.cols;
        match &mut a.buf {
            ActBuf::Bf16(s) => Ok(row_view_mut(s, rows, cols)?),
            _ => unreachable!("just allocated as bf16"),
        }
    }

    /// Where RMSNorm writes `rows`: bf16 in bf16 activation mode (its
    /// output is a GEMM's input), else f32.
    pub(super) fn rms_out<'a>(&self, a: &'a mut Act, rows: &RowRange) -> Result<RmsOut<'a>> {
        Ok(if self.bf16_acts() {
            RmsOut::Bf16(self.out_rows_bf16(a, rows)?)
        } else {
            RmsOut::F32(self.out_rows(a, rows)?)
        })
    }
}

fn check(ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Backend(msg()))
    }
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.par_iter().map(|&x| bf16::from_f32(x)).collect()
}

/// Host values as the CPU backend's `round_to_bf16` sees them.
fn host_f32(n: usize, data: HostData<'_>) -> Result<Vec<f32>> {
    if let Some(len) = data.host_len() {
        check(len == n, || {
            format!("tensor has {len} values, expected {n}")
        })?;
    }
    if let HostData::Bf16(d) = data {
        return Ok(d.iter().map(|x| x.to_f32()).collect());
    }
    let v = data.to_f32(n);
    Ok(v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect())
}
