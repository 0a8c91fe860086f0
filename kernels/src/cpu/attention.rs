//! Paged attention on the CPU: prefill chunks and decode tokens of many
//! sequences in one call, over the block-paged KV cache.
//!
//! Work is split into tasks of (sequence, KV head, tile of queries). A task
//! stacks the tile's queries of every query head in the KV head's group into
//! one matrix, so each key block is read once per group (GQA), walks the keys
//! in chunks with an online softmax, and never materialises a full score
//! matrix: per task it holds `rows × KEY_CHUNK` scores. Score and value
//! products are small GEMMs, so long prefills run near the GEMM rate.

use super::gemm::gemm_small;
use rayon::prelude::*;

/// One layer of the paged cache: K and V each `[num_blocks, kv_heads,
/// block_size, head_dim]`, so a head's rows within a block are contiguous.
#[derive(Debug, Clone, Copy)]
pub struct KvLayer<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl KvLayer<'_> {
    fn block_len(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }

    /// Offset of `(slot, head)`'s row through the block table.
    #[inline]
    fn row(&self, table: &[u32], slot: usize, head: usize) -> usize {
        let b = table[slot / self.block_size] as usize;
        b * self.block_len() + (head * self.block_size + slot % self.block_size) * self.head_dim
    }
}

/// One sequence's share of a step: `q_len` queries at rows
/// `q_start..q_start+q_len`; after the step's append the sequence caches
/// `ctx_len` tokens, so query `i` sits at slot `ctx_len - q_len + i` and sees
/// slots up to and including its own.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    pub q_start: usize,
    pub q_len: usize,
    pub ctx_len: usize,
    pub block_table: &'a [u32],
    /// Sparse decode: per KV head, the slots to attend (sorted, each below
    /// `ctx_len`). Only for a single query (`q_len == 1`).
    pub selection: Option<&'a [Vec<u32>]>,
}

/// Queries per task tile.
const Q_TILE: usize = 32;
/// Keys per inner chunk.
const KEY_CHUNK: usize = 64;

/// Computes attention for every query of `seqs`.
///
/// `q` has rows of `q_row_len` with query head `h` at columns
/// `h*head_dim..(h+1)*head_dim`; `out` has rows of `num_heads * head_dim`.
/// Scores are scaled by `1/sqrt(head_dim)`.
pub fn paged_attention(
    q: &[f32],
    q_row_len: usize,
    num_heads: usize,
    kv: &KvLayer<'_>,
    seqs: &[AttnSeq<'_>],
    out: &mut [f32],
) {
    let d = kv.head_dim;
    let group = num_heads / kv.kv_heads;
    assert_eq!(
        group * kv.kv_heads,
        num_heads,
        "heads must group over KV heads"
    );
    let out_row = num_heads * d;
    let tasks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            assert!(s.q_len <= s.ctx_len, "more queries than cached tokens");
            assert!(
                s.selection.is_none() || s.q_len == 1,
                "selection is decode-only"
            );
            (0..kv.kv_heads)
                .flat_map(move |h| (0..s.q_len.div_ceil(Q_TILE)).map(move |t| (si, h, t * Q_TILE)))
        })
        .collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(si, h, q0)| tile(q, q_row_len, group, kv, &seqs[si], h, q0))
        .collect();
    for (&(si, h, q0), res) in tasks.iter().zip(&results) {
        let s = &seqs[si];
        let n = (s.q_len - q0).min(Q_TILE);
        for qi in 0..n {
            let row = (s.q_start + q0 + qi) * out_row + h * group * d;
            out[row..row + group * d].copy_from_slice(&res[qi * group * d..(qi + 1) * group * d]);
        }
    }
}

/// One task: queries `q0..q0+Q_TILE` of `s` for KV head `h`; returns rows of
/// `group * head_dim` per query.
fn tile(
    q: &[f32],
    q_row_len: usize,
    group: usize,
    kv: &KvLayer<'_>,
    s: &AttnSeq<'_>,
    h: usize,
    q0: usize,
) -> Vec<f32> {
    let d = kv.head_dim;
    let nq = (s.q_len - q0).min(Q_TILE);
    let rows = nq * group;
    let scale = 1.0 / (d as f32).sqrt();
    // Q tile, row r = query r / group, head r % group, pre-scaled.
    let mut qt = vec![0.0f32; rows * d];
    for qi in 0..nq {
        let src = (s.q_start + q0 + qi) * q_row_len;
        for g in 0..group {
            let col = (h * group + g) * d;
            let dst = &mut qt[(qi * group + g) * d..(qi * group + g + 1) * d];
            for (o, &x) in dst.iter_mut().zip(&q[src + col..src + col + d]) {
                *o = x * scale;
            }
        }
    }
    let first_slot = s.ctx_len - s.q_len + q0;
    let keys: KeySource<'_> = match s.selection {
        Some(sel) => KeySource::List(&sel[h]),
        None => KeySource::Range(first_slot + nq),
    };
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0.0f32; rows];
    let mut acc = vec![0.0f32; rows * d];
    let mut kc = vec![0.0f32; KEY_CHUNK * d];
    let mut vc = vec![0.0f32; KEY_CHUNK * d];
    let mut sc = vec![0.0f32; rows * KEY_CHUNK];
    let mut slots = [0usize; KEY_CHUNK];
    let total = keys.len();
    let mut c0 = 0;
    while c0 < total {
        let n = (total - c0).min(KEY_CHUNK);
        for (j, slot) in slots.iter_mut().enumerate().take(n) {
            *slot = keys.get(c0 + j);
            let r = kv.row(s.block_table, *slot, h);
            kc[j * d..(j + 1) * d].copy_from_slice(&kv.k[r..r + d]);
            vc[j * d..(j + 1) * d].copy_from_slice(&kv.v[r..r + d]);
        }
        // SAFETY: qt is [rows, d], kc holds n rows of d read as kᵀ [d, n]
        // (row stride 1, column stride d), sc is [rows, KEY_CHUNK] of which
        // n columns are written.
        unsafe {
            gemm_small(
                rows,
                n,
                d,
                sc.as_mut_ptr(),
                KEY_CHUNK,
                false,
                qt.as_ptr(),
                d,
                kc.as_ptr(),
                1,
                d,
                1.0,
            );
        }
        for r in 0..rows {
            let my_slot = first_slot + r / group;
            let srow = &mut sc[r * KEY_CHUNK..r * KEY_CHUNK + n];
            if matches!(keys, KeySource::Range(_)) {
                for (j, v) in srow.iter_mut().enumerate() {
                    if slots[j] > my_slot {
                        *v = f32::NEG_INFINITY;
                    }
                }
            }
            let cmax = srow.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mnew = m[r].max(cmax);
            if mnew == f32::NEG_INFINITY {
                srow.iter_mut().for_each(|v| *v = 0.0);
                continue;
            }
            let corr = (m[r] - mnew).exp();
            let mut sum = 0.0f32;
            for v in srow.iter_mut() {
                *v = (*v - mnew).exp();
                sum += *v;
            }
            l[r] = l[r] * corr + sum;
            m[r] = mnew;
            if corr != 1.0 {
                acc[r * d..(r + 1) * d].iter_mut().for_each(|a| *a *= corr);
            }
        }
        // SAFETY: sc [rows, n] (row stride KEY_CHUNK) times vc [n, d] (row
        // stride d, column stride 1) accumulated into acc [rows, d].
        unsafe {
            gemm_small(
                rows,
                d,
                n,
                acc.as_mut_ptr(),
                d,
                true,
                sc.as_ptr(),
                KEY_CHUNK,
                vc.as_ptr(),
                d,
                1,
                1.0,
            );
        }
        c0 += n;
    }
    for r in 0..rows {
        let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
        acc[r * d..(r + 1) * d].iter_mut().for_each(|a| *a *= inv);
    }
    acc
}

enum KeySource<'a> {
    /// Slots `0..n` with the causal mask applied.
    Range(usize),
    /// Exactly these slots.
    List(&'a [u32]),
}

impl KeySource<'_> {
    fn len(&self) -> usize {
        match self {
            KeySource::Range(n) => *n,
            KeySource::List(l) => l.len(),
        }
    }
    #[inline]
    fn get(&self, i: usize) -> usize {
        match self {
            KeySource::Range(_) => i,
            KeySource::List(l) => l[i] as usize,
        }
    }
}

/// Writes the new tokens' K and V rows into their slots. `qkv` rows hold
/// `[q | k | v]` with k at column `k_col` and v at `k_col + kv_heads*head_dim`.
pub fn kv_append(
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    layout: (usize, usize, usize),
    qkv: &[f32],
    row_len: usize,
    k_col: usize,
    slots: &[u32],
) {
    let (kv_heads, block_size, d) = layout;
    let block_len = kv_heads * block_size * d;
    let v_col = k_col + kv_heads * d;
    for (t, &slot) in slots.iter().enumerate() {
        let slot = slot as usize;
        let base = (slot / block_size) * block_len + (slot % block_size) * d;
        let row = &qkv[t * row_len..(t + 1) * row_len];
        for h in 0..kv_heads {
            let dst = base + h * block_size * d;
            k_cache[dst..dst + d].copy_from_slice(&row[k_col + h * d..k_col + (h + 1) * d]);
            v_cache[dst..dst + d].copy_from_slice(&row[v_col + h * d..v_col + (h + 1) * d]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::random_weight;

    /// Dense causal attention straight from the definition, in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        keys: &[Vec<f32>],
        vals: &[Vec<f32>],
        heads: usize,
        kv_heads: usize,
        d: usize,
        q_pos: usize,
        allowed: &dyn Fn(usize, usize) -> bool,
    ) -> Vec<f32> {
        let group = heads / kv_heads;
        let mut out = vec![0.0f32; heads * d];
        for hq in 0..heads {
            let h = hq / group;
            let qv = &q[hq * d..(hq + 1) * d];
            let scores: Vec<f64> = (0..=q_pos)
                .map(|j| {
                    if !allowed(h, j) {
                        return f64::NEG_INFINITY;
                    }
                    let kr = &keys[j][h * d..(h + 1) * d];
                    qv.iter()
                        .zip(kr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let z: f64 = w.iter().sum();
            for i in 0..d {
                let v: f64 = (0..=q_pos).map(|j| w[j] * vals[j][h * d + i] as f64).sum();
                out[hq * d + i] = (v / z) as f32;
            }
        }
        out
    }

    struct Fixture {
        k: Vec<f32>,
        v: Vec<f32>,
        keys: Vec<Vec<f32>>,
        vals: Vec<Vec<f32>>,
        table: Vec<u32>,
    }

    /// A sequence of `n` tokens scattered over blocks in reverse order.
    fn fixture(n: usize, kv_heads: usize, d: usize, bs: usize, seed: u64) -> Fixture {
        let nblocks = n.div_ceil(bs) + 2;
        let table: Vec<u32> = (0..n.div_ceil(bs))
            .map(|b| (nblocks - 1 - b) as u32)
            .collect();
        let mut k = vec![f32::NAN; nblocks * kv_heads * bs * d];
        let mut v = k.clone();
        let row = kv_heads * d;
        let keys: Vec<Vec<f32>> = (0..n)
            .map(|t| {
                (0..row)
                    .map(|i| random_weight(seed, 1, (t * row + i) as u64, 0.0, 2.0))
                    .collect()
            })
            .collect();
        let vals: Vec<Vec<f32>> = (0..n)
            .map(|t| {
                (0..row)
                    .map(|i| random_weight(seed, 2, (t * row + i) as u64, 0.0, 1.0))
                    .collect()
            })
            .collect();
        let mut qkv = vec![0.0f32; n * 2 * row];
        for t in 0..n {
            qkv[t * 2 * row..t * 2 * row + row].copy_from_slice(&keys[t]);
            qkv[t * 2 * row + row..(t + 1) * 2 * row].copy_from_slice(&vals[t]);
        }
        let slots: Vec<u32> = (0..n)
            .map(|t| table[t / bs] * bs as u32 + (t % bs) as u32)
            .collect();
        kv_append(&mut k, &mut v, (kv_heads, bs, d), &qkv, 2 * row, 0, &slots);
        Fixture {
            k,
            v,
            keys,
            vals,
            table,
        }
    }

    #[test]
    fn prefill_and_decode_match_dense_reference() {
        let (heads, kv_heads, d, bs) = (6, 2, 16, 16);
        // Lengths that cross block, tile and chunk boundaries, and length 1.
        for &(n, q_len) in &[(1, 1), (17, 17), (100, 37), (130, 1), (70, 70)] {
            let f = fixture(n, kv_heads, d, bs, n as u64);
            let q: Vec<f32> = (0..q_len * heads * d)
                .map(|i| random_weight(99, n as u64, i as u64, 0.0, 1.5))
                .collect();
            let kv = KvLayer {
                k: &f.k,
                v: &f.v,
                kv_heads,
                head_dim: d,
                block_size: bs,
            };
            let seqs = [AttnSeq {
                q_start: 0,
                q_len,
                ctx_len: n,
                block_table: &f.table,
                selection: None,
            }];
            let mut out = vec![f32::NAN; q_len * heads * d];
            paged_attention(&q, heads * d, heads, &kv, &seqs, &mut out);
            for i in 0..q_len {
                let want = reference(
                    &q[i * heads * d..(i + 1) * heads * d],
                    &f.keys,
                    &f.vals,
                    heads,
                    kv_heads,
                    d,
                    n - q_len + i,
                    &|_, _| true,
                );
                let got = &out[i * heads * d..(i + 1) * heads * d];
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() < 1e-5 * (1.0 + b.abs()),
                        "n={n} q={i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn selection_attends_only_the_listed_slots() {
        let (heads, kv_heads, d, bs) = (4, 2, 8, 16);
        let n = 50;
        let f = fixture(n, kv_heads, d, bs, 5);
        let q: Vec<f32> = (0..heads * d)
            .map(|i| random_weight(3, 0, i as u64, 0.0, 1.0))
            .collect();
        let sel = vec![vec![0u32, 7, 16, 49], vec![3u32, 31, 32]];
        let kv = KvLayer {
            k: &f.k,
            v: &f.v,
            kv_heads,
            head_dim: d,
            block_size: bs,
        };
        let seqs = [AttnSeq {
            q_start: 0,
            q_len: 1,
            ctx_len: n,
            block_table: &f.table,
            selection: Some(&sel),
        }];
        let mut out = vec![f32::NAN; heads * d];
        paged_attention(&q, heads * d, heads, &kv, &seqs, &mut out);
        let want = reference(&q, &f.keys, &f.vals, heads, kv_heads, d, n - 1, &|h, j| {
            sel[h].contains(&(j as u32))
        });
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
