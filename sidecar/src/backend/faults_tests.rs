//! Unit tests of the fault-injecting backend: plans, triggers, faults.

use super::*;
use crate::backend::cpu::CpuBackend;

fn plan(s: &str) -> FaultPlan {
    s.parse().unwrap()
}

#[test]
fn parses_every_fault_and_trigger() {
    let p = |fault, at| FaultPlan { fault, at };
    assert_eq!(plan("panic@step:2"), p(Fault::Panic, Trigger::Step(2)));
    assert_eq!(
        plan("device_lost@op:40"),
        p(Fault::DeviceLost, Trigger::Op(40))
    );
    assert_eq!(plan("error@op:7"), p(Fault::Error, Trigger::Op(7)));
    assert_eq!(
        plan("illegal_address@step:3"),
        p(Fault::IllegalAddress, Trigger::Step(3))
    );
    assert_eq!(
        plan(" illegal_address @ op : 9"),
        p(Fault::IllegalAddress, Trigger::Op(9)),
        "spaces around the parts"
    );
}

#[test]
fn only_the_real_fault_needs_a_device() {
    for (spec, needs) in [
        ("error@op:1", false),
        ("panic@op:1", false),
        ("device_lost@op:1", false),
        ("illegal_address@op:1", true),
    ] {
        assert_eq!(plan(spec).fault.needs_device(), needs, "{spec}");
    }
}

#[test]
fn usage_names_every_fault() {
    let e = "boom@op:1".parse::<FaultPlan>().unwrap_err();
    for fault in ["error", "panic", "device_lost", "illegal_address"] {
        assert!(e.contains(fault), "{e}");
    }
}

/// On a backend with no device the launch is refused, and that refusal is
/// the op's error: the op is not run, nothing is marked lost, and the
/// plan does not fire again.
#[test]
fn illegal_address_without_a_device_fails_its_op() {
    let f = Faulty::new(CpuBackend::default());
    f.arm(plan("illegal_address@op:2"));
    let errs: Vec<String> = (1..=4)
        .filter_map(|_| f.act(1, 1).err().map(|e| e.to_string()))
        .collect();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("no device to fault"), "{}", errs[0]);
    assert!(f.fired());
    assert!(f.check_device().is_ok(), "nothing simulated a lost device");
    let nested = Faulty::new(Faulty::new(CpuBackend::default()));
    let e = nested.provoke_illegal_address().unwrap_err().to_string();
    assert!(
        e.contains("no device to fault"),
        "forwarded to the inner backend: {e}"
    );
}

#[test]
fn bad_specs_say_what_is_wrong() {
    for (spec, says) in [
        ("panic", "no '@'"),
        ("boom@op:1", "unknown fault"),
        ("error@op", "no ':'"),
        ("error@layer:3", "unknown trigger"),
        ("error@op:0", "not a count from 1"),
        ("error@op:-1", "not a count from 1"),
        ("error@op:x", "not a count from 1"),
    ] {
        let e = spec.parse::<FaultPlan>().unwrap_err();
        assert!(e.contains(says) && e.contains(spec), "{spec}: {e}");
    }
}

/// Runs `n` `act` ops and returns which failed (1-based).
fn failing_acts(f: &Faulty<CpuBackend>, n: u64) -> Vec<u64> {
    (1..=n).filter(|_| f.act(1, 1).is_err()).collect::<Vec<_>>()
}

#[test]
fn error_at_op_fails_that_op_only() {
    let f = Faulty::new(CpuBackend::default());
    f.act(1, 1).unwrap();
    assert_eq!(f.ops(), 1, "counted before arming too");
    f.arm(plan("error@op:3"));
    assert_eq!(f.ops(), 0, "arming restarts the count");
    assert!(!f.fired());
    let failed: Vec<u64> = (1..=6).filter(|_| f.act(1, 1).is_err()).collect();
    assert_eq!(failed, vec![3]);
    assert!(f.fired());
    assert_eq!(f.ops(), 6);
    assert!(f.check_device().is_ok(), "an error leaves the device alive");
    // Queries are not ops.
    f.describe();
    f.free_memory();
    f.supports_sparse();
    assert_eq!(f.ops(), 6);
}

#[test]
fn step_trigger_counts_begin_step() {
    let f = Faulty::new(CpuBackend::default());
    f.arm(plan("error@step:2"));
    let meta = StepMeta::default();
    assert!(f.begin_step(&meta).is_ok());
    assert_eq!(failing_acts(&f, 5), Vec::<u64>::new());
    assert!(f.begin_step(&meta).is_err(), "the second step's first op");
    assert!(f.fired());
    assert!(f.begin_step(&meta).is_ok());
    assert_eq!(f.ops(), 8);
}

#[test]
fn device_lost_is_sticky_until_the_end() {
    let f = Faulty::new(CpuBackend::default());
    f.arm(plan("device_lost@op:2"));
    assert_eq!(failing_acts(&f, 4), vec![2, 3, 4]);
    assert!(f.check_device().is_err());
    f.disarm();
    assert!(f.act(1, 1).is_err(), "disarming does not revive a device");
}

#[test]
fn disarmed_plan_never_fires() {
    let f = Faulty::new(CpuBackend::default());
    f.arm(plan("error@op:2"));
    f.disarm();
    assert_eq!(failing_acts(&f, 4), Vec::<u64>::new());
    assert!(!f.fired());
}

fn engine_of(
    b: Faulty<CpuBackend>,
    blocks: usize,
) -> Result<crate::engine::Engine<Faulty<CpuBackend>>> {
    let spec = crate::model::ModelSpec::parse("tiny", 7)?;
    let (config, src) = spec.open()?;
    let cap = crate::engine::KvCapacity::Blocks(blocks);
    crate::engine::Engine::new(b, &config, src.as_ref(), cap, None, |_, _| {})
}

#[test]
fn a_backend_with_graphs_gets_a_block_no_sequence_will_own() {
    let e = engine_of(Faulty::new(CpuBackend::default()), 4).unwrap();
    assert_eq!(
        e.backend().pad_block(),
        None,
        "nothing reserved without graphs"
    );
    assert_eq!(e.kv_free_blocks(), 4);
    let e = engine_of(Faulty::new(CpuBackend::default()).wanting_pad_block(), 4).unwrap();
    let pad = e.backend().pad_block().expect("reserved at construction");
    assert!(pad < 4);
    assert_eq!((e.kv_total_blocks(), e.kv_free_blocks()), (4, 3));
    assert_eq!(
        e.gauges().kv_free_blocks.load(SeqCst),
        3,
        "the gauge agrees"
    );
    let one = engine_of(Faulty::new(CpuBackend::default()).wanting_pad_block(), 1);
    assert!(one.is_err(), "no block left for sequences");
}

#[test]
fn panic_fault_panics_at_its_op() {
    let f = Faulty::new(CpuBackend::default());
    f.arm(plan("panic@op:2"));
    f.act(1, 1).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.act(1, 1)));
    assert!(r.is_err());
    assert!(f.fired());
    assert!(f.act(1, 1).is_ok(), "the plan fires once");
}
