//! Tactic's selection math (arXiv 2502.12216; the decisions and the
//! measurements behind them in `kernels/TACTIC.md`).
//!
//! | concept | where |
//! | --- | --- |
//! | seeded, deterministic k-means | [`kmeans`] |
//! | clusters of one (layer, KV head): centroids, members, spreads | [`index::ClusterIndex`] |
//! | one decode step's selection for a KV head's group of query heads | [`select::select_group`] |
//! | the same greedy with clusters read a chunk at a time (the GPU's formulation) | [`union::select_group_chunked`] |
//! | a sequence's clusterings over all layers, re-clustering, the engine's entry point | [`TacticSeq`] |
//! | `fixed_budget` (Quest page bounds) and `oracle_top_p` | [`baselines`] |
//! | key rows from the paged cache or a dense array | [`keys`] |
//! | seeded synthetic keys with heavy-tailed scores | [`synth`] |
//! | the device layout of a (sequence, layer)'s clusterings (GPU) | [`layout`] |

pub mod baselines;
pub mod fit;
pub mod index;
pub mod keys;
pub mod kmeans;
pub mod layout;
pub mod select;
pub mod synth;
pub mod union;

pub use baselines::{PageBounds, exact_scores, fixed_budget, oracle_top_p, true_mass};
pub use fit::{FitParams, FitScratch, select_group_fit};
pub use index::ClusterIndex;
pub use keys::{DenseKeys, KeyRows, PagedKeys};
pub use kmeans::{Init, KMeansParams};
pub use select::{Scratch, SelectStats, select_group};

use crate::cpu::KvLayer;

/// How a cluster's score spread enters its estimated mass
/// `|c|·exp(q·μ_c + v/2)` (a log-normal mean).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// `v = 0`: the centroid score alone (Jensen: underestimates).
    None,
    /// Isotropic: `v = tr Σ_c · ‖q‖² / d`.
    Iso,
    /// A shape shared by the clusters: `v = tr Σ_c · qᵀ Σ̂_W q`.
    Pooled,
}

/// Every knob of the policy (TACTIC.md gives each default's evidence).
#[derive(Debug, Clone, Copy)]
pub struct TacticParams {
    /// Target attention mass.
    pub p: f32,
    pub kmeans: KMeansParams,
    /// Re-cluster (the tail alone, appended) once this many tokens are
    /// past the clustering.
    pub recluster_limit: usize,
    pub spread: Spread,
    /// Scales the spread's variance term.
    pub spread_scale: f32,
    /// Multiplies the estimated mass of the clusters not read (≥ 1 errs on
    /// the side of reading more).
    pub margin: f32,
    /// Rank clusters by `q·μ + v/2` (estimated mass per token) instead of
    /// `q·μ`.
    pub rank_by_estimate: bool,
    /// Keep only the heaviest scored tokens of the read clusters.
    pub token_level: bool,
}

impl TacticParams {
    /// The defaults chosen in TACTIC.md for target mass `p`.
    pub fn new(p: f32) -> TacticParams {
        TacticParams {
            p,
            kmeans: KMeansParams {
                cluster_size: 16,
                iterations: 10,
                init: Init::Stratified,
                seed: 0x7ac7_1c00,
            },
            recluster_limit: 2048,
            spread: Spread::Pooled,
            spread_scale: 1.0,
            margin: 1.0,
            rank_by_estimate: true,
            token_level: false,
        }
    }
}

/// Diagnostics of one (layer, KV head) selection: what it read and kept.
#[derive(Debug, Clone, Default)]
pub struct HeadDiag {
    pub tokens_read: f64,
    pub selected: usize,
    /// Per query head of the group: the estimated mass of the selection.
    pub est_mass: Vec<f32>,
}

/// One decode token of one sequence at one layer, as the engine has it.
#[derive(Debug, Clone, Copy)]
pub struct DecodeStep<'a> {
    /// The token's query row (`[num_heads * head_dim]`, after RoPE).
    pub q: &'a [f32],
    /// The layer's paged cache, already holding this step's token.
    pub kv: KvLayer<'a>,
    pub block_table: &'a [u32],
    /// Tokens cached, this step's included.
    pub ctx_len: usize,
}

/// One sequence's Tactic state: a clustering per (layer, KV head), built at
/// its first decode step and extended when the tail passes the limit.
#[derive(Debug)]
pub struct TacticSeq {
    pub params: TacticParams,
    /// `[layer][kv_head]`; empty until the layer's first decode step.
    pub index: Vec<Vec<ClusterIndex>>,
    scratch: Scratch,
}

impl TacticSeq {
    pub fn new(params: TacticParams, layers: usize) -> TacticSeq {
        TacticSeq {
            params,
            index: vec![Vec::new(); layers],
            scratch: Scratch::default(),
        }
    }

    /// The selection of one decode step of one layer. Fills `out[h]` with KV head
    /// `h`'s sorted slots (ready for [`crate::cpu::AttnSeq::selection`]) and
    /// `diag[h]` with its diagnostics.
    pub fn select_layer(
        &mut self,
        layer: usize,
        step: &DecodeStep<'_>,
        out: &mut [Vec<u32>],
        diag: &mut [HeadDiag],
    ) {
        let DecodeStep {
            q,
            kv,
            block_table,
            ctx_len,
        } = *step;
        let d = kv.head_dim;
        let group = q.len() / d / kv.kv_heads;
        let p = self.params;
        let heads = &mut self.index[layer];
        for h in 0..kv.kv_heads {
            let keys = PagedKeys {
                kv,
                block_table,
                head: h,
            };
            // Cluster everything cached before this step's token.
            let clustered = ctx_len.saturating_sub(1);
            if heads.len() <= h {
                heads.push(ClusterIndex::build(&keys, clustered, &p.kmeans));
            } else if ctx_len - heads[h].len > p.recluster_limit {
                heads[h].extend(&keys, clustered, &p.kmeans);
            }
            let dg = &mut diag[h];
            dg.est_mass.resize(group, 0.0);
            let st = select_group(
                &heads[h],
                &keys,
                &q[h * group * d..(h + 1) * group * d],
                ctx_len,
                &p,
                &mut self.scratch,
                &mut out[h],
                &mut dg.est_mass,
            );
            dg.tokens_read = st.tokens_read;
            dg.selected = st.selected;
        }
    }
}

#[cfg(test)]
mod tests;
