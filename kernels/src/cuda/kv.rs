//! The paged KV cache in bf16 and the launch wrappers of `kv.cu`.

use super::device::{Gpu, check_len};
use super::step::StepRows;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig};
use half::bf16;

/// Every layer's K and V: per layer `[num_blocks, kv_heads, 16, head_dim]`,
/// layers one after another in one allocation each for K and V.
#[derive(Debug)]
pub struct KvCache {
    pub k: CudaSlice<bf16>,
    pub v: CudaSlice<bf16>,
    pub layers: usize,
    pub num_blocks: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

pub const BLOCK_TOKENS: usize = 16;

impl KvCache {
    /// Elements of one block of one layer's K (or V).
    pub fn block_elems(&self) -> usize {
        self.kv_heads * BLOCK_TOKENS * self.head_dim
    }

    pub fn layer_elems(&self) -> usize {
        self.num_blocks * self.block_elems()
    }

    /// Device addresses of `layer`'s K and V.
    pub fn layer_ptrs(&self, gpu: &Gpu, layer: usize) -> Result<(u64, u64)> {
        if layer >= self.layers {
            return Err(Error::Shape(format!("layer {layer} of {}", self.layers)));
        }
        let off = 2 * (layer * self.layer_elems()) as u64;
        Ok((gpu.ptr(&self.k) + off, gpu.ptr(&self.v) + off))
    }
}

#[repr(C)]
struct KvAppendParams {
    qkv: u64,
    k: u64,
    v: u64,
    slots: u64,
    rows: u32,
    row_stride: u32,
    k_col: u32,
    kv_heads: u32,
    head_dim: u32,
}

#[repr(C)]
struct CopyBlocksParams {
    k: u64,
    v: u64,
    pairs: u64,
    n_pairs: u32,
    layers: u32,
    layer_stride: u64,
    block_elems: u64,
}

// SAFETY: `#[repr(C)]` mirrors of the structs in kv.cu.
unsafe impl DeviceRepr for KvAppendParams {}
unsafe impl DeviceRepr for CopyBlocksParams {}

impl Gpu {
    /// A zeroed cache (zeros so that a stray read of an unwritten slot is
    /// finite; the self-check poisons it instead).
    pub fn kv_cache(
        &self,
        layers: usize,
        num_blocks: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<KvCache> {
        if !head_dim.is_multiple_of(8) {
            return Err(Error::Unsupported(format!(
                "head_dim {head_dim} (a multiple of 8 is needed)"
            )));
        }
        let n = layers * num_blocks * kv_heads * BLOCK_TOKENS * head_dim;
        let zeros = |what| {
            self.stream()
                .alloc_zeros::<bf16>(n.max(1))
                .map_err(super::device::drv(what))
        };
        Ok(KvCache {
            k: zeros("KV cache K")?,
            v: zeros("KV cache V")?,
            layers,
            num_blocks,
            kv_heads,
            head_dim,
        })
    }

    /// Writes the step's k and v (f32 columns `k_col..` of `qkv`, rows of
    /// `row_stride`) into their slots of `layer`, as bf16; for a range of
    /// the step's rows, `qkv` holds that range's rows.
    pub fn kv_append<'s>(
        &self,
        step: impl Into<StepRows<'s>>,
        qkv: &impl DevicePtr<f32>,
        row_stride: usize,
        k_col: usize,
        kv: &mut KvCache,
        layer: usize,
    ) -> Result<()> {
        let step = step.into();
        let rows = step.len();
        let kvd = kv.kv_heads * kv.head_dim;
        check_len("kv_append qkv", qkv.len(), rows * row_stride)?;
        if k_col + 2 * kvd > row_stride {
            return Err(Error::Shape(format!(
                "k and v at column {k_col} overflow rows of {row_stride}"
            )));
        }
        if step.step.max_slot as usize >= kv.num_blocks * BLOCK_TOKENS {
            return Err(Error::Shape(format!(
                "slot {} outside {} blocks",
                step.step.max_slot, kv.num_blocks
            )));
        }
        let (k, v) = kv.layer_ptrs(self, layer)?;
        let p = KvAppendParams {
            qkv: self.ptr(qkv),
            k,
            v,
            slots: step.slots(self),
            rows: rows as u32,
            row_stride: row_stride as u32,
            k_col: k_col as u32,
            kv_heads: kv.kv_heads as u32,
            head_dim: kv.head_dim as u32,
        };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: qkv holds rows x row_stride with k and v inside each row;
        // every slot of the step lies in the layer's blocks (max checked),
        // and the range's slots are entries `start..end` of the step's.
        unsafe { self.launch("kv_append_bf16", cfg, &p) }
    }

    /// Copies whole blocks, every layer, K and V: `(src, dst)` pairs.
    pub fn copy_blocks(&self, kv: &mut KvCache, pairs: &[(u32, u32)]) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        if let Some(&(s, d)) = pairs
            .iter()
            .find(|(s, d)| *s as usize >= kv.num_blocks || *d as usize >= kv.num_blocks)
        {
            return Err(Error::Shape(format!(
                "copy {s} -> {d} outside {} blocks",
                kv.num_blocks
            )));
        }
        let flat: Vec<u32> = pairs.iter().flat_map(|&(s, d)| [s, d]).collect();
        let dev = self.upload(&flat)?;
        let p = CopyBlocksParams {
            k: self.ptr(&kv.k),
            v: self.ptr(&kv.v),
            pairs: self.ptr(&dev),
            n_pairs: pairs.len() as u32,
            layers: kv.layers as u32,
            layer_stride: kv.layer_elems() as u64,
            block_elems: kv.block_elems() as u64,
        };
        let cfg = LaunchConfig {
            grid_dim: (pairs.len() as u32, 2 * kv.layers as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every block id is below num_blocks (checked), blocks are
        // 16-byte aligned runs of block_elems (a multiple of 8 bf16), and
        // `dev` lives until the stream has run the copy (dropped after the
        // launch, freed in stream order).
        unsafe { self.launch("copy_blocks_bf16", cfg, &p) }
    }
}
