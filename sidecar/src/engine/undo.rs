//! What a step changed in its sequences' policy states, kept until the
//! step commits, so that a step that fails puts every state back as it was.
//!
//! The selector grows states in place (a first clustering or page bounds
//! for a layer, a re-clustering of the tail, bounds over newly filled
//! pages). Cloning every state before every step would copy whole
//! clusterings per token; instead each change notes just enough to revert
//! it: the number of heads a layer had (new heads are pushed), and copies of
//! only the heads that the step is about to extend (a re-clustering happens
//! once per `recluster_limit` tokens; page bounds keep their old page count
//! and at most one partial page).

use super::sparse::PolicyState;
use tacflow_kernels::tactic::{ClusterIndex, PageBounds, TacticSeq};

/// One sequence's changes in one step, in order.
#[derive(Debug, Default)]
pub struct Undo {
    changes: Vec<Change>,
    /// A change happened that was not foreseen (so not noted): reverting
    /// then forgets the state, which the next decode step rebuilds.
    lossy: bool,
}

#[derive(Debug)]
enum Change {
    /// A Tactic layer had `lens.len()` clusterings covering `lens[h]` slots;
    /// `extended` holds the old copies of those the step re-clusters.
    Clusters {
        layer: usize,
        lens: Vec<usize>,
        extended: Vec<(usize, ClusterIndex)>,
    },
    /// A `fixed_budget` layer had `heads` page bounds; `grown` the old
    /// state of those the step extends.
    Bounds {
        layer: usize,
        heads: usize,
        grown: Vec<(usize, BoundsMark)>,
    },
}

/// Enough of a [`PageBounds`] to undo an `extend`, which keeps every full
/// page and recomputes from the old partial page on.
#[derive(Debug)]
struct BoundsMark {
    len: usize,
    /// The old partial last page's rows (empty when the old length ended on
    /// a page boundary).
    partial_min: Vec<f32>,
    partial_max: Vec<f32>,
}

impl Undo {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && !self.lossy
    }

    /// Notes a Tactic layer before its selection at context `ctx_len`: the
    /// heads the selector will re-cluster (the rule of
    /// `TacticSeq::select_layer`) are copied.
    pub fn before_clusters(&mut self, t: &TacticSeq, layer: usize, ctx_len: usize) {
        let heads = &t.index[layer];
        let extended = heads
            .iter()
            .enumerate()
            .filter(|(_, ix)| ctx_len - ix.len > t.params.recluster_limit)
            .map(|(h, ix)| (h, ix.clone()))
            .collect();
        self.changes.push(Change::Clusters {
            layer,
            lens: heads.iter().map(|ix| ix.len).collect(),
            extended,
        });
    }

    /// Checks, after the selection, that no head changed that
    /// [`Undo::before_clusters`] did not foresee (should the kernel's
    /// re-clustering rule drift from the copy above); if one did, a revert
    /// can only forget the state.
    pub fn after_clusters(&mut self, t: &TacticSeq, layer: usize) {
        let Some(Change::Clusters { lens, extended, .. }) = self.changes.last() else {
            unreachable!("before_clusters notes the layer first");
        };
        let unforeseen = lens.iter().enumerate().any(|(h, &len)| {
            t.index[layer][h].len != len && !extended.iter().any(|&(e, _)| e == h)
        });
        self.lossy |= unforeseen;
    }

    /// Notes a `fixed_budget` layer's bounds before they grow to `covered`.
    pub fn before_bounds(&mut self, bounds: &[PageBounds], layer: usize, covered: usize) {
        let grown = bounds
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len < covered)
            .map(|(h, b)| {
                let from = b.len / b.page * b.d;
                let to = b.len.div_ceil(b.page) * b.d;
                let mark = BoundsMark {
                    len: b.len,
                    partial_min: b.min[from..to].to_vec(),
                    partial_max: b.max[from..to].to_vec(),
                };
                (h, mark)
            })
            .collect();
        self.changes.push(Change::Bounds {
            layer,
            heads: bounds.len(),
            grown,
        });
    }
}

impl PolicyState {
    /// Reverts the changes of a step that failed.
    pub fn revert(&mut self, undo: Undo) {
        if undo.lossy {
            self.reset();
            return;
        }
        for change in undo.changes.into_iter().rev() {
            match (change, &mut *self) {
                (
                    Change::Clusters {
                        layer,
                        lens,
                        extended,
                    },
                    PolicyState::Tactic(t),
                ) => {
                    t.index[layer].truncate(lens.len());
                    for (h, old) in extended {
                        t.index[layer][h] = old;
                    }
                }
                (
                    Change::Bounds {
                        layer,
                        heads,
                        grown,
                    },
                    PolicyState::FixedBudget { bounds, .. },
                ) => {
                    bounds[layer].truncate(heads);
                    for (h, mark) in grown {
                        mark.restore(&mut bounds[layer][h]);
                    }
                }
                (c, s) => unreachable!("{c:?} cannot be undone on {s:?}"),
            }
        }
    }
}

impl BoundsMark {
    fn restore(self, b: &mut PageBounds) {
        let from = self.len / b.page * b.d;
        b.min.truncate(from);
        b.max.truncate(from);
        b.min.extend_from_slice(&self.partial_min);
        b.max.extend_from_slice(&self.partial_max);
        b.len = self.len;
    }
}
