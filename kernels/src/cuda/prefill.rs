//! Launch wrapper of the tensor-core prefill attention
//! (`kernels/prefill.cu`): the rows of a launch that are prefill chunks go
//! to it in tiles of up to 64 consecutive tokens of one sequence, the other
//! rows (decode tokens, short chunks) to the decode kernel of
//! [`super::attention`] (kernels/ATTENTION.md, "Prefill chunks").
//!
//! Experimental (`experimental_prefill_attention`) until a GPU run of
//! `tacflowd selfcheck --groups attention` verifies it: the CPU stand-in
//! (`kernels/examples/prefill_emu`) runs the kernel's own source against
//! the CPU reference, but not on tensor cores.

use super::attention::{AttnIo, AttnOverride, AttnShape};
use super::device::{Gpu, check_len, ready_shared_memory};
use super::step::StepRows;
use crate::error::{Error, Result};
use cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig};
use std::collections::HashMap;
use std::ops::Range;

/// Head sizes `prefill.cu` instantiates.
pub const PREFILL_HEAD_DIMS: [usize; 2] = [64, 128];
/// Query tokens per CTA (`PF_BM`).
pub const PREFILL_TILE_ROWS: usize = 64;
/// Keys per shared-memory tile (`PF_BN`).
const PREFILL_TILE_KEYS: usize = 64;
/// A run of consecutive tokens of one sequence shorter than this stays
/// with the decode kernel: a tile of fewer rows would leave most of its
/// tensor-core work unused, and the decode kernel reads K and V once per
/// KV head where a prefill CTA reads them once per query head.
pub const PREFILL_MIN_ROWS: usize = 16;
const PREFILL_THREADS: usize = 128;

/// The prefill kernel for head size `d`: the daemon's (q and p as bf16 hi
/// and lo halves), or with `bf16` the lab's variant (q and p rounded to
/// bf16 once; `lab/prefill_variants.cu`).
pub fn prefill_kernel(d: usize, bf16: bool) -> String {
    let tag = if bf16 { "_bf16" } else { "" };
    format!("prefill_f32_d{d}{tag}")
}

/// The prefill kernels of one module: the daemon's, or (`bf16`) the lab's.
pub fn prefill_kernels(bf16: bool) -> Vec<String> {
    PREFILL_HEAD_DIMS
        .iter()
        .map(|&d| prefill_kernel(d, bf16))
        .collect()
}

/// Dynamic shared memory of a CTA: q's hi and lo halves, then two buffers
/// of K and two of V, each `[64][d]` bf16.
pub fn prefill_smem_bytes(d: usize) -> usize {
    (2 * PREFILL_TILE_ROWS + 4 * PREFILL_TILE_KEYS) * d * 2
}

/// How a launch's rows are served: prefill tiles and the decode kernel's
/// row ranges, which together cover every row once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrefillSplit {
    /// `[first row, rows, keys, 0]` per tile, rows counted from the
    /// launch's first: up to 64 consecutive tokens of one sequence, `keys`
    /// the largest key count among them.
    pub tiles: Vec<[u32; 4]>,
    /// Rows the decode kernel serves, in maximal ranges.
    pub decode: Vec<Range<usize>>,
}

/// Cuts rows into runs (consecutive rows of one block table whose key
/// counts rise by one: a chunk of one sequence), sends the runs of at least
/// `min_rows` to tiles and every other row to the decode kernel.
pub fn split_rows(kv_len: &[u32], table_off: &[u32], min_rows: usize) -> PrefillSplit {
    let n = kv_len.len().min(table_off.len());
    let mut out = PrefillSplit::default();
    let mut decode_from: Option<usize> = None;
    let mut r = 0;
    while r < n {
        let mut end = r + 1;
        while end < n
            && table_off[end] == table_off[r]
            && kv_len[end] == kv_len[end - 1].wrapping_add(1)
        {
            end += 1;
        }
        if end - r >= min_rows.max(1) {
            if let Some(from) = decode_from.take() {
                out.decode.push(from..r);
            }
            for first in (r..end).step_by(PREFILL_TILE_ROWS) {
                let last = (first + PREFILL_TILE_ROWS).min(end);
                let keys = kv_len[first..last].iter().copied().max().unwrap_or(0);
                out.tiles
                    .push([first as u32, (last - first) as u32, keys, 0]);
            }
        } else {
            decode_from.get_or_insert(r);
        }
        r = end;
    }
    if let Some(from) = decode_from {
        out.decode.push(from..n);
    }
    out
}

#[repr(C)]
struct PrefillParams {
    qkv: u64,
    k: u64,
    v: u64,
    kv_len: u64,
    table_off: u64,
    tables: u64,
    tiles: u64,
    out: u64,
    qkv_stride: u32,
    num_heads: u32,
    kv_heads: u32,
    group: u32,
    scale_log2: f32,
}

// SAFETY: `#[repr(C)]` mirror of `PrefillParams` in prefill.cu.
unsafe impl DeviceRepr for PrefillParams {}

/// Raises each prefill kernel's dynamic shared-memory limit to what it
/// uses and reads how many of its CTAs fit on one SM.
pub(crate) fn prefill_occupancy(
    funcs: &HashMap<String, CudaFunction>,
) -> Result<HashMap<String, usize>> {
    let mut out = HashMap::new();
    for (d, bf16) in PREFILL_HEAD_DIMS
        .iter()
        .flat_map(|&d| [(d, false), (d, true)])
    {
        let name = prefill_kernel(d, bf16);
        let Some(f) = funcs.get(&name) else { continue };
        let n = ready_shared_memory(f, &name, PREFILL_THREADS, prefill_smem_bytes(d))?;
        out.insert(name, n);
    }
    Ok(out)
}

impl Gpu {
    /// Causal attention of the rows of `step` as [`Gpu::attention`], with
    /// the prefill chunks among them on the tensor-core prefill kernel and
    /// the other rows on the decode kernel. Head sizes the prefill kernel
    /// lacks are refused, not served some other way.
    pub fn attention_with_prefill<'s>(
        &self,
        step: impl Into<StepRows<'s>>,
        io: AttnIo<'_>,
        shape: AttnShape,
    ) -> Result<PrefillSplit> {
        self.attention_with_prefill_kernel(step.into(), io, shape, false)
    }

    /// [`Gpu::attention_with_prefill`] on the daemon's prefill kernel, or
    /// with `bf16` on the lab's variant (`Gpu::load_lab` first).
    pub fn attention_with_prefill_kernel(
        &self,
        step: StepRows<'_>,
        io: AttnIo<'_>,
        shape: AttnShape,
        bf16: bool,
    ) -> Result<PrefillSplit> {
        if !PREFILL_HEAD_DIMS.contains(&shape.head_dim) {
            return Err(Error::Unsupported(format!(
                "the prefill attention kernel serves head sizes {PREFILL_HEAD_DIMS:?}, not {}",
                shape.head_dim
            )));
        }
        let split = split_rows(step.host_kv_len(), step.host_table_off(), PREFILL_MIN_ROWS);
        let AttnIo {
            qkv,
            kv,
            layer,
            mut out,
        } = io;
        let (w_in, w_out) = (shape.qkv_stride, shape.num_heads * shape.head_dim);
        check_len("attention qkv", qkv.len(), step.len() * w_in)?;
        check_len("attention out", out.len(), step.len() * w_out)?;
        let start = step.range().start;
        for r in &split.decode {
            let part = step.step.rows(start + r.start..start + r.end)?;
            let io = AttnIo {
                qkv: qkv.slice(r.start * w_in..r.end * w_in),
                kv,
                layer,
                out: out.slice_mut(r.start * w_out..r.end * w_out),
            };
            self.attention(part, io, shape, AttnOverride::default())?;
        }
        if !split.tiles.is_empty() {
            let io = AttnIo {
                qkv,
                kv,
                layer,
                out,
            };
            self.prefill_launch(&step, io, shape, &split.tiles, bf16)?;
        }
        Ok(split)
    }

    /// Launches the prefill kernel over `tiles` of the rows of `step`.
    fn prefill_launch(
        &self,
        step: &StepRows<'_>,
        io: AttnIo<'_>,
        shape: AttnShape,
        tiles: &[[u32; 4]],
        bf16: bool,
    ) -> Result<()> {
        let AttnIo {
            qkv,
            kv,
            layer,
            mut out,
        } = io;
        shape.check()?;
        let d = shape.head_dim;
        if kv.head_dim != d || kv.kv_heads != shape.kv_heads {
            return Err(Error::Unsupported(format!(
                "prefill attention with {} KV heads of {d} over a cache of {} of {}",
                shape.kv_heads, kv.kv_heads, kv.head_dim
            )));
        }
        if step.step.max_block as usize >= kv.num_blocks || tiles.len() > 65_535 {
            return Err(Error::Shape(format!(
                "prefill: block {} of {}, {} tiles",
                step.step.max_block,
                kv.num_blocks,
                tiles.len()
            )));
        }
        let flat: Vec<u32> = tiles.iter().flatten().copied().collect();
        let dev_tiles = self.upload(&flat)?;
        let (k, v) = kv.layer_ptrs(self, layer)?;
        let p = PrefillParams {
            qkv: self.ptr(&qkv),
            k,
            v,
            kv_len: step.kv_len(self),
            table_off: step.table_off(self),
            tables: step.tables(self),
            tiles: self.ptr(&dev_tiles),
            out: self.ptr_mut(&mut out),
            qkv_stride: shape.qkv_stride as u32,
            num_heads: shape.num_heads as u32,
            kv_heads: shape.kv_heads as u32,
            group: (shape.num_heads / shape.kv_heads) as u32,
            scale_log2: std::f32::consts::LOG2_E / (d as f32).sqrt(),
        };
        let cfg = LaunchConfig {
            grid_dim: (shape.num_heads as u32, tiles.len() as u32, 1),
            block_dim: (PREFILL_THREADS as u32, 1, 1),
            shared_mem_bytes: prefill_smem_bytes(d) as u32,
        };
        // SAFETY: qkv holds the launch's rows x qkv_stride f32 (a multiple
        // of 4: the float4 loads of q are aligned) and out rows x num_heads
        // x d f32 (checked by the caller); every tile's rows lie inside the
        // launch's (split_rows cuts them from its rows), share one block
        // table, and its `keys` is the largest kv_len among them, which the
        // table covers (checked at upload) with block ids below num_blocks
        // (max checked), so every K/V read is inside the layer; keys past
        // a row's own count are read but masked. The tile list lives until
        // its stream-ordered free, after the kernel. Shared memory:
        // prefill_smem_bytes(d), the limit raised at load.
        unsafe { self.launch(&prefill_kernel(d, bf16), cfg, &p) }?;
        drop(dev_tiles);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_become_tiles_and_the_rest_decode_ranges() {
        // Two decode rows, a 70-token chunk, a decode row, a 5-token chunk.
        let mut kv_len = vec![300, 41];
        let mut toff = vec![0, 20];
        kv_len.extend(131..201);
        toff.extend(std::iter::repeat_n(30, 70));
        kv_len.extend([9, 10, 11, 12, 13, 14]);
        toff.extend([50, 60, 60, 60, 60, 60]);
        let s = split_rows(&kv_len, &toff, 16);
        assert_eq!(s.tiles, vec![[2, 64, 194, 0], [66, 6, 200, 0]]);
        assert_eq!(s.decode, vec![0..2, 72..78]);
        // Every row exactly once.
        let mut seen = vec![0; kv_len.len()];
        for t in &s.tiles {
            for r in t[0]..t[0] + t[1] {
                seen[r as usize] += 1;
            }
        }
        for r in s.decode.iter().flat_map(|r| r.clone()) {
            seen[r] += 1;
        }
        assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
    }

    #[test]
    fn a_run_ends_where_the_table_or_the_count_breaks() {
        // Same table, but the counts do not rise by one: two runs of 20.
        let kv_len: Vec<u32> = (1..=20).chain(1..=20).collect();
        let s = split_rows(&kv_len, &[7; 40], 16);
        assert_eq!(s.tiles, vec![[0, 20, 20, 0], [20, 20, 20, 0]]);
        assert!(s.decode.is_empty());
        // Rising counts over two tables: two runs too short for a tile.
        let s = split_rows(
            &(1..=20).collect::<Vec<_>>(),
            &[[1; 10], [2; 10]].concat(),
            16,
        );
        assert!(s.tiles.is_empty());
        assert_eq!(s.decode, vec![0..20]);
        assert_eq!(split_rows(&[], &[], 16), PrefillSplit::default());
    }

    #[test]
    fn shared_memory_fits_two_ctas_per_sm_at_head_size_128() {
        assert_eq!(prefill_smem_bytes(128), 96 * 1024);
        assert_eq!(prefill_smem_bytes(64), 48 * 1024);
        assert!(2 * prefill_smem_bytes(128) <= 227 * 1024);
    }
}
