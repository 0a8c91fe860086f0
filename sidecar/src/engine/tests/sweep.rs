//! The fault sweep: one step that mixes every kind of work the engine does
//! is failed at each of its backend ops in turn. After each failure every
//! sequence, the allocator and the counters must be as before the step, and
//! the same step run again must give what an engine that never failed gives.

use super::*;
use crate::backend::Backend;
use crate::backend::faults::{Fault, FaultPlan, Trigger};
use crate::schedule::Plan;
use tacflow_ipc::ErrorCode;

const BLOCKS: usize = 48;

/// Sequences of the mixed step, each set up for one path:
/// 1: a prompt's first chunk (full attention, logits written);
/// 2: a later prompt chunk; 3: Tactic's first decode (clustering);
/// 4: a Tactic decode past its re-clustering limit (extends a clustering);
/// 5 and its fork 6: `fixed_budget` decodes over a shared partial block
/// (copy-on-write for both) whose bounds grow by a page;
/// 7: `oracle_top_p` after a truncation; 8: a full-attention decode with
/// diagnostics; 9: a prompt chunk scored with `prompt_logprobs` (the row
/// kept from its first chunk used, the kept row dropped as the prompt ends).
pub(super) fn scenario() -> (TestEngine, StepWork) {
    scenario_under(Plan::Sequential)
}

/// [`scenario`] with the mixed step's forward pass cut as `plan` says (the
/// steps that set it up run sequentially).
pub(super) fn scenario_under(plan: Plan) -> (TestEngine, StepWork) {
    let mut e = engine(BLOCKS);
    let tactic = |recluster_limit| AttentionPolicy::Tactic {
        p: 0.9,
        cluster_size: Some(4),
        recluster_limit,
    };
    open(&mut e, 1, AttentionPolicy::Full, false);
    open(&mut e, 2, AttentionPolicy::Full, false);
    feed(&mut e, 2, tokens(2, 18));
    open(&mut e, 3, tactic(None), true);
    feed(&mut e, 3, tokens(3, 40));
    open(&mut e, 4, tactic(Some(16)), true);
    feed(&mut e, 4, tokens(4, 30));
    feed(&mut e, 4, tokens(40, 1)); // clusters 30 slots
    feed(&mut e, 4, tokens(41, 20));
    let budget = AttentionPolicy::FixedBudget { tokens: 8, p: None };
    open(&mut e, 5, budget, true);
    feed(&mut e, 5, tokens(5, 30));
    feed(&mut e, 5, tokens(50, 1)); // bounds over one page
    feed(&mut e, 5, tokens(51, 16)); // 47 tokens: a partial third block
    e.fork_sequence(key(5), key(6), None, None, None).unwrap();
    open(&mut e, 7, AttentionPolicy::OracleTopP { p: 0.8 }, true);
    feed(&mut e, 7, tokens(7, 25));
    e.truncate_sequence(key(7), 11).unwrap();
    open(&mut e, 8, AttentionPolicy::Full, true);
    feed(&mut e, 8, tokens(8, 9));
    let scored = SamplingParams {
        seed: Some(9),
        prompt_logprobs: Some(3),
        ..SamplingParams::default()
    };
    e.open_sequence(key(9), AttentionPolicy::Full, scored, false)
        .unwrap();
    e.step(&work(vec![entry(9, tokens(9, 10), false)])).unwrap();
    let mut w = work(vec![
        entry(1, tokens(10, 20), false),
        entry(2, tokens(20, 7), true),
        entry(3, tokens(30, 1), true),
        entry(4, tokens(42, 1), true),
        entry(5, tokens(52, 1), true),
        entry(6, tokens(60, 1), true),
        entry(7, tokens(70, 1), true),
        entry(8, tokens(80, 1), true),
        entry(9, tokens(90, 6), true),
    ]);
    w.logits[0] = Some(logits_target(20));
    e.set_plan(plan);
    (e, w)
}

/// What a successful run of the mixed step gives.
#[derive(Debug)]
struct Ran {
    results: Vec<StepResult>,
    logits: Vec<f32>,
    after: Snapshot,
}

fn run_ok(e: &mut TestEngine, w: &StepWork) -> Ran {
    let results = e.step(w).unwrap();
    let logits = read_logits(w.logits[0].as_ref().unwrap());
    Ran {
        results,
        logits,
        after: snapshot(e),
    }
}

/// Compares two runs piece by piece, so that a failure names the piece.
fn same(got: &Ran, want: &Ran, what: &str) {
    // Debug text compares floats exactly and NaN (a fixed budget's
    // estimated mass) equal to itself.
    for (g, w) in got.results.iter().zip(&want.results) {
        let (g, w) = (format!("{g:?}"), format!("{w:?}"));
        assert!(g == w, "{what}:\n{g}\n vs\n{w}");
    }
    assert_eq!(got.results.len(), want.results.len(), "{what}");
    assert!(got.logits == want.logits, "{what}: logits differ");
    let (g, w) = (&got.after, &want.after);
    for (seq, s) in &w.seqs {
        assert!(
            g.seqs.get(seq) == Some(s),
            "{what}: seq {seq} differs after the step"
        );
    }
    assert_eq!(g.alloc, w.alloc, "{what}");
    assert_eq!(g.counters, w.counters, "{what}");
    assert!(
        g.totals == w.totals,
        "{what}: {}\n vs {}",
        g.totals,
        w.totals
    );
    assert!(
        g.attention == w.attention,
        "{what}: attention gauges differ"
    );
    assert_eq!(g, w, "{what}");
}

#[test]
fn the_comparison_catches_a_changed_result() {
    let (mut a, w) = scenario();
    let want = run_ok(&mut a, &w);
    let mut got = Ran {
        results: want.results.clone(),
        logits: want.logits.clone(),
        after: snapshot(&a),
    };
    got.results[4].attention.as_mut().unwrap().true_mass += 1e-9;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| same(&got, &want, "x")));
    assert!(r.is_err());
}

#[test]
fn two_engines_run_the_mixed_step_alike() {
    let (mut a, w) = scenario();
    let (mut b, v) = scenario();
    same(&run_ok(&mut a, &w), &run_ok(&mut b, &v), "two engines");
}

#[test]
fn the_mixed_step_exercises_every_path() {
    let (mut e, w) = scenario();
    let before = snapshot(&e);
    let s = |seq: u64| &before.seqs[&seq];
    assert_eq!(s(5).table, s(6).table, "the fork shares its blocks");
    assert_eq!(s(5).refcounts, vec![2, 2, 2]);
    assert_eq!((s(7).len, s(7).table.len()), (14, 1), "truncated");
    let free = e.kv_free_blocks();
    let ran = run_ok(&mut e, &w);
    let after = |seq: u64| &ran.after.seqs[&seq];
    assert_ne!(after(5).table[2], after(6).table[2], "both copied");
    assert_eq!(after(5).table[..2], after(6).table[..2]);
    assert_eq!(after(5).refcounts, vec![2, 2, 1]);
    // Fresh blocks: 2 for seq 1's prompt and the 2 copies; the shared
    // source loses both owners and goes free.
    assert_eq!(e.kv_free_blocks(), free - 2 - 2 + 1);
    // The oracle keeps nothing across steps; the others grow.
    for seq in [3, 4, 5, 6] {
        assert_ne!(after(seq).state, s(seq).state, "seq {seq}: state grew");
    }
    for (r, seq) in ran.results.iter().zip(1..) {
        assert_eq!(r.token.is_some(), seq != 1);
        assert_eq!(r.attention.is_some(), (3..=8).contains(&seq), "seq {seq}");
        assert_eq!(r.prompt_logprobs.is_empty(), seq != 9, "seq {seq}");
    }
    assert!(s(9).prompt_row.is_some(), "a row kept from the first chunk");
    assert!(ran.results[8].prompt_logprobs.iter().all(Option::is_some));
    assert!(after(9).prompt_row.is_none(), "the prompt ended");
    assert_eq!(ran.results[7].attention.as_ref().unwrap().policy, "full");
    assert!(ran.logits.iter().all(|x| x.is_finite()));
    assert!(ran.logits.iter().any(|&x| x != 0.0));
}

/// The sweep itself: every op of the mixed step fails once.
#[test]
fn a_step_failed_at_any_op_changes_nothing_and_reruns_identically() {
    sweep(Plan::Sequential);
}

/// The sweep with the mixed step cut into nano-batches on several lanes
/// (a random valid schedule, issued in a random order).
#[test]
fn a_multi_lane_step_failed_at_any_op_changes_nothing() {
    sweep(super::schedules::multi_lane_plan());
}

fn sweep(plan: Plan) {
    let (mut reference, w) = scenario_under(plan.clone());
    let ops0 = reference.backend().ops();
    let want = run_ok(&mut reference, &w);
    let total = reference.backend().ops() - ops0;
    assert!(total > 40, "the step ran {total} ops");
    for n in 1..=total {
        let (mut e, w) = scenario_under(plan.clone());
        let before = snapshot(&e);
        e.backend().arm(FaultPlan {
            fault: Fault::Error,
            at: Trigger::Op(n),
        });
        let err = e.step(&w).expect_err("the armed op fails the step");
        assert!(e.backend().fired(), "op {n}");
        assert_eq!(err.code, ErrorCode::Internal, "op {n}: {err:?}");
        assert_eq!(snapshot(&e), before, "op {n} of {total} failed");
        e.backend().disarm();
        same(
            &run_ok(&mut e, &w),
            &want,
            &format!("rerun after op {n} failed"),
        );
    }
}

/// A device lost at any op of the mixed step fails it and the step after
/// it, and neither changes anything.
#[test]
fn a_device_lost_at_any_op_fails_every_step_and_changes_nothing() {
    let (mut reference, w) = scenario();
    let ops0 = reference.backend().ops();
    reference.step(&w).unwrap();
    let total = reference.backend().ops() - ops0;
    for n in 1..=total {
        let (mut e, w) = scenario();
        let before = snapshot(&e);
        e.backend().arm(FaultPlan {
            fault: Fault::DeviceLost,
            at: Trigger::Op(n),
        });
        assert!(e.step(&w).is_err(), "op {n}");
        assert!(e.backend().check_device().is_err());
        assert!(e.step(&w).is_err(), "op {n}: still lost");
        assert_eq!(snapshot(&e), before, "device lost at op {n} of {total}");
    }
}
