//! Tactic's CI tests on synthetic data (seeded through [`crate::rng`]).

use super::*;
use crate::cpu::{AttnSeq, KvLayer, kv_append, paged_attention};
use crate::rng;

use super::synth::Synth;
pub(super) use super::synth::normal;
use super::synth::student_t3;

/// The heavy-tailed keys of `synth.rs` at head size 64.
pub(super) type Heavy = Synth;

pub(super) fn heavy(n: usize, blobs: usize, group: usize, seed: u64) -> Heavy {
    Synth::heavy(n, blobs, group, 64, seed)
}

fn scores_of(h: &Heavy, g: usize, ctx: usize) -> Vec<f32> {
    let mut s = Vec::new();
    let keys = DenseKeys { k: &h.keys, d: h.d };
    exact_scores(&keys, &h.queries[g * h.d..(g + 1) * h.d], ctx, &mut s);
    s
}

#[test]
fn oracle_reaches_p_with_the_fewest_tokens() {
    // Exhaustive check on small sets: no subset smaller than the oracle's
    // reaches P, and the oracle's does.
    for case in 0..40u64 {
        let n = 1 + (case as usize % 12);
        let scores: Vec<f32> = (0..n)
            .map(|i| 3.0 * student_t3(7, case, i as u64))
            .collect();
        for &p in &[0.5f32, 0.8, 0.9, 0.99] {
            let (mut order, mut sel) = (Vec::new(), Vec::new());
            oracle_top_p(&scores, p, &mut order, &mut sel);
            sel.sort_unstable();
            assert!(true_mass(&scores, &sel) >= p as f64 - 1e-9);
            let best = (1u32..1 << n)
                .filter(|m| {
                    let set: Vec<u32> = (0..n as u32).filter(|i| m >> i & 1 == 1).collect();
                    true_mass(&scores, &set) >= p as f64
                })
                .map(|m| m.count_ones() as usize)
                .min()
                .unwrap();
            assert_eq!(sel.len(), best, "case {case} p {p}");
        }
    }
}

/// The acceptance bar on synthetic heavy tails, as on the real model: over
/// 8 seeds × 3 query heads, at least 90% of the heads reach `P` on their
/// group's selection (no miss by more than 0.05), reading at most three
/// times the oracle's tokens (unioned over the group, summed over seeds).
#[test]
fn tactic_reaches_p_within_three_times_the_oracle_on_heavy_tails() {
    let p = 0.9f32;
    let (mut hits, mut heads, mut read, mut oracle) = (0, 0, 0.0, 0.0);
    for seed in 0..8u64 {
        let h = heavy(4096, 512, 3, seed);
        let keys = DenseKeys { k: &h.keys, d: h.d };
        let prm = TacticParams::new(p);
        let idx = ClusterIndex::build(&keys, h.n - 16, &prm.kmeans);
        let mut s = Scratch::default();
        let (mut sel, mut order, mut uni) = (Vec::new(), Vec::new(), Vec::new());
        let mut est = vec![0.0; 3];
        let st = select_group(
            &idx, &keys, &h.queries, h.n, &prm, &mut s, &mut sel, &mut est,
        );
        for (g, e) in est.iter().enumerate() {
            let sc = scores_of(&h, g, h.n);
            let tm = true_mass(&sc, &sel);
            eprintln!("seed {seed} head {g}: true mass {tm:.3}, estimated {e:.3}");
            assert!(
                tm >= p as f64 - 0.05,
                "seed {seed} head {g}: true mass {tm}"
            );
            hits += usize::from(tm >= p as f64);
            heads += 1;
            oracle_top_p(&sc, p, &mut order, &mut uni);
        }
        uni.sort_unstable();
        uni.dedup();
        eprintln!(
            "seed {seed}: read {:.0}, oracle {}",
            st.tokens_read,
            uni.len()
        );
        read += st.tokens_read;
        oracle += uni.len() as f64;
    }
    assert!(hits * 10 >= heads * 9, "{hits} of {heads} heads reach {p}");
    assert!(read <= 3.0 * oracle, "read {read} vs oracle {oracle}");
}

#[test]
fn the_group_selection_covers_each_head() {
    let h = heavy(2048, 256, 3, 5);
    let keys = DenseKeys { k: &h.keys, d: h.d };
    let prm = TacticParams::new(0.9);
    let idx = ClusterIndex::build(&keys, h.n - 4, &prm.kmeans);
    let mut s = Scratch::default();
    let (mut group, mut single) = (Vec::new(), Vec::new());
    let mut est = vec![0.0; 3];
    select_group(
        &idx, &keys, &h.queries, h.n, &prm, &mut s, &mut group, &mut est,
    );
    // Every head's estimate reaches P on the union.
    assert!(est.iter().all(|&e| e >= 0.9), "{est:?}");
    // The union contains the first head's own selection (it is served
    // first) and is at least as large as every single head's.
    let mut e1 = vec![0.0; 1];
    for g in 0..3 {
        let q = &h.queries[g * h.d..(g + 1) * h.d];
        select_group(&idx, &keys, q, h.n, &prm, &mut s, &mut single, &mut e1);
        if g == 0 {
            assert!(single.iter().all(|x| group.binary_search(x).is_ok()));
        }
        let sc = scores_of(&h, g, h.n);
        assert!(true_mass(&sc, &group) + 1e-9 >= true_mass(&sc, &single).min(0.9));
    }
}

/// A paged cache of one layer filled with the heavy-tailed keys (blocks in
/// reverse order), random values.
struct Paged {
    k: Vec<f32>,
    v: Vec<f32>,
    table: Vec<u32>,
    kv_heads: usize,
}

const BS: usize = 16;

fn paged(h: &Heavy, kv_heads: usize) -> Paged {
    let d = h.d;
    let nb = h.n.div_ceil(BS);
    let table: Vec<u32> = (0..nb).map(|b| (nb - 1 - b) as u32).collect();
    let mut k = vec![f32::NAN; nb * kv_heads * BS * d];
    let mut v = k.clone();
    let row = kv_heads * d;
    let mut qkv = vec![0.0f32; h.n * 2 * row];
    for t in 0..h.n {
        for kh in 0..kv_heads {
            let dst = t * 2 * row + kh * d;
            qkv[dst..dst + d].copy_from_slice(&h.keys[t * d..(t + 1) * d]);
            for j in 0..d {
                qkv[t * 2 * row + row + kh * d + j] =
                    rng::random_weight(3, kh as u64, (t * d + j) as u64, 0.0, 1.0);
            }
        }
    }
    let slots: Vec<u32> = (0..h.n)
        .map(|t| table[t / BS] * BS as u32 + (t % BS) as u32)
        .collect();
    kv_append(&mut k, &mut v, (kv_heads, BS, d), &qkv, 2 * row, 0, &slots);
    Paged {
        k,
        v,
        table,
        kv_heads,
    }
}

fn step<'a>(p: &'a Paged, q: &'a [f32], d: usize, ctx_len: usize) -> DecodeStep<'a> {
    DecodeStep {
        q,
        kv: KvLayer {
            k: &p.k,
            v: &p.v,
            kv_heads: p.kv_heads,
            head_dim: d,
            block_size: BS,
        },
        block_table: &p.table,
        ctx_len,
    }
}

#[test]
fn new_tokens_are_always_selected_and_the_tail_is_reclustered() {
    let h = heavy(1200, 64, 3, 21);
    let pc = paged(&h, 1);
    let mut prm = TacticParams::new(0.5);
    prm.recluster_limit = 100;
    let mut seq = TacticSeq::new(prm, 1);
    let mut out = vec![Vec::new()];
    let mut diag = vec![HeadDiag::default()];
    // First decode step at 1000: clusters 0..999.
    for ctx in (1000..=1200).step_by(20) {
        seq.select_layer(0, &step(&pc, &h.queries, h.d, ctx), &mut out, &mut diag);
        let clustered = seq.index[0][0].len;
        assert!(ctx - clustered <= 101, "ctx {ctx}, clustered {clustered}");
        for t in clustered..ctx {
            assert!(
                out[0].binary_search(&(t as u32)).is_ok(),
                "tail slot {t} missing"
            );
        }
        assert!(out[0].windows(2).all(|w| w[0] < w[1]), "sorted, unique");
    }
    // The tail was re-clustered (appended) at least once.
    assert!(seq.index[0][0].len > 999);
    let idx = &seq.index[0][0];
    let mut all: Vec<u32> = idx.members.clone();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..idx.len as u32).collect::<Vec<_>>(),
        "clusters partition the slots"
    );
}

#[test]
fn selection_is_deterministic() {
    let h = heavy(3000, 128, 3, 8);
    let pc = paged(&h, 1);
    let run = || {
        let mut seq = TacticSeq::new(TacticParams::new(0.9), 1);
        let mut out = vec![Vec::new()];
        let mut diag = vec![HeadDiag::default()];
        seq.select_layer(0, &step(&pc, &h.queries, h.d, 3000), &mut out, &mut diag);
        (out, seq.index[0][0].centroids.clone(), diag[0].tokens_read)
    };
    let a = run();
    let b = run();
    assert_eq!(a.0, b.0);
    assert_eq!(a.1, b.1);
    assert_eq!(a.2, b.2);
}

#[test]
fn attention_over_the_selection_equals_the_renormalised_reference() {
    let (kv_heads, group) = (2, 3);
    let h = heavy(700, 64, group, 4);
    let pc = paged(&h, kv_heads);
    let d = h.d;
    // Queries: the group's directions for KV head 0, shuffled for head 1.
    let mut q = h.queries.clone();
    q.extend(h.queries.iter().rev().map(|x| x * 0.5));
    let mut seq = TacticSeq::new(TacticParams::new(0.9), 1);
    let mut sel = vec![Vec::new(); kv_heads];
    let mut diag = vec![HeadDiag::default(); kv_heads];
    let st = step(&pc, &q, d, 700);
    seq.select_layer(0, &st, &mut sel, &mut diag);
    let seqs = [AttnSeq {
        q_start: 0,
        q_len: 1,
        ctx_len: 700,
        block_table: &pc.table,
        selection: Some(&sel),
    }];
    let mut out = vec![f32::NAN; q.len()];
    paged_attention(&q, q.len(), group * kv_heads, &st.kv, &seqs, &mut out);
    for hq in 0..group * kv_heads {
        let kh = hq / group;
        let keys = PagedKeys {
            kv: st.kv,
            block_table: &pc.table,
            head: kh,
        };
        let qh = &q[hq * d..(hq + 1) * d];
        let w: Vec<f64> = sel[kh]
            .iter()
            .map(|&s| {
                let k = keys.key(s as usize);
                qh.iter()
                    .zip(k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    / (d as f64).sqrt()
            })
            .collect();
        let mx = w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = w.iter().map(|x| (x - mx).exp()).sum();
        for i in 0..d {
            let want: f64 = sel[kh]
                .iter()
                .zip(&w)
                .map(|(&s, &x)| {
                    let slot = pc.table[s as usize / BS] as usize * BS + s as usize % BS;
                    let r = (slot / BS * kv_heads + kh) * BS * d + (slot % BS) * d;
                    (x - mx).exp() * pc.v[r + i] as f64
                })
                .sum::<f64>()
                / z;
            let got = out[hq * d + i] as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "head {hq} dim {i}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn page_bounds_grow_like_a_fresh_build_and_bound_every_score() {
    let h = heavy(100, 8, 1, 2);
    let keys = DenseKeys { k: &h.keys, d: h.d };
    let mut b = PageBounds::build(&keys, 37, 16);
    b.extend(&keys, 90);
    let fresh = PageBounds::build(&keys, 90, 16);
    assert_eq!((b.min.clone(), b.max.clone()), (fresh.min, fresh.max));
    let q = &h.queries[..h.d];
    for slot in 0..90 {
        let s: f32 = q.iter().zip(keys.key(slot)).map(|(a, b)| a * b).sum();
        assert!(s <= b.bound(slot / 16, q) + 1e-3 * (1.0 + s.abs()));
    }
    // The budget is respected and the tail past the bounds is kept.
    let mut out = Vec::new();
    let read = fixed_budget(&b, q, 100, 40, &mut out);
    assert!(out.len() <= 40 + 15 && (90..100).all(|t| out.contains(&t)));
    assert_eq!(read, out.len() as f64 + 6.0);
}

#[test]
fn tiny_contexts_select_everything_they_must() {
    // Length 1 (nothing clustered), a context shorter than one cluster, and
    // one crossing a block boundary.
    for n in [1usize, 5, 17, 33] {
        let h = heavy(n.max(2), 2, 3, n as u64);
        let pc = paged(&h, 1);
        let mut seq = TacticSeq::new(TacticParams::new(0.9), 1);
        let mut out = vec![Vec::new()];
        let mut diag = vec![HeadDiag::default()];
        seq.select_layer(0, &step(&pc, &h.queries, h.d, n), &mut out, &mut diag);
        assert!(out[0].contains(&(n as u32 - 1)), "n {n}: own token");
        assert!(out[0].iter().all(|&s| (s as usize) < n));
        for g in 0..3 {
            let sc = scores_of(&h, g, n);
            assert!(
                true_mass(&sc, &out[0]) >= 0.9 - 1e-6 || n > 16,
                "n {n} head {g}"
            );
        }
    }
}
