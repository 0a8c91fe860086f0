//! The cost model, the simulator and the search.

use super::step;
use crate::schedule::build::{self, LaneMap, NanoSpec};
use crate::schedule::program::Program;
use crate::schedule::search::{
    CostFile, CostModel, CostPoint, OpKind, SearchSpace, makespan, search, share_grid,
};

/// A cost table sampled from `f(kind, rows, share)` on a grid of rows and
/// shares (affine `f` are interpolated exactly).
fn table(f: impl Fn(OpKind, usize, f64) -> f64) -> CostModel {
    let mut points = vec![];
    for op in OpKind::ALL {
        for rows in [1, 4096] {
            for sm_share in [0.25, 0.5, 0.75, 1.0] {
                let us = f(op, rows, sm_share);
                points.push(CostPoint {
                    op,
                    rows,
                    sm_share,
                    us,
                });
            }
        }
    }
    let file = CostFile {
        version: 1,
        model: "synthetic".into(),
        gpu: "none".into(),
        sm_share: None,
        points,
    };
    CostModel::from_file(file).unwrap()
}

/// Attention costs the same on any share of the SMs (memory-bound) and
/// grows with its rows (the KV it reads); GEMMs scale with rows and SMs.
fn attention_bound() -> CostModel {
    table(|k, rows, share| match k {
        OpKind::Attention => 20.0 * rows as f64,
        OpKind::Rowwise => 1.0,
        _ => (2.0 + rows as f64 * 10.0) / share,
    })
}

/// GEMMs dominate, everything scales with SMs, and each launch has a
/// fixed cost: splitting only adds launches.
fn gemm_bound() -> CostModel {
    table(|k, rows, share| match k {
        OpKind::Rowwise => 1.0,
        OpKind::Attention => (1.0 + rows as f64) / share,
        _ => (20.0 + rows as f64 * 50.0) / share,
    })
}

#[test]
fn the_table_interpolates_and_extrapolates_as_documented() {
    let m = table(|_, rows, share| (10.0 + rows as f64) / share);
    let close = |a: f64, b: f64| (a - b).abs() < 1e-6 * b.max(1.0);
    assert!(close(m.cost(OpKind::Qkv, 2048, 1.0), 2058.0));
    assert!(close(m.cost(OpKind::Qkv, 8192, 1.0), 4106.0 * 2.0));
    assert!(close(m.cost(OpKind::Down, 100, 0.125), 110.0 / 0.25 * 2.0));
    // Between shares 0.5 and 0.75 the time is interpolated linearly.
    let mid = (110.0 / 0.5 + 110.0 / 0.75) / 2.0;
    assert!(close(m.cost(OpKind::Down, 100, 0.625), mid));
    assert_eq!(m.cost(OpKind::Down, 0, 0.5), 0.0);
}

#[test]
fn cost_files_round_trip_and_other_versions_are_refused() {
    let dir = std::env::temp_dir().join(format!("tacflow-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let points = OpKind::ALL
        .map(|op| CostPoint {
            op,
            rows: 8,
            sm_share: 1.0,
            us: 3.0,
        })
        .to_vec();
    let mut file = CostFile {
        version: 1,
        model: "m".into(),
        gpu: "g".into(),
        sm_share: None,
        points,
    };
    let toml_path = dir.join("cost.toml");
    std::fs::write(&toml_path, toml::to_string(&file).unwrap()).unwrap();
    let m = CostModel::load(&toml_path).unwrap();
    assert_eq!((m.model.as_str(), m.gpu.as_str()), ("m", "g"));
    assert_eq!(m.cost(OpKind::Attention, 8, 1.0), 3.0);
    file.version = 2;
    let json_path = dir.join("cost.json");
    std::fs::write(&json_path, serde_json::to_string(&file).unwrap()).unwrap();
    let err = CostModel::load(&json_path).unwrap_err().to_string();
    assert!(err.contains("version 2"), "{err}");
    file.version = 1;
    file.points.pop();
    let err = CostModel::from_file(file).unwrap_err().to_string();
    assert!(err.contains("Rowwise"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_sequential_makespan_is_the_sum_of_its_nodes() {
    let p = Program {
        layers: 2,
        qkv_bias: true,
        fusions: Default::default(),
    };
    let meta = step(&[1, 4, 1]);
    let m = attention_bound();
    let s = build::sequential(&p, meta.tokens.len(), meta.logit_rows.len());
    let sum: f64 = s
        .nodes
        .iter()
        .map(|n| m.cost(OpKind::of(n.op), n.rows.len(), 1.0))
        .sum();
    assert!((makespan(&s, &m, &[1.0]).unwrap() - sum).abs() < 1e-6);
}

#[test]
fn share_grids_stay_within_the_sms() {
    let g = share_grid(3, 0.25);
    assert!(
        g.iter()
            .all(|s| s.len() == 3 && s.iter().sum::<f64>() <= 1.0 + 1e-9)
    );
    assert!(g.contains(&vec![0.5, 0.25, 0.25]) && g.contains(&vec![0.25, 0.25, 0.25]));
    assert_eq!(g.len(), 4);
    assert_eq!(share_grid(1, 0.5), vec![vec![0.5], vec![1.0]]);
}

/// Every schedule of the family, simulated on its own: any one dense cut or
/// none, any one attention cut or none, the three lane maps, two skews,
/// every share vector on a quarter grid.
fn brute_force(p: &Program, meta: &crate::backend::StepMeta, m: &CostModel) -> f64 {
    let rows = meta.tokens.len();
    let cuts = |all: Vec<usize>| std::iter::once(vec![]).chain(all.into_iter().map(|c| vec![c]));
    let mut best = f64::INFINITY;
    for lanes in [LaneMap::single(), LaneMap::nanoflow(), LaneMap::two_batch()] {
        for dense_cuts in cuts((1..rows).collect()) {
            for attn_cuts in cuts(build::seq_boundaries(meta)) {
                for skew in [0, 5] {
                    let lanes = lanes.clone();
                    let attn_cuts = attn_cuts.clone();
                    let spec = NanoSpec {
                        dense_cuts: dense_cuts.clone(),
                        attn_cuts,
                        lanes,
                        skew,
                    };
                    let s = build::nano_batched(p, meta, &spec).unwrap();
                    for shares in share_grid(s.lanes.len(), 0.25) {
                        best = best.min(makespan(&s, m, &shares).unwrap());
                    }
                }
            }
        }
    }
    best
}

#[test]
fn the_search_finds_the_brute_force_optimum() {
    let p = Program {
        layers: 1,
        qkv_bias: false,
        fusions: Default::default(),
    };
    let meta = step(&[1, 1, 3, 1]);
    for m in [attention_bound(), gemm_bound()] {
        let mut space = SearchSpace::for_step(&meta);
        space.skews = vec![0, 5];
        space.share_step = 0.25;
        space.attn_cuts = std::iter::once(vec![])
            .chain(build::seq_boundaries(&meta).into_iter().map(|c| vec![c]))
            .collect();
        let found = search(&p, &meta, &m, &space).unwrap();
        let best = brute_force(&p, &meta, &m);
        assert!(
            (found.predicted_us - best).abs() < 1e-6,
            "{} vs {best}",
            found.predicted_us
        );
        let s = build::nano_batched(&p, &meta, &found.spec).unwrap();
        let again = makespan(&s, &m, &found.shares).unwrap();
        assert!((again - found.predicted_us).abs() < 1e-6);
    }
}

#[test]
fn the_choice_follows_the_costs() {
    let p = Program {
        layers: 2,
        qkv_bias: false,
        fusions: Default::default(),
    };
    let meta = step(&[1, 1, 1, 1, 8, 1, 1, 1, 1, 16]);
    let space = SearchSpace::for_step(&meta);
    let overlap = search(&p, &meta, &attention_bound(), &space).unwrap();
    assert!(overlap.spec.lanes.lanes() > 1, "{overlap:?}");
    assert!(
        overlap.predicted_us < 0.9 * overlap.sequential_us,
        "{overlap:?}"
    );
    let single = search(&p, &meta, &gemm_bound(), &space).unwrap();
    assert_eq!(single.spec.lanes, LaneMap::single(), "{single:?}");
    assert!(single.spec.dense_cuts.is_empty() && single.spec.attn_cuts.is_empty());
    assert!((single.predicted_us - single.sequential_us).abs() < 1e-6);
}

#[test]
fn one_lane_on_a_gpu_gets_the_whole_device() {
    let p = Program {
        layers: 1,
        qkv_bias: false,
        fusions: Default::default(),
    };
    let meta = step(&[1, 1, 1, 1]);
    // Nothing depends on the share (a mechanism that bounds nothing): a
    // tie, which the smallest share would win were one lane offered any.
    let flat = table(|_, rows, _| 10.0 + rows as f64);
    let mut space = SearchSpace::for_step(&meta);
    space.lane_maps = vec![LaneMap::single()];
    space.share_step = 0.25;
    let found = search(&p, &meta, &flat, &space).unwrap();
    assert_eq!(found.shares, vec![1.0], "{found:?}");
}
