//! The decoder's ops on the GPU ([`Backend`] for [`CudaBackend`]): each
//! over a range of its activation's rows, on the current lane.

use super::act::{Act, ActBuf, Matrix, RowsOf, Vector};
use super::step::step_arrays;
use super::{CudaBackend, RESERVE_BYTES, check, host_f32, to_bf16};
use crate::backend::tactic::StateId;
use crate::backend::{
    AttnDims, Backend, GraphPass, HostData, KvLayout, RowRange, SampleOutput, StepMeta, TacticEntry,
};
use crate::error::Result;
use rayon::prelude::*;
use tacflow_kernels::cpu::{self, Processing, SampleParams, Sampled};
use tacflow_kernels::cuda::{DeviceStep, Heads, KvCache, LaneEvent};

/// Up to this many rows with vLLM's processing come back to the host one by
/// one; more, and the whole logits come back in one copy.
const PROCESSED_ROWS_ALONE: usize = 8;

impl Backend for CudaBackend {
    type Act = Act;
    type Matrix = Matrix;
    type Vector = Vector;
    type Kv = KvCache;
    type Step = DeviceStep;
    /// A CUDA event without timing, from the GPU's pool.
    type Event = LaneEvent;

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

    fn weight_bytes(&self) -> usize {
        2
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

    /// Needs the fault kernel loaded ([`CudaBackend::with_fault_kernel`]).
    #[cfg(feature = "fault-injection")]
    fn provoke_illegal_address(&self) -> Result<()> {
        self.gpu.write_unmapped()?;
        Ok(())
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

    /// With one lane, unallocated until its first writer; with several,
    /// an f32 buffer from the pool now (see the module doc).
    fn act(&self, rows: usize, cols: usize) -> Result<Act> {
        let buf = if self.gpu.lanes() > 1 {
            ActBuf::F32(self.pool.take(&self.gpu, rows * cols)?)
        } else {
            ActBuf::Empty
        };
        Ok(Act { rows, cols, buf })
    }

    /// Runs on lane 0, after everything any lane was given before (a
    /// schedule that failed half-way may have left work on other lanes).
    fn begin_step(&self, meta: &StepMeta) -> Result<DeviceStep> {
        self.gpu.use_lane(0)?;
        self.gpu.join_lanes()?;
        Ok(DeviceStep::upload(&self.gpu, &step_arrays(meta)?)?)
    }

    fn lanes(&self) -> usize {
        self.gpu.lanes()
    }

    fn use_lane(&self, lane: usize) -> Result<()> {
        Ok(self.gpu.use_lane(lane)?)
    }

    fn new_event(&self) -> Result<LaneEvent> {
        Ok(self.gpu.new_event()?)
    }

    fn signal(&self, event: &LaneEvent) -> Result<()> {
        Ok(self.gpu.signal(event)?)
    }

    fn wait(&self, event: &LaneEvent) -> Result<()> {
        Ok(self.gpu.wait(event)?)
    }

    fn embed(
        &self,
        step: &DeviceStep,
        table: &Matrix,
        out: &mut Act,
        rows: RowRange,
    ) -> Result<()> {
        check(out.rows == step.rows && out.cols == table.cols, || {
            "embed: output shape".into()
        })?;
        let (part, cols) = (step.rows(rows.clone())?, out.cols);
        let mut o = self.out_rows(out, &rows)?;
        Ok(self
            .gpu
            .embed(part, &table.data, table.rows, &mut o, cols)?)
    }

    fn rmsnorm(&self, x: &Act, w: &Vector, eps: f32, out: &mut Act, rows: RowRange) -> Result<()> {
        check(out.shape() == x.shape() && w.len == x.cols, || {
            "rmsnorm: shapes".into()
        })?;
        let xs = x.rows_f32("rmsnorm", &rows)?;
        let o = self.rms_out(out, &rows)?;
        Ok(self.gpu.rmsnorm(&xs, &w.data, eps, x.shape_of(&rows), o)?)
    }

    fn linear(&self, x: &Act, w: &Matrix, out: &mut Act, rows: RowRange) -> Result<()> {
        check(
            x.cols == w.cols && out.rows == x.rows && out.cols == w.rows,
            || {
                format!(
                    "linear: [{}, {}] x [{}, {}]ᵀ into [{}, {}]",
                    x.rows, x.cols, w.rows, w.cols, out.rows, out.cols
                )
            },
        )?;
        x.in_range("linear", &rows)?;
        if rows.is_empty() {
            return Ok(());
        }
        let dims = (rows.len(), w.rows, w.cols);
        let xs = x.rows_any("GEMM", &rows)?;
        let mut o = self.out_rows(out, &rows)?;
        match xs {
            RowsOf::F32(xs) => Ok(self.gpu.gemm_nt_f32(&xs, &w.data, &mut o, dims)?),
            RowsOf::Bf16(xs) => Ok(self.gpu.gemm_nt(&xs, &w.data, &mut o, dims)?),
        }
    }

    fn add_bias(&self, x: &mut Act, b: &Vector, rows: RowRange) -> Result<()> {
        check(b.len == x.cols, || "add_bias: width".into())?;
        let shape = x.shape_of(&rows);
        let mut xs = x.rows_f32_mut("add_bias", &rows)?;
        Ok(self.gpu.add_bias(&mut xs, &b.data, shape)?)
    }

    fn rope(
        &self,
        step: &DeviceStep,
        qkv: &mut Act,
        inv_freq: &Vector,
        d: AttnDims,
        rows: RowRange,
    ) -> Result<()> {
        check(qkv.rows == step.rows, || "rope: rows".into())?;
        let (part, shape) = (step.rows(rows.clone())?, qkv.shape_of(&rows));
        let heads = d.num_heads + d.num_kv_heads;
        Ok(self.gpu.rope(
            part,
            &mut qkv.rows_f32_mut("rope", &rows)?,
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
        check(qkv.rows == step.rows, || "kv_append: rows".into())?;
        let part = step.rows(rows.clone())?;
        let q = qkv.rows_f32("kv_append", &rows)?;
        Ok(self
            .gpu
            .kv_append(part, &q, qkv.cols, d.q_dim(), kv, layer)?)
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
        if !self.bf16_acts() {
            return self.attention_launches(step, (qkv, kv, layer), d, out, rows);
        }
        // The output is the o projection's input: f32 from the kernel into
        // the backend's attention scratch, then cast to bf16.
        let mut f = self.attention_scratch(out.rows, out.cols)?;
        let r = self
            .attention_launches(step, (qkv, kv, layer), d, &mut f, rows.clone())
            .and_then(|()| {
                let n = rows.len() * out.cols;
                let src = f.rows_f32("attention", &rows)?;
                let mut o = self.out_rows_bf16(out, &rows)?;
                Ok(self.gpu.cast_bf16(&src, &mut o, n)?)
            });
        self.keep_attention_scratch(f);
        r
    }

    fn device_tactic(&self) -> bool {
        self.tactic.is_some()
    }

    fn device_baselines(&self) -> bool {
        self.tactic.is_some()
    }

    fn tactic_open(
        &self,
        id: StateId,
        params: &tacflow_kernels::tactic::TacticParams,
        d: AttnDims,
        layers: usize,
    ) -> Result<()> {
        let shape = tacflow_kernels::cuda::TacticShape {
            kv_heads: d.num_kv_heads,
            head_dim: d.head_dim,
            group: d.num_heads / d.num_kv_heads,
        };
        shape.check()?;
        self.gpu_tactic()?.dev.open(id, params, d, layers)
    }

    fn tactic_fork(&self, parent: StateId, child: StateId) -> Result<()> {
        self.gpu_tactic()?.dev.fork(parent, child)
    }

    fn tactic_reset(&self, id: StateId) {
        if let Ok(mut t) = self.gpu_tactic() {
            t.dev.reset(id);
        }
    }

    fn tactic_close(&self, id: StateId) {
        if let Ok(mut t) = self.gpu_tactic() {
            t.dev.close(id);
        }
    }

    fn tactic_attention(
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
        self.tactic_attention_rows(step, qkv, kv, layer, d, entries, out, rows)
    }

    fn tactic_diagnostics(&self) -> Result<Vec<crate::backend::tactic::TacticMeasure>> {
        self.gpu_tactic()?.take_measures(&self.gpu)
    }

    fn tactic_end_step(&self, commit: bool) {
        if let Ok(mut t) = self.gpu_tactic() {
            t.dev.end_step(commit);
            t.measured.clear();
        }
    }

    fn tactic_bytes(&self) -> usize {
        self.gpu_tactic().map_or(0, |t| t.dev.live_bytes())
    }

    fn add(&self, x: &mut Act, y: &Act, rows: RowRange) -> Result<()> {
        check(x.shape() == y.shape(), || "add: shapes".into())?;
        let n = rows.len() * x.cols;
        let ys = y.rows_f32("add", &rows)?;
        Ok(self.gpu.add(&mut x.rows_f32_mut("add", &rows)?, &ys, n)?)
    }

    fn silu_mul(&self, gate_up: &Act, out: &mut Act, rows: RowRange) -> Result<()> {
        check(
            gate_up.rows == out.rows && gate_up.cols == 2 * out.cols,
            || "silu_mul: shapes".into(),
        )?;
        if self.bf16_acts() {
            return self.silu_mul_gemm_input(gate_up, out, rows);
        }
        let (n, inter) = (rows.len(), out.cols);
        let g = gate_up.rows_f32("silu_mul", &rows)?;
        let mut o = self.out_rows(out, &rows)?;
        Ok(self.gpu.silu_mul(&g, &mut o, n, inter)?)
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
        let o = self.rms_out(out, &rows)?;
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
        out.in_range("silu_mul", &rows)?;
        let n = out.rows * out.cols;
        if !matches!(&out.buf, ActBuf::Bf16(s) if s.len() >= n) {
            self.out_rows_bf16(out, &(0..0))?;
        }
        let ActBuf::Bf16(o) = &mut out.buf else {
            unreachable!("allocated as bf16 above")
        };
        Ok(self
            .gpu
            .silu_mul_bf16(gate_up.f32("silu_mul")?, o, dims, rows)?)
    }

    fn gather_rows(&self, step: &DeviceStep, x: &Act, out: &mut Act, rows: RowRange) -> Result<()> {
        check(out.rows == step.logit_rows && out.cols == x.cols, || {
            "gather_rows: shapes".into()
        })?;
        out.in_range("gather_rows", &rows)?;
        if rows.is_empty() {
            return Ok(());
        }
        let (x_rows, cols) = (x.rows, x.cols);
        let xs = x.f32("gather_rows")?;
        let mut o = self.out_rows(out, &rows)?;
        Ok(self
            .gpu
            .gather_rows_in(step, rows, xs, x_rows, &mut o, cols)?)
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
        // The step's sync point: the logits may come from any lane, and the
        // downloads below wait for every lane.
        self.gpu.join_lanes()?;
        let sampled = self.gpu.sample(l, logits.cols, params)?;
        let logits = if want_logits {
            Some(self.gpu.download(l, logits.rows * logits.cols)?)
        } else {
            None
        };
        Ok(SampleOutput { sampled, logits })
    }

    /// vLLM's logits processing on the host: the rows that use it are
    /// copied back and processed and sampled by the CPU reference (their
    /// penalties need the sequence's token counts, which live on the host),
    /// the others sampled on the device as [`Backend::sample`] does. The
    /// results are the CPU backend's for the same logits.
    fn sample_processed(
        &self,
        logits: &Act,
        params: &[Option<SampleParams>],
        procs: &[Option<Processing>],
        want_logits: bool,
    ) -> Result<SampleOutput> {
        check(procs.len() == params.len(), || {
            "sample_processed: one processing entry per row".into()
        })?;
        let processed = |i: usize| params[i].is_some() && procs[i].is_some();
        if !(0..params.len()).any(processed) {
            return self.sample(logits, params, want_logits);
        }
        let device: Vec<Option<SampleParams>> = (0..params.len())
            .map(|i| if processed(i) { None } else { params[i] })
            .collect();
        let mut out = self.sample(logits, &device, want_logits)?;
        let cols = logits.cols;
        let l = logits.f32("sample_processed")?;
        let wanted: Vec<usize> = (0..params.len()).filter(|&i| processed(i)).collect();
        // The rows come back one by one, or, when many are processed, with
        // every other row in one copy (one synchronisation, not one each).
        let all = match out.logits.take() {
            Some(all) => Some(all),
            None if wanted.len() > PROCESSED_ROWS_ALONE => {
                Some(self.gpu.download(l, logits.rows * cols)?)
            }
            None => None,
        };
        let rows: Vec<(usize, Vec<f32>)> = wanted
            .into_iter()
            .map(|i| match &all {
                Some(all) => Ok((i, all[i * cols..(i + 1) * cols].to_vec())),
                None => Ok((i, self.gpu.download_range(l, i * cols, cols)?)),
            })
            .collect::<Result<_>>()?;
        if want_logits {
            out.logits = all;
        }
        let sampled: Vec<(usize, Sampled)> = rows
            .par_iter()
            .filter_map(|(i, row)| {
                let (p, proc) = (params[*i].as_ref()?, procs[*i].as_ref()?);
                Some((*i, cpu::sample_processed(row, p, proc)))
            })
            .collect();
        for (i, s) in sampled {
            out.sampled[i] = Some(s);
        }
        Ok(out)
    }

    fn supports_processing(&self) -> bool {
        true
    }

    fn copy_blocks(&self, kv: &mut KvCache, pairs: &[(u32, u32)]) -> Result<()> {
        Ok(self.gpu.copy_blocks(kv, pairs)?)
    }

    /// With `cuda_graphs` on, a pure decode step (`graphs::graph_key`).
    fn graph_step(&self, meta: &StepMeta) -> bool {
        self.graph_step_ok(meta)
    }

    fn forward_graph(
        &self,
        meta: &StepMeta,
        kv: &mut KvCache,
        pass: &mut dyn GraphPass<Self>,
    ) -> Result<Act> {
        self.run_graph(meta, kv, pass)
    }

    fn wants_pad_block(&self) -> bool {
        self.graphs.borrow().is_some()
    }

    fn set_pad_block(&mut self, block: u32) {
        if let Some(g) = self.graphs.get_mut() {
            g.set_pad_block(block);
        }
    }
}
