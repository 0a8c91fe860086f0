//! The clustering of one (layer, KV head)'s cached keys and the per-cluster
//! metadata the selection reads each decode step.

use super::keys::KeyRows;
use super::kmeans::{KMeans, KMeansParams, kmeans};

/// Clusters of the keys at slots `0..len`, contiguous for the hot path:
/// centroids `[clusters, d]`, members grouped by cluster (ascending slots
/// within one), and per-cluster spreads.
#[derive(Debug, Clone, Default)]
pub struct ClusterIndex {
    pub d: usize,
    /// Slots `0..len` are clustered; later ones are the tail.
    pub len: usize,
    /// `[clusters, d]`, the mean of each cluster's keys (as stored in the
    /// cache, so `q·μ` is the cluster's mean score).
    pub centroids: Vec<f32>,
    /// `members[offsets[c]..offsets[c + 1]]` are cluster `c`'s slots.
    pub offsets: Vec<u32>,
    pub members: Vec<u32>,
    /// `ln |c|`.
    pub log_size: Vec<f32>,
    /// `tr Σ_c`: the mean squared distance of the members to the centroid.
    pub spread: Vec<f32>,
    /// Pooled within-cluster covariance `Σ_W` (`[d, d]`), divided by its
    /// trace, so that `spread_c · qᵀ Σ̂_W q` approximates the score variance
    /// of cluster `c` with a shape shared by all clusters.
    pub shape: Vec<f32>,
    /// Trace of the unnormalised pooled scatter behind `shape`.
    pub(super) shape_trace: f64,
}

impl ClusterIndex {
    pub fn clusters(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Trace of the unnormalised pooled scatter behind `shape` (what a
    /// re-clustering re-weights the shape by).
    pub fn shape_trace(&self) -> f64 {
        self.shape_trace
    }

    /// Sets the trace of an index rebuilt from its parts (the device
    /// layout, `layout::read_heads`).
    pub fn set_shape_trace(&mut self, t: f64) {
        self.shape_trace = t;
    }

    #[inline]
    pub fn members_of(&self, c: usize) -> &[u32] {
        &self.members[self.offsets[c] as usize..self.offsets[c + 1] as usize]
    }

    #[inline]
    pub fn centroid(&self, c: usize) -> &[f32] {
        &self.centroids[c * self.d..(c + 1) * self.d]
    }

    /// Clusters the keys at slots `0..len` (k-means on the same keys).
    pub fn build<K: KeyRows>(keys: &K, len: usize, p: &KMeansParams) -> ClusterIndex {
        let mut idx = ClusterIndex {
            d: keys.dim(),
            offsets: vec![0],
            ..Default::default()
        };
        idx.extend(keys, len, p);
        idx
    }

    /// Clusters the tail `self.len..len` on its own and appends its clusters
    /// (re-clustering cost proportional to the tail, old clusters untouched).
    pub fn extend<K: KeyRows>(&mut self, keys: &K, len: usize, p: &KMeansParams) {
        if len <= self.len {
            return;
        }
        let d = self.d;
        let start = self.len;
        let n = len - start;
        let mut flat = Vec::with_capacity(n * d);
        for s in start..len {
            flat.extend_from_slice(keys.key(s));
        }
        let km = kmeans(&flat, n, d, p);
        self.append(keys, start, &km);
        self.len = len;
    }

    /// Builds from an assignment computed elsewhere (for example on the keys
    /// before RoPE): centroids and spreads come from `keys`, so ranking still
    /// uses the scores attention will compute.
    pub fn from_assignment<K: KeyRows>(keys: &K, assign: &[u32], k: usize) -> ClusterIndex {
        let mut idx = ClusterIndex {
            d: keys.dim(),
            offsets: vec![0],
            ..Default::default()
        };
        let km = KMeans {
            k,
            assign: assign.to_vec(),
            centroids: vec![0.0; k * keys.dim()],
        };
        idx.append(keys, 0, &km);
        idx.len = assign.len();
        idx
    }

    fn append<K: KeyRows>(&mut self, keys: &K, start: usize, km: &KMeans) {
        let d = self.d;
        // Counting sort of slots by cluster (stable: ascending slots).
        let mut counts = vec![0u32; km.k];
        for &a in &km.assign {
            counts[a as usize] += 1;
        }
        let base = self.members.len() as u32;
        let mut pos = Vec::with_capacity(km.k);
        let mut acc = 0u32;
        for &c in &counts {
            pos.push(acc);
            acc += c;
            self.offsets.push(base + acc);
        }
        self.members.resize(base as usize + km.assign.len(), 0);
        for (i, &a) in km.assign.iter().enumerate() {
            let p = &mut pos[a as usize];
            self.members[(base + *p) as usize] = (start + i) as u32;
            *p += 1;
        }
        // Centroids and spreads from the members; pooled shape re-weighted.
        let mut cov = vec![0.0f64; d * d];
        let c0 = self.clusters() - km.k;
        let mut mu = vec![0.0f64; d];
        let mut dev = vec![0.0f64; d];
        for c in c0..self.clusters() {
            let m = &self.members[self.offsets[c] as usize..self.offsets[c + 1] as usize];
            mu.iter_mut().for_each(|x| *x = 0.0);
            for &s in m {
                for (a, &x) in mu.iter_mut().zip(keys.key(s as usize)) {
                    *a += x as f64;
                }
            }
            let inv = 1.0 / m.len() as f64;
            mu.iter_mut().for_each(|x| *x *= inv);
            let mut tr = 0.0f64;
            for &s in m {
                for ((o, &x), &u) in dev.iter_mut().zip(keys.key(s as usize)).zip(&mu) {
                    *o = x as f64 - u;
                }
                tr += dev.iter().map(|x| x * x).sum::<f64>();
                for i in 0..d {
                    for j in 0..d {
                        cov[i * d + j] += dev[i] * dev[j];
                    }
                }
            }
            self.centroids.extend(mu.iter().map(|&x| x as f32));
            self.log_size.push((m.len() as f32).ln());
            self.spread.push((tr * inv) as f32);
        }
        // Pooled covariance: unnormalise the old shape by its trace, add the
        // new scatter, renormalise.
        let mut shape: Vec<f64> = if self.shape.is_empty() {
            vec![0.0; d * d]
        } else {
            self.shape
                .iter()
                .map(|&x| x as f64 * self.shape_trace)
                .collect()
        };
        for (s, c) in shape.iter_mut().zip(&cov) {
            *s += c;
        }
        let tr: f64 = (0..d).map(|i| shape[i * d + i]).sum();
        self.shape_trace = tr;
        let inv = if tr > 0.0 { 1.0 / tr } else { 0.0 };
        self.shape = shape.iter().map(|&x| (x * inv) as f32).collect();
    }
}
