//! Where the arrays of one (sequence, layer)'s clusterings live inside one
//! device allocation: the layout that the GPU kernels (`tactic.cu`) and the
//! backend's state manager agree on.
//!
//! One allocation per (sequence, layer) holds every KV head's clustering
//! ([`super::ClusterIndex`]'s fields, head-major), so that a sequence's
//! state is a handful of buffers (one per layer), a fork can share them,
//! and growing a clustering (the re-clustered tail appended) is one new
//! allocation and a few copies. What only the device knows (how many
//! clusters k-means kept once the empty ones were dropped) lives in the
//! allocation too (`count`); the host knows upper bounds only, which is all
//! it needs to size buffers and launches.

use super::index::ClusterIndex;

/// Byte alignment of every array (16: the kernels read centroids and the
/// shape as `float4`, the trace as `double`).
const ALIGN: u64 = 16;

/// The arrays of one (sequence, layer), for `kv_heads` heads of
/// `head_dim`, every head with room for `cap` clusters over `len`
/// clustered slots. Offsets are in bytes from the allocation's start.
/// `#[repr(C)]`: the kernels read it as `TacLayout` (tactic/common.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateLayout {
    pub kv_heads: u32,
    pub head_dim: u32,
    /// Clusters a head has room for (the sum over its clustering runs of
    /// k-means' `k`, an upper bound on what k-means keeps).
    pub cap: u32,
    /// Slots `0..len` are clustered (every head's members); the tail starts
    /// at `len`.
    pub len: u32,
    /// `[kv_heads] u32`: clusters kept per head (written by the device).
    pub count: u64,
    /// `[kv_heads] f64`: trace of the unnormalised pooled scatter.
    pub trace: u64,
    /// `[kv_heads][cap][head_dim] f32`.
    pub centroids: u64,
    /// `[kv_heads][cap] f32`: `ln |c|`.
    pub log_size: u64,
    /// `[kv_heads][cap] f32`: mean squared distance to the centroid.
    pub spread: u64,
    /// `[kv_heads][cap + 1] u32`: cluster `c`'s members are
    /// `members[offsets[c]..offsets[c + 1]]` of its head.
    pub offsets: u64,
    /// `[kv_heads][len] u32`: slots, grouped by cluster, ascending within one.
    pub members: u64,
    /// `[kv_heads][head_dim][head_dim] f32`: pooled covariance over its trace.
    pub shape: u64,
    /// Size of the allocation.
    pub bytes: u64,
}

/// One array of a layout: where it starts and how many bytes each head
/// takes of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub per_head: u64,
}

impl StateLayout {
    /// The layout for `kv_heads` heads of `head_dim`, room for `cap`
    /// clusters over `len` slots.
    pub fn new(kv_heads: usize, head_dim: usize, cap: usize, len: usize) -> StateLayout {
        let (h, d) = (kv_heads as u64, head_dim as u64);
        let (c, n) = (cap as u64, len as u64);
        let mut at = 0u64;
        let mut take = |bytes: u64| {
            let off = at;
            at = (at + bytes).div_ceil(ALIGN) * ALIGN;
            off
        };
        let count = take(4 * h);
        let trace = take(8 * h);
        let centroids = take(4 * h * c * d);
        let log_size = take(4 * h * c);
        let spread = take(4 * h * c);
        let offsets = take(4 * h * (c + 1));
        let members = take(4 * h * n);
        let shape = take(4 * h * d * d);
        StateLayout {
            kv_heads: kv_heads as u32,
            head_dim: head_dim as u32,
            cap: cap as u32,
            len: len as u32,
            count,
            trace,
            centroids,
            log_size,
            spread,
            offsets,
            members,
            shape,
            bytes: at.max(ALIGN),
        }
    }

    /// The layout once a run of `n` more slots, clustered into at most `k`
    /// clusters per head, is appended.
    pub fn grown(&self, k: usize, n: usize) -> StateLayout {
        StateLayout::new(
            self.kv_heads as usize,
            self.head_dim as usize,
            self.cap as usize + k,
            self.len as usize + n,
        )
    }

    /// The per-head arrays, in the order of the allocation; each head's
    /// part is `per_head` bytes at `offset + head * per_head`.
    pub fn per_head_regions(&self) -> [Region; 5] {
        let (c, d, n) = (self.cap as u64, self.head_dim as u64, self.len as u64);
        [
            Region {
                offset: self.centroids,
                per_head: 4 * c * d,
            },
            Region {
                offset: self.log_size,
                per_head: 4 * c,
            },
            Region {
                offset: self.spread,
                per_head: 4 * c,
            },
            Region {
                offset: self.offsets,
                per_head: 4 * (c + 1),
            },
            Region {
                offset: self.members,
                per_head: 4 * n,
            },
        ]
    }

    /// The arrays whose size does not depend on `cap` or `len` (count,
    /// trace, shape): `(offset, bytes)` over all heads.
    pub fn fixed_regions(&self) -> [(u64, u64); 3] {
        let (h, d) = (self.kv_heads as u64, self.head_dim as u64);
        [
            (self.count, 4 * h),
            (self.trace, 8 * h),
            (self.shape, 4 * h * d * d),
        ]
    }

    /// The copies that carry this layout's contents into `to` (a grown
    /// layout of the same heads): `(from offset, to offset, bytes)`. A head
    /// keeps its clusters at the same indices and its members at the same
    /// positions, so the appended run lands after them.
    pub fn copies_into(&self, to: &StateLayout) -> Vec<(u64, u64, u64)> {
        assert!(
            to.kv_heads == self.kv_heads
                && to.head_dim == self.head_dim
                && to.cap >= self.cap
                && to.len >= self.len,
            "a state grows into a layout at least as large"
        );
        let mut out: Vec<(u64, u64, u64)> = self
            .fixed_regions()
            .iter()
            .zip(to.fixed_regions())
            .map(|(&(a, n), (b, _))| (a, b, n))
            .collect();
        for (old, new) in self.per_head_regions().iter().zip(to.per_head_regions()) {
            if old.per_head == 0 {
                continue;
            }
            for h in 0..self.kv_heads as u64 {
                out.push((
                    old.offset + h * old.per_head,
                    new.offset + h * new.per_head,
                    old.per_head,
                ));
            }
        }
        out
    }
}

/// Writes one clustering per head (`heads[h]`, every one over this
/// layout's `len` slots) into `bytes`, an allocation of this layout: what
/// the device's kernels would have left there.
pub fn write_heads(l: &StateLayout, heads: &[ClusterIndex], bytes: &mut [u8]) {
    let (d, cap) = (l.head_dim as usize, l.cap as usize);
    assert!(
        heads.len() == l.kv_heads as usize && bytes.len() >= l.bytes as usize,
        "one clustering per head, into an allocation of the layout"
    );
    for (h, ix) in heads.iter().enumerate() {
        let c = ix.clusters();
        assert!(
            c <= cap && ix.len == l.len as usize && ix.d == d,
            "head {h} fits"
        );
        put(bytes, l.count + 4 * h as u64, &[c as u32]);
        put(bytes, l.trace + 8 * h as u64, &[ix.shape_trace()]);
        put(bytes, l.centroids + (4 * h * cap * d) as u64, &ix.centroids);
        put(bytes, l.log_size + (4 * h * cap) as u64, &ix.log_size);
        put(bytes, l.spread + (4 * h * cap) as u64, &ix.spread);
        put(bytes, l.offsets + (4 * h * (cap + 1)) as u64, &ix.offsets);
        put(
            bytes,
            l.members + 4 * (h as u64) * l.len as u64,
            &ix.members,
        );
        let zeros = vec![0.0f32; d * d];
        let shape = if ix.shape.is_empty() {
            &zeros
        } else {
            &ix.shape
        };
        put(bytes, l.shape + (4 * h * d * d) as u64, shape);
    }
}

/// The clusterings `bytes` (an allocation of this layout) holds, one per
/// head, each over its first `len` slots (the layout's `len` once written;
/// less for the clusters an allocation held before a run was appended).
pub fn read_heads(l: &StateLayout, bytes: &[u8], len: usize) -> Vec<ClusterIndex> {
    let (d, cap) = (l.head_dim as usize, l.cap as usize);
    (0..l.kv_heads as usize)
        .map(|h| {
            let c = get::<u32>(bytes, l.count + 4 * h as u64, 1)[0] as usize;
            let offsets = get::<u32>(bytes, l.offsets + (4 * h * (cap + 1)) as u64, c + 1);
            let n = if c == 0 { 0 } else { offsets[c] as usize };
            let mut ix = ClusterIndex {
                d,
                len,
                centroids: get(bytes, l.centroids + (4 * h * cap * d) as u64, c * d),
                offsets: if c == 0 { vec![0] } else { offsets },
                members: get(bytes, l.members + 4 * (h as u64) * l.len as u64, n),
                log_size: get(bytes, l.log_size + (4 * h * cap) as u64, c),
                spread: get(bytes, l.spread + (4 * h * cap) as u64, c),
                // An index that has never clustered anything has no shape.
                shape: if c == 0 {
                    vec![]
                } else {
                    get(bytes, l.shape + (4 * h * d * d) as u64, d * d)
                },
                ..Default::default()
            };
            ix.set_shape_trace(get::<f64>(bytes, l.trace + 8 * h as u64, 1)[0]);
            ix
        })
        .collect()
}

fn put<T: bytemuck::Pod>(bytes: &mut [u8], at: u64, v: &[T]) {
    let src: &[u8] = bytemuck::cast_slice(v);
    bytes[at as usize..at as usize + src.len()].copy_from_slice(src);
}

fn get<T: bytemuck::Pod>(bytes: &[u8], at: u64, n: usize) -> Vec<T> {
    let at = at as usize;
    let size = std::mem::size_of::<T>();
    (0..n)
        .map(|i| bytemuck::pod_read_unaligned(&bytes[at + i * size..at + (i + 1) * size]))
        .collect()
}

/// Clusters k-means starts from for `n` slots at `cluster_size` per cluster
/// (what [`super::kmeans::kmeans`] computes: `ceil(n / size)`, at most `n`).
pub fn clusters_for(n: usize, cluster_size: usize) -> usize {
    n.div_ceil(cluster_size.max(1)).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_are_aligned_disjoint_and_inside_the_allocation() {
        for (h, d, c, n) in [
            (3, 64, 512, 8191),
            (8, 128, 1, 1),
            (1, 16, 0, 0),
            (2, 8, 7, 13),
        ] {
            let l = StateLayout::new(h, d, c, n);
            let mut spans: Vec<(u64, u64)> = l
                .per_head_regions()
                .iter()
                .map(|r| (r.offset, r.per_head * h as u64))
                .chain(l.fixed_regions())
                .collect();
            spans.sort();
            for w in spans.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0, "{spans:?}");
            }
            for (off, bytes) in spans {
                assert_eq!(off % ALIGN, 0);
                assert!(off + bytes <= l.bytes);
            }
        }
    }

    #[test]
    fn growing_keeps_each_head_at_its_place() {
        let old = StateLayout::new(3, 64, 10, 150);
        let new = old.grown(4, 60);
        assert_eq!((new.cap, new.len), (14, 210));
        let copies = old.copies_into(&new);
        // count, trace, shape, then five arrays for each of three heads.
        assert_eq!(copies.len(), 3 + 5 * 3);
        // Head 2's members: 150 slots from its old row to its new one.
        let m = copies
            .iter()
            .find(|c| c.0 == old.members + 2 * 4 * 150)
            .unwrap();
        assert_eq!(*m, (old.members + 2 * 600, new.members + 2 * 4 * 210, 600));
        for &(_, to, n) in &copies {
            assert!(to + n <= new.bytes);
        }
    }

    #[test]
    fn clusterings_round_trip_through_the_layout() {
        use crate::tactic::{DenseKeys, KMeansParams, kmeans::Init};
        let d = 16;
        let keys: Vec<f32> = (0..300 * d)
            .map(|i| crate::rng::random_weight(2, 3, i as u64, 0.0, 1.0))
            .collect();
        let dk = DenseKeys { k: &keys, d };
        let km = KMeansParams {
            cluster_size: 16,
            iterations: 5,
            init: Init::Stratified,
            seed: 1,
        };
        let mut a = ClusterIndex::build(&dk, 200, &km);
        a.extend(&dk, 290, &km);
        let b = ClusterIndex::build(&dk, 290, &km);
        let l = StateLayout::new(2, d, 25, 290);
        let mut bytes = vec![0xa5u8; l.bytes as usize];
        write_heads(&l, &[a.clone(), b.clone()], &mut bytes);
        let back = read_heads(&l, &bytes, 290);
        for (x, y) in [a, b].iter().zip(&back) {
            assert_eq!(
                (
                    &x.centroids,
                    &x.offsets,
                    &x.members,
                    &x.log_size,
                    &x.spread,
                    &x.shape
                ),
                (
                    &y.centroids,
                    &y.offsets,
                    &y.members,
                    &y.log_size,
                    &y.spread,
                    &y.shape
                )
            );
            assert_eq!(x.shape_trace(), y.shape_trace());
        }
        // Nothing clustered: no clusters, no shape, as a fresh index.
        let empty = ClusterIndex::build(&dk, 0, &km);
        let l0 = StateLayout::new(1, d, 0, 0);
        let mut z = vec![0u8; l0.bytes as usize];
        write_heads(&l0, std::slice::from_ref(&empty), &mut z);
        let e = &read_heads(&l0, &z, 0)[0];
        assert_eq!(
            (e.clusters(), e.shape.len(), e.offsets.clone()),
            (0, 0, vec![0])
        );
    }

    #[test]
    fn k_is_what_kmeans_starts_from() {
        assert_eq!(clusters_for(0, 16), 0);
        assert_eq!(clusters_for(1, 16), 1);
        assert_eq!(clusters_for(16, 16), 1);
        assert_eq!(clusters_for(17, 16), 2);
        assert_eq!(clusters_for(5, 1), 5);
    }
}
