//! The mixed step of the sweep run under random valid schedules (random
//! nano-batches on one to four lanes, issued in random orders: what an
//! adversarial GPU could do with its streams): the trace the backend
//! records proves every dependency ordered, and the logits equal the
//! sequential pass's.

use super::sweep::scenario_under;
use super::*;
use crate::schedule::{Op, Plan, trace};

/// A random plan whose mixed step runs on more than one lane.
pub(super) fn multi_lane_plan() -> Plan {
    (0..64)
        .map(|seed| Plan::Random { seed })
        .find(|plan| lanes_of(plan.clone()) > 1)
        .expect("a seed with several lanes")
}

/// Lanes of the mixed step's schedule under `plan`.
fn lanes_of(plan: Plan) -> usize {
    let (mut e, w) = scenario_under(plan);
    e.backend().recorder.start();
    e.step(&w).unwrap();
    let rec = e.backend().recorder.take();
    let lanes: std::collections::BTreeSet<usize> =
        rec.trace.entries.iter().map(|x| x.lane).collect();
    lanes.len()
}

/// Every entry's logits, row after row.
fn all_logits(e: &mut TestEngine, w: &mut StepWork) -> (Vec<StepResult>, Vec<f32>) {
    let targets: Vec<_> = w
        .entries
        .iter()
        .map(|x| logits_target(x.tokens.len()))
        .collect();
    w.logits = targets.iter().cloned().map(Some).collect();
    let results = e.step(w).unwrap();
    (results, targets.iter().flat_map(read_logits).collect())
}

fn rel_diff(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (f64::from(*g) - f64::from(*w)).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| f64::from(*w).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn random_schedules_give_the_sequential_logits_and_order_every_dependency() {
    let (mut e, mut w) = scenario_under(Plan::Sequential);
    let (want_results, want) = all_logits(&mut e, &mut w);
    let (mut multi, mut events) = (0, 0);
    for seed in 0..16 {
        let plan = Plan::Random { seed };
        let (mut e, mut w) = scenario_under(plan.clone());
        e.backend().recorder.start();
        let (results, got) = all_logits(&mut e, &mut w);
        let rec = e.backend().recorder.take();
        assert!(
            rec.mismatches.is_empty(),
            "seed {seed}: {:?}",
            rec.mismatches
        );
        let meta = rec.meta.expect("the step's metadata");
        let (schedule, _) = plan.lay_out(&e.model_program(), &meta).unwrap();
        if let Err(v) = trace::check(&rec.trace, &schedule, &meta) {
            panic!("seed {seed}: {} violations, first {:?}", v.len(), v[0]);
        }
        multi += usize::from(schedule.lanes.len() > 1);
        events += rec
            .trace
            .entries
            .iter()
            .map(|x| x.waited.len())
            .sum::<usize>();
        let d = rel_diff(&got, &want);
        assert!(
            d <= 1e-6,
            "seed {seed}: logits {d:.2e} from the sequential pass"
        );
        for (g, r) in results.iter().zip(&want_results) {
            assert_eq!(g.token, r.token, "seed {seed}: seq {}", r.seq_id);
        }
    }
    assert!(multi >= 8, "only {multi} of 16 schedules had several lanes");
    assert!(events > 0, "no cross-lane event was waited");
}

/// The checker on a real run: a needed event removed from a schedule that
/// then runs anyway (around the validation) leaves a trace the checker
/// rejects, naming the pair nothing ordered, and the validation itself
/// refuses the schedule.
#[test]
fn a_run_missing_a_needed_event_is_caught() {
    let plan = multi_lane_plan();
    let (mut e, w) = scenario_under(plan.clone());
    e.backend().recorder.start();
    e.step(&w).unwrap();
    let meta = e.backend().recorder.take().meta.unwrap();
    let program = e.model_program();
    let (mut schedule, order) = plan.lay_out(&program, &meta).unwrap();
    assert!(!schedule.events.is_empty());
    let gone = schedule.events.remove(0);
    let refused = crate::schedule::deps::validate(&schedule, &program, &meta);
    assert!(refused.is_err(), "validation let the schedule through");
    // Run it anyway, in the order that was valid with the event.
    let given = Plan::Given(std::sync::Arc::new((schedule.clone(), order)));
    let (mut e, w) = scenario_under(given);
    e.backend().recorder.start();
    e.step(&w).unwrap();
    let rec = e.backend().recorder.take();
    let v = trace::check(&rec.trace, &schedule, &rec.meta.unwrap()).unwrap_err();
    let named = v.iter().any(|x| match x {
        trace::Violation::Unordered { before, after, .. } => {
            (*before, *after) == (gone.before, gone.after)
        }
        _ => false,
    });
    assert!(named, "{gone:?} not among {v:?}");
}

/// Every fusion on: the mixed step gives the unfused pass's logits, in the
/// sequential schedule and in random ones.
#[test]
fn fused_programs_give_the_unfused_logits() {
    use crate::schedule::program::Fusions;
    let all = Fusions {
        add_norm: true,
        rope_append: true,
        silu_gemm_input: true,
    };
    let (mut e, mut w) = scenario_under(Plan::Sequential);
    let (_, want) = all_logits(&mut e, &mut w);
    for plan in [
        Plan::Sequential,
        Plan::Random { seed: 3 },
        Plan::Random { seed: 11 },
    ] {
        let (mut e, mut w) = scenario_under(plan.clone());
        e.set_fusions(all);
        let program = e.model_program();
        assert!(
            program
                .ops()
                .iter()
                .any(|op| matches!(op, Op::AddMlpNorm(_)))
        );
        e.backend().recorder.start();
        let (_, got) = all_logits(&mut e, &mut w);
        let rec = e.backend().recorder.take();
        let meta = rec.meta.unwrap();
        let (schedule, _) = plan.lay_out(&program, &meta).unwrap();
        trace::check(&rec.trace, &schedule, &meta).unwrap();
        let d = rel_diff(&got, &want);
        assert!(
            d <= 1e-6,
            "{plan:?}: fused logits {d:.2e} from the unfused pass"
        );
    }
}

/// A schedule file as `tune` writes it (two-batch overlap for small
/// steps, NanoFlow's three lanes with a skew for larger ones) runs the
/// mixed step with the sequential pass's logits and tokens, every
/// dependency ordered.
#[test]
fn tuned_schedules_give_the_sequential_logits() {
    use crate::schedule::build::{LaneMap, NanoSpec};
    use crate::schedule::tuned::{ScheduleFile, ScheduleKey, Tuned, TunedStep};
    let (mut e, mut w) = scenario_under(Plan::Sequential);
    let (want_results, want) = all_logits(&mut e, &mut w);
    let small = crate::schedule::tests::step(&[1, 1, 1, 1]);
    let entry = |meta, spec, shares: Vec<f64>| {
        let mut t = TunedStep::from_spec("test".into(), meta, spec);
        t.shares = shares;
        t
    };
    let two = NanoSpec {
        dense_cuts: vec![2],
        attn_cuts: vec![2],
        lanes: LaneMap::two_batch(),
        skew: 0,
    };
    let big = crate::schedule::tests::step(&[1, 1, 1, 1, 12]);
    let three = NanoSpec {
        dense_cuts: vec![6],
        attn_cuts: vec![4],
        lanes: LaneMap::nanoflow(),
        skew: 2,
    };
    let file = ScheduleFile {
        version: 1,
        model: "tiny".into(),
        key: ScheduleKey {
            fingerprint: "f".into(),
            device: "d".into(),
            policy: "full".into(),
        },
        cost_file: String::new(),
        steps: vec![
            entry(&small, &two, vec![0.5, 0.5]),
            entry(&big, &three, vec![0.5, 0.25, 0.25]),
        ],
    };
    for keep in 0..2 {
        let mut one = file.clone();
        one.steps = vec![file.steps[keep].clone()];
        let plan = Plan::Tuned(std::sync::Arc::new(Tuned::new(one)));
        let (mut e, mut w) = scenario_under(plan.clone());
        e.backend().recorder.start();
        let (results, got) = all_logits(&mut e, &mut w);
        let rec = e.backend().recorder.take();
        let meta = rec.meta.expect("the step's metadata");
        let (schedule, _) = plan.lay_out(&e.model_program(), &meta).unwrap();
        assert!(schedule.lanes.len() > 1, "entry {keep}: one lane");
        trace::check(&rec.trace, &schedule, &meta).unwrap();
        assert!(rel_diff(&got, &want) <= 1e-6);
        for (g, r) in results.iter().zip(&want_results) {
            assert_eq!(g.token, r.token);
        }
    }
}
