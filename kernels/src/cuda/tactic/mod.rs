//! Launch wrappers of `tactic.cu` (Tactic's decode path on the GPU,
//! kernels/TACTIC.md "On the GPU").
//!
//! | step | wrapper | kernels |
//! | --- | --- | --- |
//! | cluster new runs of keys into their states | [`Gpu::tactic_cluster`] | `tactic/kmeans.cuh` |
//! | rank, estimate, union: the slots each (sequence, KV head) attends | [`Gpu::tactic_select`] | `tactic/select.cuh`, `tactic/union.cuh` |
//! | attention over those slots | [`Gpu::tactic_attend`] | `tactic/sparse.cuh` |
//! | `oracle_top_p`: exact scores, sorted, the shortest prefix reaching P, the union | [`Gpu::tactic_oracle`] | `tactic/oracle.cuh` |
//! | `fixed_budget`: page bounds, page orders, the round-robin to the budget | [`Gpu::tactic_budget`] | `tactic/budget.cuh` |
//! | diagnostics: each selection's true mass, its estimate, what it kept | [`Gpu::tactic_measure`] | `tactic/diag.cuh` |
//!
//! A launch serves every (sequence, KV head) of a layer at once; the host
//! lays out each one's part of the scratch from upper bounds it knows
//! (clusters k-means may keep, the context) and never waits for the
//! device. The states themselves are the caller's allocations, laid out by
//! [`crate::tactic::layout::StateLayout`].

mod budget;
mod diag;
mod kmeans;
mod oracle;
mod select;

pub use budget::BudgetJob;
pub use diag::{JobDiag, diag_record_len, parse_diag};
pub use kmeans::ClusterJob;
pub use oracle::OracleJob;
pub(crate) use select::rank_shared_memory;
pub use select::{SelectJob, SelectionHost};

use super::device::Gpu;
use crate::error::{Error, Result};
use crate::tactic::layout::StateLayout;
use cudarc::driver::{CudaSlice, DeviceRepr};

// SAFETY: `StateLayout` is `#[repr(C)]`, mirrored by `TacLayout` in
// tactic/common.cuh (four u32, then nine u64: no padding).
unsafe impl DeviceRepr for StateLayout {}

/// Scratch of the Tactic kernels, kept between launches: each buffer grows
/// to the largest launch so far and is never shrunk. What a selection
/// leaves here (the slot lists) is what the attention after it reads.
#[derive(Debug, Default)]
pub struct TacticWorkspace {
    // k-means
    pub(crate) cent: Scratch<f32>,
    pub(crate) norms: Scratch<f32>,
    pub(crate) assign: Scratch<u32>,
    pub(crate) counts: Scratch<u32>,
    pub(crate) offs: Scratch<u32>,
    pub(crate) members: Scratch<u32>,
    pub(crate) changed: Scratch<u32>,
    pub(crate) mu: Scratch<f64>,
    pub(crate) cov: Scratch<f64>,
    // selection
    pub(crate) qs: Scratch<f32>,
    pub(crate) qvar: Scratch<f32>,
    pub(crate) refs: Scratch<u32>,
    pub(crate) lest: Scratch<f32>,
    pub(crate) keys: Scratch<u64>,
    pub(crate) tail: Scratch<f32>,
    pub(crate) bitmap: Scratch<u32>,
    pub(crate) taken: Scratch<u32>,
    pub(crate) list: Scratch<u32>,
    pub(crate) list_len: Scratch<u32>,
    pub(crate) est: Scratch<f32>,
    /// The oracle's exact scores (its sort keys use `keys`).
    pub(crate) oracle_scores: Scratch<f32>,
    /// The problems of the last selection, which the attention reuses.
    pub(crate) sel_probs: Option<CudaSlice<select::SelProblem>>,
    pub(crate) sel_count: usize,
    // attention
    pub(crate) part_acc: Scratch<f32>,
    pub(crate) part_ml: Scratch<f32>,
}

/// One growable device buffer.
#[derive(Debug)]
pub struct Scratch<T>(Option<CudaSlice<T>>);

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Scratch(None)
    }
}

impl<T: DeviceRepr> Scratch<T> {
    /// The buffer's address, grown first to at least `n` elements (at
    /// least one).
    pub(crate) fn at_least(&mut self, gpu: &Gpu, n: usize) -> Result<u64> {
        if self.0.as_ref().is_none_or(|b| b.len() < n.max(1)) {
            self.0 = None;
            self.0 = Some(gpu.alloc::<T>(n.max(1))?);
        }
        Ok(gpu.ptr(self.0.as_ref().expect("just allocated")))
    }

    pub(crate) fn get(&self) -> Result<&CudaSlice<T>> {
        self.0
            .as_ref()
            .ok_or_else(|| Error::Shape("a Tactic scratch read before any launch wrote it".into()))
    }
}

/// What every Tactic launch needs to know about the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TacticShape {
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Query heads per KV head.
    pub group: usize,
}

impl TacticShape {
    /// Whether the kernels serve this shape: head sizes of
    /// [`super::sources::TACTIC_HEAD_DIMS`], at most
    /// [`super::sources::TACTIC_MAX_GROUP`] query heads per KV head.
    pub fn check(&self) -> Result<()> {
        use super::sources::{TACTIC_HEAD_DIMS, TACTIC_MAX_GROUP};
        if !TACTIC_HEAD_DIMS.contains(&self.head_dim) {
            return Err(Error::Unsupported(format!(
                "Tactic at head size {} (the kernels serve {TACTIC_HEAD_DIMS:?})",
                self.head_dim
            )));
        }
        if self.group == 0 || self.group > TACTIC_MAX_GROUP {
            return Err(Error::Unsupported(format!(
                "Tactic with {} query heads per KV head (at most {TACTIC_MAX_GROUP})",
                self.group
            )));
        }
        Ok(())
    }
}

/// A state's layout matches the model (the kernels trust it).
fn check_layout(l: &StateLayout, shape: &TacticShape) -> Result<()> {
    if l.kv_heads as usize != shape.kv_heads || l.head_dim as usize != shape.head_dim {
        return Err(Error::Shape(format!(
            "a Tactic state of {} heads of {} for a model of {} of {}",
            l.kv_heads, l.head_dim, shape.kv_heads, shape.head_dim
        )));
    }
    Ok(())
}

/// Exclusive prefix sums of `sizes`, and their total.
fn bases(sizes: impl Iterator<Item = usize>) -> (Vec<usize>, usize) {
    let mut at = 0;
    let v = sizes
        .map(|s| {
            let b = at;
            at += s;
            b
        })
        .collect();
    (v, at)
}

/// `u32` for a device offset, or a shape error.
fn u32_of(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::Shape(format!("{what} {x} does not fit 32 bits")))
}
