//! The state manager on host memory posing as a device.

use super::*;
use crate::backend::tactic::mem::HostMemory;
use tacflow_kernels::rng;
use tacflow_kernels::tactic::{HeadDiag, TacticSeq};

const H: usize = 3;
const D: usize = 16;

fn states() -> (TacticStates<HostMemory>, HostMemory) {
    (TacticStates::new(H, D), HostMemory::new())
}

fn params(limit: usize) -> TacticParams {
    let mut p = TacticParams::new(0.9);
    p.recluster_limit = limit;
    p
}

/// Writes a recognisable pattern over a state's bytes (what the kernels
/// would have written), so that copies can be followed.
fn stamp(s: &mut TacticStates<HostMemory>, id: StateId, layer: usize, tag: u8) {
    let seq = s.seqs.get_mut(&id).unwrap();
    let st = Arc::get_mut(seq.layers[layer].as_mut().unwrap()).unwrap();
    for (i, b) in st.buf.data.iter_mut().enumerate() {
        *b = tag ^ (i as u8);
    }
}

#[test]
fn the_first_decode_step_clusters_everything_before_its_token() {
    let (mut s, m) = states();
    s.open(1, params(2048), 2).unwrap();
    let p = s.prepare(&m, 1, 0, 100, false).unwrap();
    assert_eq!(
        p.run,
        Some(ClusterRun {
            start: 0,
            n: 99,
            k: 7
        })
    );
    assert_eq!((p.layout.len, p.layout.cap), (99, 7));
    assert_eq!(s.live_bytes(), p.layout.bytes as usize);
    // A fresh state starts zeroed: no clusters, no shape, trace 0.
    let st = s.layer(1, 0).unwrap();
    assert!(st.buf.data.iter().all(|&b| b == 0));
    // The other layer is untouched; the next step selects on the same state.
    assert!(s.layer(1, 1).is_none());
    s.commit();
    let again = s.prepare(&m, 1, 0, 101, false).unwrap();
    assert_eq!((again.addr, again.run), (p.addr, None));
}

#[test]
fn the_prompt_end_builds_what_the_first_decode_step_would() {
    let (mut s, m) = states();
    s.open(1, params(2048), 1).unwrap();
    s.open(2, params(2048), 1).unwrap();
    // A prompt of 99 tokens: its last chunk's last row has 99 cached, its
    // own included; the first decode step then has 100.
    let end = s.prepare(&m, 1, 0, 99, true).unwrap();
    let first = s.prepare(&m, 2, 0, 100, false).unwrap();
    assert_eq!(end.run, first.run);
    assert_eq!(end.layout, first.layout);
    s.commit();
    // The first decode step only selects, on the state the prompt built.
    let next = s.prepare(&m, 1, 0, 100, false).unwrap();
    assert_eq!((next.addr, next.run), (end.addr, None));
    // A prompt end on a state already built (a fork of a decoding
    // parent) leaves it as it is, however long its tail.
    s.commit();
    s.fork(1, 3).unwrap();
    let again = s.prepare(&m, 3, 0, 5000, true).unwrap();
    assert_eq!((again.addr, again.run), (end.addr, None));
    // One that covers more than the cache is refused.
    assert!(s.prepare(&m, 3, 0, 98, true).is_err());
}

#[test]
fn a_one_token_context_has_nothing_to_cluster() {
    let (mut s, m) = states();
    s.open(1, params(16), 1).unwrap();
    let p = s.prepare(&m, 1, 0, 1, false).unwrap();
    assert_eq!((p.run, p.layout.len, p.layout.cap), (None, 0, 0));
    s.commit();
    // The tail grows until it passes the limit, then is clustered from 0.
    assert_eq!(s.prepare(&m, 1, 0, 16, false).unwrap().run, None);
    let r = s.prepare(&m, 1, 0, 17, false).unwrap().run.unwrap();
    assert_eq!((r.start, r.n, r.k), (0, 16, 1));
}

#[test]
fn reclustering_appends_the_tail_and_keeps_the_old_clusters() {
    let (mut s, m) = states();
    s.open(1, params(16), 1).unwrap();
    let first = s.prepare(&m, 1, 0, 100, false).unwrap();
    s.commit();
    stamp(&mut s, 1, 0, 0x3c);
    let old_bytes = s.layer(1, 0).unwrap().buf.data.clone();
    // 99 clustered: at 116 the tail (99..116) is 17 > 16 long.
    assert_eq!(s.prepare(&m, 1, 0, 115, false).unwrap().run, None);
    let p = s.prepare(&m, 1, 0, 116, false).unwrap();
    assert_eq!(
        p.run,
        Some(ClusterRun {
            start: 99,
            n: 16,
            k: 1
        })
    );
    assert_eq!((p.layout.len, p.layout.cap), (115, 8));
    assert_ne!(p.addr, first.addr);
    let new = &s.layer(1, 0).unwrap().buf.data;
    for (from, to, n) in first.layout.copies_into(&p.layout) {
        let (f, t, n) = (from as usize, to as usize, n as usize);
        assert_eq!(new[t..t + n], old_bytes[f..f + n]);
    }
    // Head 1's members keep their positions in its (longer) row.
    let (om, nm) = (first.layout.members as usize, p.layout.members as usize);
    assert_eq!(
        new[nm + 4 * 115..nm + 4 * 115 + 4 * 99],
        old_bytes[om + 4 * 99..om + 4 * 198]
    );
    s.commit();
    assert_eq!(s.live_bytes(), p.layout.bytes as usize, "old state freed");
}

#[test]
fn a_fork_shares_until_one_side_grows() {
    let (mut s, m) = states();
    s.open(1, params(16), 2).unwrap();
    s.prepare(&m, 1, 0, 50, false).unwrap();
    s.prepare(&m, 1, 1, 50, false).unwrap();
    s.commit();
    let one = s.live_bytes();
    s.fork(1, 2).unwrap();
    assert_eq!(s.live_bytes(), one, "nothing copied");
    assert_eq!(
        s.prepare(&m, 2, 0, 51, false).unwrap().addr,
        s.prepare(&m, 1, 0, 51, false).unwrap().addr
    );
    s.commit();
    // The child re-clusters layer 0: it gets its own; the parent's is intact.
    stamp_shared_check(&mut s);
    let parent = s.layer(1, 0).unwrap().layout;
    let grown = s.prepare(&m, 2, 0, 70, false).unwrap();
    s.commit();
    assert!(grown.run.is_some());
    assert_eq!(s.layer(1, 0).unwrap().layout, parent);
    assert_eq!(s.live_bytes(), one + grown.layout.bytes as usize);
    // Closing the parent frees only what the child does not hold.
    s.close(1);
    let child_only = s.layer(2, 0).unwrap().layout.bytes + s.layer(2, 1).unwrap().layout.bytes;
    assert_eq!(s.live_bytes(), child_only as usize);
    s.close(2);
    assert_eq!(s.live_bytes(), 0);
    assert_eq!(m.live_bytes(), 0, "every allocation dropped");
}

/// A shared state cannot be written through either sequence.
fn stamp_shared_check(s: &mut TacticStates<HostMemory>) {
    let seq = s.seqs.get_mut(&2).unwrap();
    assert!(Arc::get_mut(seq.layers[0].as_mut().unwrap()).is_none());
}

#[test]
fn truncation_forgets_and_the_next_step_rebuilds() {
    let (mut s, m) = states();
    s.open(1, params(2048), 1).unwrap();
    s.prepare(&m, 1, 0, 300, false).unwrap();
    s.commit();
    s.reset(1);
    assert!(s.layer(1, 0).is_none());
    assert_eq!(m.live_bytes(), 0);
    let p = s.prepare(&m, 1, 0, 120, false).unwrap();
    assert_eq!(p.run.unwrap().n, 119);
}

#[test]
fn a_failed_step_leaves_every_state_as_it_was() {
    let (mut s, m) = states();
    s.open(1, params(16), 3).unwrap();
    s.open(2, params(16), 3).unwrap();
    for l in 0..3 {
        s.prepare(&m, 1, l, 40, false).unwrap();
    }
    s.commit();
    let before: Vec<u64> = (0..3)
        .map(|l| m.addr(&s.layer(1, l).unwrap().buf))
        .collect();
    let bytes = s.live_bytes();
    // A step grows seq 1's layer 0 and builds seq 2's layer 0, then fails.
    s.prepare(&m, 1, 0, 60, false).unwrap();
    s.prepare(&m, 2, 0, 60, false).unwrap();
    s.rollback();
    let after: Vec<u64> = (0..3)
        .map(|l| m.addr(&s.layer(1, l).unwrap().buf))
        .collect();
    assert_eq!(before, after);
    assert!(s.layer(2, 0).is_none());
    assert_eq!(s.live_bytes(), bytes);
    assert_eq!(m.live_bytes(), bytes);
    // An allocation that fails changes nothing either.
    m.fail_after(0);
    assert!(s.prepare(&m, 1, 1, 60, false).is_err());
    assert_eq!(m.addr(&s.layer(1, 1).unwrap().buf), before[1]);
    s.rollback();
    assert_eq!(s.live_bytes(), bytes);
    // Forks and closes wait for the step's end.
    s.prepare(&m, 2, 1, 10, false).unwrap();
    assert!(s.fork(2, 3).is_err());
    s.commit();
    s.fork(2, 3).unwrap();
}

#[test]
fn the_device_runs_only_the_default_estimator() {
    let (mut s, m) = states();
    let mut p = params(2048);
    p.token_level = true;
    assert!(s.open(1, p, 1).is_err());
    let mut p = params(2048);
    p.kmeans.cluster_size = 24;
    s.open(1, p, 1).unwrap();
    assert!(s.open(1, p, 1).is_err(), "ids are unique");
    assert_eq!(s.prepare(&m, 1, 0, 49, false).unwrap().run.unwrap().k, 2);
}

/// The growth rule is `TacticSeq`'s: over a decode of 400 tokens from a
/// context of 30 with a limit of 40, the device state covers the same slots
/// as the CPU reference's clustering at every step, and has room for every
/// cluster the reference keeps.
#[test]
fn states_grow_as_the_cpu_reference_does() {
    let (n, first, limit) = (430usize, 30usize, 40usize);
    let keys: Vec<f32> = (0..n * D)
        .map(|i| rng::random_weight(5, 1, i as u64, 0.0, 1.0))
        .collect();
    let prm = params(limit);
    let mut cpu = TacticSeq::new(prm, 1);
    let mut s = TacticStates::new(1, D);
    let m = HostMemory::new();
    s.open(7, prm, 1).unwrap();
    let q = vec![0.5f32; 3 * D];
    let (mut out, mut diag) = (vec![Vec::new()], vec![HeadDiag::default()]);
    // The CPU reads keys from a paged cache: one block per 16 slots, in order.
    let v = vec![0.0f32; n * D];
    let table: Vec<u32> = (0..n.div_ceil(16) as u32).collect();
    let mut k = keys;
    k.resize(n.div_ceil(16) * 16 * D, 0.0);
    let mut vv = v;
    vv.resize(k.len(), 0.0);
    for ctx in first..=n {
        let step = tacflow_kernels::tactic::DecodeStep {
            q: &q,
            kv: tacflow_kernels::cpu::KvLayer {
                k: &k,
                v: &vv,
                kv_heads: 1,
                head_dim: D,
                block_size: 16,
            },
            block_table: &table,
            ctx_len: ctx,
        };
        cpu.select_layer(0, &step, &mut out, &mut diag);
        let p = s.prepare(&m, 7, 0, ctx, false).unwrap();
        s.commit();
        let idx = &cpu.index[0][0];
        assert_eq!(p.layout.len as usize, idx.len, "ctx {ctx}");
        assert!(p.layout.cap as usize >= idx.clusters(), "ctx {ctx}");
    }
    // It did re-cluster along the way.
    assert!(cpu.index[0][0].len > first);
}
