//! The chunked formulation against the sequential greedy, on the heavy
//! tails of `tactic/tests.rs`.

use super::*;
use crate::rng;
use crate::tactic::select::select_group;
use crate::tactic::tests::{Heavy, heavy, normal};
use crate::tactic::{DenseKeys, true_mass};

/// Query rows for the group: the construction's directions, turned a
/// little by seeded noise so that steps differ.
fn queries(h: &Heavy, g_n: usize, seed: u64) -> Vec<f32> {
    (0..g_n * h.d)
        .map(|i| h.queries[i] + 0.6 * normal(seed, 77, i as u64))
        .collect()
}

/// The sets agree, or every head's true mass on the two sets is within
/// `1e-3` (the criterion TACTIC.md sets for a CPU/GPU difference).
fn near_tie(h: &Heavy, q: &[f32], ctx: usize, a: &[u32], b: &[u32]) -> bool {
    let keys = DenseKeys { k: &h.keys, d: h.d };
    (0..q.len() / h.d).all(|g| {
        let mut sc = Vec::new();
        crate::tactic::exact_scores(&keys, &q[g * h.d..(g + 1) * h.d], ctx, &mut sc);
        (true_mass(&sc, a) - true_mass(&sc, b)).abs() <= 1e-3
    })
}

#[test]
fn chunked_union_equals_the_sequential_greedy() {
    let (mut cases, mut equal, mut ties) = (0usize, 0usize, 0usize);
    for seed in 0..6u64 {
        for &(n, blobs, g_n) in &[(1500usize, 96usize, 3usize), (4096, 512, 4), (777, 40, 1)] {
            let h = heavy(n, blobs, g_n, seed);
            let keys = DenseKeys { k: &h.keys, d: h.d };
            for &p in &[0.5f32, 0.8, 0.9, 0.95, 0.99] {
                let prm = TacticParams::new(p);
                // The tail grows over a few decode steps past the clustering.
                let idx = ClusterIndex::build(&keys, n - 40, &prm.kmeans);
                for step in 0..4u64 {
                    let ctx = n - 30 + 10 * step as usize;
                    let q = queries(&h, g_n, seed * 131 + step);
                    let (mut s, mut seq, mut est) = (Scratch::default(), vec![], vec![0.0; g_n]);
                    let st = select_group(&idx, &keys, &q, ctx, &prm, &mut s, &mut seq, &mut est);
                    for chunk in [1usize, 3, UNION_CHUNK, 32] {
                        let (mut par, mut est2) = (vec![], vec![0.0; g_n]);
                        let st2 = select_group_chunked(
                            &idx, &keys, &q, ctx, &prm, chunk, &mut s, &mut par, &mut est2,
                        );
                        cases += 1;
                        if par == seq {
                            equal += 1;
                            assert_eq!(st.tokens_read, st2.tokens_read);
                            for (a, b) in est.iter().zip(&est2) {
                                assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
                            }
                        } else {
                            assert!(
                                near_tie(&h, &q, ctx, &seq, &par),
                                "seed {seed} n {n} p {p} step {step} chunk {chunk}: \
                                 {} vs {} slots, not a near-tie",
                                seq.len(),
                                par.len()
                            );
                            ties += 1;
                        }
                    }
                }
            }
        }
    }
    eprintln!("{cases} cases: {equal} equal sets, {ties} near-ties");
    assert!(equal * 1000 >= cases * 999, "{equal} of {cases} equal");
}

/// Clusters whose scores tie exactly (duplicated keys): the order breaks
/// ties by cluster index in both formulations, so the sets still agree.
#[test]
fn exact_ties_break_alike() {
    let d = 16;
    let n = 640;
    let keys: Vec<f32> = (0..n * d)
        .map(|i| {
            let (row, j) = (i / d, i % d);
            // Eight distinct keys, each repeated: every cluster ties with
            // others of the same key.
            rng::random_weight(9, (row % 8) as u64, j as u64, 0.0, 1.0)
        })
        .collect();
    let dk = DenseKeys { k: &keys, d };
    let q: Vec<f32> = (0..2 * d)
        .map(|i| rng::random_weight(4, 1, i as u64, 0.0, 2.0))
        .collect();
    for &p in &[0.3f32, 0.6, 0.9] {
        let prm = TacticParams::new(p);
        let idx = ClusterIndex::build(&dk, n - 8, &prm.kmeans);
        let (mut s, mut a, mut b) = (Scratch::default(), vec![], vec![]);
        let mut est = vec![0.0; 2];
        select_group(&idx, &dk, &q, n, &prm, &mut s, &mut a, &mut est);
        for chunk in [1, 2, UNION_CHUNK] {
            select_group_chunked(&idx, &dk, &q, n, &prm, chunk, &mut s, &mut b, &mut est);
            assert_eq!(a, b, "p {p} chunk {chunk}");
        }
    }
}

/// Length 1 and a context with nothing clustered: the tail alone.
#[test]
fn a_tail_alone_is_selected_whole() {
    let h = heavy(20, 4, 2, 3);
    let keys = DenseKeys { k: &h.keys, d: h.d };
    let prm = TacticParams::new(0.9);
    let idx = ClusterIndex::build(&keys, 0, &prm.kmeans);
    let (mut s, mut out, mut est) = (Scratch::default(), vec![], vec![0.0; 2]);
    for ctx in [1usize, 20] {
        select_group_chunked(
            &idx, &keys, &h.queries, ctx, &prm, 8, &mut s, &mut out, &mut est,
        );
        assert_eq!(out, (0..ctx as u32).collect::<Vec<_>>());
        assert!(est.iter().all(|&e| e == 1.0), "{est:?}");
    }
}
