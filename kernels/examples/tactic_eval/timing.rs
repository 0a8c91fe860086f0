//! `--suite timing`: the default selector's cost per call on the real keys
//! and queries, the clustering's cost, and the clusters' size spread per
//! initialisation (why strided initialisation ranks better).

use crate::Dump;
use std::time::Instant;
use tacflow_kernels::tactic::{
    ClusterIndex, DenseKeys, Init, KMeansParams, Scratch, TacticParams, select_group,
};

pub fn run(dump: &Dump) {
    let (layers, kvh, _, d, heads) = dump.dims();
    let group = heads / kvh;
    let prm = TacticParams::new(0.9);
    let w = dump.ends.len() - 1;
    let n0 = dump.ends[w] - dump.steps;
    for init in [
        Init::Strided,
        Init::Stratified,
        Init::PlusPlus,
        Init::Random,
    ] {
        let km = KMeansParams { init, ..prm.kmeans };
        let (mut t, mut max_size, mut big, mut cnt) = (0.0, 0.0, 0.0, 0.0);
        for l in (0..layers).step_by(3) {
            for h in 0..kvh {
                let keys = DenseKeys {
                    k: dump.keys(false, l, h),
                    d,
                };
                let t0 = Instant::now();
                let idx = ClusterIndex::build(&keys, n0, &km);
                t += t0.elapsed().as_secs_f64();
                let sizes: Vec<usize> = (0..idx.clusters())
                    .map(|c| idx.members_of(c).len())
                    .collect();
                max_size += *sizes.iter().max().unwrap() as f64;
                big += sizes
                    .iter()
                    .filter(|&&s| s > 4 * km.cluster_size)
                    .sum::<usize>() as f64
                    / n0 as f64;
                cnt += 1.0;
            }
        }
        println!(
            "| {init:?} | {:.0} ms | {:.0} | {:.1}% |",
            1e3 * t / cnt,
            max_size / cnt,
            100.0 * big / cnt
        );
    }
    // Per-call cost of the default selection, all (layer, KV head, step).
    let mut s = Scratch::default();
    let (mut sel, mut est) = (Vec::new(), vec![0.0f32; group]);
    let (mut t, mut calls, mut read) = (0.0, 0usize, 0.0);
    for l in 0..layers {
        for h in 0..kvh {
            let keys = DenseKeys {
                k: dump.keys(false, l, h),
                d,
            };
            let idx = ClusterIndex::build(&keys, n0, &prm.kmeans);
            for j in 0..dump.steps {
                let q = dump.queries(l, w * dump.steps + j, h, group);
                // The fastest of 5 runs: this machine is shared, and the
                // minimum filters out preemption.
                let mut best = f64::INFINITY;
                let mut st = Default::default();
                for _ in 0..5 {
                    let t0 = Instant::now();
                    st = select_group(&idx, &keys, q, n0 + j + 1, &prm, &mut s, &mut sel, &mut est);
                    best = best.min(t0.elapsed().as_secs_f64());
                }
                let st: tacflow_kernels::tactic::SelectStats = st;
                t += best;
                read += st.tokens_read / (n0 + j + 1) as f64;
                calls += 1;
            }
        }
    }
    println!(
        "\nselect_group (default, P = 0.9, ctx {}..{}): {:.1} µs per (layer, KV head) call, \
         {:.2} ms per decode token over {layers} layers x {kvh} KV heads; reads {:.1}% of the context",
        n0 + 1,
        dump.ends[w],
        1e6 * t / calls as f64,
        1e3 * t / calls as f64 * (layers * kvh) as f64,
        100.0 * read / calls as f64
    );
}
