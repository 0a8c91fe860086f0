//! Validation: what it accepts, and that it names what it rejects.

use super::{program, step};
use crate::schedule::build::{self, random_meta};
use crate::schedule::deps::{self, ScheduleError, position, validate};
use crate::schedule::program::Program;
use crate::schedule::{EventEdge, Op, Schedule};

#[test]
fn positions_follow_program_order() {
    for (qkv_bias, fused) in [(false, false), (true, false), (false, true), (true, true)] {
        let fusions = crate::schedule::program::Fusions {
            add_norm: fused,
            rope_append: fused,
            silu_gemm_input: fused,
        };
        let ops = Program {
            layers: 3,
            qkv_bias,
            fusions,
        }
        .ops();
        let keys: Vec<_> = ops.iter().map(|&o| position(o)).collect();
        assert!(
            keys.windows(2).all(|w| w[0] < w[1]),
            "bias {qkv_bias}, fused {fused}"
        );
    }
}

#[test]
fn random_schedules_of_fused_programs_validate() {
    let fusions = crate::schedule::program::Fusions {
        add_norm: true,
        rope_append: true,
        silu_gemm_input: true,
    };
    for seed in 0..100 {
        let meta = random_meta(seed);
        let p = Program {
            fusions,
            ..program(seed % 2 == 0)
        };
        let s = build::random(&p, &meta, seed);
        validate(&s, &p, &meta).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

#[test]
fn random_schedules_validate() {
    for seed in 0..300 {
        let meta = random_meta(seed);
        let p = program(seed % 2 == 0);
        let s = build::random(&p, &meta, seed);
        validate(&s, &p, &meta).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

#[test]
fn every_needed_event_removed_is_caught_with_its_pair() {
    let mut checked = 0;
    for seed in 0..60 {
        let meta = random_meta(seed);
        let p = program(false);
        let s = build::random(&p, &meta, seed);
        for (i, e) in s.events.iter().enumerate() {
            let mut cut = s.clone();
            cut.events.remove(i);
            let err = validate(&cut, &p, &meta).unwrap_err();
            assert!(matches!(err, ScheduleError::Unordered { .. }), "{err}");
            let missing = deps::unordered_conflicts(&cut, &meta).unwrap();
            let named = missing
                .iter()
                .any(|c| (c.before, c.after) == (e.before, e.after));
            assert!(named, "seed {seed}: event {e:?} not named in {missing:?}");
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} events tried");
}

/// A two-lane schedule with events, for the hand-made breakages below.
fn two_lanes() -> (Program, crate::backend::StepMeta, Schedule) {
    let p = program(false);
    let meta = step(&[1, 5, 1, 3]);
    let spec = build::NanoSpec {
        dense_cuts: vec![4],
        attn_cuts: vec![6],
        lanes: build::LaneMap::nanoflow(),
        skew: 2,
    };
    let s = build::nano_batched(&p, &meta, &spec).unwrap();
    validate(&s, &p, &meta).unwrap();
    assert!(!s.events.is_empty());
    (p, meta, s)
}

#[test]
fn cycles_are_rejected() {
    let (p, meta, mut s) = two_lanes();
    let (first, last) = (s.lanes[0][0], *s.lanes[1].last().unwrap());
    s.events.push(EventEdge {
        before: last,
        after: first,
    });
    match validate(&s, &p, &meta) {
        Err(ScheduleError::Cycle { nodes }) => {
            assert!(nodes.contains(&first) && nodes.contains(&last), "{nodes:?}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_lane_order_against_the_dataflow_is_unordered() {
    let p = program(false);
    let meta = step(&[2, 3]);
    let mut s = build::sequential(&p, meta.tokens.len(), meta.logit_rows.len());
    // The first layer's norm before the embedding it reads.
    s.lanes[0].swap(0, 1);
    let (a, b) = (s.lanes[0][1], s.lanes[0][0]);
    let err = validate(&s, &p, &meta).unwrap_err();
    let missing = deps::unordered_conflicts(&s, &meta).unwrap();
    assert!(matches!(err, ScheduleError::Unordered { .. }), "{err}");
    assert!(missing.iter().any(|c| (c.before, c.after) == (a, b)));
}

#[test]
fn coverage_errors_are_rejected() {
    let (p, meta, s) = two_lanes();
    let qkv = s.nodes.iter().position(|n| n.op == Op::Qkv(1)).unwrap();
    let mut gap = s.clone();
    gap.nodes[qkv].rows.end -= 1;
    let err = validate(&gap, &p, &meta).unwrap_err();
    assert!(
        matches!(err, ScheduleError::Uncovered { op: Op::Qkv(1), .. }),
        "{err}"
    );
    let mut over = s.clone();
    over.nodes[qkv].rows.end += 1;
    let err = validate(&over, &p, &meta).unwrap_err();
    assert!(
        matches!(err, ScheduleError::Overlap { op: Op::Qkv(1), .. }),
        "{err}"
    );
    let mut outside = s.clone();
    let last = outside
        .nodes
        .iter()
        .rposition(|n| n.op == Op::Qkv(1))
        .unwrap();
    outside.nodes[last].rows.end = meta.tokens.len() + 1;
    let err = validate(&outside, &p, &meta).unwrap_err();
    assert!(
        matches!(err, ScheduleError::OutOfRows { node, .. } if node == last),
        "{err}"
    );
    let mut foreign = s.clone();
    foreign.nodes[qkv].op = Op::Qkv(7);
    let err = validate(&foreign, &p, &meta).unwrap_err();
    assert!(
        matches!(err, ScheduleError::ForeignOp { node, .. } if node == qkv),
        "{err}"
    );
    let mut missing = build::sequential(&p, meta.tokens.len(), meta.logit_rows.len());
    missing.nodes.pop();
    missing.lanes[0].pop();
    let err = validate(&missing, &p, &meta).unwrap_err();
    assert_eq!(err, ScheduleError::MissingOp { op: Op::LmHead });
}

#[test]
fn lane_and_event_errors_are_rejected() {
    let (p, meta, s) = two_lanes();
    let v = s.lanes[1][0];
    let mut none = s.clone();
    none.lanes[1].remove(0);
    let err = validate(&none, &p, &meta).unwrap_err();
    assert_eq!(err, ScheduleError::NoLane { node: v });
    let mut twice = s.clone();
    twice.lanes[0].push(v);
    let err = validate(&twice, &p, &meta).unwrap_err();
    assert!(
        matches!(err, ScheduleError::ManyLanes { node, .. } if node == v),
        "{err}"
    );
    let mut ghost = s.clone();
    ghost.events.push(EventEdge {
        before: 0,
        after: 9999,
    });
    let err = validate(&ghost, &p, &meta).unwrap_err();
    assert!(
        matches!(err, ScheduleError::EventMissingNode { after: 9999, .. }),
        "{err}"
    );
    let mut same = s.clone();
    let (a, b) = (s.lanes[0][0], s.lanes[0][1]);
    same.events.push(EventEdge {
        before: a,
        after: b,
    });
    let err = validate(&same, &p, &meta).unwrap_err();
    assert!(
        matches!(err, ScheduleError::EventOnOneLane { lane: 0, .. }),
        "{err}"
    );
}

#[test]
fn kv_appends_of_a_cut_sequence_precede_its_attention() {
    // The prefill at rows 1..6 is cut by the dense cut at 3; attention is
    // cut only at the sequence boundary 6.
    let p = program(false);
    let meta = step(&[1, 5, 1, 3]);
    let spec = build::NanoSpec {
        dense_cuts: vec![3],
        attn_cuts: vec![6],
        lanes: build::LaneMap::nanoflow(),
        skew: 0,
    };
    let s = build::nano_batched(&p, &meta, &spec).unwrap();
    let find = |op: Op, start: usize| {
        let at = |n: &&crate::schedule::Node| n.op == op && n.rows.start == start;
        s.nodes.iter().position(|n| at(&n)).unwrap()
    };
    let req = deps::required(&s, &meta);
    let (kv0, kv1) = (find(Op::KvAppend(1), 0), find(Op::KvAppend(1), 3));
    let (att0, att1) = (find(Op::Attention(1), 0), find(Op::Attention(1), 6));
    assert!(req.contains(&(kv0, att0)) && req.contains(&(kv1, att0)));
    // The second attention piece reads only rows 6..10, all in `kv1`.
    assert!(req.contains(&(kv1, att1)) && !req.contains(&(kv0, att1)));
    // No attention of layer 1 depends on layer 0's appends.
    let kv_l0 = find(Op::KvAppend(0), 3);
    assert!(!req.contains(&(kv_l0, att0)));
}

#[test]
fn a_thirty_layer_step_in_four_nano_batches_validates() {
    let p = Program {
        layers: 30,
        qkv_bias: true,
        fusions: Default::default(),
    };
    let mut q_lens = vec![1; 48];
    q_lens.extend([40, 17, 1, 1, 64]);
    let meta = step(&q_lens);
    let rows = meta.tokens.len();
    let spec = build::NanoSpec {
        dense_cuts: vec![rows / 4, rows / 2, 3 * rows / 4],
        attn_cuts: vec![24, 48],
        lanes: build::LaneMap::nanoflow(),
        skew: 3,
    };
    let t = std::time::Instant::now();
    let s = build::nano_batched(&p, &meta, &spec).unwrap();
    let built = t.elapsed();
    validate(&s, &p, &meta).unwrap();
    eprintln!(
        "{} nodes, {} events: built in {built:?}, validated in {:?}",
        s.nodes.len(),
        s.events.len(),
        t.elapsed() - built
    );
    assert!(s.nodes.len() > 1500);
}
