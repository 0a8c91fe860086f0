//! Tactic through the device path (the backend keeps the states), run on
//! the CPU backend whose host stand-in does the kernels' work: the same
//! decodes as the host path, forks, truncations and closes through the
//! backend, and a failed step that leaves the states as they were.

use super::*;
use crate::backend::Backend;
use crate::backend::faults::{Fault, FaultPlan, Trigger};
use crate::engine::Serves;
use tacflow_ipc::ErrorCode;

/// A `tiny` engine whose CPU backend keeps the Tactic states.
fn device_engine(blocks: usize) -> TestEngine {
    let spec = ModelSpec::parse("tiny", 7).unwrap();
    let (config, src) = spec.open().unwrap();
    let backend = Faulty::new(CpuBackend::default().with_device_tactic());
    Engine::new(
        backend,
        &config,
        src.as_ref(),
        KvCapacity::Blocks(blocks),
        None,
        |_, _| {},
    )
    .unwrap()
}

fn tactic(p: f32, cluster_size: Option<u32>, recluster_limit: Option<u32>) -> AttentionPolicy {
    AttentionPolicy::Tactic {
        p,
        cluster_size,
        recluster_limit,
    }
}

/// The same step on both engines gives the same result, bit for bit.
fn both(host: &mut TestEngine, dev: &mut TestEngine, seq: u64, toks: Vec<u32>) -> u32 {
    let a = feed(host, seq, toks.clone());
    let b = feed(dev, seq, toks);
    assert_eq!(format!("{a:?}"), format!("{b:?}"), "seq {seq}");
    a.token.unwrap()
}

#[test]
fn the_device_path_decodes_as_the_host_path() {
    for policy in [
        tactic(0.9, Some(4), Some(16)),
        tactic(0.5, None, None),
        tactic(0.99, Some(2), Some(16)),
    ] {
        let (mut host, mut dev) = (engine(64), device_engine(64));
        for e in [&mut host, &mut dev] {
            open(e, 1, policy.clone(), false);
        }
        let mut t = both(&mut host, &mut dev, 1, tokens(1, 37));
        // The device path clustered the 37 prompt keys at the prompt's end,
        // the host path clusters them at the first decode step.
        assert!(dev.backend().tactic_bytes() > 0, "{policy:?}");
        let PolicyState::Tactic(seq) = &host.seqs[&key(1)].state else {
            panic!("a host Tactic state")
        };
        assert!(seq.index.iter().all(|l| l.is_empty()));
        // 40 decode steps: the limit of 16 re-clusters the tail twice.
        for _ in 0..40 {
            t = both(&mut host, &mut dev, 1, vec![t]);
        }
        assert!(dev.backend().tactic_bytes() > 0, "{policy:?}");
        assert!(matches!(dev.seqs[&key(1)].state, PolicyState::Device(_)));
        assert!(matches!(host.seqs[&key(1)].state, PolicyState::Tactic(_)));
    }
}

/// A prompt in chunks is clustered at the chunk that ends it (the first to
/// sample); a prompt whose last chunk is one token (a decode step), or
/// that never sampled, at its first decode step: the same keys either
/// way, so the same decode as the host path.
#[test]
fn the_state_is_built_where_the_prompt_ends() {
    let policy = tactic(0.9, Some(4), Some(64));
    let (mut host, mut dev) = (engine(64), device_engine(64));
    for e in [&mut host, &mut dev] {
        for seq in 1..=3 {
            open(e, seq, policy.clone(), false);
        }
    }
    let step = |e: &mut TestEngine, seq: u64, toks: Vec<u32>, sample: bool| {
        e.step(&work(vec![entry(seq, toks, sample)]))
            .unwrap()
            .remove(0)
    };
    let mut last = vec![];
    for (seq, chunks) in [(1, [20, 13]), (2, [20, 1]), (3, [33, 0])] {
        let before = dev.backend().tactic_bytes();
        for e in [&mut host, &mut dev] {
            step(e, seq, tokens(seq, chunks[0]), false);
        }
        assert_eq!(
            dev.backend().tactic_bytes(),
            before,
            "a chunk that does not sample"
        );
        let toks = tokens(seq + 10, chunks[1]);
        let t = if toks.is_empty() {
            // Never sampled: the first decode token is the client's.
            7
        } else {
            let (a, b) = (
                step(&mut host, seq, toks.clone(), true),
                step(&mut dev, seq, toks, true),
            );
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "seq {seq}");
            a.token.unwrap()
        };
        // Built at the chunk that samples: over all its keys at a prompt's
        // end, over the keys before its token at a one-token chunk (a
        // decode step); not before a prompt that never sampled decodes.
        let built = dev.backend().tactic_bytes() > before;
        assert_eq!(built, chunks[1] > 0, "seq {seq}");
        last.push(t);
    }
    for _ in 0..12 {
        for (seq, t) in (1..=3).zip(last.iter_mut()) {
            *t = both(&mut host, &mut dev, seq, vec![*t]);
        }
    }
}

#[test]
fn forks_truncations_and_closes_go_through_the_backend() {
    let (mut host, mut dev) = (engine(96), device_engine(96));
    let policy = tactic(0.9, Some(4), Some(16));
    for e in [&mut host, &mut dev] {
        open(e, 1, policy.clone(), false);
    }
    let mut t = both(&mut host, &mut dev, 1, tokens(1, 30));
    for _ in 0..5 {
        t = both(&mut host, &mut dev, 1, vec![t]);
    }
    let held = dev.backend().tactic_bytes();
    for e in [&mut host, &mut dev] {
        e.fork_sequence(key(1), key(2), None, None, None).unwrap();
    }
    assert_eq!(dev.backend().tactic_bytes(), held, "a fork shares");
    // Both sides decode on, past their re-clustering limit.
    let (mut a, mut b) = (t, t);
    for _ in 0..20 {
        a = both(&mut host, &mut dev, 1, vec![a]);
        b = both(&mut host, &mut dev, 2, vec![b]);
    }
    assert!(dev.backend().tactic_bytes() > held);
    // A truncation forgets; the next decode clusters again.
    for e in [&mut host, &mut dev] {
        e.truncate_sequence(key(2), 9).unwrap();
    }
    for _ in 0..3 {
        b = both(&mut host, &mut dev, 2, vec![b]);
    }
    dev.close_sequence(key(1)).unwrap();
    assert!(dev.backend().tactic_bytes() > 0, "seq 2 holds its own");
    dev.drop_session(SESSION);
    assert_eq!(dev.backend().tactic_bytes(), 0, "every state freed");
}

#[test]
fn a_backend_keeping_tactic_serves_every_policy_on_its_device() {
    let mut dev = device_engine(16);
    let serves = Serves::of(dev.backend());
    assert_eq!(
        crate::engine::policies(serves),
        ["full", "tactic", "fixed_budget", "oracle_top_p"]
    );
    let budget = AttentionPolicy::FixedBudget { tokens: 8, p: None };
    open(&mut dev, 1, AttentionPolicy::OracleTopP { p: 0.9 }, true);
    open(&mut dev, 2, budget, false);
    for seq in [1, 2] {
        let state = &dev.seqs[&key(seq)].state;
        assert!(
            matches!(state, PolicyState::DeviceBaseline { .. }),
            "{state:?}"
        );
    }
    assert_eq!(dev.seqs[&key(2)].state.target(), 0.9);
}

/// The baselines selected by the backend decode as the host path's, their
/// diagnostics (true mass, estimate, tokens read) the same, bit for bit,
/// beside a Tactic sequence in the same steps.
#[test]
fn the_device_baselines_decode_as_the_host_path() {
    for policy in [
        AttentionPolicy::OracleTopP { p: 0.8 },
        AttentionPolicy::FixedBudget {
            tokens: 24,
            p: Some(0.7),
        },
    ] {
        let (mut host, mut dev) = (engine(96), device_engine(96));
        for e in [&mut host, &mut dev] {
            open(e, 1, policy.clone(), true);
            open(e, 2, tactic(0.9, Some(4), Some(16)), true);
            feed(e, 2, tokens(2, 20));
        }
        let mut t = both(&mut host, &mut dev, 1, tokens(1, 40));
        for step in 0..20 {
            let w = vec![entry(1, vec![t], true), entry(2, tokens(step, 1), true)];
            let (a, b) = (
                host.step(&work(w.clone())).unwrap(),
                dev.step(&work(w)).unwrap(),
            );
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "{policy:?} step {step}");
            let d = a[0].attention.as_ref().expect("diagnostics asked for");
            assert!(d.true_mass > 0.0 && d.tokens_read_fraction > 0.0, "{d:?}");
            t = a[0].token.unwrap();
        }
        let host_state = &host.seqs[&key(1)].state;
        assert!(!host_state.on_device(), "{host_state:?}");
    }
}

/// Diagnostics of a device-path sequence (measured by the backend where
/// it selects) are the host path's: the same true masses, estimates and
/// tokens read in every step reply, a fork's included.
#[test]
fn device_diagnostics_are_the_host_paths() {
    let (mut host, mut dev) = (engine(96), device_engine(96));
    let policy = tactic(0.9, Some(4), Some(16));
    for e in [&mut host, &mut dev] {
        open(e, 1, policy.clone(), true);
        open(e, 3, policy.clone(), false);
        feed(e, 3, tokens(3, 25));
    }
    let mut t = both(&mut host, &mut dev, 1, tokens(1, 33));
    for step in 0..25 {
        if step == 10 {
            for e in [&mut host, &mut dev] {
                e.fork_sequence(key(1), key(2), None, None, Some(true))
                    .unwrap();
            }
        }
        let mut w = vec![entry(1, vec![t], true), entry(3, tokens(step, 1), true)];
        if step >= 10 {
            w.push(entry(2, tokens(50 + step, 1), true));
        }
        let (a, b) = (
            host.step(&work(w.clone())).unwrap(),
            dev.step(&work(w)).unwrap(),
        );
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "step {step}");
        let d = a[0].attention.as_ref().expect("diagnostics asked for");
        assert!(d.true_mass > 0.0 && d.tokens_read_fraction > 0.0, "{d:?}");
        assert!(a[1].attention.is_none(), "seq 3 asked for none");
        t = a[0].token.unwrap();
    }
}

/// A step of four Tactic sequences, one at its first decode (clustering:
/// its prompt never sampled), one past its limit (re-clustering), one
/// selecting on what it has, one whose prompt ends (clustering at its last
/// row), failed at each of its ops in turn: the states stay as they were
/// (the same bytes held, and the step run again gives what an engine that
/// never failed gives).
#[test]
fn a_failed_step_leaves_the_device_states_as_they_were() {
    let setup = || {
        let mut e = device_engine(64);
        for seq in 1..=4 {
            open(&mut e, seq, tactic(0.9, Some(4), Some(16)), false);
        }
        e.step(&work(vec![entry(1, tokens(1, 21), false)])).unwrap();
        for seq in 2..=3 {
            feed(&mut e, seq, tokens(seq, 20 + seq as usize));
        }
        feed(&mut e, 2, tokens(20, 1));
        feed(&mut e, 2, tokens(21, 16));
        feed(&mut e, 3, tokens(30, 1));
        let mut entries: Vec<_> = (1..=3).map(|s| entry(s, tokens(40 + s, 1), true)).collect();
        entries.push(entry(4, tokens(44, 19), true));
        (e, work(entries))
    };
    let (mut reference, w) = setup();
    let ops0 = reference.backend().ops();
    let want = reference.step(&w).unwrap();
    let ops = reference.backend().ops() - ops0;
    assert!(ops > 3, "the step has ops");
    for op in 1..=ops {
        let (mut e, w) = setup();
        let before = (snapshot(&e), e.backend().tactic_bytes());
        e.backend().arm(FaultPlan {
            at: Trigger::Op(op),
            fault: Fault::Error,
        });
        assert!(e.step(&w).is_err(), "op {op}");
        e.backend().disarm();
        assert_eq!(
            (snapshot(&e), e.backend().tactic_bytes()),
            before,
            "op {op}"
        );
        let got = e.step(&w).unwrap();
        assert_eq!(format!("{got:?}"), format!("{want:?}"), "op {op}");
    }
}

/// What `hello` lists and `open_sequence` accepts for each kind of
/// backend: the CUDA backend without `experimental_gpu_tactic` serves full
/// attention only; with it, Tactic and the baselines on its device; a
/// backend selecting on host views, every policy.
#[test]
fn each_backend_serves_what_it_selects() {
    use crate::engine::{policies, validate_policy};
    let plain_gpu = Serves::host(false);
    let gpu_tactic = Serves {
        host: false,
        device_tactic: true,
        device_baselines: true,
    };
    let host = Serves::host(true);
    let budget = AttentionPolicy::FixedBudget {
        tokens: 64,
        p: None,
    };
    let oracle = AttentionPolicy::OracleTopP { p: 0.9 };
    let t = tactic(0.9, None, None);
    assert_eq!(policies(plain_gpu), ["full"]);
    assert_eq!(policies(gpu_tactic).len(), 4);
    assert_eq!(policies(host).len(), 4);
    for p in [&t, &oracle, &budget] {
        let e = validate_policy(p, plain_gpu).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unsupported, "{p:?}");
        assert!(validate_policy(p, host).is_ok(), "{p:?}");
        assert!(validate_policy(p, gpu_tactic).is_ok(), "{p:?}");
    }
    // A backend keeping Tactic states without the baselines on its device
    // serves no host policy: a step selects in one place.
    let tactic_only = Serves {
        device_baselines: false,
        ..gpu_tactic
    };
    assert_eq!(policies(tactic_only), ["full", "tactic"]);
    for p in [&oracle, &budget] {
        let e = validate_policy(p, tactic_only).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unsupported, "{p:?}");
    }
    // Out-of-range parameters are bad requests wherever they would run.
    let bad = AttentionPolicy::OracleTopP { p: 1.5 };
    assert_eq!(
        validate_policy(&bad, gpu_tactic).unwrap_err().code,
        ErrorCode::BadRequest
    );
}
