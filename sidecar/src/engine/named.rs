//! Client-named KV blocks. A session reserves blocks (`reserve_blocks`);
//! the daemon takes them from its allocator and keeps them until the session
//! ends. A named-block sequence's steps name its whole table by reservation
//! ids (`0..reserved`), which the daemon maps to its physical blocks: the
//! client (vLLM's block manager) decides what is shared between sequences,
//! the daemon checks every id and writes nothing but the slots of each
//! entry's new tokens. Two entries of one step may not write one slot, nor
//! may an entry write a slot another entry of the step reads (the result
//! would depend on the order the backend runs them in).

use super::kv_cache::{AppendPlan, blocks_for};
use super::{BLOCK_SIZE, Engine, SeqKey, SessionId};
use crate::backend::Backend;
use std::collections::HashMap;
use tacflow_ipc::{BlockMode, ErrorCode, ErrorReply, SequenceStateReply, StepEntry};

/// A named entry's plan (no fresh block, no copy) and the ids it named.
pub type NamedPlan = (AppendPlan, Vec<u32>);

fn entry_error(code: ErrorCode, i: usize, msg: String) -> ErrorReply {
    ErrorReply::new(code, format!("entry {i}: {msg}")).with("entry", i)
}

impl<B: Backend> Engine<B> {
    /// Grows the session's reservation by `count` blocks; returns its size.
    /// Refused `out_of_kv_blocks` with the figures when fewer are free.
    pub fn reserve_blocks(&mut self, session: SessionId, count: u64) -> Result<u64, ErrorReply> {
        let free = self.alloc.free_count();
        let got = usize::try_from(count)
            .ok()
            .and_then(|n| self.alloc.alloc(n))
            .ok_or_else(|| {
                ErrorReply::new(
                    ErrorCode::OutOfKvBlocks,
                    format!("cannot reserve {count} KV blocks, {free} are free"),
                )
                .with("needed", count)
                .with("free", free)
            })?;
        let r = self.reservations.entry(session).or_default();
        r.extend(got);
        let size = r.len() as u64;
        self.publish();
        Ok(size)
    }

    /// The session's reservation size.
    pub fn reserved_blocks(&self, session: SessionId) -> usize {
        self.reservations.get(&session).map_or(0, Vec::len)
    }

    /// What the daemon holds for a sequence.
    pub fn sequence_state(
        &self,
        key: SeqKey,
        request_id: u64,
    ) -> Result<SequenceStateReply, ErrorReply> {
        let s = self.seqs.get(&key).ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::UnknownSequence,
                format!("sequence {} is not open", key.seq),
            )
            .with("seq_id", key.seq)
        })?;
        Ok(SequenceStateReply {
            request_id,
            seq_id: key.seq,
            num_tokens: s.len as u64,
            prompt_len: s.prompt_len.map(|p| p as u64),
            mode: s.mode,
            attention: s.policy.clone(),
            sampling: s.sampling.clone(),
            diagnostics: s.diagnostics,
            num_blocks: s.table.len() as u64,
            block_ids: s.names.clone(),
        })
    }

    /// Per entry, for named-block sequences, the plan of the table the
    /// entry names (no block is allocated) and the ids themselves. Checks
    /// that daemon-mode entries name no blocks, that named ones name enough,
    /// every id inside the reservation, and the writes of the step.
    pub(super) fn plan_named(
        &self,
        session: SessionId,
        entries: &[StepEntry],
        keys: &[SeqKey],
    ) -> Result<Vec<Option<NamedPlan>>, ErrorReply> {
        let empty = vec![];
        let reserved = self.reservations.get(&session).unwrap_or(&empty);
        let mut out = Vec::with_capacity(entries.len());
        for (i, (e, k)) in entries.iter().zip(keys).enumerate() {
            let s = &self.seqs[k];
            let named = match (s.mode, &e.blocks) {
                (BlockMode::Daemon, None) => None,
                (BlockMode::Daemon, Some(_)) => {
                    return Err(entry_error(
                        ErrorCode::BadRequest,
                        i,
                        format!("sequence {} manages its own blocks: name none", e.seq_id),
                    ));
                }
                (BlockMode::Named, None) => {
                    return Err(entry_error(
                        ErrorCode::BadRequest,
                        i,
                        format!("sequence {} uses named blocks: name its table", e.seq_id),
                    ));
                }
                (BlockMode::Named, Some(ids)) => {
                    let need = blocks_for(s.len + e.tokens.len(), BLOCK_SIZE);
                    Some(map_table(i, ids, need, reserved)?)
                }
            };
            out.push(named);
        }
        check_writes(entries, keys, &out, |k| self.seqs[k].len)?;
        Ok(out)
    }
}

/// The physical table behind the first `need` ids of `ids`.
fn map_table(
    i: usize,
    ids: &[u32],
    need: usize,
    reserved: &[u32],
) -> Result<NamedPlan, ErrorReply> {
    if ids.len() < need {
        return Err(entry_error(
            ErrorCode::BadRequest,
            i,
            format!("{} blocks named, the sequence needs {need}", ids.len()),
        )
        .with("needed", need));
    }
    // Every id is checked, the ignored tail too: a foreign id is an error
    // wherever it stands.
    if let Some(&b) = ids.iter().find(|&&b| b as usize >= reserved.len()) {
        return Err(entry_error(
            ErrorCode::UnknownBlock,
            i,
            format!(
                "block {b} is outside the session's reservation of {}",
                reserved.len()
            ),
        )
        .with("block", b)
        .with("reserved", reserved.len()));
    }
    let names = ids[..need].to_vec();
    let table = names.iter().map(|&b| reserved[b as usize]).collect();
    let plan = AppendPlan {
        table,
        fresh: vec![],
        cow: None,
    };
    Ok((plan, names))
}

/// Refuses a step in which two named entries write one slot, or one writes
/// a slot that another reads (daemon-mode entries write only blocks they own
/// alone, which no reservation holds).
fn check_writes(
    entries: &[StepEntry],
    keys: &[SeqKey],
    named: &[Option<NamedPlan>],
    len_of: impl Fn(&SeqKey) -> usize,
) -> Result<(), ErrorReply> {
    let bs = BLOCK_SIZE;
    // Physical block → (entry, first written offset, last written offset).
    let mut written: HashMap<u32, Vec<(usize, usize, usize)>> = HashMap::new();
    for (i, (e, k)) in entries.iter().zip(keys).enumerate() {
        let Some((p, _)) = &named[i] else { continue };
        let (from, to) = (len_of(k), len_of(k) + e.tokens.len());
        for b in from / bs..to.div_ceil(bs) {
            let lo = from.max(b * bs) - b * bs;
            let hi = to.min((b + 1) * bs) - b * bs - 1;
            let w = written.entry(p.table[b]).or_default();
            if let Some(&(j, ..)) = w.iter().find(|&&(_, l, h)| l <= hi && lo <= h) {
                return Err(entry_error(
                    ErrorCode::BadRequest,
                    i,
                    format!("writes a KV slot that entry {j} writes in the same step"),
                ));
            }
            w.push((i, lo, hi));
        }
    }
    for (i, (e, k)) in entries.iter().zip(keys).enumerate() {
        let Some((p, _)) = &named[i] else { continue };
        // The entry reads every slot below its new length (its own new
        // tokens included, which it writes itself).
        let ctx = len_of(k) + e.tokens.len();
        for (b, phys) in p.table.iter().enumerate() {
            let read_hi = ctx.min((b + 1) * bs) - b * bs - 1;
            let other = written
                .get(phys)
                .and_then(|w| w.iter().find(|&&(j, l, _)| j != i && l <= read_hi));
            if let Some(&(j, ..)) = other {
                return Err(entry_error(
                    ErrorCode::BadRequest,
                    i,
                    format!("reads a KV slot that entry {j} writes in the same step"),
                ));
            }
        }
    }
    Ok(())
}
