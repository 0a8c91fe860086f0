//! The schedules `build` makes: the sequential pass and nano-batches.

use super::{program, step};
use crate::schedule::Op;
use crate::schedule::build::{self, LaneMap, NanoSpec, random_meta};
use crate::schedule::deps::{ScheduleError, validate};

#[test]
fn the_sequential_schedule_is_one_lane_without_events() {
    for seed in 0..20 {
        let meta = random_meta(seed);
        let p = program(seed % 2 == 1);
        let s = build::sequential(&p, meta.tokens.len(), meta.logit_rows.len());
        assert!(s.events.is_empty());
        assert_eq!(s.lanes, vec![(0..p.ops().len()).collect::<Vec<_>>()]);
        let ops: Vec<Op> = s.nodes.iter().map(|n| n.op).collect();
        assert_eq!(ops, p.ops());
        assert!(s.nodes.iter().all(|n| n.lane == 0 && n.rows.start == 0));
        validate(&s, &p, &meta).unwrap();
    }
}

fn specs(meta: &crate::backend::StepMeta) -> Vec<NanoSpec> {
    let rows = meta.tokens.len();
    let bounds = build::seq_boundaries(meta);
    let mut out = vec![];
    for lanes in [LaneMap::single(), LaneMap::nanoflow(), LaneMap::two_batch()] {
        for skew in [0, 3] {
            let dense_cuts = if rows > 2 {
                vec![rows / 3, rows / 2 + 1]
            } else {
                vec![]
            };
            let attn_cuts = bounds.iter().copied().take(1).collect();
            out.push(NanoSpec {
                dense_cuts,
                attn_cuts,
                lanes: lanes.clone(),
                skew,
            });
        }
    }
    out
}

#[test]
fn nano_batched_schedules_validate_and_need_every_event() {
    for seed in 0..30 {
        let meta = random_meta(seed);
        let p = program(false);
        for spec in specs(&meta) {
            let s = build::nano_batched(&p, &meta, &spec).unwrap();
            validate(&s, &p, &meta).unwrap_or_else(|e| panic!("{seed} {spec:?}: {e}"));
            assert_eq!(s.lanes.len(), spec.lanes.lanes());
            for i in 0..s.events.len() {
                let mut cut = s.clone();
                cut.events.remove(i);
                assert!(
                    validate(&cut, &p, &meta).is_err(),
                    "{seed}: event {i} not needed"
                );
            }
        }
    }
}

#[test]
fn one_lane_nano_batches_interleave_op_by_op() {
    let p = program(false);
    let meta = step(&[4, 4]);
    let spec = NanoSpec {
        dense_cuts: vec![4],
        attn_cuts: vec![4],
        lanes: LaneMap::single(),
        skew: 0,
    };
    let s = build::nano_batched(&p, &meta, &spec).unwrap();
    let ops: Vec<(Op, usize)> = s.lanes[0]
        .iter()
        .map(|&v| (s.nodes[v].op, s.nodes[v].rows.start))
        .collect();
    let qkv = ops.iter().position(|&o| o == (Op::Qkv(0), 0)).unwrap();
    assert_eq!(ops[qkv + 1], (Op::Qkv(0), 4));
    assert!(s.events.is_empty());
}

#[test]
fn a_skew_lets_the_first_nano_batch_run_ahead() {
    let p = program(false);
    let meta = step(&[4, 4]);
    let spec = NanoSpec {
        dense_cuts: vec![4],
        attn_cuts: vec![4],
        lanes: LaneMap::nanoflow(),
        skew: 4,
    };
    let s = build::nano_batched(&p, &meta, &spec).unwrap();
    validate(&s, &p, &meta).unwrap();
    // On the "other" lane the first piece's KV append comes before the
    // second piece's RoPE: its attention need not wait for the second QKV.
    let other: Vec<(Op, usize)> = s.lanes[2]
        .iter()
        .map(|&v| (s.nodes[v].op, s.nodes[v].rows.start))
        .collect();
    let at = |o| other.iter().position(|&x| x == o).unwrap();
    assert!(at((Op::KvAppend(0), 0)) < at((Op::Rope(0), 4)));
}

#[test]
fn bad_cuts_are_errors() {
    let p = program(false);
    let meta = step(&[3, 3]);
    let mut spec = NanoSpec {
        dense_cuts: vec![2],
        attn_cuts: vec![2],
        lanes: LaneMap::nanoflow(),
        skew: 0,
    };
    let err = build::nano_batched(&p, &meta, &spec).unwrap_err();
    assert!(
        matches!(
            err,
            ScheduleError::BadCut {
                cut: 2,
                what: "attention rows",
                ..
            }
        ),
        "{err}"
    );
    spec.attn_cuts = vec![3];
    spec.dense_cuts = vec![4, 4];
    assert!(build::nano_batched(&p, &meta, &spec).is_err());
    spec.dense_cuts = vec![6];
    assert!(build::nano_batched(&p, &meta, &spec).is_err());
    spec.dense_cuts = vec![5];
    assert!(build::nano_batched(&p, &meta, &spec).is_ok());
}

#[test]
fn logit_ops_follow_the_dense_nano_batches() {
    let p = program(false);
    let meta = step(&[2, 1, 3]);
    let spec = NanoSpec {
        dense_cuts: vec![3],
        attn_cuts: vec![],
        lanes: LaneMap::two_batch(),
        skew: 0,
    };
    let s = build::nano_batched(&p, &meta, &spec).unwrap();
    // Logit rows are token rows 1, 2, 5: two in the first nano-batch.
    let heads: Vec<_> = s
        .nodes
        .iter()
        .filter(|n| n.op == Op::LmHead)
        .map(|n| (n.rows.clone(), n.lane))
        .collect();
    assert_eq!(heads, vec![(0..2, 0), (2..3, 1)]);
    validate(&s, &p, &meta).unwrap();
}
