//! Attention offload (`PROTOCOL.md` §4.7): attention-only sequences whose
//! KV cache and attention policy live in the daemon while the client runs
//! the rest of the model (a transformers model through
//! `tacflow.hf`, a serving stack).
//!
//! | piece | file |
//! | --- | --- |
//! | the pool: one growing arena per cache shape, one byte budget | [`pool`] |
//! | one `attention_step`: check, read, append, select, attend, write, commit | [`step`] |
//!
//! It runs on the executor thread beside the engine (or without one: a
//! daemon started with `--attention-only` loads no model) and computes on
//! the CPU kernels, whatever backend runs the model: its inputs and outputs
//! are host regions.

pub mod pool;
pub mod step;
#[cfg(test)]
mod tests;

use crate::engine::SeqKey;
use crate::engine::gauges::Gauges;
use crate::engine::sparse::PolicyState;
use pool::{ArenaKey, Pool, arena_key};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tacflow_ipc::{
    AttentionLayout, AttentionPolicy, AttentionPoolInfo, ErrorCode, ErrorReply, PolicyStats,
};

/// One attention-only sequence.
#[derive(Debug)]
pub struct OffSeq {
    pub layout: AttentionLayout,
    pub arena: ArenaKey,
    pub policy: AttentionPolicy,
    pub state: PolicyState,
    pub diagnostics: bool,
    /// Blocks covering the longest layer.
    pub table: Vec<u32>,
    /// Cached rows per layer: layers are appended one request at a time.
    pub lens: Vec<usize>,
}

/// Per policy, what the decode queries of sequences with diagnostics read
/// and kept (every layer and head counted alike).
#[derive(Debug, Default, Clone)]
struct Totals {
    queries: u64,
    read: f64,
    mass: f64,
    successes: f64,
    heads: f64,
}

pub struct Offload {
    pool: Pool,
    seqs: HashMap<SeqKey, OffSeq>,
    max_context: usize,
    steps_by_layer: Vec<u64>,
    totals: BTreeMap<String, Totals>,
    /// Whether sparse policies may be chosen (the same list `hello` gives).
    sparse: bool,
    gauges: Arc<Gauges>,
}

fn refuse(what: &str) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Unsupported,
        format!(
            "{what}: the daemon cannot honour it exactly and does not approximate attention; \
             run this model with its own attention"
        ),
    )
}

/// Checks a declared layout: shapes the kernels take, a finite scale, and
/// no feature the daemon cannot honour.
pub fn check_layout(l: &AttentionLayout) -> Result<(), ErrorReply> {
    let bad = |m: String| Err(ErrorReply::bad_request(format!("layout: {m}")));
    if l.num_layers == 0 || l.num_layers > 1024 {
        return bad(format!("num_layers {} is not in 1..=1024", l.num_layers));
    }
    if l.num_kv_heads == 0 || l.num_heads == 0 || !l.num_heads.is_multiple_of(l.num_kv_heads) {
        return bad(format!(
            "num_heads {} must be a positive multiple of num_kv_heads {}",
            l.num_heads, l.num_kv_heads
        ));
    }
    if l.num_heads > 1024 || l.head_dim == 0 || l.head_dim > 1024 {
        return bad("num_heads and head_dim must be in 1..=1024".into());
    }
    if !(l.scale.is_finite() && l.scale > 0.0) {
        return bad(format!("scale {} is not a positive number", l.scale));
    }
    if let Some(c) = l.softcap {
        return Err(refuse(&format!("logit softcapping ({c})")));
    }
    if let Some(w) = l.sliding_window {
        return Err(refuse(&format!("a sliding window of {w} tokens")));
    }
    if l.sinks {
        return Err(refuse("attention sinks"));
    }
    Ok(())
}

impl Offload {
    pub fn new(budget_bytes: u64, max_context: usize, sparse: bool, gauges: Arc<Gauges>) -> Self {
        let o = Offload {
            pool: Pool::new(budget_bytes),
            seqs: HashMap::new(),
            max_context,
            steps_by_layer: Vec::new(),
            totals: BTreeMap::new(),
            sparse,
            gauges,
        };
        o.publish();
        o
    }

    pub fn contains(&self, key: &SeqKey) -> bool {
        self.seqs.contains_key(key)
    }

    pub fn session_sequences(&self, session: u64) -> usize {
        self.seqs.keys().filter(|k| k.session == session).count()
    }

    /// Opens an attention-only sequence (the caller checked that the id is
    /// free among the model's sequences too).
    pub fn open(
        &mut self,
        key: SeqKey,
        layout: AttentionLayout,
        policy: AttentionPolicy,
        diagnostics: bool,
    ) -> Result<(), ErrorReply> {
        check_layout(&layout)?;
        crate::engine::validate_policy(&policy, crate::engine::Serves::host(self.sparse))?;
        if self.seqs.contains_key(&key) {
            return Err(ErrorReply::new(
                ErrorCode::SequenceExists,
                format!("sequence {} is already open", key.seq),
            )
            .with("seq_id", key.seq));
        }
        let layers = layout.num_layers as usize;
        self.seqs.insert(
            key,
            OffSeq {
                arena: arena_key(&layout),
                layout,
                state: PolicyState::new(&policy, layers),
                policy,
                diagnostics,
                table: Vec::new(),
                lens: vec![0; layers],
            },
        );
        self.publish();
        Ok(())
    }

    /// Copies `parent` into a new sequence `child` with its own blocks (the
    /// K and V of every layer copied: attention-only sequences share no
    /// block, so an append never needs a copy-on-write), under its own
    /// policy when one is given (one prefilled prompt, decoded under
    /// several policies). Returns the child's rows at layer 0.
    pub fn fork(
        &mut self,
        parent: SeqKey,
        child: SeqKey,
        policy: Option<AttentionPolicy>,
        diagnostics: Option<bool>,
    ) -> Result<usize, ErrorReply> {
        if let Some(p) = &policy {
            crate::engine::validate_policy(p, crate::engine::Serves::host(self.sparse))?;
        }
        if self.seqs.contains_key(&child) {
            return Err(ErrorReply::new(
                ErrorCode::SequenceExists,
                format!("sequence {} is already open", child.seq),
            )
            .with("seq_id", child.seq));
        }
        let p = &self.seqs[&parent];
        let n = p.table.len();
        let key = p.arena;
        if !self.pool.can_take(key, n) {
            return Err(pool::exhausted(n, key, &self.pool));
        }
        let fresh = self.pool.take(key, n).expect("checked above");
        let p = &self.seqs[&parent];
        let arena = self.pool.arena_mut(key).expect("blocks were taken");
        let elems = arena.kv.layout.block_elems();
        for layer in arena.kv.k.iter_mut().chain(arena.kv.v.iter_mut()) {
            for (&src, &dst) in p.table.iter().zip(&fresh) {
                let (s, d) = (src as usize * elems, dst as usize * elems);
                layer.copy_within(s..s + elems, d);
            }
        }
        let layers = p.lens.len();
        let (policy, state) = match policy {
            Some(np) if np != p.policy => (np.clone(), PolicyState::new(&np, layers)),
            _ => (p.policy.clone(), p.state.fork()),
        };
        let c = OffSeq {
            layout: p.layout,
            arena: key,
            policy,
            state,
            diagnostics: diagnostics.unwrap_or(p.diagnostics),
            table: fresh,
            lens: p.lens.clone(),
        };
        let rows = c.lens[0];
        self.seqs.insert(child, c);
        self.publish();
        Ok(rows)
    }

    /// Drops the last `drop` rows of every layer (a layer shorter than that
    /// is refused: nothing is clamped); returns the rows left.
    pub fn truncate(&mut self, key: SeqKey, drop: u64) -> Result<usize, ErrorReply> {
        let s = self.seqs.get_mut(&key).expect("the caller checked");
        let shortest = *s.lens.iter().min().unwrap_or(&0);
        if drop > shortest as u64 {
            return Err(ErrorReply::bad_request(format!(
                "cannot drop {drop} rows from sequence {}, whose shortest layer holds {shortest}",
                key.seq
            ))
            .with("num_tokens", shortest));
        }
        let drop = drop as usize;
        s.lens.iter_mut().for_each(|l| *l -= drop);
        if drop > 0 {
            s.state.reset();
        }
        let longest = *s.lens.iter().max().unwrap_or(&0);
        let keep = longest.div_ceil(crate::engine::BLOCK_SIZE);
        let gone = s.table.split_off(keep.min(s.table.len()));
        let (arena, left) = (s.arena, s.lens[0]);
        self.pool.release(arena, &gone);
        self.publish();
        Ok(left)
    }

    pub fn close(&mut self, key: SeqKey) {
        if let Some(s) = self.seqs.remove(&key) {
            self.pool.release(s.arena, &s.table);
        }
        self.publish();
    }

    /// Frees every sequence of a session; returns how many there were.
    pub fn drop_session(&mut self, session: u64) -> usize {
        let keys: Vec<SeqKey> = self
            .seqs
            .keys()
            .filter(|k| k.session == session)
            .copied()
            .collect();
        for k in &keys {
            self.close(*k);
        }
        keys.len()
    }

    /// What `hello` and `stats` say of the pool.
    pub fn info(&self) -> AttentionPoolInfo {
        let (blocks, used) = self.pool.used();
        AttentionPoolInfo {
            block_size: crate::engine::BLOCK_SIZE as u32,
            total_bytes: self.pool.budget(),
            used_bytes: used,
            blocks,
            sequences: self.seqs.len() as u64,
            steps_by_layer: self.steps_by_layer.clone(),
            attention: self
                .totals
                .iter()
                .map(|(k, t)| {
                    let heads = t.heads.max(1.0);
                    let stats = PolicyStats {
                        decode_steps: t.queries,
                        tokens_read_fraction: t.read / heads,
                        true_mass: t.mass / heads,
                        success_rate: t.successes / heads,
                        ..PolicyStats::default()
                    };
                    (k.clone(), stats)
                })
                .collect(),
        }
    }

    fn publish(&self) {
        if let Ok(mut g) = self.gauges.attention_pool.lock() {
            *g = self.info();
        }
    }
}
