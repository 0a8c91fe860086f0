//! Launch wrapper of the attention kernels (`kernels/attention.cu` over
//! `kernels/attention/*.cuh`): paged attention for decode tokens and
//! prefill chunks, with the split-over-context plan and the fused merge of
//! the splits (kernels/ATTENTION.md).

use super::device::{Gpu, check_len};
use super::kv::{BLOCK_TOKENS, KvCache};
use super::sources::{
    ATTENTION_HEAD_DIMS, ATTENTION_MAX_GROUP, ATTENTION_MAX_SPLIT_PAGES, AttnVariant,
    attention_kernel,
};
use super::step::StepRows;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig};
use std::sync::atomic::Ordering;
use tracing::warn;

/// The attention part of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub num_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Width of a `qkv` row; query head h sits at columns `h*head_dim..`.
    pub qkv_stride: usize,
}

impl AttnShape {
    /// Query heads per CTA: the largest divisor of the group that is at
    /// most 8.
    pub fn heads_per_cta(&self) -> usize {
        let group = self.num_heads / self.kv_heads.max(1);
        (1..=ATTENTION_MAX_GROUP.min(group))
            .rev()
            .find(|g| group.is_multiple_of(*g))
            .unwrap_or(1)
    }

    /// Whether the kernels serve this shape: KV heads that divide the query
    /// heads, a head size `attention.cu` instantiates, and every query head
    /// inside a `qkv` row whose width keeps the float4 loads of q aligned.
    pub fn check(&self) -> Result<()> {
        let ok = ATTENTION_HEAD_DIMS.contains(&self.head_dim)
            && self.kv_heads > 0
            && self.num_heads.is_multiple_of(self.kv_heads)
            && self.num_heads * self.head_dim <= self.qkv_stride
            && self.qkv_stride.is_multiple_of(4);
        if ok {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "attention with {} heads over {} KV heads of {} in qkv rows of {} (head sizes {:?})",
                self.num_heads, self.kv_heads, self.head_dim, self.qkv_stride, ATTENTION_HEAD_DIMS
            )))
        }
    }
}

/// What one attention launch reads and writes: the launch's rows of `qkv`
/// and `out` (all of a step's, or a range's: `view::row_view`).
#[derive(Debug)]
pub struct AttnIo<'a> {
    /// `[rows, qkv_stride]` f32, RoPE applied.
    pub qkv: CudaView<'a, f32>,
    pub kv: &'a KvCache,
    pub layer: usize,
    /// `[rows, num_heads * head_dim]` f32.
    pub out: CudaViewMut<'a, f32>,
}

/// Overrides of the plan: self-check cases force each split count and
/// merge on the same inputs (the lab's `AttnOverride` adds the kernel).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttnOverride {
    pub splits: Option<usize>,
    pub head_major: Option<bool>,
    /// The cooperative merge of the splits on (where the grid allows it)
    /// or off.
    pub coop: Option<bool>,
    /// Splits of unequal length (`AttnPlan::long_splits`) on or off.
    pub uneven: Option<bool>,
}

/// Launch order of the CTAs by default: the head groups of one row (and
/// split) next to each other, so that they are resident together and read
/// the neighbouring 4 KiB head slices of the same block at the same time.
pub const HEAD_MAJOR: bool = true;

/// How a launch is cut up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnPlan {
    /// Query heads per CTA (a divisor of the group, at most 8).
    pub heads_per_cta: usize,
    /// CTAs per KV head (`group / heads_per_cta`).
    pub chunks: usize,
    /// Splits of the context per row (1: no partials, no merge).
    pub splits: usize,
    pub pages_per_split: usize,
    /// The first `long_splits` splits have `pages_per_split` pages, the
    /// others one fewer: any split count covers the pages, so the plan can
    /// fill every slot of the wave.
    pub long_splits: usize,
    /// The key loop that runs.
    pub variant: AttnVariant,
    /// CTA order: a row's head groups adjacent (else a head group's rows).
    pub head_major: bool,
    /// The splits are merged by every CTA of a cooperative launch (else by
    /// the last CTA of each row and head group to finish).
    pub coop: bool,
}

/// Where one wave would give each row at most two splits and a row has more
/// than `WAVE_LONG_PAGES` pages (many rows of long contexts: 32 x 32k), the
/// rows are cut into splits of about `WAVE_SPLIT_PAGES` pages instead,
/// several waves of them, so that the hardware hands the slots of CTAs that
/// finish early to the next ones and the CTAs the memory system serves last
/// hold less (kernels/ATTENTION.md: 512 pages measured best at 32 x 32k
/// with the tensor-core loop, points 29 and 38).
const WAVE_LONG_PAGES: usize = 512;
const WAVE_SPLIT_PAGES: usize = 512;

/// Splits of unequal length by default (kernels/ATTENTION.md).
pub const UNEVEN: bool = true;

/// A split should stream at least this many pages (64 keys) so that its
/// fixed costs (q, the table slice, the partial it writes) stay small.
const MIN_PAGES_PER_SPLIT: usize = 4;
/// Most splits of one row (the merge keeps `heads x splits` weights in
/// shared memory).
pub const MAX_SPLITS: usize = 1024;
/// The cooperative merge pays where the last CTA would read many partials
/// (kernels/ATTENTION.md); it takes at most `COOP_MAX_SPLITS` (attention/common.cuh).
const COOP_MIN_SPLITS: usize = 32;
const COOP_MAX_SPLITS: usize = 256;
/// What one launch adds to a cooperative merge's counter in all
/// (`COOP_EPOCH` in attention/common.cuh): it rests at a multiple of this.
const COOP_EPOCH: u32 = 1024;

impl AttnPlan {
    /// One wave: when `rows x kv_heads x chunks` CTAs leave some of the
    /// `slots` (CTAs that co-reside on the whole GPU) empty, each row's
    /// keys are cut into `slots / ctas` splits (a page apart at most), so
    /// that every CTA streams about the same number of pages and all finish
    /// together; but where that gives each row at most two splits and the
    /// row has more than `WAVE_LONG_PAGES` pages, splits of about
    /// `WAVE_SPLIT_PAGES` in several waves. A split never holds more than
    /// `ATTENTION_MAX_SPLIT_PAGES` pages (the table slice a CTA stages) nor
    /// fewer than `MIN_PAGES_PER_SPLIT`.
    pub fn new(
        shape: &AttnShape,
        rows: usize,
        max_kv_len: usize,
        slots: usize,
        variant: AttnVariant,
        force: AttnOverride,
    ) -> AttnPlan {
        let heads_per_cta = shape.heads_per_cta();
        let chunks = shape.num_heads / shape.kv_heads.max(1) / heads_per_cta;
        let ctas = (rows * shape.kv_heads * chunks).max(1);
        let pages = max_kv_len.div_ceil(BLOCK_TOKENS).max(1);
        let fewest = pages.div_ceil(ATTENTION_MAX_SPLIT_PAGES);
        let want = force.splits.unwrap_or_else(|| {
            let one_wave = (slots / ctas)
                .min(pages / MIN_PAGES_PER_SPLIT)
                .clamp(1, MAX_SPLITS);
            if ctas <= slots && one_wave <= 2 && pages > WAVE_LONG_PAGES {
                pages.div_ceil(WAVE_SPLIT_PAGES).min(MAX_SPLITS)
            } else {
                one_wave
            }
        });
        let count = want.max(fewest).clamp(1, pages);
        let pages_per_split = pages.div_ceil(count);
        // Unequal splits take exactly `count`; equal ones may need fewer.
        let (splits, long_splits) = if force.uneven.unwrap_or(UNEVEN) {
            (count, pages - count * (pages_per_split - 1))
        } else {
            let n = pages.div_ceil(pages_per_split);
            (n, n)
        };
        // Every CTA must be resident to wait for the others.
        let coop_fits = splits > 1 && splits <= COOP_MAX_SPLITS && ctas * splits <= slots;
        AttnPlan {
            heads_per_cta,
            chunks,
            splits,
            pages_per_split,
            long_splits,
            coop: coop_fits && force.coop.unwrap_or(splits >= COOP_MIN_SPLITS),
            variant,
            head_major: force.head_major.unwrap_or(HEAD_MAJOR),
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
    counters: u64,
    rows: u32,
    qkv_stride: u32,
    num_heads: u32,
    kv_heads: u32,
    group: u32,
    chunks: u32,
    pages_per_split: u32,
    splits: u32,
    head_major: u32,
    scale_log2: f32,
    coop: u32,
    long_splits: u32,
    timeline: u64,
}

// SAFETY: `#[repr(C)]` mirror of the struct in attention/common.cuh.
unsafe impl DeviceRepr for AttnParams {}

/// Device buffers the splits need, kept between launches (no allocation per
/// step): the partials, and a pair of counters per (row, head group): the
/// cooperative merge's, which rests at a multiple of 1024, and the last-CTA
/// merge's, which the merging CTA resets to zero. Each lane has its own
/// (`lane.rs`), allocated and used on its stream only, so launches on two
/// lanes never share partials or counters.
#[derive(Debug, Default)]
pub struct AttnWorkspace {
    acc: Option<CudaSlice<f32>>,
    ml: Option<CudaSlice<f32>>,
    counters: Option<CudaSlice<u32>>,
}

impl AttnWorkspace {
    /// Addresses of buffers of at least `acc`, `ml` and `counters`
    /// elements, grown (and the counters zeroed) when too small.
    fn ensure(&mut self, gpu: &Gpu, acc: usize, ml: usize, counters: usize) -> Result<[u64; 3]> {
        if self.acc.as_ref().is_none_or(|b| b.len() < acc) {
            self.acc = Some(gpu.alloc(acc)?);
            gpu.note_workspace_regrowth();
        }
        if self.ml.as_ref().is_none_or(|b| b.len() < ml) {
            self.ml = Some(gpu.alloc(ml)?);
            gpu.note_workspace_regrowth();
        }
        if self.counters.as_ref().is_none_or(|b| b.len() < counters) {
            self.counters = Some(gpu.alloc_zeroed(counters)?);
            gpu.note_workspace_regrowth();
        }
        fn p<T>(gpu: &Gpu, b: &Option<CudaSlice<T>>) -> u64 {
            b.as_ref().map_or(0, |b| gpu.ptr(b))
        }
        Ok([p(gpu, &self.acc), p(gpu, &self.ml), p(gpu, &self.counters)])
    }
}

fn check_shape(shape: &AttnShape, kv: &KvCache) -> Result<()> {
    shape.check()?;
    if kv.head_dim == shape.head_dim && kv.kv_heads == shape.kv_heads {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "attention with {} KV heads of {} over a cache of {} of {}",
            shape.kv_heads, shape.head_dim, kv.kv_heads, kv.head_dim
        )))
    }
}

impl Gpu {
    /// Counters of the current lane's split workspace that are not at rest
    /// (a cooperative merge's off a multiple of 1024, a last-CTA merge's not
    /// zero): 0 after every complete launch, else the next launch would
    /// merge too early. Self-check only (copies the counters to the host).
    pub fn attention_workspace_unsettled(&self) -> Result<usize> {
        let ws = self.attention_workspace();
        let Some(c) = &ws.counters else {
            return Ok(0);
        };
        Ok(self
            .download(c, c.len())?
            .chunks(2)
            .map(|pair| usize::from(pair[0] % COOP_EPOCH != 0) + usize::from(pair[1] != 0))
            .sum())
    }

    /// CTAs of the pipelined kernel for `(d, g, v)` that co-reside on the
    /// whole GPU.
    pub fn attention_slots(&self, d: usize, g: usize, v: AttnVariant) -> usize {
        self.info().sm_count.max(1) * self.occupancy(&attention_kernel(d, g, v))
    }

    /// The plan [`Gpu::attention`] would use.
    pub fn attention_plan(
        &self,
        shape: &AttnShape,
        rows: usize,
        max_kv_len: usize,
        force: AttnOverride,
    ) -> AttnPlan {
        let v = AttnVariant::default_for(shape.head_dim, shape.heads_per_cta());
        self.attention_plan_for(shape, rows, max_kv_len, v, force)
    }

    /// The plan of loop `v` (the lab times other loops than the default; a
    /// read-only twin runs its compute kernel's grid).
    pub(crate) fn attention_plan_for(
        &self,
        shape: &AttnShape,
        rows: usize,
        max_kv_len: usize,
        v: AttnVariant,
        force: AttnOverride,
    ) -> AttnPlan {
        let g = shape.heads_per_cta();
        let slots = self.attention_slots(shape.head_dim, g, AttnVariant { compute: true, ..v });
        // A lane held to some SMs by the bounded grid fills only theirs
        // (`share.rs`); without a cap the slots are unchanged.
        let slots =
            super::share::capped_slots(slots, self.info().sm_count, self.lane_attention_sms());
        let force = if self.coop_refused.load(Ordering::Relaxed) {
            AttnOverride {
                coop: Some(false),
                ..force
            }
        } else {
            force
        };
        AttnPlan::new(shape, rows, max_kv_len, slots, v, force)
    }

    /// Causal attention of every row of the step (or of a range of its
    /// rows, `io` then holding that range's rows) over its sequence's cached
    /// keys of `io.layer`; `io.out` gets f32 rows of `num_heads * head_dim`.
    /// The plan is for the range's rows and longest context. `force`
    /// overrides the plan (self-check).
    pub fn attention<'s>(
        &self,
        step: impl Into<StepRows<'s>>,
        io: AttnIo<'_>,
        shape: AttnShape,
        force: AttnOverride,
    ) -> Result<AttnPlan> {
        let step = step.into();
        check_shape(&shape, io.kv)?;
        let plan = self.attention_plan(&shape, step.len(), step.max_kv_len() as usize, force);
        self.attention_launch(step, io, shape, plan, 0)
    }

    /// Checks the grid of `plan` and launches its kernel; `timeline` is the
    /// device address a timeline variant fills (0 otherwise).
    pub(crate) fn attention_launch<'s>(
        &self,
        step: impl Into<StepRows<'s>>,
        io: AttnIo<'_>,
        shape: AttnShape,
        plan: AttnPlan,
        timeline: u64,
    ) -> Result<AttnPlan> {
        let AttnIo {
            qkv,
            kv,
            layer,
            mut out,
        } = io;
        check_shape(&shape, kv)?;
        let step = step.into();
        let rows = step.len();
        let d = shape.head_dim;
        check_len("attention qkv", qkv.len(), rows * shape.qkv_stride)?;
        check_len("attention out", out.len(), rows * shape.num_heads * d)?;
        if step.step.max_block as usize >= kv.num_blocks {
            return Err(Error::Shape(format!(
                "block {} outside {} blocks",
                step.step.max_block, kv.num_blocks
            )));
        }
        let y = shape.kv_heads * plan.chunks;
        if rows * y > i32::MAX as usize
            || plan.splits > 65_535.min(MAX_SPLITS)
            || plan.pages_per_split > ATTENTION_MAX_SPLIT_PAGES
        {
            return Err(Error::Unsupported(format!(
                "attention grid {rows} x {y} x {} of {} pages",
                plan.splits, plan.pages_per_split
            )));
        }
        let v = plan.variant;
        let (k, vv) = kv.layer_ptrs(self, layer)?;
        let [part_acc, part_ml, counters] = if plan.splits > 1 {
            let n = rows * shape.num_heads * plan.splits;
            self.attention_workspace()
                .ensure(self, n * d, n * 2, rows * y * 2)?
        } else {
            [0; 3]
        };
        let p = AttnParams {
            qkv: self.ptr(&qkv),
            k,
            v: vv,
            kv_len: step.kv_len(self),
            table_off: step.table_off(self),
            tables: step.tables(self),
            out: self.ptr_mut(&mut out),
            part_acc,
            part_ml,
            counters,
            rows: rows as u32,
            qkv_stride: shape.qkv_stride as u32,
            num_heads: shape.num_heads as u32,
            kv_heads: shape.kv_heads as u32,
            group: (shape.num_heads / shape.kv_heads) as u32,
            chunks: plan.chunks as u32,
            pages_per_split: plan.pages_per_split as u32,
            splits: plan.splits as u32,
            head_major: plan.head_major as u32,
            scale_log2: std::f32::consts::LOG2_E / (d as f32).sqrt(),
            coop: plan.coop as u32,
            long_splits: plan.long_splits as u32,
            timeline,
        };
        let cfg = LaunchConfig {
            grid_dim: ((rows * y) as u32, 1, plan.splits as u32),
            block_dim: (v.threads() as u32, 1, 1),
            shared_mem_bytes: v.smem_bytes(d, plan.heads_per_cta) as u32,
        };
        // SAFETY: qkv holds rows x qkv_stride f32 (a multiple of 4, so the
        // float4 loads of q are aligned) with every query head inside a
        // row; each row's kv_len keys are covered by its block table
        // (checked at upload) whose ids are below num_blocks (max checked);
        // a range's kv_len and table_off are entries `start..end` of the
        // step's and its table offsets index the step's tables,
        // so every K/V read is inside the layer; a split stages at most
        // ATTENTION_MAX_SPLIT_PAGES table entries (checked); out holds rows
        // x num_heads x d; a timeline, if not 0, holds 8 u64 per CTA. With
        // splits > 1 the workspace holds rows x num_heads x splits
        // partials and rows x y counter pairs (the cooperative merge's at a
        // multiple of 1024, the last-CTA merge's at zero), and no other
        // launch uses it concurrently: it is the current lane's, used in
        // that lane's stream order only. A cooperative merge
        // waits for the other CTAs of its row and head group: the
        // cooperative launch guarantees they are all resident (or fails).
        let name = attention_kernel(d, plan.heads_per_cta, v);
        match unsafe { self.launch_as(&name, cfg, &p, plan.coop) } {
            Err(e @ Error::CooperativeRefused { .. }) => {
                warn!(
                    cause = %e,
                    ctas = rows * y * plan.splits,
                    "attention splits are merged by their last CTA from now on"
                );
                self.coop_refused.store(true, Ordering::Relaxed);
                let p = AttnParams { coop: 0, ..p };
                // SAFETY: as above; the last-CTA merge needs no residency.
                unsafe { self.launch(&name, cfg, &p)? };
                Ok(AttnPlan {
                    coop: false,
                    ..plan
                })
            }
            r => r.map(|()| plan),
        }
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

    const SLOTS: usize = 4 * 132;
    const V: AttnVariant = AttnVariant::frag();

    #[test]
    fn shapes_the_kernels_serve() {
        let ok = |h, kv, d, w| {
            AttnShape {
                num_heads: h,
                kv_heads: kv,
                head_dim: d,
                qkv_stride: w,
            }
            .check()
            .is_ok()
        };
        assert!(ok(32, 8, 128, 48 * 128));
        assert!(ok(9, 3, 64, 15 * 64));
        assert!(
            !ok(10, 3, 64, 16 * 64),
            "KV heads must divide the query heads"
        );
        assert!(!ok(9, 0, 64, 15 * 64), "no KV heads");
        assert!(!ok(9, 3, 48, 15 * 48), "a head size no kernel has");
        assert!(!ok(32, 8, 128, 31 * 128), "query heads past the qkv row");
        assert!(
            !ok(2, 1, 16, 34),
            "a qkv row that misaligns q's float4 loads"
        );
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
            let p = AttnPlan::new(&shape(h, kv), 1000, 10, SLOTS, V, AttnOverride::default());
            assert_eq!((p.heads_per_cta, p.chunks), (g, chunks), "{h}/{kv}");
        }
    }

    #[test]
    fn splits_fill_one_wave_and_cover_the_context() {
        let s = shape(32, 8);
        let plan = |rows, len| AttnPlan::new(&s, rows, len, SLOTS, V, AttnOverride::default());
        // The benchmark shapes: one wave of CTAs a page apart at most, but
        // 32 x 32k in two waves of 512-page splits.
        for (rows, len, splits) in [
            (1, 32_768, 66),
            (8, 32_768, 8),
            (32, 32_768, 4),
            (1, 131_072, 66),
            (4, 131_072, 16),
            (64, 4096, 1),
            (256, 2048, 1),
        ] {
            let p = plan(rows, len);
            assert_eq!(p.splits, splits, "{rows} x {len}: {p:?}");
            // The long splits and the short ones cover the pages exactly.
            let pages = len.div_ceil(16);
            assert!(p.long_splits >= 1 && p.long_splits <= p.splits, "{p:?}");
            assert_eq!(
                p.long_splits * p.pages_per_split
                    + (p.splits - p.long_splits) * (p.pages_per_split - 1),
                pages,
                "{p:?}"
            );
            assert!(p.pages_per_split <= ATTENTION_MAX_SPLIT_PAGES);
        }
        // Equal splits when asked: the last one may be shorter, none empty.
        let even = AttnOverride {
            uneven: Some(false),
            ..AttnOverride::default()
        };
        let e = AttnPlan::new(&s, 1, 32_768, SLOTS, V, even);
        assert_eq!((e.splits, e.pages_per_split, e.long_splits), (64, 32, 64));
        let e = AttnPlan::new(&s, 1, 131_072, SLOTS, V, even);
        assert_eq!((e.splits, e.pages_per_split), (66, 125));
        assert!(
            (e.splits - 1) * e.pages_per_split * 16 < 131_072,
            "no empty split"
        );
        assert_eq!(plan(1, 20).splits, 1);
        // A long context splits even when the rows fill the GPU: a CTA
        // stages at most ATTENTION_MAX_SPLIT_PAGES pages of its table.
        let long = plan(600, 40_000);
        assert_eq!(long.splits, 3, "{long:?}");
        let force = |n| AttnOverride {
            splits: Some(n),
            ..AttnOverride::default()
        };
        let forced = AttnPlan::new(&s, 1, 100, SLOTS, V, force(3));
        assert_eq!((forced.splits, forced.pages_per_split), (3, 3));
        assert_eq!(AttnPlan::new(&s, 1, 5, SLOTS, V, force(16)).splits, 1);
    }

    #[test]
    fn a_lane_held_to_some_sms_plans_for_their_slots_only() {
        use crate::cuda::share::capped_slots;
        let s = shape(32, 8);
        let auto = AttnOverride::default();
        let plan = |rows, len, slots| AttnPlan::new(&s, rows, len, slots, V, auto);
        // No cap: the plan of the whole GPU, bit for bit.
        for (rows, len) in [(1, 32_768), (8, 32_768), (64, 4096), (4, 131_072)] {
            assert_eq!(
                plan(rows, len, capped_slots(SLOTS, 132, 0)),
                plan(rows, len, SLOTS)
            );
        }
        // A quarter of the SMs (33 of 132, 4 CTAs each): one wave of at most
        // 132 CTAs, the splits shrink with the slots.
        let quarter = capped_slots(SLOTS, 132, 33);
        assert_eq!(quarter, 132);
        for (rows, len) in [(1, 32_768), (8, 8192), (2, 8192)] {
            let p = plan(rows, len, quarter);
            let ctas = rows * 8 * p.chunks * p.splits;
            assert!(
                ctas <= quarter,
                "{rows} x {len}: {ctas} CTAs in {quarter} slots: {p:?}"
            );
            assert!(p.splits <= plan(rows, len, SLOTS).splits);
        }
        assert_eq!(plan(1, 32_768, quarter).splits, 16);
        assert_eq!(plan(8, 8192, quarter).splits, 2);
        // Long rows that get at most two splits a wave take several waves
        // of 512-page splits, capped or not: more CTAs than the cap.
        assert_eq!(plan(8, 32_768, quarter).splits, 4);
        // Cooperative only where every CTA fits in the capped slots.
        let on = AttnOverride {
            coop: Some(true),
            ..auto
        };
        let p = AttnPlan::new(&s, 8, 8192, quarter, V, on);
        assert!(p.coop && 8 * 8 * p.splits <= quarter, "{p:?}");
        // Rows that fill the cap get no splits (the grid is then the rows').
        assert_eq!(plan(64, 4096, quarter).splits, 1);
    }

    #[test]
    fn cooperative_merge_only_where_every_cta_is_resident() {
        let s = shape(32, 8);
        let plan = |rows, len, force| AttnPlan::new(&s, rows, len, SLOTS, V, force);
        let auto = AttnOverride::default();
        // Many splits in one wave: cooperative.
        assert!(plan(1, 32_768, auto).coop);
        assert!(plan(1, 131_072, auto).coop);
        // Few splits: the last CTA merges them cheaply.
        assert!(!plan(8, 32_768, auto).coop);
        assert!(!plan(64, 4096, auto).coop, "no splits");
        let on = AttnOverride {
            coop: Some(true),
            ..auto
        };
        assert!(plan(8, 32_768, on).coop);
        assert!(
            !plan(
                1,
                32_768,
                AttnOverride {
                    coop: Some(false),
                    ..auto
                }
            )
            .coop
        );
        // More CTAs than slots (forced splits): never cooperative.
        let many = AttnOverride {
            splits: Some(100),
            coop: Some(true),
            ..auto
        };
        assert!(!plan(1, 32_768, many).coop);
        // More splits than the cooperative merge takes.
        let one_cta = shape(8, 1);
        let wide = AttnPlan::new(&one_cta, 1, 131_072, 4 * SLOTS, V, on);
        assert!(wide.splits > 256 && !wide.coop, "{wide:?}");
    }
}
