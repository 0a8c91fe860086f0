//! Tests of the schedule logic: building, validating, issuing, tracing and
//! searching schedules over seeded random steps.

mod build;
mod deps;
mod search;
mod tuned;

use super::program::Program;
use crate::backend::{SeqMeta, StepMeta};

/// A two-layer program, small enough for many seeds.
pub(crate) fn program(qkv_bias: bool) -> Program {
    Program {
        layers: 2,
        qkv_bias,
        fusions: Default::default(),
    }
}

/// A step of the given sequences' query lengths, the last row of each a
/// logit row.
pub(crate) fn step(q_lens: &[usize]) -> StepMeta {
    let mut meta = StepMeta::default();
    for &q_len in q_lens {
        let q_start = meta.tokens.len();
        meta.seqs.push(SeqMeta {
            q_start,
            q_len,
            ctx_len: q_len + 3,
            block_table: vec![],
        });
        meta.tokens.extend((0..q_len).map(|_| 1));
        meta.logit_rows.push((q_start + q_len - 1) as u32);
    }
    meta.positions = vec![0; meta.tokens.len()];
    meta.slots = (0..meta.tokens.len() as u32).collect();
    meta
}
