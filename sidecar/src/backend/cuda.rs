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
//! In bf16 activation mode ([`GpuActivations::Bf16`], off by default) the
//! GEMMs' inputs are bf16 instead, as serving engines run them: RMSNorm
//! writes bf16, the attention output is cast to bf16, SwiGLU writes bf16
//! (`silu_mul_bf16`), and `linear` reads them with no split (one GEMM,
//! bf16 x bf16 -> f32). The residual stream, q/k/v and logits stay f32.
//! The CPU backend's `round_activations` is its twin.

use super::{AttnDims, Backend, HostData, KvLayout, RowRange, SampleOutput, StepMeta};
use crate::config::GpuActivations;
use crate::error::{Error, Result};
use half::bf16;
use rayon::prelude::*;
use tacflow_kernels::cpu::SampleParams;
use tacflow_kernels::cuda::{
    AttnIo, AttnOverride, AttnPlan, AttnShape, BufferPool, CudaSlice, DeviceStep, Gpu, Heads,
    KvCache, Pooled, RmsOut, Rows, StepArrays,
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
}

impl CudaBackend {
    /// Opens device `ordinal` and compiles (or loads cached) kernels.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        Ok(CudaBackend {
            gpu: Gpu::new(ordinal)?,
            pool: BufferPool::default(),
            activations: GpuActivations::Split,
        })
    }

    /// The backend with its GEMM inputs in `mode` (the module doc).
    pub fn with_activations(mut self, mode: GpuActivations) -> CudaBackend {
        self.activations = mode;
        self
    }

    fn bf16_acts(&self) -> bool {
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
        let (io, shape) = self.attention_io(step, src, d, out)?;
        Ok(self.gpu.attention(step, io, shape, force)?)
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
        let (io, shape) = self.attention_io(step, src, d, out)?;
        Ok(self.gpu.attention_forced(step, io, shape, force)?)
    }

    /// What an attention launch reads and writes, and the kernels' view of
    /// its shape, the rows checked.
    fn attention_io<'a>(
        &self,
        step: &DeviceStep,
        (qkv, kv, layer): (&'a Act, &'a KvCache, usize),
        d: AttnDims,
        out: &'a mut Act,
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
            qkv: qkv.f32("attention")?,
            kv,
            layer,
            out: self.out_f32(out)?,
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
        Ok(self.gpu.sample_with(l, logits.cols, params, launched)?)
    }

    /// Activation buffers waiting for reuse (benchmarks).
    pub fn pooled_buffers(&self) -> usize {
        self.pool.cached()
    }

    /// `a`'s bf16 buffer, allocated (stream-ordered) unless it has one.
    fn out_bf16<'a>(&self, a: &'a mut Act) -> Result<&'a mut CudaSlice<bf16>> {
        let n = a.rows * a.cols;
        if !matches!(&a.buf, ActBuf::Bf16(s) if s.len() >= n) {
            a.buf = ActBuf::Bf16(self.gpu.alloc(n)?);
        }
        match &mut a.buf {
            ActBuf::Bf16(s) => Ok(s),
            _ => unreachable!("just allocated as bf16"),
        }
    }

    /// Where RMSNorm writes: bf16 in bf16 activation mode (its output is a
    /// GEMM's input), else f32.
    fn rms_out<'a>(&self, a: &'a mut Act) -> Result<RmsOut<'a>> {
        Ok(if self.bf16_acts() {
            RmsOut::Bf16(self.out_bf16(a)?)
        } else {
            RmsOut::F32(self.out_f32(a)?)
        })
    }

    fn out_f32<'a>(&self, a: &'a mut Act) -> Result<&'a mut CudaSlice<f32>> {
        let n = a.rows * a.cols;
        if !matches!(&a.buf, ActBuf::F32(s) if s.len() >= n) {
            a.buf = ActBuf::F32(self.pool.take(&self.gpu, n)?);
        }
        match &mut a.buf {
            ActBuf::F32(s) => Ok(s),
            _ => unreachable!("just allocated as f32"),
        }
    }
}

/// An activation `[rows, cols]`; see the module doc for its dtype.
pub struct Act {
    pub rows: usize,
    pub cols: usize,
    buf: ActBuf,
}

enum ActBuf {
    /// Not written yet: allocated by the first op that writes it.
    Empty,
    /// At least `rows * cols` elements, from the backend's pool.
    F32(Pooled),
    Bf16(CudaSlice<bf16>),
}

impl Act {
    fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.buf {
            ActBuf::F32(s) => Ok(s),
            ActBuf::Bf16(_) => Err(Error::Backend(format!(
                "{what}: expected f32 rows, got bf16"
            ))),
            ActBuf::Empty => Err(Error::Backend(format!(
                "{what}: reading an unwritten activation"
            ))),
        }
    }

    fn f32_mut(&mut self, what: &str) -> Result<&mut CudaSlice<f32>> {
        match &mut self.buf {
            ActBuf::F32(s) => Ok(s),
            _ => Err(Error::Backend(format!("{what}: expected written f32 rows"))),
        }
    }

    fn shape(&self) -> Rows {
        Rows {
            rows: self.rows,
            cols: self.cols,
        }
    }
}

/// A weight matrix in bf16, PyTorch `nn.Linear` layout.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    data: CudaSlice<bf16>,
}

/// A vector in f32 (norm weights hold bf16-rounded values).
pub struct Vector {
    pub len: usize,
    data: CudaSlice<f32>,
}

/// The CUDA backend runs each op over all rows of its activations, on one
/// lane, for now: a schedule with nano-batches or lanes is refused here.
fn whole(op: &str, rows: &RowRange, n: usize) -> Result<()> {
    check(rows.start == 0 && rows.end == n, || {
        format!("{op}: rows {rows:?} of {n}: the CUDA backend runs whole activations only")
    })
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

/// Per-row attention metadata from the host description of a step.
fn step_arrays(meta: &StepMeta) -> Result<StepArrays> {
    let rows = meta.tokens.len();
    let mut a = StepArrays {
        tokens: meta.tokens.clone(),
        positions: meta.positions.clone(),
        slots: meta.slots.clone(),
        kv_len: vec![0; rows],
        table_off: vec![0; rows],
        tables: Vec::new(),
        logit_rows: meta.logit_rows.clone(),
    };
    let mut covered = 0;
    for s in &meta.seqs {
        check(
            s.q_len <= s.ctx_len
                && s.q_start + s.q_len <= rows
                && s.ctx_len <= 16 * s.block_table.len(),
            || {
                format!(
                    "sequence rows {}+{} of {rows}, {} cached in {} blocks",
                    s.q_start,
                    s.q_len,
                    s.ctx_len,
                    s.block_table.len()
                )
            },
        )?;
        let off = a.tables.len() as u32;
        a.tables.extend_from_slice(&s.block_table);
        for i in 0..s.q_len {
            a.kv_len[s.q_start + i] = (s.ctx_len - s.q_len + i + 1) as u32;
            a.table_off[s.q_start + i] = off;
        }
        covered += s.q_len;
    }
    check(covered == rows && a.kv_len.iter().all(|&l| l > 0), || {
        format!("the sequences cover {covered} of {rows} rows, each exactly once")
    })?;
    Ok(a)
}

impl Backend for CudaBackend {
    type Act = Act;
    type Matrix = Matrix;
    type Vector = Vector;
    type Kv = KvCache;
    type Step = DeviceStep;
    /// One lane: issue order is the order.
    type Event = ();

    fn describe(&self) -> (String, String) {
        let i = self.gpu.info();
        let gib = i.total_memory as f64 / (1u64 << 30) as f64;
        (
            "cuda".into(),
            format!("{} ({}, {} SMs, {gib:.0} GiB)", i.name, i.arch, i.sm_count),
        )
    }

    fn weight_dtype(&self) -> &'static str {
        "bf16"
    }

    fn free_memory(&self) -> Option<usize> {
        self.gpu
            .free_memory()
            .ok()
            .map(|f| f.saturating_sub(RESERVE_BYTES))
    }

    fn kv_block_bytes(&self, l: &KvLayout) -> usize {
        2 * l.num_layers * l.block_elems() * 2
    }

    /// A sticky CUDA fault poisons the context for good: the daemon must
    /// exit and be restarted rather than answer every later request with it.
    fn check_device(&self) -> std::result::Result<(), String> {
        self.gpu.check_context().map_err(|e| e.to_string())
    }

    fn matrix(&self, rows: usize, cols: usize, data: HostData<'_>) -> Result<Matrix> {
        let n = rows * cols;
        let data = match data {
            HostData::Random {
                seed,
                stream,
                mean,
                std,
            } => {
                let mut d = self.gpu.alloc(n)?;
                self.gpu.random_bf16(&mut d, n, seed, stream, mean, std)?;
                d
            }
            HostData::Bf16(d) => {
                check(d.len() == n, || {
                    format!("tensor has {} values, expected {n}", d.len())
                })?;
                self.gpu.upload(d)?
            }
            other => self.gpu.upload(&to_bf16(&host_f32(n, other)?))?,
        };
        Ok(Matrix { rows, cols, data })
    }

    fn vector(&self, len: usize, data: HostData<'_>) -> Result<Vector> {
        Ok(Vector {
            len,
            data: self.gpu.upload(&host_f32(len, data)?)?,
        })
    }

    fn constants(&self, data: &[f32]) -> Result<Vector> {
        Ok(Vector {
            len: data.len(),
            data: self.gpu.upload(data)?,
        })
    }

    fn kv_cache(&self, l: &KvLayout) -> Result<KvCache> {
        check(l.block_size == 16, || {
            format!("KV block size {} (the kernels use 16)", l.block_size)
        })?;
        Ok(self
            .gpu
            .kv_cache(l.num_layers, l.num_blocks, l.num_kv_heads, l.head_dim)?)
    }

    fn act(&self, rows: usize, cols: usize) -> Result<Act> {
        Ok(Act {
            rows,
            cols,
            buf: ActBuf::Empty,
        })
    }

    fn begin_step(&self, meta: &StepMeta) -> Result<DeviceStep> {
        Ok(DeviceStep::upload(&self.gpu, &step_arrays(meta)?)?)
    }

    fn use_lane(&self, lane: usize) -> Result<()> {
        check(lane == 0, || {
            format!("lane {lane}: the CUDA backend runs one lane")
        })
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

    fn embed(
        &self,
        step: &DeviceStep,
        table: &Matrix,
        out: &mut Act,
        rows: RowRange,
    ) -> Result<()> {
        whole("embed", &rows, out.rows)?;
        check(out.rows == step.rows && out.cols == table.cols, || {
            "embed: output shape".into()
        })?;
        let cols = out.cols;
        let o = self.out_f32(out)?;
        Ok(self.gpu.embed(step, &table.data, table.rows, o, cols)?)
    }

    fn rmsnorm(&self, x: &Act, w: &Vector, eps: f32, out: &mut Act, rows: RowRange) -> Result<()> {
        whole("rmsnorm", &rows, x.rows)?;
        check(out.shape() == x.shape() && w.len == x.cols, || {
            "rmsnorm: shapes".into()
        })?;
        let o = self.rms_out(out)?;
        Ok(self
            .gpu
            .rmsnorm(x.f32("rmsnorm")?, &w.data, eps, x.shape(), o)?)
    }

    fn linear(&self, x: &Act, w: &Matrix, out: &mut Act, rows: RowRange) -> Result<()> {
        whole("linear", &rows, x.rows)?;
        check(
            x.cols == w.cols && out.rows == x.rows && out.cols == w.rows,
            || {
                format!(
                    "linear: [{}, {}] x [{}, {}]ᵀ into [{}, {}]",
                    x.rows, x.cols, w.rows, w.cols, out.rows, out.cols
                )
            },
        )?;
        if x.rows == 0 {
            return Ok(());
        }
        let dims = (x.rows, w.rows, w.cols);
        match &x.buf {
            ActBuf::F32(xs) => {
                let o = self.out_f32(out)?;
                Ok(self.gpu.gemm_nt_f32(xs, &w.data, o, dims)?)
            }
            ActBuf::Bf16(xs) => {
                let o = self.out_f32(out)?;
                Ok(self.gpu.gemm_nt(xs, &w.data, o, dims)?)
            }
            ActBuf::Empty => Err(Error::Backend("GEMM of an unwritten activation".into())),
        }
    }

    fn add_bias(&self, x: &mut Act, b: &Vector, rows: RowRange) -> Result<()> {
        whole("add_bias", &rows, x.rows)?;
        check(b.len == x.cols, || "add_bias: width".into())?;
        let shape = x.shape();
        Ok(self.gpu.add_bias(x.f32_mut("add_bias")?, &b.data, shape)?)
    }

    fn rope(
        &self,
        step: &DeviceStep,
        qkv: &mut Act,
        inv_freq: &Vector,
        d: AttnDims,
        rows: RowRange,
    ) -> Result<()> {
        whole("rope", &rows, qkv.rows)?;
        let shape = qkv.shape();
        let heads = d.num_heads + d.num_kv_heads;
        Ok(self.gpu.rope(
            step,
            qkv.f32_mut("rope")?,
            shape,
            &inv_freq.data,
            heads,
            d.head_dim,
        )?)
    }

    fn kv_append(
        &self,
        step: &DeviceStep,
        qkv: &Act,
        kv: &mut KvCache,
        layer: usize,
        d: AttnDims,
        rows: RowRange,
    ) -> Result<()> {
        whole("kv_append", &rows, qkv.rows)?;
        check(qkv.rows == step.rows, || "kv_append: rows".into())?;
        Ok(self
            .gpu
            .kv_append(step, qkv.f32("kv_append")?, qkv.cols, d.q_dim(), kv, layer)?)
    }

    fn attention(
        &self,
        step: &DeviceStep,
        qkv: &Act,
        kv: &KvCache,
        layer: usize,
        d: AttnDims,
        out: &mut Act,
        rows: RowRange,
    ) -> Result<()> {
        whole("attention", &rows, qkv.rows)?;
        if !self.bf16_acts() {
            self.attention_forced(step, (qkv, kv, layer), d, out, AttnOverride::default())?;
            return Ok(());
        }
        // The output is the o projection's input: f32 from the kernel,
        // cast to bf16 (the f32 buffer goes back to the pool, in stream
        // order, after the cast).
        let mut f = self.act(out.rows, out.cols)?;
        self.attention_forced(step, (qkv, kv, layer), d, &mut f, AttnOverride::default())?;
        let n = out.rows * out.cols;
        let o = self.out_bf16(out)?;
        Ok(self.gpu.cast_bf16(f.f32("attention")?, o, n)?)
    }

    fn add(&self, x: &mut Act, y: &Act, rows: RowRange) -> Result<()> {
        whole("add", &rows, x.rows)?;
        check(x.shape() == y.shape(), || "add: shapes".into())?;
        let n = x.rows * x.cols;
        Ok(self.gpu.add(x.f32_mut("add")?, y.f32("add")?, n)?)
    }

    fn silu_mul(&self, gate_up: &Act, out: &mut Act, rows: RowRange) -> Result<()> {
        whole("silu_mul", &rows, out.rows)?;
        check(
            gate_up.rows == out.rows && gate_up.cols == 2 * out.cols,
            || "silu_mul: shapes".into(),
        )?;
        if self.bf16_acts() {
            return self.silu_mul_gemm_input(gate_up, out, rows);
        }
        let (rows, inter) = (out.rows, out.cols);
        let o = self.out_f32(out)?;
        Ok(self
            .gpu
            .silu_mul(gate_up.f32("silu_mul")?, o, rows, inter)?)
    }

    fn add_rmsnorm(
        &self,
        x: &mut Act,
        y: &Act,
        w: &Vector,
        eps: f32,
        out: &mut Act,
        rows: RowRange,
    ) -> Result<()> {
        check(
            x.shape() == y.shape() && out.shape() == x.shape() && w.len == x.cols,
            || "add_rmsnorm: shapes".into(),
        )?;
        let shape = x.shape();
        let o = self.rms_out(out)?;
        let xy = (x.f32_mut("add_rmsnorm")?, y.f32("add_rmsnorm")?);
        Ok(self.gpu.add_rmsnorm(xy, &w.data, eps, shape, rows, o)?)
    }

    fn rope_kv_append(
        &self,
        step: &DeviceStep,
        qkv: &mut Act,
        inv_freq: &Vector,
        kv: &mut KvCache,
        layer: usize,
        d: AttnDims,
        rows: RowRange,
    ) -> Result<()> {
        let shape = qkv.shape();
        let heads = Heads {
            q: d.num_heads,
            kv: d.num_kv_heads,
            dim: d.head_dim,
        };
        let q = qkv.f32_mut("rope_kv_append")?;
        Ok(self
            .gpu
            .rope_kv_append(step, q, shape, &inv_freq.data, kv, layer, heads, rows)?)
    }

    /// bf16 in bf16 activation mode (the `silu_mul_bf16` kernel), f32 (as
    /// `silu_mul`) otherwise.
    fn silu_mul_gemm_input(&self, gate_up: &Act, out: &mut Act, rows: RowRange) -> Result<()> {
        check(
            gate_up.rows == out.rows && gate_up.cols == 2 * out.cols,
            || "silu_mul: shapes".into(),
        )?;
        if !self.bf16_acts() {
            return self.silu_mul(gate_up, out, rows);
        }
        let dims = (out.rows, out.cols);
        let o = self.out_bf16(out)?;
        Ok(self
            .gpu
            .silu_mul_bf16(gate_up.f32("silu_mul")?, o, dims, rows)?)
    }

    fn gather_rows(&self, step: &DeviceStep, x: &Act, out: &mut Act, rows: RowRange) -> Result<()> {
        whole("gather_rows", &rows, out.rows)?;
        check(out.rows == step.logit_rows && out.cols == x.cols, || {
            "gather_rows: shapes".into()
        })?;
        if out.rows == 0 {
            return Ok(());
        }
        let (rows, cols) = (x.rows, x.cols);
        let o = self.out_f32(out)?;
        Ok(self
            .gpu
            .gather_rows(step, x.f32("gather_rows")?, rows, o, cols)?)
    }

    fn sample(
        &self,
        logits: &Act,
        params: &[Option<SampleParams>],
        want_logits: bool,
    ) -> Result<SampleOutput> {
        check(params.len() == logits.rows, || {
            "sample: one parameter set per row".into()
        })?;
        if logits.rows == 0 {
            return Ok(SampleOutput {
                sampled: vec![],
                logits: want_logits.then(Vec::new),
            });
        }
        let l = logits.f32("sample")?;
        let sampled = self.gpu.sample(l, logits.cols, params)?;
        let logits = if want_logits {
            Some(self.gpu.download(l, logits.rows * logits.cols)?)
        } else {
            None
        };
        Ok(SampleOutput { sampled, logits })
    }

    fn copy_blocks(&self, kv: &mut KvCache, pairs: &[(u32, u32)]) -> Result<()> {
        Ok(self.gpu.copy_blocks(kv, pairs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SeqMeta;

    #[test]
    fn step_arrays_give_each_row_its_causal_key_count_and_table() {
        let meta = StepMeta {
            tokens: vec![5, 6, 7, 8],
            positions: vec![17, 18, 19, 3],
            slots: vec![1, 2, 3, 4],
            seqs: vec![
                SeqMeta {
                    q_start: 0,
                    q_len: 3,
                    ctx_len: 20,
                    block_table: vec![9, 4],
                },
                SeqMeta {
                    q_start: 3,
                    q_len: 1,
                    ctx_len: 4,
                    block_table: vec![7],
                },
            ],
            logit_rows: vec![2, 3],
        };
        let a = step_arrays(&meta).unwrap();
        assert_eq!(a.kv_len, vec![18, 19, 20, 4]);
        assert_eq!(a.table_off, vec![0, 0, 0, 2]);
        assert_eq!(a.tables, vec![9, 4, 7]);
        let mut bad = meta.clone();
        bad.seqs[1].ctx_len = 17; // more keys than one block holds
        assert!(step_arrays(&bad).is_err());
        let mut gap = meta;
        gap.seqs.pop(); // row 3 belongs to no sequence
        assert!(step_arrays(&gap).is_err());
    }
}
