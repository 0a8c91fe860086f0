//! Launch wrappers of `rowwise.cu`, `rope.cu` and `random.cu`.
//!
//! Row-wise wrappers take buffers or views of them ([`super::view`]) and a
//! step or a range of its rows ([`StepRows`]): an op over a nano-batch runs
//! the same kernel on a smaller matrix that starts at its first row.

use super::device::{Gpu, check_len};
use super::step::{DeviceStep, StepRows};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig};
use half::bf16;
use std::ops::Range;

#[repr(C)]
struct RandomParams {
    out: u64,
    n: u64,
    seed: u64,
    stream: u64,
    scale: f32,
    mean: f32,
}

#[repr(C)]
struct EmbedParams {
    table: u64,
    tokens: u64,
    out: u64,
    rows: u32,
    dim: u32,
}

#[repr(C)]
struct RmsnormParams {
    x: u64,
    w: u64,
    out: u64,
    rows: u32,
    dim: u32,
    eps: f32,
}

#[repr(C)]
struct AddParams {
    x: u64,
    y: u64,
    n: u64,
}

#[repr(C)]
struct BiasParams {
    x: u64,
    b: u64,
    n: u64,
    cols: u32,
}

#[repr(C)]
struct SiluParams {
    gate_up: u64,
    out: u64,
    n: u64,
    inter: u32,
}

#[repr(C)]
struct SplitParams {
    x: u64,
    out: u64,
    n: u64,
}

#[repr(C)]
struct HalvesParams {
    tmp: u64,
    out: u64,
    n: u64,
}

#[repr(C)]
struct GatherParams {
    x: u64,
    rows: u64,
    out: u64,
    n: u32,
    cols: u32,
}

#[repr(C)]
struct CastParams {
    x: u64,
    out: u64,
    n: u64,
}

#[repr(C)]
struct RopeParams {
    qkv: u64,
    positions: u64,
    inv_freq: u64,
    rows: u32,
    row_stride: u32,
    heads: u32,
    head_dim: u32,
}

// SAFETY: plain `#[repr(C)]` structs of integers and floats whose layout
// matches the parameter structs of the `.cu` files field for field.
unsafe impl DeviceRepr for RandomParams {}
unsafe impl DeviceRepr for EmbedParams {}
unsafe impl DeviceRepr for RmsnormParams {}
unsafe impl DeviceRepr for AddParams {}
unsafe impl DeviceRepr for BiasParams {}
unsafe impl DeviceRepr for SiluParams {}
unsafe impl DeviceRepr for GatherParams {}
unsafe impl DeviceRepr for SplitParams {}
unsafe impl DeviceRepr for HalvesParams {}
unsafe impl DeviceRepr for CastParams {}
unsafe impl DeviceRepr for RopeParams {}

/// One block per row.
fn per_row(rows: usize, threads: u32) -> Result<LaunchConfig> {
    let r = u32::try_from(rows).map_err(|_| Error::Unsupported(format!("{rows} rows")))?;
    Ok(LaunchConfig {
        grid_dim: (r, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Unsupported(format!("{what} = {v} exceeds u32")))
}

/// Where an op reads and writes: `rows` rows of `cols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rows {
    pub rows: usize,
    pub cols: usize,
}

impl Rows {
    pub fn n(&self) -> usize {
        self.rows * self.cols
    }
}

impl Gpu {
    /// `out[i] = random_weight(seed, stream, i, mean, std)` rounded to bf16,
    /// bit-identical to the host's `rng::random_weight` + `bf16::from_f32`.
    pub fn random_bf16(
        &self,
        out: &mut CudaSlice<bf16>,
        n: usize,
        seed: u64,
        stream: u64,
        mean: f32,
        std: f32,
    ) -> Result<()> {
        check_len("random out", out.len(), n)?;
        let p = RandomParams {
            out: self.ptr(out),
            n: n as u64,
            seed,
            stream,
            scale: std * crate::rng::SQRT3,
            mean,
        };
        // SAFETY: `out` holds at least `n` bf16 (checked); the kernel writes
        // indices below `n` only.
        unsafe { self.launch("random_bf16", self.grid_for(n), &p) }
    }

    /// `out[t] = table[tokens[t]]` as f32 for the step's rows (or a range
    /// of them, `out` then holding that range's rows); `table` is
    /// `[vocab, dim]`.
    pub fn embed<'s>(
        &self,
        step: impl Into<StepRows<'s>>,
        table: &CudaSlice<bf16>,
        vocab: usize,
        out: &mut impl DevicePtrMut<f32>,
        dim: usize,
    ) -> Result<()> {
        let step = step.into();
        let rows = step.len();
        check_len("embed table", table.len(), vocab * dim)?;
        check_len("embed out", out.len(), rows * dim)?;
        if step.step.max_token as usize >= vocab {
            return Err(Error::Shape(format!(
                "token {} outside a vocabulary of {vocab}",
                step.step.max_token
            )));
        }
        let p = EmbedParams {
            table: self.ptr(table),
            tokens: step.tokens(self),
            out: self.ptr_mut(out),
            rows: u32_of("rows", rows)?,
            dim: u32_of("dim", dim)?,
        };
        // SAFETY: every token of the step indexes a row of `table` (max
        // checked), the range's tokens are entries `start..end` of the
        // step's, and `out` holds rows x dim f32.
        unsafe { self.launch("embed_bf16", per_row(rows, 256)?, &p) }
    }

    /// RMSNorm of f32 rows into bf16 (`out_bf16`) or f32.
    pub fn rmsnorm(
        &self,
        x: &impl DevicePtr<f32>,
        w: &CudaSlice<f32>,
        eps: f32,
        shape: Rows,
        out: RmsOut<'_>,
    ) -> Result<()> {
        check_len("rmsnorm x", x.len(), shape.n())?;
        check_len("rmsnorm w", w.len(), shape.cols)?;
        let (kernel, out_ptr, out_len) = match out {
            RmsOut::Bf16(o) => ("rmsnorm_bf16", self.ptr(&o), o.len()),
            RmsOut::F32(o) => ("rmsnorm_f32", self.ptr(&o), o.len()),
        };
        check_len("rmsnorm out", out_len, shape.n())?;
        let p = RmsnormParams {
            x: self.ptr(x),
            w: self.ptr(w),
            out: out_ptr,
            rows: u32_of("rows", shape.rows)?,
            dim: u32_of("dim", shape.cols)?,
            eps,
        };
        // SAFETY: x and out hold rows x dim elements, w holds dim (checked).
        unsafe { self.launch(kernel, per_row(shape.rows, 256)?, &p) }
    }

    /// `x += y` over `n` elements.
    pub fn add(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        y: &impl DevicePtr<f32>,
        n: usize,
    ) -> Result<()> {
        check_len("add x", x.len(), n)?;
        check_len("add y", y.len(), n)?;
        let p = AddParams {
            x: self.ptr_mut(x),
            y: self.ptr(y),
            n: n as u64,
        };
        // SAFETY: both hold n f32 (checked).
        unsafe { self.launch("add_f32", self.grid_for(n), &p) }
    }

    /// `x[t] += b` for every row of `shape`.
    pub fn add_bias(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        b: &CudaSlice<f32>,
        shape: Rows,
    ) -> Result<()> {
        check_len("bias x", x.len(), shape.n())?;
        check_len("bias b", b.len(), shape.cols)?;
        let p = BiasParams {
            x: self.ptr_mut(x),
            b: self.ptr(b),
            n: shape.n() as u64,
            cols: u32_of("cols", shape.cols)?,
        };
        // SAFETY: x holds rows x cols, b holds cols (checked).
        unsafe { self.launch("add_bias_f32", self.grid_for(shape.n()), &p) }
    }

    /// SwiGLU: rows of `[gate | up]` (`2 * inter` wide) into rows of `inter`.
    pub fn silu_mul(
        &self,
        gate_up: &impl DevicePtr<f32>,
        out: &mut impl DevicePtrMut<f32>,
        rows: usize,
        inter: usize,
    ) -> Result<()> {
        check_len("silu gate_up", gate_up.len(), rows * 2 * inter)?;
        check_len("silu out", out.len(), rows * inter)?;
        let n = rows * inter;
        let p = SiluParams {
            gate_up: self.ptr(gate_up),
            out: self.ptr_mut(out),
            n: n as u64,
            inter: u32_of("inter", inter)?,
        };
        // SAFETY: gate_up holds rows x 2 inter, out rows x inter (checked).
        unsafe { self.launch("silu_mul_f32", self.grid_for(n), &p) }
    }

    /// `out[i] = x[step.logit_rows[i]]`.
    pub fn gather_rows(
        &self,
        step: &DeviceStep,
        x: &CudaSlice<f32>,
        x_rows: usize,
        out: &mut CudaSlice<f32>,
        cols: usize,
    ) -> Result<()> {
        self.gather_rows_in(step, 0..step.logit_rows, x, x_rows, out, cols)
    }

    /// `out[i - logit.start] = x[step.logit_rows[i]]` for the logit rows `i`
    /// in `logit`: `out` holds that range's rows, `x` all of the step's.
    pub fn gather_rows_in(
        &self,
        step: &DeviceStep,
        logit: Range<usize>,
        x: &CudaSlice<f32>,
        x_rows: usize,
        out: &mut impl DevicePtrMut<f32>,
        cols: usize,
    ) -> Result<()> {
        if logit.start > logit.end || logit.end > step.logit_rows {
            return Err(Error::Shape(format!(
                "logit rows {logit:?} of {}",
                step.logit_rows
            )));
        }
        let n = logit.len();
        if n == 0 {
            return Ok(());
        }
        check_len("gather x", x.len(), x_rows * cols)?;
        check_len("gather out", out.len(), n * cols)?;
        if step.max_logit_row as usize >= x_rows {
            return Err(Error::Shape(format!(
                "logit row {} of {x_rows} rows",
                step.max_logit_row
            )));
        }
        let p = GatherParams {
            x: self.ptr(x),
            rows: step.logit_rows_ptr(self) + 4 * logit.start as u64,
            out: self.ptr_mut(out),
            n: u32_of("rows", n)?,
            cols: u32_of("cols", cols)?,
        };
        // SAFETY: every gathered row is below x_rows (max checked); the
        // range's entries are `start..end` of the step's logit rows
        // (checked); out holds n x cols.
        unsafe { self.launch("gather_rows_f32", per_row(n, 256)?, &p) }
    }

    /// `x` (`rows x cols` f32) as `[hi; lo]`, `2 rows x cols` bf16 with
    /// `hi = bf16(x)`, `lo = bf16(x - hi)`.
    pub fn split_bf16x2(
        &self,
        x: &impl DevicePtr<f32>,
        out: &mut CudaSlice<bf16>,
        n: usize,
    ) -> Result<()> {
        check_len("split x", x.len(), n)?;
        check_len("split out", out.len(), 2 * n)?;
        let p = SplitParams {
            x: self.ptr(x),
            out: self.ptr(out),
            n: n as u64,
        };
        // SAFETY: x holds n f32, out 2n bf16 (checked).
        unsafe { self.launch("split_bf16x2", self.grid_for(n), &p) }
    }

    /// `out[i] = tmp[i] + tmp[n + i]`.
    pub fn sum_halves(
        &self,
        tmp: &CudaSlice<f32>,
        out: &mut impl DevicePtrMut<f32>,
        n: usize,
    ) -> Result<()> {
        check_len("halves tmp", tmp.len(), 2 * n)?;
        check_len("halves out", out.len(), n)?;
        let p = HalvesParams {
            tmp: self.ptr(tmp),
            out: self.ptr_mut(out),
            n: n as u64,
        };
        // SAFETY: tmp holds 2n f32, out n (checked).
        unsafe { self.launch("sum_halves_f32", self.grid_for(n), &p) }
    }

    /// f32 to bf16, `n` elements.
    pub fn cast_bf16(
        &self,
        x: &impl DevicePtr<f32>,
        out: &mut impl DevicePtrMut<bf16>,
        n: usize,
    ) -> Result<()> {
        check_len("cast x", x.len(), n)?;
        check_len("cast out", out.len(), n)?;
        let p = CastParams {
            x: self.ptr(x),
            out: self.ptr_mut(out),
            n: n as u64,
        };
        // SAFETY: both hold n elements (checked).
        unsafe { self.launch("cast_bf16", self.grid_for(n), &p) }
    }

    /// Rotates the first `heads` heads of every row of `qkv` (`shape.cols`
    /// wide) by the positions of the step's rows (or of a range of them,
    /// `qkv` then holding that range's rows).
    pub fn rope<'s>(
        &self,
        step: impl Into<StepRows<'s>>,
        qkv: &mut impl DevicePtrMut<f32>,
        shape: Rows,
        inv_freq: &CudaSlice<f32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let step = step.into();
        check_len("rope qkv", qkv.len(), shape.n())?;
        check_len("rope inv_freq", inv_freq.len(), head_dim / 2)?;
        if shape.rows != step.len() || heads * head_dim > shape.cols || !head_dim.is_multiple_of(2)
        {
            return Err(Error::Shape(format!(
                "rope: {heads} heads of {head_dim} in rows of {} ({} rows, step of {})",
                shape.cols,
                shape.rows,
                step.len()
            )));
        }
        let p = RopeParams {
            qkv: self.ptr_mut(qkv),
            positions: step.positions(self),
            inv_freq: self.ptr(inv_freq),
            rows: u32_of("rows", shape.rows)?,
            row_stride: u32_of("cols", shape.cols)?,
            heads: u32_of("heads", heads)?,
            head_dim: u32_of("head_dim", head_dim)?,
        };
        // SAFETY: heads x head_dim fit in each row, rows match the step's
        // positions, inv_freq holds head_dim / 2 (checked).
        unsafe { self.launch("rope_f32", per_row(shape.rows, 256)?, &p) }
    }
}

/// Where RMSNorm writes: a buffer (`.into()`) or rows of one.
#[derive(Debug)]
pub enum RmsOut<'a> {
    Bf16(CudaViewMut<'a, bf16>),
    F32(CudaViewMut<'a, f32>),
}

impl<'a> From<&'a mut CudaSlice<f32>> for RmsOut<'a> {
    fn from(s: &'a mut CudaSlice<f32>) -> RmsOut<'a> {
        RmsOut::F32(s.as_view_mut())
    }
}

impl<'a> From<&'a mut CudaSlice<bf16>> for RmsOut<'a> {
    fn from(s: &'a mut CudaSlice<bf16>) -> RmsOut<'a> {
        RmsOut::Bf16(s.as_view_mut())
    }
}
