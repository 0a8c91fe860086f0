//! Launch wrapper of `lab/attention_regs.cu`, the first attention kernel kept as
//! the measured baseline of the pipelined one (kernels/ATTENTION.md): its
//! own split plan (4 CTAs per SM, at least 4 pages a split) and a second
//! launch that merges the splits.

use super::attention::AttnPlan;
use super::device::Gpu;
use super::kv::{BLOCK_TOKENS, KvCache};
use super::step::DeviceStep;
use crate::error::{Error, Result};
use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, LaunchConfig};

#[repr(C)]
struct RegsParams {
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
struct RegsMergeParams {
    part_acc: u64,
    part_ml: u64,
    out: u64,
    rows: u32,
    num_heads: u32,
    head_dim: u32,
    splits: u32,
}

// SAFETY: `#[repr(C)]` mirrors of the structs in lab/attention_regs.cu.
unsafe impl DeviceRepr for RegsParams {}
unsafe impl DeviceRepr for RegsMergeParams {}

/// Its plan: split only when fewer CTAs than 4 per SM exist, into at
/// most `4 * sm / ctas` splits of at least 4 pages.
fn regs_splits(ctas: usize, pages: usize, sm_count: usize, force: Option<usize>) -> (usize, usize) {
    let target = 4 * sm_count.max(1);
    let want = force.unwrap_or(if ctas >= target {
        1
    } else {
        target.div_ceil(ctas.max(1)).min(pages.div_ceil(4))
    });
    let pps = pages.div_ceil(want.clamp(1, pages));
    (pages.div_ceil(pps), pps)
}

impl Gpu {
    /// The first attention kernel on the Llama-3 shape (head size 128, 4 query heads
    /// per KV head), with its own split plan unless `force_splits`. Returns
    /// the splits and pages per split it ran.
    pub(crate) fn attention_registers(
        &self,
        step: &DeviceStep,
        (qkv, kv, layer, out): (
            &CudaView<'_, f32>,
            &KvCache,
            usize,
            &mut CudaViewMut<'_, f32>,
        ),
        shape: &super::attention::AttnShape,
        plan: &AttnPlan,
        force_splits: Option<usize>,
    ) -> Result<(usize, usize)> {
        if shape.head_dim != 128 || plan.heads_per_cta != 4 || plan.chunks != 1 {
            return Err(Error::Unsupported(
                "the register baseline exists for head size 128 and 4 heads per CTA only".into(),
            ));
        }
        let rows = step.rows;
        let d = shape.head_dim;
        let pages = (step.max_kv_len as usize).div_ceil(BLOCK_TOKENS).max(1);
        let (splits, pps) = regs_splits(
            rows * shape.kv_heads,
            pages,
            self.info().sm_count,
            force_splits,
        );
        let parts = if splits > 1 {
            let n = splits * rows * shape.num_heads;
            Some((self.alloc::<f32>(n * d)?, self.alloc::<f32>(n * 2)?))
        } else {
            None
        };
        let (k, v) = kv.layer_ptrs(self, layer)?;
        let p = RegsParams {
            qkv: self.ptr(qkv),
            k,
            v,
            kv_len: step.kv_len(self),
            table_off: step.table_off(self),
            tables: step.tables(self),
            out: self.ptr_mut(out),
            part_acc: parts.as_ref().map_or(0, |(a, _)| self.ptr(a)),
            part_ml: parts.as_ref().map_or(0, |(_, m)| self.ptr(m)),
            rows: rows as u32,
            qkv_stride: shape.qkv_stride as u32,
            num_heads: shape.num_heads as u32,
            kv_heads: shape.kv_heads as u32,
            group: 4,
            chunks: 1,
            pages_per_split: pps as u32,
            splits: splits as u32,
            scale_log2: std::f32::consts::LOG2_E / (d as f32).sqrt(),
        };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, shape.kv_heads as u32, splits as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as in `Gpu::attention` (the caller checked the shapes and
        // the block ids); the partial buffers hold splits x rows x
        // num_heads x (d, 2) when splits > 1 and are not touched otherwise.
        unsafe { self.launch("attention_regs_f32_d128_g4", cfg, &p)? };
        if let Some((acc, ml)) = &parts {
            let m = RegsMergeParams {
                part_acc: self.ptr(acc),
                part_ml: self.ptr(ml),
                out: self.ptr_mut(out),
                rows: rows as u32,
                num_heads: shape.num_heads as u32,
                head_dim: d as u32,
                splits: splits as u32,
            };
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, shape.num_heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the partials were written for every (split, row,
            // head) by the launch above; out holds rows x num_heads x d.
            unsafe { self.launch("attention_regs_merge_f32", cfg, &m)? };
        }
        Ok((splits, pps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_kernel_plan() {
        assert_eq!(regs_splits(600, 256, 132, None), (1, 256));
        assert_eq!(regs_splits(512, 256, 132, None), (2, 128));
        let (s, pps) = regs_splits(8, 2048, 132, None);
        assert_eq!((s, pps), (64, 32));
        assert_eq!(regs_splits(8, 100, 132, Some(3)), (3, 34));
    }
}
