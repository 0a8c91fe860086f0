//! Launch wrapper of `attention.cu`: paged attention for decode tokens and
//! prefill chunks, with the split-over-context plan (kernels/ATTENTION.md).

use super::device::{Gpu, check_len};
use super::kv::{BLOCK_TOKENS, KvCache};
use super::sources::{ATTENTION_HEAD_DIMS, ATTENTION_MAX_GROUP, attention_kernel};
use super::step::DeviceStep;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};

/// The attention part of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub num_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Width of a `qkv` row; query head h sits at columns `h*head_dim..`.
    pub qkv_stride: usize,
}

/// What one attention launch reads and writes.
#[derive(Debug)]
pub struct AttnIo<'a> {
    /// `[rows, qkv_stride]` f32, RoPE applied.
    pub qkv: &'a CudaSlice<f32>,
    pub kv: &'a KvCache,
    pub layer: usize,
    /// `[rows, num_heads * head_dim]` f32.
    pub out: &'a mut CudaSlice<f32>,
}

/// How a launch is cut up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnPlan {
    /// Query heads per CTA (a divisor of the group, at most 8).
    pub heads_per_cta: usize,
    /// CTAs per KV head (`group / heads_per_cta`).
    pub chunks: usize,
    /// Splits of the context per row (1: no merge pass).
    pub splits: usize,
    pub pages_per_split: usize,
}

/// A split should stream at least this many pages (64 keys) so that its
/// fixed costs (loading q, merging row groups) stay small.
const MIN_PAGES_PER_SPLIT: usize = 4;
/// CTAs that fill the GPU: 4 per SM co-reside at 128 threads.
const CTAS_PER_SM: usize = 4;

impl AttnPlan {
    /// Splits the context only when rows x heads alone cannot fill the GPU
    /// (few, long sequences); `force_splits` overrides (tests).
    pub fn new(
        shape: &AttnShape,
        rows: usize,
        max_kv_len: usize,
        sm_count: usize,
        force_splits: Option<usize>,
    ) -> AttnPlan {
        let group = shape.num_heads / shape.kv_heads.max(1);
        let heads_per_cta = (1..=ATTENTION_MAX_GROUP.min(group))
            .rev()
            .find(|g| group.is_multiple_of(*g))
            .unwrap_or(1);
        let chunks = group / heads_per_cta;
        let ctas = rows * shape.kv_heads * chunks;
        let pages = max_kv_len.div_ceil(BLOCK_TOKENS).max(1);
        let target = CTAS_PER_SM * sm_count.max(1);
        let want = force_splits.unwrap_or_else(|| {
            if ctas >= target {
                1
            } else {
                target
                    .div_ceil(ctas.max(1))
                    .min(pages.div_ceil(MIN_PAGES_PER_SPLIT))
            }
        });
        let pages_per_split = pages.div_ceil(want.clamp(1, pages));
        AttnPlan {
            heads_per_cta,
            chunks,
            splits: pages.div_ceil(pages_per_split),
            pages_per_split,
        }
    }
}

#[repr(C)]
struct AttnParams {
    qkv: u64,
    k: u64,
    v: u64,
    kv_len: u64,
    table_off: u64,
    tables: u64,
    out: u64,
    part_acc: u64,
    part_ml: u64,
    rows: u32,
    qkv_stride: u32,
    num_heads: u32,
    kv_heads: u32,
    group: u32,
    chunks: u32,
    pages_per_split: u32,
    splits: u32,
    scale_log2: f32,
}

#[repr(C)]
struct MergeParams {
    part_acc: u64,
    part_ml: u64,
    out: u64,
    rows: u32,
    num_heads: u32,
    head_dim: u32,
    splits: u32,
}

// SAFETY: `#[repr(C)]` mirrors of the structs in attention.cu.
unsafe impl DeviceRepr for AttnParams {}
unsafe impl DeviceRepr for MergeParams {}

fn check_shape(shape: &AttnShape, kv: &KvCache) -> Result<()> {
    let ok = ATTENTION_HEAD_DIMS.contains(&shape.head_dim)
        && shape.kv_heads > 0
        && shape.num_heads.is_multiple_of(shape.kv_heads)
        && kv.head_dim == shape.head_dim
        && kv.kv_heads == shape.kv_heads
        && shape.num_heads * shape.head_dim <= shape.qkv_stride;
    if ok {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "attention with {} heads over {} KV heads of {} (cache: {} of {}; head sizes {:?})",
            shape.num_heads,
            shape.kv_heads,
            shape.head_dim,
            kv.kv_heads,
            kv.head_dim,
            ATTENTION_HEAD_DIMS
        )))
    }
}

impl Gpu {
    /// Causal attention of every row of the step over its sequence's cached
    /// keys of `io.layer`; `io.out` gets f32 rows of `num_heads * head_dim`.
    /// `force_splits` overrides the split plan (tests).
    pub fn attention(
        &self,
        step: &DeviceStep,
        io: AttnIo<'_>,
        shape: AttnShape,
        force_splits: Option<usize>,
    ) -> Result<AttnPlan> {
        let AttnIo {
            qkv,
            kv,
            layer,
            out,
        } = io;
        check_shape(&shape, kv)?;
        let rows = step.rows;
        let d = shape.head_dim;
        check_len("attention qkv", qkv.len(), rows * shape.qkv_stride)?;
        check_len("attention out", out.len(), rows * shape.num_heads * d)?;
        if step.max_block as usize >= kv.num_blocks {
            return Err(Error::Shape(format!(
                "block {} outside {} blocks",
                step.max_block, kv.num_blocks
            )));
        }
        let plan = AttnPlan::new(
            &shape,
            rows,
            step.max_kv_len as usize,
            self.info().sm_count,
            force_splits,
        );
        if rows > i32::MAX as usize || shape.kv_heads * plan.chunks > 65_535 || plan.splits > 65_535
        {
            return Err(Error::Unsupported(format!(
                "attention grid {rows} x {} x {}",
                shape.kv_heads * plan.chunks,
                plan.splits
            )));
        }
        let parts = if plan.splits > 1 {
            let n = plan.splits * rows * shape.num_heads;
            Some((self.alloc::<f32>(n * d)?, self.alloc::<f32>(n * 2)?))
        } else {
            None
        };
        let (k, v) = kv.layer_ptrs(self, layer)?;
        let p = AttnParams {
            qkv: self.ptr(qkv),
            k,
            v,
            kv_len: step.kv_len(self),
            table_off: step.table_off(self),
            tables: step.tables(self),
            out: self.ptr(out),
            part_acc: parts.as_ref().map_or(0, |(a, _)| self.ptr(a)),
            part_ml: parts.as_ref().map_or(0, |(_, m)| self.ptr(m)),
            rows: rows as u32,
            qkv_stride: shape.qkv_stride as u32,
            num_heads: shape.num_heads as u32,
            kv_heads: shape.kv_heads as u32,
            group: (shape.num_heads / shape.kv_heads) as u32,
            chunks: plan.chunks as u32,
            pages_per_split: plan.pages_per_split as u32,
            splits: plan.splits as u32,
            scale_log2: std::f32::consts::LOG2_E / (d as f32).sqrt(),
        };
        let cfg = LaunchConfig {
            grid_dim: (
                rows as u32,
                (shape.kv_heads * plan.chunks) as u32,
                plan.splits as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: qkv holds rows x qkv_stride f32 with every query head
        // inside a row; each row's kv_len keys are covered by its block
        // table (checked at upload) whose ids are below num_blocks (max
        // checked), so every K/V read is inside the layer; out holds rows x
        // num_heads x d; the partial buffers hold splits x rows x num_heads
        // x (d, 2) when splits > 1 and are not touched otherwise.
        unsafe { self.launch(&attention_kernel(d, plan.heads_per_cta), cfg, &p)? };
        if let Some((acc, ml)) = &parts {
            let m = MergeParams {
                part_acc: self.ptr(acc),
                part_ml: self.ptr(ml),
                out: self.ptr(out),
                rows: rows as u32,
                num_heads: shape.num_heads as u32,
                head_dim: d as u32,
                splits: plan.splits as u32,
            };
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, shape.num_heads as u32, 1),
                block_dim: (d.min(128) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the partials were written for every (split, row, head)
            // by the launch above; out holds rows x num_heads x d.
            unsafe { self.launch("attention_merge_f32", cfg, &m)? };
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(num_heads: usize, kv_heads: usize) -> AttnShape {
        AttnShape {
            num_heads,
            kv_heads,
            head_dim: 128,
            qkv_stride: 0,
        }
    }

    #[test]
    fn heads_per_cta_divide_the_group() {
        for (h, kv, g, chunks) in [
            (32, 8, 4, 1),
            (9, 3, 3, 1),
            (24, 2, 6, 2),
            (32, 2, 8, 2),
            (10, 1, 5, 2),
            (8, 8, 1, 1),
        ] {
            let p = AttnPlan::new(&shape(h, kv), 1000, 10, 132, None);
            assert_eq!((p.heads_per_cta, p.chunks), (g, chunks), "{h}/{kv}");
        }
    }

    #[test]
    fn splits_only_when_rows_cannot_fill_the_gpu_and_cover_the_context() {
        let s = shape(32, 8);
        assert_eq!(AttnPlan::new(&s, 512, 4096, 132, None).splits, 1);
        let p = AttnPlan::new(&s, 1, 32_768, 132, None);
        assert!(p.splits > 16, "{p:?}");
        assert!(p.splits * p.pages_per_split * 16 >= 32_768);
        assert!(
            (p.splits - 1) * p.pages_per_split * 16 < 32_768,
            "no empty split: {p:?}"
        );
        let short = AttnPlan::new(&s, 1, 20, 132, None);
        assert_eq!(short.splits, 1, "{short:?}");
        let forced = AttnPlan::new(&s, 1, 100, 132, Some(3));
        assert_eq!((forced.splits, forced.pages_per_split), (3, 3));
        assert_eq!(AttnPlan::new(&s, 1, 5, 132, Some(16)).splits, 1);
    }
}
