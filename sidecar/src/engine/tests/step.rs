//! `Engine::step`: refusals change nothing; forks copy before they write;
//! a truncated sequence continues from where it was cut.

use super::*;
use tacflow_ipc::{ErrorCode, ErrorReply};

/// Runs a step that must fail with `code`, and checks it changed nothing.
fn refused(e: &mut TestEngine, w: &StepWork, code: ErrorCode) -> ErrorReply {
    let before = snapshot(e);
    let ops = e.backend().ops();
    let err = e.step(w).expect_err("the step is refused");
    assert_eq!(err.code, code, "{err:?}");
    assert_eq!(snapshot(e), before, "a refused step changed the engine");
    assert_eq!(e.backend().ops(), ops, "a refused step ran no op");
    err
}

#[test]
fn invalid_entries_are_refused_before_anything_runs() {
    let mut e = engine(16);
    open(&mut e, 1, AttentionPolicy::Full, false);
    open(&mut e, 2, AttentionPolicy::Full, false);
    feed(&mut e, 1, tokens(1, 5));
    let ok = || entry(1, tokens(9, 3), true);
    let cases = [
        (entry(3, tokens(1, 1), true), ErrorCode::UnknownSequence),
        (entry(1, tokens(1, 1), true), ErrorCode::BadRequest), // twice
        (entry(2, vec![], true), ErrorCode::BadRequest),
        (entry(2, vec![VOCAB as u32], true), ErrorCode::BadRequest),
        (entry(2, tokens(1, 4097), false), ErrorCode::ContextTooLong),
    ];
    for (bad, code) in cases {
        let err = refused(&mut e, &work(vec![ok(), bad]), code);
        assert!(err.message.starts_with("entry 1:"), "{}", err.message);
    }
    let mut bad = entry(2, tokens(1, 3), true);
    bad.positions = Some(vec![0, 1]);
    refused(&mut e, &work(vec![ok(), bad]), ErrorCode::ShapeMismatch);
    assert!(e.step(&work(vec![])).unwrap().is_empty());
}

#[test]
fn a_step_out_of_blocks_allocates_nothing() {
    let mut e = engine(4);
    open(&mut e, 1, AttentionPolicy::Full, false);
    open(&mut e, 2, AttentionPolicy::Full, false);
    feed(&mut e, 1, tokens(1, 40)); // 3 blocks
    // Seq 1 fits in its third block, seq 2 needs 2 more: 2 > 1 free.
    let w = work(vec![
        entry(1, tokens(2, 1), true),
        entry(2, tokens(3, 17), true),
    ]);
    let err = refused(&mut e, &w, ErrorCode::OutOfKvBlocks);
    assert_eq!(err.detail["needed"], 2u64.into());
    assert_eq!(err.detail["free"], 1u64.into());
    // One block fewer and it runs.
    let w = work(vec![
        entry(1, tokens(2, 1), true),
        entry(2, tokens(3, 16), true),
    ]);
    e.step(&w).unwrap();
    assert_eq!(e.kv_free_blocks(), 0);
}

#[test]
fn a_forks_first_write_copies_its_shared_block() {
    let mut e = engine(16);
    open(&mut e, 1, AttentionPolicy::Full, false);
    let prompt = tokens(1, 20);
    feed(&mut e, 1, prompt.clone());
    e.fork_sequence(key(1), key(2), None, None, None).unwrap();
    let parent = e.seqs[&key(1)].table.clone();
    let free = e.kv_free_blocks();
    // The child decodes first: it writes into a copy of the shared block.
    let (x, y) = (tokens(7, 1), tokens(8, 1));
    let child = feed(&mut e, 2, x.clone());
    let t = e.seqs[&key(2)].table.clone();
    assert_eq!(t[0], parent[0], "the full block stays shared");
    assert_ne!(t[1], parent[1], "the partial block was copied");
    assert_eq!(e.alloc.refcount(parent[0]), 2);
    assert_eq!(e.alloc.refcount(parent[1]), 1);
    assert_eq!(e.kv_free_blocks(), free - 1);
    assert_eq!(e.seqs[&key(1)].table, parent, "the parent keeps its blocks");
    // The parent, decoding a different token, sees its own cache intact:
    // as an engine that never forked sees it; and the child decoded as the
    // parent would have.
    let parent_y = feed(&mut e, 1, y.clone());
    let mut solo = engine(16);
    open(&mut solo, 1, AttentionPolicy::Full, false);
    feed(&mut solo, 1, prompt.clone());
    assert_eq!(parent_y, feed(&mut solo, 1, y));
    let mut solo = engine(16);
    open(&mut solo, 1, AttentionPolicy::Full, false);
    feed(&mut solo, 1, prompt);
    let mut want = feed(&mut solo, 1, x);
    want.seq_id = 2;
    assert_eq!(child, want);
}

#[test]
fn a_truncated_sequence_continues_from_the_cut() {
    let mut e = engine(16);
    let prompt = tokens(1, 37);
    open(&mut e, 1, AttentionPolicy::Full, false);
    feed(&mut e, 1, prompt.clone());
    let free = e.kv_free_blocks();
    assert_eq!(e.truncate_sequence(key(1), 17).unwrap(), 20);
    assert_eq!(e.seqs[&key(1)].table.len(), 2);
    assert_eq!(e.kv_free_blocks(), free + 1);
    let next = tokens(5, 3);
    let got = feed(&mut e, 1, next.clone());
    assert_eq!(got.num_tokens, 23);
    assert!(got.token.is_some());
    // The same as a sequence that only ever held the first 20 tokens.
    let mut solo = engine(16);
    open(&mut solo, 1, AttentionPolicy::Full, false);
    feed(&mut solo, 1, prompt[..20].to_vec());
    let want = feed(&mut solo, 1, next);
    assert_eq!(got.token, want.token);
    for ((t, a), (u, b)) in got.top_logprobs.iter().zip(&want.top_logprobs) {
        assert_eq!(t, u);
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn truncation_forgets_the_policy_state() {
    let mut e = engine(16);
    let tactic = AttentionPolicy::Tactic {
        p: 0.9,
        cluster_size: Some(4),
        recluster_limit: None,
    };
    open(&mut e, 1, tactic.clone(), false);
    open(&mut e, 2, tactic, false);
    let fresh = state_of(&e.seqs[&key(2)].state);
    feed(&mut e, 1, tokens(1, 30));
    feed(&mut e, 1, tokens(2, 1));
    assert_ne!(state_of(&e.seqs[&key(1)].state), fresh, "clustered");
    e.truncate_sequence(key(1), 0).unwrap();
    assert_ne!(state_of(&e.seqs[&key(1)].state), fresh, "nothing dropped");
    e.truncate_sequence(key(1), 5).unwrap();
    assert_eq!(state_of(&e.seqs[&key(1)].state), fresh);
}
