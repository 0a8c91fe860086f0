//! Client-named blocks: a named sequence computes what a daemon-managed one
//! does, a prefix-cache hit reads the blocks another sequence wrote, every
//! foreign id or overlapping write is refused without a change, and a step
//! failed at any backend op writes no slot but its new tokens' (so no block
//! that another sequence reads).

use super::*;
use crate::backend::faults::{Fault, FaultPlan, Trigger};
use crate::engine::{BLOCK_SIZE, SeqOptions};
use std::collections::BTreeSet;
use tacflow_ipc::{BlockMode, ErrorCode};

fn open_named(e: &mut TestEngine, seq: u64, prefix: Vec<u32>) {
    let opts = SeqOptions {
        sampling: SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            seed: Some(1000 + seq),
            logprobs: 3,
            ..SamplingParams::default()
        },
        mode: BlockMode::Named,
        prefix,
        ..SeqOptions::default()
    };
    e.open_with(key(seq), opts).unwrap();
}

fn named(seq: u64, toks: Vec<u32>, blocks: Vec<u32>) -> StepEntry {
    StepEntry {
        blocks: Some(blocks),
        ..entry(seq, toks, true)
    }
}

/// Every physical slot's K and V rows over all layers and heads.
fn all_slots(e: &TestEngine) -> Vec<Vec<f32>> {
    let l = e.kv.layout;
    let (bs, hd, heads) = (l.block_size, l.head_dim, l.num_kv_heads);
    (0..l.num_blocks * bs)
        .map(|slot| {
            let (b, s) = (slot / bs, slot % bs);
            let mut row = vec![];
            for layer in e.kv.k.iter().chain(&e.kv.v) {
                for h in 0..heads {
                    let at = ((b * heads + h) * bs + s) * hd;
                    row.extend_from_slice(&layer[at..at + hd]);
                }
            }
            row
        })
        .collect()
}

/// The physical slots every open sequence reads (its tokens).
fn read_slots(e: &TestEngine) -> BTreeSet<usize> {
    e.seqs
        .values()
        .flat_map(|s| {
            (0..s.len.min(s.table.len() * BLOCK_SIZE))
                .map(|p| s.table[p / BLOCK_SIZE] as usize * BLOCK_SIZE + p % BLOCK_SIZE)
        })
        .collect()
}

#[test]
fn a_named_sequence_computes_what_a_daemon_managed_one_does() {
    let mut a = engine(32);
    open(&mut a, 1, AttentionPolicy::Full, false);
    let want: Vec<_> = [tokens(1, 21), tokens(2, 1), tokens(3, 12)]
        .into_iter()
        .map(|t| feed(&mut a, 1, t))
        .collect();
    let mut b = engine(32);
    assert_eq!(b.reserve_blocks(SESSION, 6).unwrap(), 6);
    open_named(&mut b, 1, vec![]);
    // Scattered ids, and a table longer than needed (its tail is ignored).
    let ids = vec![5, 0, 3, 4];
    let mut got = vec![];
    for t in [tokens(1, 21), tokens(2, 1), tokens(3, 12)] {
        let w = work(vec![named(1, t, ids.clone())]);
        got.push(b.step(&w).unwrap().remove(0));
    }
    assert_eq!(format!("{got:?}"), format!("{want:?}"));
    let st = b.sequence_state(key(1), 7).unwrap();
    assert_eq!((st.num_tokens, st.num_blocks), (34, 3));
    assert_eq!(st.block_ids, vec![5, 0, 3]);
    assert_eq!(b.kv_free_blocks(), 32 - 6, "named steps allocate nothing");
}

#[test]
fn a_prefix_cache_hit_reads_the_blocks_another_sequence_wrote() {
    let prompt = tokens(9, 32);
    let next = tokens(10, 3);
    // Sequence 2 of either engine: the same seed.
    let mut a = engine(32);
    open(&mut a, 2, AttentionPolicy::Full, false);
    feed(&mut a, 2, prompt.clone());
    let want = feed(&mut a, 2, next.clone());
    let mut b = engine(32);
    b.reserve_blocks(SESSION, 8).unwrap();
    open_named(&mut b, 1, vec![]);
    b.step(&work(vec![named(1, prompt.clone(), vec![2, 6])]))
        .unwrap();
    // Sequence 2 starts with the 32 cached tokens of blocks 2 and 6.
    open_named(&mut b, 2, prompt);
    let got = b
        .step(&work(vec![named(2, next, vec![2, 6, 1])]))
        .unwrap()
        .remove(0);
    assert_eq!(got.top_logprobs, want.top_logprobs);
    assert_eq!(got.token, want.token);
    assert_eq!(got.num_tokens, 35);
}

#[test]
fn foreign_ids_and_overlapping_writes_are_refused_and_change_nothing() {
    let mut e = engine(32);
    e.reserve_blocks(SESSION, 4).unwrap();
    open_named(&mut e, 1, vec![]);
    open_named(&mut e, 2, vec![]);
    open(&mut e, 3, AttentionPolicy::Full, false);
    e.step(&work(vec![named(1, tokens(1, 20), vec![0, 1])]))
        .unwrap();
    let before = snapshot(&e);
    let kv = all_slots(&e);
    let cases: Vec<(StepWork, ErrorCode)> = vec![
        // Id 4 is outside a reservation of 4, even in the ignored tail.
        (
            work(vec![named(1, tokens(2, 1), vec![0, 4])]),
            ErrorCode::UnknownBlock,
        ),
        (
            work(vec![named(1, tokens(2, 1), vec![0, 1, 9])]),
            ErrorCode::UnknownBlock,
        ),
        // Too few blocks for 21 tokens.
        (
            work(vec![named(1, tokens(2, 1), vec![0])]),
            ErrorCode::BadRequest,
        ),
        // A daemon-managed sequence names none; a named one must.
        (
            work(vec![named(3, tokens(2, 1), vec![0])]),
            ErrorCode::BadRequest,
        ),
        (
            work(vec![entry(1, tokens(2, 1), true)]),
            ErrorCode::BadRequest,
        ),
        // Sequence 2 would write slot 20 that sequence 1 writes too.
        (
            work(vec![
                named(1, tokens(2, 1), vec![0, 1]),
                named(2, tokens(3, 21), vec![2, 1]),
            ]),
            ErrorCode::BadRequest,
        ),
        // Sequence 2 would write block 1's first slots, which 1 reads.
        (
            work(vec![
                named(1, tokens(2, 1), vec![0, 1]),
                named(2, tokens(3, 17), vec![3, 1]),
            ]),
            ErrorCode::BadRequest,
        ),
    ];
    for (i, (w, code)) in cases.iter().enumerate() {
        let err = e.step(w).expect_err("refused");
        assert_eq!(err.code, *code, "case {i}: {err:?}");
        assert_eq!(snapshot(&e), before, "case {i}");
        assert!(all_slots(&e) == kv, "case {i}: the KV cache changed");
    }
    // Another session's reservation is not this one's.
    let mut w = work(vec![named(1, tokens(2, 1), vec![0, 1])]);
    w.session = SESSION + 1;
    assert_eq!(e.step(&w).unwrap_err().code, ErrorCode::UnknownSequence);
}

#[test]
fn a_reservation_is_refused_with_the_figures_and_freed_with_its_session() {
    let mut e = engine(10);
    e.reserve_blocks(SESSION, 6).unwrap();
    let err = e.reserve_blocks(SESSION, 5).unwrap_err();
    assert_eq!(err.code, ErrorCode::OutOfKvBlocks);
    let d = format!("{:?}", err.detail);
    assert!(d.contains("needed") && d.contains("free"), "{d}");
    assert_eq!(e.reserve_blocks(SESSION, 4).unwrap(), 10, "ids grow");
    assert_eq!(e.kv_free_blocks(), 0);
    e.drop_session(SESSION);
    assert_eq!(e.kv_free_blocks(), 10);
}

/// A step mixing named sequences that share a block (a prefix-cache hit)
/// with a daemon-managed one: 1 decodes into its partial block, 2 (prefix
/// of 1's first block) prefills a chunk into its own block, 3 decodes.
fn named_scenario() -> (TestEngine, StepWork, BTreeSet<usize>) {
    let mut e = engine(24);
    e.reserve_blocks(SESSION, 6).unwrap();
    open_named(&mut e, 1, vec![]);
    let prompt = tokens(1, 20);
    e.step(&work(vec![named(1, prompt.clone(), vec![4, 1])]))
        .unwrap();
    open_named(&mut e, 2, prompt[..16].to_vec());
    open(&mut e, 3, AttentionPolicy::Full, false);
    feed(&mut e, 3, tokens(3, 9));
    let w = work(vec![
        named(1, tokens(11, 1), vec![4, 1]),
        named(2, tokens(12, 5), vec![4, 0]),
        entry(3, tokens(13, 1), true),
    ]);
    let r = &e.reservations[&SESSION];
    let bs = BLOCK_SIZE;
    let mut writes: BTreeSet<usize> = BTreeSet::from([r[1] as usize * bs + 4]);
    writes.extend((0..5).map(|s| r[0] as usize * bs + s));
    let s3 = &e.seqs[&key(3)];
    writes.insert(s3.table[0] as usize * bs + 9);
    (e, w, writes)
}

#[test]
fn a_named_step_failed_at_any_op_writes_only_its_new_slots() {
    let (mut reference, w, _) = named_scenario();
    let ops0 = reference.backend().ops();
    let want = reference.step(&w).unwrap();
    let total = reference.backend().ops() - ops0;
    assert!(total > 20, "the step ran {total} ops");
    for n in 1..=total {
        let (mut e, w, writes) = named_scenario();
        let before = snapshot(&e);
        let kv = all_slots(&e);
        let read = read_slots(&e);
        assert!(
            read.is_disjoint(&writes),
            "the scenario writes no read slot"
        );
        e.backend().arm(FaultPlan {
            fault: Fault::Error,
            at: Trigger::Op(n),
        });
        let err = e.step(&w).expect_err("the armed op fails the step");
        assert_eq!(err.code, ErrorCode::Internal, "op {n}");
        assert_eq!(snapshot(&e), before, "op {n} of {total}");
        let after = all_slots(&e);
        for (slot, (a, b)) in after.iter().zip(&kv).enumerate() {
            if a != b {
                assert!(writes.contains(&slot), "op {n}: slot {slot} was written");
            }
        }
        for &slot in &read {
            assert!(after[slot] == kv[slot], "op {n}: read slot {slot} changed");
        }
        e.backend().disarm();
        let again = e.step(&w).unwrap();
        assert_eq!(
            format!("{again:?}"),
            format!("{want:?}"),
            "rerun after op {n}"
        );
    }
}
