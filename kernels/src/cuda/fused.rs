//! Launch wrappers of `fused.cu`: the residual add with RMSNorm, RoPE with
//! the KV append, and SwiGLU written in bf16 for the next GEMM. Each runs
//! on a range of rows of its activations (the pointers are offset to the
//! range's first row on the host), and each matches the composition of the
//! unfused ops it replaces (`crate::cpu::fused` is the reference).

use super::device::{Gpu, check_len};
use super::kv::{BLOCK_TOKENS, KvCache};
use super::rowwise::{RmsOut, Rows};
use super::step::DeviceStep;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};
use half::bf16;
use std::ops::Range;

#[repr(C)]
struct AddRmsnormParams {
    x: u64,
    y: u64,
    w: u64,
    out: u64,
    dim: u32,
    eps: f32,
}

#[repr(C)]
struct RopeKvParams {
    qkv: u64,
    positions: u64,
    slots: u64,
    inv_freq: u64,
    k: u64,
    v: u64,
    row_stride: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
}

#[repr(C)]
struct SiluBf16Params {
    gate_up: u64,
    out: u64,
    n: u64,
    inter: u32,
}

// SAFETY: plain `#[repr(C)]` structs of integers and floats whose layout
// matches the parameter structs of fused.cu field for field.
unsafe impl DeviceRepr for AddRmsnormParams {}
unsafe impl DeviceRepr for RopeKvParams {}
unsafe impl DeviceRepr for SiluBf16Params {}

/// The attention's head counts, as the fused RoPE + append needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Query heads (rotated in place, from column 0 of a row).
    pub q: usize,
    /// KV heads: k heads follow the q heads, v heads follow the k heads.
    pub kv: usize,
    pub dim: usize,
}

fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Unsupported(format!("{what} = {v} exceeds u32")))
}

/// One block of 256 threads per row of `rows`.
fn per_row(rows: &Range<usize>) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (u32_of("rows", rows.len())?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `rows` lies within `have` rows.
fn in_range(what: &str, rows: &Range<usize>, have: usize) -> Result<()> {
    if rows.start > rows.end || rows.end > have {
        return Err(Error::Shape(format!("{what}: rows {rows:?} of {have}")));
    }
    Ok(())
}

impl Gpu {
    /// For the rows of `rows`: `x += y`, then `out = rmsnorm(x) * w` in
    /// bf16 or f32; `x` and `y` are `shape`, `out` is a view of the rows of
    /// `rows` (from its first row, as every row-range output), `w` holds
    /// `shape.cols`. Rows outside the range are not touched.
    pub fn add_rmsnorm(
        &self,
        (x, y): (&mut CudaSlice<f32>, &CudaSlice<f32>),
        w: &CudaSlice<f32>,
        eps: f32,
        shape: Rows,
        rows: Range<usize>,
        out: RmsOut<'_>,
    ) -> Result<()> {
        check_len("add_rmsnorm x", x.len(), shape.n())?;
        check_len("add_rmsnorm y", y.len(), shape.n())?;
        check_len("add_rmsnorm w", w.len(), shape.cols)?;
        in_range("add_rmsnorm", &rows, shape.rows)?;
        let (kernel, out_ptr, out_len) = match &out {
            RmsOut::Bf16(o) => ("add_rmsnorm_bf16", self.ptr(o), o.len()),
            RmsOut::F32(o) => ("add_rmsnorm_f32", self.ptr(o), o.len()),
        };
        check_len("add_rmsnorm out", out_len, rows.len() * shape.cols)?;
        if rows.is_empty() {
            return Ok(());
        }
        let first = (rows.start * shape.cols) as u64;
        let p = AddRmsnormParams {
            x: self.ptr(x) + 4 * first,
            y: self.ptr(y) + 4 * first,
            w: self.ptr(w),
            out: out_ptr,
            dim: u32_of("dim", shape.cols)?,
            eps,
        };
        // SAFETY: x and y hold shape.rows x dim elements and the range
        // lies within shape.rows (checked), so block r touches row
        // rows.start + r of x and y and row r of out, which holds the
        // range's rows (checked); w holds dim (checked). f32 and bf16 pointers
        // stay aligned to their element size.
        unsafe { self.launch(kernel, per_row(&rows)?, &p) }
    }

    /// For the rows of `rows` of the step: rotates their q and k heads in
    /// `qkv` (rows of `shape.cols`: q | k | v from column 0) by the step's
    /// positions, then writes the rotated k and the v of each row to its
    /// slot of `layer` in bf16: `rope` then `kv_append` in one launch.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv_append(
        &self,
        step: &DeviceStep,
        qkv: &mut CudaSlice<f32>,
        shape: Rows,
        inv_freq: &CudaSlice<f32>,
        kv: &mut KvCache,
        layer: usize,
        heads: Heads,
        rows: Range<usize>,
    ) -> Result<()> {
        let d = heads.dim;
        check_len("rope_kv qkv", qkv.len(), shape.n())?;
        check_len("rope_kv inv_freq", inv_freq.len(), d / 2)?;
        in_range("rope_kv_append", &rows, shape.rows)?;
        let width = (heads.q + 2 * heads.kv) * d;
        if shape.rows != step.rows
            || width > shape.cols
            || !d.is_multiple_of(2)
            || heads.kv != kv.kv_heads
            || d != kv.head_dim
        {
            return Err(Error::Shape(format!(
                "rope_kv_append: {} + 2 x {} heads of {d} in rows of {} ({} rows, step of {}), \
                 cache of {} heads of {}",
                heads.q, heads.kv, shape.cols, shape.rows, step.rows, kv.kv_heads, kv.head_dim
            )));
        }
        if step.max_slot as usize >= kv.num_blocks * BLOCK_TOKENS {
            return Err(Error::Shape(format!(
                "slot {} outside a cache of {} blocks",
                step.max_slot, kv.num_blocks
            )));
        }
        let (k, v) = kv.layer_ptrs(self, layer)?;
        if rows.is_empty() {
            return Ok(());
        }
        let r0 = rows.start as u64;
        let p = RopeKvParams {
            qkv: self.ptr(qkv) + 4 * r0 * shape.cols as u64,
            positions: step.positions(self) + 4 * r0,
            slots: step.slots(self) + 4 * r0,
            inv_freq: self.ptr(inv_freq),
            k,
            v,
            row_stride: u32_of("cols", shape.cols)?,
            heads: u32_of("heads", heads.q)?,
            kv_heads: u32_of("kv_heads", heads.kv)?,
            head_dim: u32_of("head_dim", d)?,
        };
        // SAFETY: the range lies within the step's rows, whose positions
        // and slots the step holds; (q + 2 kv) heads of head_dim fit in a
        // row; every slot is inside the cache (max checked) and the layer
        // exists (layer_ptrs), so each K/V write lands in this layer;
        // inv_freq holds head_dim / 2 (checked).
        unsafe { self.launch("rope_kv_append_bf16", per_row(&rows)?, &p) }
    }

    /// SwiGLU of the rows of `rows`: rows of `[gate | up]` (`2 * inter`
    /// wide, `gate_up` holds `total` of them) into bf16 rows of `inter`.
    pub fn silu_mul_bf16(
        &self,
        gate_up: &CudaSlice<f32>,
        out: &mut CudaSlice<bf16>,
        (total, inter): (usize, usize),
        rows: Range<usize>,
    ) -> Result<()> {
        check_len("silu gate_up", gate_up.len(), total * 2 * inter)?;
        check_len("silu out", out.len(), total * inter)?;
        in_range("silu_mul_bf16", &rows, total)?;
        let n = rows.len() * inter;
        if n == 0 {
            return Ok(());
        }
        let r0 = rows.start as u64;
        let p = SiluBf16Params {
            gate_up: self.ptr(gate_up) + 4 * r0 * 2 * inter as u64,
            out: self.ptr(out) + 2 * r0 * inter as u64,
            n: n as u64,
            inter: u32_of("inter", inter)?,
        };
        // SAFETY: from the range's first row, gate_up holds rows.len() x
        // 2 inter f32 and out rows.len() x inter bf16 (checked: the range
        // lies within `total` rows of both).
        unsafe { self.launch("silu_mul_bf16", self.grid_for(n), &p) }
    }
}
