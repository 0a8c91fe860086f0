//! Seeded, deterministic k-means over one (layer, KV head)'s keys.
//!
//! Deterministic so that a GPU version can reproduce it: the initial
//! centroids are a pure function of `(seed, n, k)` through [`crate::rng`],
//! each key goes to the nearest centroid with ties broken by the lower
//! centroid index, and centroids are member means summed in slot order. The
//! distance is `‖c‖² − 2k·c` (the `‖k‖²` term does not change the argmin).

use crate::cpu::matmul_nt;
use crate::rng;

/// How the first centroids are chosen (TACTIC.md: "Initialisation").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Every `n/k`-th key: no randomness, spread over positions.
    Strided,
    /// One key drawn (seeded) from each of `k` equal position ranges:
    /// spread over positions like `Strided`, without its blind spot for
    /// periodic structure.
    Stratified,
    /// `k` distinct keys drawn uniformly (seeded).
    Random,
    /// k-means++ (D² sampling, seeded): `k` sequential passes over the keys.
    PlusPlus,
}

/// Parameters of one clustering.
#[derive(Debug, Clone, Copy)]
pub struct KMeansParams {
    /// Average tokens per cluster: `k = ceil(n / cluster_size)`.
    pub cluster_size: usize,
    /// Lloyd iterations (stops earlier when no assignment changes).
    pub iterations: usize,
    pub init: Init,
    pub seed: u64,
}

/// The result: `assign[i]` is key `i`'s cluster, `centroids` is `[k, d]`
/// row-major. Every cluster in `0..k` has at least one member.
#[derive(Debug, Clone)]
pub struct KMeans {
    pub k: usize,
    pub assign: Vec<u32>,
    pub centroids: Vec<f32>,
}

/// Every initialisation starts from slot 0 as a centroid (`Strided` does
/// by construction): the first token is the attention sink, a key unlike
/// the rest whose score dominates; merged into a cluster of ordinary keys it
/// breaks that cluster's mass estimate (TACTIC.md, "Initialisation").
#[allow(dead_code)]
const fn pin_first() {}

/// RNG stream of the k-means draws (distinct from weight and sampling streams).
const KMEANS_STREAM: u64 = 0x4b4d_4541_0000_0000;
/// Rows of keys per assignment block (bounds the score buffer to
/// `ASSIGN_ROWS × k` floats).
const ASSIGN_ROWS: usize = 512;

/// Clusters `n` keys of `d` dims (`keys` is `[n, d]` row-major).
pub fn kmeans(keys: &[f32], n: usize, d: usize, p: &KMeansParams) -> KMeans {
    assert_eq!(keys.len(), n * d, "kmeans: keys is not [n, d]");
    assert!(n > 0 && p.cluster_size > 0, "kmeans: empty input");
    let k = n.div_ceil(p.cluster_size).min(n);
    let mut centroids = match p.init {
        Init::Strided => (0..k)
            .flat_map(|c| row(keys, d, c * n / k).to_vec())
            .collect(),
        Init::Stratified => (0..k)
            .flat_map(|c| {
                let (lo, hi) = (c * n / k, (c + 1) * n / k);
                // Range 0 starts at slot 0 (see `pin_first`).
                let r = if c == 0 {
                    0
                } else {
                    (rng::bits(p.seed, KMEANS_STREAM + 2, c as u64) % (hi - lo) as u64) as usize
                };
                row(keys, d, lo + r).to_vec()
            })
            .collect(),
        Init::Random => random_init(keys, n, d, k, p.seed),
        Init::PlusPlus => plus_plus_init(keys, n, d, k, p.seed),
    };
    let mut assign = vec![u32::MAX; n];
    let mut scratch = vec![0.0f32; ASSIGN_ROWS.min(n) * k];
    for _ in 0..p.iterations {
        let changed = assign_step(keys, n, d, &centroids, k, &mut assign, &mut scratch);
        update_step(keys, d, &assign, &mut centroids);
        if !changed {
            break;
        }
    }
    // Final assignment against the final centroids, then drop empty clusters.
    assign_step(keys, n, d, &centroids, k, &mut assign, &mut scratch);
    update_step(keys, d, &assign, &mut centroids);
    compact(assign, centroids, d)
}

#[inline]
fn row(x: &[f32], d: usize, i: usize) -> &[f32] {
    &x[i * d..(i + 1) * d]
}

/// Squared Euclidean distance, summed in a fixed order.
fn dist2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

fn random_init(keys: &[f32], n: usize, d: usize, k: usize, seed: u64) -> Vec<f32> {
    // Partial Fisher–Yates over indices: the first k of a seeded permutation.
    let mut idx: Vec<u32> = (0..n as u32).collect();
    // Index 0 stays first (see `pin_first`).
    for i in 1..k {
        let r = i + (rng::bits(seed, KMEANS_STREAM, i as u64) % (n - i) as u64) as usize;
        idx.swap(i, r);
    }
    idx[..k]
        .iter()
        .flat_map(|&i| row(keys, d, i as usize).to_vec())
        .collect()
}

fn plus_plus_init(keys: &[f32], n: usize, d: usize, k: usize, seed: u64) -> Vec<f32> {
    let first = 0; // see `pin_first`
    let mut cent = row(keys, d, first).to_vec();
    let mut best: Vec<f32> = (0..n).map(|i| dist2(row(keys, d, i), &cent)).collect();
    for c in 1..k {
        let total: f64 = best.iter().map(|&x| x as f64).sum();
        let target = rng::uniform01(seed, KMEANS_STREAM + 1, c as u64) as f64 * total;
        let mut acc = 0.0f64;
        let mut pick = n - 1;
        for (i, &b) in best.iter().enumerate() {
            acc += b as f64;
            if acc > target && b > 0.0 {
                pick = i;
                break;
            }
        }
        let new = row(keys, d, pick).to_vec();
        for (i, b) in best.iter_mut().enumerate() {
            *b = b.min(dist2(row(keys, d, i), &new));
        }
        cent.extend_from_slice(&new);
    }
    cent
}

/// Assigns every key to its nearest centroid; returns whether any changed.
fn assign_step(
    keys: &[f32],
    n: usize,
    d: usize,
    centroids: &[f32],
    k: usize,
    assign: &mut [u32],
    scratch: &mut [f32],
) -> bool {
    let norms: Vec<f32> = (0..k)
        .map(|c| row(centroids, d, c).iter().map(|x| x * x).sum())
        .collect();
    let mut changed = false;
    let mut r0 = 0;
    while r0 < n {
        let rows = (n - r0).min(ASSIGN_ROWS);
        let s = &mut scratch[..rows * k];
        matmul_nt(&keys[r0 * d..(r0 + rows) * d], centroids, s, rows, k, d);
        for r in 0..rows {
            let sr = &s[r * k..(r + 1) * k];
            let mut bc = 0usize;
            let mut bd = f32::INFINITY;
            for (c, (&dot, &nc)) in sr.iter().zip(&norms).enumerate() {
                let dd = nc - 2.0 * dot;
                if dd < bd {
                    bd = dd;
                    bc = c;
                }
            }
            if assign[r0 + r] != bc as u32 {
                assign[r0 + r] = bc as u32;
                changed = true;
            }
        }
        r0 += rows;
    }
    changed
}

/// Centroid = mean of its members (f64 sums in slot order); an empty cluster
/// keeps its previous centroid.
fn update_step(keys: &[f32], d: usize, assign: &[u32], centroids: &mut [f32]) {
    let k = centroids.len() / d;
    let mut sums = vec![0.0f64; k * d];
    let mut counts = vec![0u32; k];
    for (i, &c) in assign.iter().enumerate() {
        let c = c as usize;
        counts[c] += 1;
        for (s, &x) in sums[c * d..(c + 1) * d].iter_mut().zip(row(keys, d, i)) {
            *s += x as f64;
        }
    }
    for c in 0..k {
        if counts[c] > 0 {
            let inv = 1.0 / counts[c] as f64;
            for (o, &s) in centroids[c * d..(c + 1) * d]
                .iter_mut()
                .zip(&sums[c * d..(c + 1) * d])
            {
                *o = (s * inv) as f32;
            }
        }
    }
}

/// Renumbers clusters in index order, skipping empty ones, so `k` counts
/// only clusters with members.
fn compact(mut assign: Vec<u32>, centroids: Vec<f32>, d: usize) -> KMeans {
    let k0 = centroids.len() / d;
    let mut used = vec![false; k0];
    for &c in &assign {
        used[c as usize] = true;
    }
    let mut map = vec![u32::MAX; k0];
    let mut cent = Vec::with_capacity(centroids.len());
    let mut k = 0u32;
    for c in 0..k0 {
        if used[c] {
            map[c] = k;
            k += 1;
            cent.extend_from_slice(row(&centroids, d, c));
        }
    }
    for a in assign.iter_mut() {
        *a = map[*a as usize];
    }
    KMeans {
        k: k as usize,
        assign,
        centroids: cent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separated_blobs_are_recovered_and_runs_repeat() {
        // 4 blobs of 8 points far apart; cluster_size 8 gives k = 4.
        let d = 4;
        let keys: Vec<f32> = (0..32)
            .flat_map(|i| {
                let b = (i / 8) as f32 * 100.0;
                (0..d).map(move |j| b + rng::random_weight(1, i as u64, j as u64, 0.0, 1.0))
            })
            .collect();
        for init in [
            Init::Strided,
            Init::Stratified,
            Init::Random,
            Init::PlusPlus,
        ] {
            // Random init may seed two centroids in one blob; only the
            // spread-out initialisations must recover the blobs.
            let must_recover = init != Init::Random;
            let p = KMeansParams {
                cluster_size: 8,
                iterations: 10,
                init,
                seed: 3,
            };
            let a = kmeans(&keys, 32, d, &p);
            let b = kmeans(&keys, 32, d, &p);
            assert_eq!(a.assign, b.assign);
            assert_eq!(a.centroids, b.centroids);
            for i in 0..32 {
                if must_recover {
                    assert_eq!(a.assign[i], a.assign[i / 8 * 8], "{init:?}");
                }
            }
        }
    }
}
