//! The GQA union as a GPU computes it: [`select_group`]'s greedy over the
//! group with the clusters' exact masses computed a chunk at a time, in
//! parallel, instead of one cluster at a time.
//!
//! The sequential greedy (`select.rs`) serves the heads in turn: head `g`
//! takes its next cluster not yet taken while `Z_g < P (Z_g + R_g)`, and
//! every cluster taken adds its members' exact masses to every head's `Z`
//! and removes its estimate from every head's `R`. Reading a cluster's keys
//! is the costly part, and it is what parallelises: here head `g` looks at
//! the next `chunk` entries of its order at once, computes the exact masses
//! (for every head of the group) of those not taken yet, all at the same
//! time (a warp per cluster on the GPU), and then one scan over the chunk
//! finds where the sequential greedy would have stopped: before the first
//! entry at which `Z_g ≥ P (Z_g + R_g)` already holds. The entries before
//! the stop are taken, in order, with exactly the sequential greedy's
//! updates of every head's `Z` and `R`; masses computed past the stop are
//! dropped (wasted work, never selected).
//!
//! So the selected set is the sequential greedy's: the same order, the
//! same stopping test after the same clusters. The one difference is the
//! grouping of the f64 sums: a cluster's member masses are summed first
//! and then added to `Z`, where the sequential loop adds them one by one.
//! That can only move a stop whose test is decided within f64 rounding (a
//! near-tie); `chunked_union_equals_the_sequential_greedy` checks that on
//! synthetic heavy tails.
//!
//! [`select_group`]: super::select::select_group

use super::TacticParams;
use super::index::ClusterIndex;
use super::keys::{KeyRows, dot};
use super::select::{Scratch, SelectStats, prepare, seed_group, sort_more, stats};

/// Clusters one chunk evaluates at once: the warps of the GPU kernel's
/// block (`UNION_WARPS` in tactic.cu).
pub const UNION_CHUNK: usize = 8;

/// [`select_group`](super::select::select_group) in the chunked formulation
/// (the module doc), with chunks of `chunk` clusters. Cluster granularity
/// only (the device's estimator: no token-level refinement). Writes the
/// sorted slots to `out` and each head's estimated mass to `est_mass`.
#[allow(clippy::too_many_arguments)]
pub fn select_group_chunked<K: KeyRows>(
    idx: &ClusterIndex,
    keys: &K,
    q: &[f32],
    ctx_len: usize,
    prm: &TacticParams,
    chunk: usize,
    s: &mut Scratch,
    out: &mut Vec<u32>,
    est_mass: &mut [f32],
) -> SelectStats {
    assert!(chunk > 0 && !prm.token_level, "chunks of clusters, whole");
    let d = idx.d;
    let g_n = q.len() / d;
    let c_n = idx.clusters();
    prepare(idx, q, prm, s);
    seed_group(idx, keys, ctx_len, prm, s, out);
    s.taken.clear();
    s.taken.resize(c_n, false);
    let target = prm.p as f64;
    let margin = prm.margin as f64;
    // `[chunk][G]`: the exact masses of a chunk's clusters, every head.
    let mut mass = vec![0.0f64; chunk * g_n];
    for g in 0..g_n {
        let mut ptr = 0;
        while s.z[g] < target * (s.z[g] + s.r[g]) && ptr < c_n {
            let end = (ptr + chunk).min(c_n);
            sort_more(s, g, c_n, end - 1);
            let cand: Vec<usize> = (ptr..end).map(|i| s.order[g * c_n + i] as usize).collect();
            // In parallel on the GPU: each candidate's masses, every head.
            for (i, &c) in cand.iter().enumerate() {
                let m = &mut mass[i * g_n..(i + 1) * g_n];
                if !s.taken[c] {
                    cluster_mass(idx, keys, c, s, d, m);
                }
            }
            // The scan: where the sequential greedy stops in this chunk.
            let (mut z, mut r) = (s.z[g], s.r[g]);
            let mut stop = cand.len();
            for (i, &c) in cand.iter().enumerate() {
                if z >= target * (z + r) {
                    stop = i;
                    break;
                }
                if !s.taken[c] {
                    z += mass[i * g_n + g];
                    let e = (s.lest[g * c_n + c] as f64).exp() * margin;
                    r = (r - e).max(0.0);
                }
            }
            for (i, &c) in cand[..stop].iter().enumerate() {
                if s.taken[c] {
                    continue;
                }
                s.taken[c] = true;
                out.extend_from_slice(idx.members_of(c));
                for h in 0..g_n {
                    s.z[h] += mass[i * g_n + h];
                    let e = (s.lest[h * c_n + c] as f64).exp() * margin;
                    s.r[h] = (s.r[h] - e).max(0.0);
                }
            }
            ptr += stop;
            if stop < cand.len() {
                break;
            }
        }
    }
    for (e, (&z, &r)) in est_mass.iter_mut().zip(s.z.iter().zip(&s.r)) {
        *e = (z / (z + r)) as f32;
    }
    out.sort_unstable();
    stats(out.len(), 0, c_n, d, prm)
}

/// Tokens read by a chunked selection of `selected` slots over `clusters`
/// clusters of dimension `d`: what [`select_group_chunked`] reports, for a
/// device that measured only those two counts (its diagnostics).
pub fn chunked_tokens_read(selected: usize, clusters: usize, d: usize, prm: &TacticParams) -> f64 {
    stats(selected, 0, clusters, d, prm).tokens_read
}

/// Cluster `c`'s exact mass for every head (relative to the head's
/// reference): its members' masses in slot order, each an f32 exponential
/// as the sequential greedy computes it, summed in f64.
fn cluster_mass<K: KeyRows>(
    idx: &ClusterIndex,
    keys: &K,
    c: usize,
    s: &Scratch,
    d: usize,
    out: &mut [f64],
) {
    out.fill(0.0);
    for &slot in idx.members_of(c) {
        let k = keys.key(slot as usize);
        for (h, o) in out.iter_mut().enumerate() {
            let m = (dot(&s.qs[h * d..(h + 1) * d], k) - s.refs[h]).exp();
            *o += m as f64;
        }
    }
}

#[cfg(test)]
#[path = "union_tests.rs"]
mod tests;
