//! Tactic's selection for one (layer, KV head) at one decode step: rank the
//! clusters per query head, read clusters in that order (their exact scores
//! come with reading them), estimate the mass of the clusters not read, and
//! stop once every query head of the group has reached `P` of its estimated
//! total. The selected set is the union over the group (GQA).

use super::index::ClusterIndex;
use super::keys::{KeyRows, dot};
use super::{Spread, TacticParams};

/// Reusable buffers: no allocation per call once they have grown.
#[derive(Debug, Default)]
pub struct Scratch {
    pub(super) qs: Vec<f32>,
    /// `[G, C]` centroid scores, then log of the estimated cluster mass
    /// relative to the head's reference.
    pub(super) lest: Vec<f32>,
    pub(super) rank: Vec<f32>,
    pub(super) order: Vec<u32>,
    /// Per head: how much of its order is sorted.
    pub(super) sorted: Vec<usize>,
    pub(super) taken: Vec<bool>,
    /// Per head: exact mass read, estimated mass not read, reference score.
    pub(super) z: Vec<f64>,
    pub(super) r: Vec<f64>,
    pub(super) refs: Vec<f32>,
    pub(super) qvar: Vec<f32>,
    /// Token-level refinement: scored slots and their masses `[slot][G]`.
    pub(super) scored: Vec<u32>,
    pub(super) mass: Vec<f32>,
    pub(super) pick: Vec<u32>,
    pub(super) keep: Vec<bool>,
}

/// What one selection cost and what it believes it reached.
#[derive(Debug, Clone, Copy, Default)]
pub struct SelectStats {
    /// Token-equivalents read (K row + V row = 1): selected 1, scored only 0.5,
    /// centroid 0.5, per-cluster scalars 0.5/d each.
    pub tokens_read: f64,
    /// Tokens selected (the union over the group).
    pub selected: usize,
}

/// Selects the slots for one KV head's group of query heads.
///
/// `q` holds the group's `G` query rows (`[G, d]`, unscaled, after RoPE);
/// the sequence caches `ctx_len` tokens, `idx` covers slots `0..idx.len` and
/// every slot from `idx.len` on (the tail) is always selected. Writes the
/// sorted slots to `out` and each head's estimated mass to `est_mass`.
#[allow(clippy::too_many_arguments)]
pub fn select_group<K: KeyRows>(
    idx: &ClusterIndex,
    keys: &K,
    q: &[f32],
    ctx_len: usize,
    prm: &TacticParams,
    s: &mut Scratch,
    out: &mut Vec<u32>,
    est_mass: &mut [f32],
) -> SelectStats {
    let d = idx.d;
    let g_n = q.len() / d;
    let c_n = idx.clusters();
    prepare(idx, q, prm, s);
    seed_group(idx, keys, ctx_len, prm, s, out);
    s.taken.clear();
    s.taken.resize(c_n, false);
    s.scored.clear();
    s.mass.clear();
    let token_level = prm.token_level;
    let target = prm.p as f64;
    for g in 0..g_n {
        let mut ptr = 0;
        while s.z[g] < target * (s.z[g] + s.r[g]) && ptr < c_n {
            sort_more(s, g, c_n, ptr);
            let c = s.order[g * c_n + ptr] as usize;
            ptr += 1;
            if s.taken[c] {
                continue;
            }
            s.taken[c] = true;
            for &slot in idx.members_of(c) {
                let k = keys.key(slot as usize);
                for h in 0..g_n {
                    let m = (dot(&s.qs[h * d..(h + 1) * d], k) - s.refs[h]).exp();
                    s.z[h] += m as f64;
                    if token_level {
                        s.mass.push(m);
                    }
                }
                if token_level {
                    s.scored.push(slot);
                } else {
                    out.push(slot);
                }
            }
            for h in 0..g_n {
                let e = (s.lest[h * c_n + c] as f64).exp() * prm.margin as f64;
                s.r[h] = (s.r[h] - e).max(0.0);
            }
        }
    }
    for (e, (&z, &r)) in est_mass.iter_mut().zip(s.z.iter().zip(&s.r)) {
        *e = (z / (z + r)) as f32;
    }
    let scored_only = if token_level {
        let before = out.len();
        refine_tokens(s, g_n, target, out);
        s.scored.len() - (out.len() - before)
    } else {
        0
    };
    out.sort_unstable();
    stats(out.len(), scored_only, c_n, d, prm)
}

/// The start of every head's walk: the tail (always selected, its exact
/// mass in `z`, its scores raising each head's reference) goes to `out`,
/// and each head's `lest` becomes its estimates relative to the reference,
/// whose sum (times the margin) starts `r`.
pub(super) fn seed_group<K: KeyRows>(
    idx: &ClusterIndex,
    keys: &K,
    ctx_len: usize,
    prm: &TacticParams,
    s: &mut Scratch,
    out: &mut Vec<u32>,
) {
    let d = idx.d;
    let g_n = s.qs.len() / d;
    let c_n = idx.clusters();
    out.clear();
    // The tail: always selected, exact. Its scores also fix the reference.
    for slot in idx.len..ctx_len {
        let k = keys.key(slot);
        for g in 0..g_n {
            let sc = dot(&s.qs[g * d..(g + 1) * d], k);
            s.refs[g] = s.refs[g].max(sc);
        }
    }
    s.z.clear();
    s.z.resize(g_n, 0.0);
    for slot in idx.len..ctx_len {
        let k = keys.key(slot);
        for g in 0..g_n {
            s.z[g] += ((dot(&s.qs[g * d..(g + 1) * d], k) - s.refs[g]) as f64).exp();
        }
        out.push(slot as u32);
    }
    // Estimated mass of every cluster, relative to the reference.
    s.r.clear();
    for g in 0..g_n {
        let rf = s.refs[g];
        let row = &mut s.lest[g * c_n..(g + 1) * c_n];
        let mut r = 0.0f64;
        for v in row.iter_mut() {
            *v -= rf;
            r += (*v as f64).exp();
        }
        s.r.push(r * prm.margin as f64);
    }
}

/// Tokens read by a selection of `selected` tokens (plus `scored_only`
/// keys read to score) over `c_n` clusters of dimension `d`.
pub(super) fn stats(
    selected: usize,
    scored_only: usize,
    c_n: usize,
    d: usize,
    prm: &TacticParams,
) -> SelectStats {
    let scalars = 1 + usize::from(prm.spread != Spread::None);
    let shape_rows = if prm.spread == Spread::Pooled { d } else { 0 };
    SelectStats {
        tokens_read: selected as f64
            + 0.5 * scored_only as f64
            + 0.5 * c_n as f64 * (1.0 + scalars as f64 / d as f64)
            + 0.5 * shape_rows as f64,
        selected,
    }
}

/// Scaled queries, centroid scores, spreads, log-estimates and rankings.
pub(super) fn prepare(idx: &ClusterIndex, q: &[f32], prm: &TacticParams, s: &mut Scratch) {
    let d = idx.d;
    let g_n = q.len() / d;
    let c_n = idx.clusters();
    let scale = 1.0 / (d as f32).sqrt();
    s.qs.clear();
    s.qs.extend(q.iter().map(|x| x * scale));
    // Per head: the factor turning a cluster's spread into a score variance.
    s.qvar.clear();
    for g in 0..g_n {
        let qg = &s.qs[g * d..(g + 1) * d];
        let v = match prm.spread {
            Spread::None => 0.0,
            Spread::Iso => dot(qg, qg) / d as f32,
            // No clusters yet (nothing cached before the first token): no shape.
            Spread::Pooled if idx.shape.is_empty() => 0.0,
            Spread::Pooled => (0..d)
                .map(|i| qg[i] * dot(&idx.shape[i * d..(i + 1) * d], qg))
                .sum(),
        };
        s.qvar.push(v * prm.spread_scale);
    }
    s.lest.resize(g_n * c_n, 0.0);
    s.rank.resize(g_n * c_n, 0.0);
    s.refs.clear();
    for g in 0..g_n {
        let qg = &s.qs[g * d..(g + 1) * d];
        let mut best = f32::NEG_INFINITY;
        for c in 0..c_n {
            let m = dot(qg, idx.centroid(c));
            let half_var = 0.5 * s.qvar[g] * idx.spread[c];
            s.lest[g * c_n + c] = idx.log_size[c] + m + half_var;
            s.rank[g * c_n + c] = if prm.rank_by_estimate {
                m + half_var
            } else {
                m
            };
            best = best.max(m + half_var);
        }
        s.refs.push(best);
    }
    s.order.clear();
    s.sorted.clear();
    for g in 0..g_n {
        s.order.extend(0..c_n as u32);
        s.sorted.push(0);
        sort_more(s, g, c_n, 0);
    }
}

/// Clusters ranked per sort batch: most heads stop within the first few
/// dozen clusters, so the order is sorted lazily, a batch at a time.
const SORT_BATCH: usize = 48;

/// Makes head `g`'s order exact (best first, ties by cluster index) up to
/// position `need` and at least one batch further.
pub(super) fn sort_more(s: &mut Scratch, g: usize, c_n: usize, need: usize) {
    let done = s.sorted[g];
    if done > need || done == c_n {
        return;
    }
    let upto = (need + 1).max(done + SORT_BATCH).min(c_n);
    let rank = &s.rank[g * c_n..(g + 1) * c_n];
    let cmp = |a: &u32, b: &u32| {
        rank[*b as usize]
            .total_cmp(&rank[*a as usize])
            .then(a.cmp(b))
    };
    let rest = &mut s.order[g * c_n + done..(g + 1) * c_n];
    if upto < c_n {
        rest.select_nth_unstable_by(upto - done - 1, cmp);
    }
    rest[..upto - done].sort_unstable_by(cmp);
    s.sorted[g] = upto;
}

/// Token-level refinement: of the scored tokens, each head keeps its
/// heaviest ones until its exact tail mass plus them reaches `P` of its
/// estimated total; the union goes to `out` (after the tail).
fn refine_tokens(s: &mut Scratch, g_n: usize, target: f64, out: &mut Vec<u32>) {
    let n = s.scored.len();
    s.keep.clear();
    s.keep.resize(n, false);
    for g in 0..g_n {
        let total = s.z[g] + s.r[g];
        let scored_mass: f64 = (0..n).map(|i| s.mass[i * g_n + g] as f64).sum();
        let mut have = s.z[g] - scored_mass;
        s.pick.clear();
        s.pick.extend(0..n as u32);
        let mass = &s.mass;
        s.pick.sort_unstable_by(|&a, &b| {
            mass[b as usize * g_n + g]
                .total_cmp(&mass[a as usize * g_n + g])
                .then(s.scored[a as usize].cmp(&s.scored[b as usize]))
        });
        for &i in &s.pick {
            if have >= target * total {
                break;
            }
            have += s.mass[i as usize * g_n + g] as f64;
            s.keep[i as usize] = true;
        }
    }
    out.extend((0..n).filter(|&i| s.keep[i]).map(|i| s.scored[i]));
}
