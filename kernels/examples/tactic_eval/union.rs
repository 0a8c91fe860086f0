//! `--suite union`: the GPU's chunked GQA union
//! (`union::select_group_chunked`, `UNION_CHUNK` clusters a round) against
//! the sequential greedy (`select_group`) on a real model's queries and
//! keys: every (layer, KV head, window, step) at each P. Sets that differ
//! must be near-ties: every query head's true mass on the two sets within
//! `1e-3` (the criterion kernels/TACTIC.md sets for a CPU/GPU difference).

use crate::Dump;
use rayon::prelude::*;
use tacflow_kernels::tactic::union::{UNION_CHUNK, select_group_chunked};
use tacflow_kernels::tactic::{
    ClusterIndex, DenseKeys, Scratch, TacticParams, exact_scores, select_group, true_mass,
};

/// Counts over every (layer, KV head, window, step) at one P.
#[derive(Default, Clone, Copy)]
struct Tally {
    sets: usize,
    differ: usize,
    near_ties: usize,
    worst: f64,
}

/// Prints one Markdown row per P; returns whether every difference was a
/// near-tie.
pub fn run(dump: &Dump, ps: &[f32]) -> bool {
    let (layers, kvh, _, d, heads) = dump.dims();
    let group = heads / kvh;
    let cells: Vec<(usize, usize, usize)> = (0..layers)
        .flat_map(|l| (0..kvh).flat_map(move |h| (0..dump.ends.len()).map(move |w| (l, h, w))))
        .collect();
    let mut ok = true;
    for &p in ps {
        let prm = TacticParams::new(p);
        let tally = cells
            .par_iter()
            .map(|&(l, h, w)| {
                let keys = DenseKeys {
                    k: dump.keys(false, l, h),
                    d,
                };
                let n0 = dump.ends[w] - dump.steps;
                let idx = ClusterIndex::build(&keys, n0, &prm.kmeans);
                let mut s = Scratch::default();
                let (mut a, mut b) = (Vec::new(), Vec::new());
                let mut est = vec![0.0f32; group];
                let (mut t, mut sc) = (Tally::default(), Vec::new());
                for j in 0..dump.steps {
                    let q = dump.queries(l, w * dump.steps + j, h, group);
                    let ctx = n0 + j + 1;
                    select_group(&idx, &keys, q, ctx, &prm, &mut s, &mut a, &mut est);
                    select_group_chunked(
                        &idx,
                        &keys,
                        q,
                        ctx,
                        &prm,
                        UNION_CHUNK,
                        &mut s,
                        &mut b,
                        &mut est,
                    );
                    t.sets += 1;
                    if a == b {
                        continue;
                    }
                    t.differ += 1;
                    let gap = (0..group)
                        .map(|g| {
                            exact_scores(&keys, &q[g * d..(g + 1) * d], ctx, &mut sc);
                            (true_mass(&sc, &a) - true_mass(&sc, &b)).abs()
                        })
                        .fold(0.0, f64::max);
                    t.worst = t.worst.max(gap);
                    t.near_ties += usize::from(gap <= 1e-3);
                }
                t
            })
            .reduce(Tally::default, |x, y| Tally {
                sets: x.sets + y.sets,
                differ: x.differ + y.differ,
                near_ties: x.near_ties + y.near_ties,
                worst: x.worst.max(y.worst),
            });
        ok &= tally.near_ties == tally.differ;
        println!(
            "| {} | {p} | {} | {} ({:.3}%) | {} | {:.1e} |",
            dump.name,
            tally.sets,
            tally.differ,
            100.0 * tally.differ as f64 / tally.sets.max(1) as f64,
            tally.near_ties,
            tally.worst
        );
    }
    ok
}
