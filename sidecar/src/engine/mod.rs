//! The engine: a model on a backend, its KV cache, and the sequences of every
//! session. It runs on the executor thread, which owns it alone.
//!
//! | piece | file |
//! | --- | --- |
//! | block allocation, copy-on-write plans | [`kv_cache`] |
//! | a step: validate, plan, run, sample, commit | [`step`] |
//! | sparse attention policies and their selections | [`sparse`] |
//! | what the selections kept: step diagnostics, totals per policy | [`diag`] |
//! | undoing a failed step's policy-state changes | [`undo`] |
//! | Tactic states the backend keeps: open, fork, truncate, close | [`device`] |
//! | client-named blocks: reservations, named tables, sequence state | [`named`] |
//! | sampling options: validation, fresh seeds, vLLM's processing | [`sampling`] |
//! | counters shared with the I/O thread | [`gauges`] |

mod device;
pub mod diag;
pub mod gauges;
pub mod kv_cache;
pub mod named;
mod replay;
pub mod sampling;
pub mod sparse;
pub mod step;
#[cfg(test)]
mod tests;
pub mod undo;

use crate::backend::{Backend, KvLayout};
use crate::error::Result;
use crate::model::Model;
use crate::model::config::ModelConfig;
use crate::model::weights::WeightSource;
use crate::schedule::Plan;
use gauges::Gauges;
use kv_cache::{BlockAllocator, blocks_for};
use sparse::{PolicyState, PolicyTotals};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tacflow_ipc::{AttentionPolicy, BlockMode, ErrorCode, ErrorReply, SamplingParams};

/// Session ids are the daemon's own small integers (tokens stay in the I/O
/// thread).
pub type SessionId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqKey {
    pub session: SessionId,
    pub seq: u64,
}

/// One sequence's state.
#[derive(Debug)]
pub struct Sequence {
    pub policy: AttentionPolicy,
    /// What the policy keeps across steps (clusterings, page bounds).
    pub state: PolicyState,
    pub sampling: SamplingParams,
    pub diagnostics: bool,
    /// KV blocks covering `len` tokens exactly (`blocks_for(len)` of them):
    /// physical ids, owned (refcounted) in daemon mode, borrowed from the
    /// session's reservation in named mode.
    pub table: Vec<u32>,
    pub len: usize,
    pub mode: BlockMode,
    /// Named mode: the reservation ids of `table`, as the last step named them.
    pub names: Vec<u32>,
    /// Every token the sequence holds (the penalties count them).
    pub tokens: Vec<u32>,
    /// How many of `tokens` are the prompt; fixed by the first sampling
    /// entry when the client did not give it.
    pub prompt_len: Option<usize>,
    /// The client gave `sampling.seed` (a fork inherits it then; otherwise
    /// a fork draws its own).
    pub seed_given: bool,
    /// `prompt_logprobs`: the raw logits of the last row the previous step
    /// computed, while the prompt goes on. The next chunk's first token is
    /// scored against it (kept as logits rather than log-probabilities: the
    /// same size, and one log-softmax, done where every other row's is).
    /// Set only by a step's commit, so a failed step leaves it as it was.
    pub prompt_row: Option<Vec<f32>>,
}

/// How a sequence is opened (`open_sequence`).
#[derive(Debug, Clone, Default)]
pub struct SeqOptions {
    pub policy: AttentionPolicy,
    pub sampling: SamplingParams,
    pub diagnostics: bool,
    pub mode: BlockMode,
    /// Named mode: tokens already cached in the blocks the first step names.
    pub prefix: Vec<u32>,
    pub prompt_len: Option<u64>,
    /// (1.4) Attention-only: the layout it declared (`crate::offload`).
    pub layout: Option<tacflow_ipc::AttentionLayout>,
}

/// Size of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCapacity {
    Blocks(usize),
    /// Fraction of the device memory free after loading the weights.
    MemoryFraction(f64),
}

pub const BLOCK_SIZE: usize = 16;

pub struct Engine<B: Backend> {
    backend: B,
    model: Model<B>,
    kv: B::Kv,
    alloc: BlockAllocator,
    seqs: HashMap<SeqKey, Sequence>,
    /// Longest sequence accepted.
    max_context: usize,
    gauges: Arc<Gauges>,
    /// Attention diagnostics aggregated per policy, for `stats`.
    policy_totals: BTreeMap<String, PolicyTotals>,
    /// How each step's forward pass is cut into a schedule.
    plan: Plan,
    /// Per session, the physical blocks behind its reservation ids.
    reservations: HashMap<SessionId, Vec<u32>>,
    /// Where fresh seeds come from for sequences opened without one.
    seeds: sampling::SeedSource,
    /// The next name of a Tactic state the backend keeps.
    next_state: u64,
}

fn seq_error(code: ErrorCode, key: SeqKey, what: &str) -> ErrorReply {
    ErrorReply::new(code, format!("sequence {} {what}", key.seq)).with("seq_id", key.seq)
}

impl<B: Backend> Engine<B> {
    /// Loads the model and sizes the KV cache.
    pub fn new(
        mut backend: B,
        config: &ModelConfig,
        src: &dyn WeightSource,
        capacity: KvCapacity,
        max_context: Option<usize>,
        progress: impl FnMut(usize, usize),
    ) -> Result<Engine<B>> {
        let model = Model::load(&backend, config, src, progress)?;
        let mut layout = KvLayout {
            num_layers: config.num_layers,
            num_blocks: 0,
            block_size: BLOCK_SIZE,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
        };
        layout.num_blocks = match capacity {
            KvCapacity::Blocks(n) => n,
            KvCapacity::MemoryFraction(f) => {
                let free = backend.free_memory().ok_or_else(|| {
                    crate::error::Error::Config(
                        "this backend cannot size the KV cache by memory: give --kv-blocks".into(),
                    )
                })?;
                (free as f64 * f) as usize / backend.kv_block_bytes(&layout)
            }
        };
        if layout.num_blocks == 0 {
            return Err(crate::error::Error::Config(
                "the KV cache would have no blocks".into(),
            ));
        }
        let kv = backend.kv_cache(&layout)?;
        let mut alloc = BlockAllocator::new(layout.num_blocks);
        // The padding rows of captured graph steps write to a block that no
        // sequence ever owns: taken now, never released.
        if backend.wants_pad_block() {
            let pad = alloc.alloc(1).filter(|_| alloc.free_count() > 0);
            let pad = pad.ok_or_else(|| {
                crate::error::Error::Config(
                    "cuda_graphs needs a KV block for padding rows and one for sequences".into(),
                )
            })?;
            backend.set_pad_block(pad[0]);
        }
        let gauges = Arc::new(Gauges::default());
        gauges.set_kv(layout.num_blocks, alloc.free_count());
        Ok(Engine {
            backend,
            max_context: max_context
                .unwrap_or(config.max_position_embeddings)
                .min(config.max_position_embeddings),
            model,
            kv,
            alloc,
            seqs: HashMap::new(),
            gauges,
            policy_totals: BTreeMap::new(),
            plan: Plan::default(),
            reservations: HashMap::new(),
            seeds: sampling::SeedSource::from_os(),
            next_state: 0,
        })
    }

    /// The ops of the model's forward pass.
    pub fn model_program(&self) -> crate::schedule::program::Program {
        self.model.program()
    }

    /// Runs these pairs of ops fused from the next step on.
    pub fn set_fusions(&mut self, fusions: crate::schedule::program::Fusions) {
        self.model.fusions = fusions;
    }

    /// Cuts every later step's forward pass as `plan` says.
    pub fn set_plan(&mut self, plan: Plan) {
        self.plan = plan;
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn gauges(&self) -> Arc<Gauges> {
        self.gauges.clone()
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    pub fn kv_total_blocks(&self) -> usize {
        self.alloc.total()
    }

    pub fn kv_free_blocks(&self) -> usize {
        self.alloc.free_count()
    }

    fn publish(&self) {
        self.gauges
            .set_kv(self.alloc.total(), self.alloc.free_count());
        self.gauges.set_sequences(self.seqs.len());
    }

    pub fn open_sequence(
        &mut self,
        key: SeqKey,
        policy: AttentionPolicy,
        sampling: SamplingParams,
        diagnostics: bool,
    ) -> Result<(), ErrorReply> {
        let opts = SeqOptions {
            policy,
            sampling,
            diagnostics,
            ..SeqOptions::default()
        };
        self.open_with(key, opts)
    }

    /// Opens a sequence in either block mode.
    pub fn open_with(&mut self, key: SeqKey, o: SeqOptions) -> Result<(), ErrorReply> {
        validate_policy(&o.policy, self.serves())?;
        self.validate_sampling(&o.sampling)?;
        if self.seqs.contains_key(&key) {
            return Err(seq_error(ErrorCode::SequenceExists, key, "is already open"));
        }
        self.validate_prefix(&o)?;
        let state = self.new_state(&o.policy)?;
        let seed_given = o.sampling.seed.is_some();
        let mut sampling = o.sampling;
        sampling.seed = Some(sampling.seed.unwrap_or_else(|| self.seeds.fresh()));
        self.seqs.insert(
            key,
            Sequence {
                state,
                policy: o.policy,
                sampling,
                diagnostics: o.diagnostics,
                table: vec![],
                len: o.prefix.len(),
                mode: o.mode,
                names: vec![],
                prompt_len: o.prompt_len.map(|p| p as usize),
                tokens: o.prefix,
                seed_given,
                prompt_row: None,
            },
        );
        self.publish();
        Ok(())
    }

    pub fn fork_sequence(
        &mut self,
        parent: SeqKey,
        child: SeqKey,
        sampling: Option<SamplingParams>,
        policy: Option<AttentionPolicy>,
        diagnostics: Option<bool>,
    ) -> Result<usize, ErrorReply> {
        if let Some(s) = &sampling {
            self.validate_sampling(s)?;
        }
        if let Some(p) = &policy {
            validate_policy(p, self.serves())?;
        }
        let p = self
            .seqs
            .get(&parent)
            .ok_or_else(|| seq_error(ErrorCode::UnknownSequence, parent, "is not open"))?;
        if self.seqs.contains_key(&child) {
            return Err(seq_error(
                ErrorCode::SequenceExists,
                child,
                "is already open",
            ));
        }
        // A child with its own policy starts its own state; one that keeps
        // the parent's takes a copy (it covers the shared prefix), which the
        // backend makes when it keeps the state.
        let own = policy.filter(|np| *np != p.policy);
        let inherited = match (&own, &p.state) {
            (Some(_), _) => None,
            (None, PolicyState::Device(d)) => Some(Err(*d)),
            (None, st) => Some(Ok(st.fork())),
        };
        let parent_policy = p.policy.clone();
        let (policy, state) = match (own, inherited) {
            (Some(np), _) => {
                let st = self.new_state(&np)?;
                (np, st)
            }
            (None, Some(Err(d))) => (parent_policy, self.fork_device(d)?),
            (None, Some(Ok(st))) => (parent_policy, st),
            (None, None) => unreachable!("inherited whenever the policy is kept"),
        };
        let p = &self.seqs[&parent];
        // The child keeps a seed the client gave; a seed the daemon picked
        // is picked afresh, so that unseeded forks draw differently.
        let (mut sampling, seed_given) = match sampling {
            Some(s) => (s.clone(), s.seed.is_some()),
            None => (p.sampling.clone(), p.seed_given),
        };
        if !seed_given {
            sampling.seed = Some(self.seeds.fresh());
        }
        let c = Sequence {
            policy,
            state,
            sampling,
            diagnostics: diagnostics.unwrap_or(p.diagnostics),
            table: p.table.clone(),
            len: p.len,
            mode: p.mode,
            names: p.names.clone(),
            tokens: p.tokens.clone(),
            prompt_len: p.prompt_len,
            seed_given,
            prompt_row: p.prompt_row.clone(),
        };
        if c.mode == BlockMode::Daemon {
            for &b in &c.table {
                self.alloc.retain(b);
            }
        }
        let len = c.len;
        self.seqs.insert(child, c);
        self.publish();
        Ok(len)
    }

    pub fn truncate_sequence(&mut self, key: SeqKey, drop: u64) -> Result<usize, ErrorReply> {
        let s = self
            .seqs
            .get_mut(&key)
            .ok_or_else(|| seq_error(ErrorCode::UnknownSequence, key, "is not open"))?;
        if drop > s.len as u64 {
            return Err(ErrorReply::bad_request(format!(
                "cannot drop {drop} tokens from sequence {} of {}",
                key.seq, s.len
            ))
            .with("num_tokens", s.len));
        }
        s.len -= drop as usize;
        s.tokens.truncate(s.len);
        if drop > 0 {
            s.state.reset();
            if let Some(id) = s.state.device_id() {
                self.backend.tactic_reset(id);
            }
            // The row it held scored a token that is gone.
            s.prompt_row = None;
        }
        // A named sequence opened with a prefix holds no table until its
        // first step.
        let keep = blocks_for(s.len, BLOCK_SIZE).min(s.table.len());
        let gone = s.table.split_off(keep);
        s.names.truncate(keep.min(s.names.len()));
        let len = s.len;
        if s.mode == BlockMode::Daemon {
            self.alloc.release_all(&gone);
        }
        self.publish();
        Ok(len)
    }

    pub fn close_sequence(&mut self, key: SeqKey) -> Result<(), ErrorReply> {
        let s = self
            .seqs
            .remove(&key)
            .ok_or_else(|| seq_error(ErrorCode::UnknownSequence, key, "is not open"))?;
        self.drop_state(&s.state);
        if s.mode == BlockMode::Daemon {
            self.alloc.release_all(&s.table);
        }
        self.publish();
        Ok(())
    }

    /// Frees every sequence of a session (it closed or its lease ran out).
    pub fn drop_session(&mut self, session: SessionId) -> usize {
        let keys: Vec<SeqKey> = self
            .seqs
            .keys()
            .filter(|k| k.session == session)
            .copied()
            .collect();
        for k in &keys {
            let s = self.seqs.remove(k).expect("listed");
            self.drop_state(&s.state);
            if s.mode == BlockMode::Daemon {
                self.alloc.release_all(&s.table);
            }
        }
        if let Some(blocks) = self.reservations.remove(&session) {
            self.alloc.release_all(&blocks);
        }
        self.publish();
        keys.len()
    }

    /// Whether the model's sequences include `key` (attention-only ones
    /// share the session's ids).
    pub fn has_sequence(&self, key: &SeqKey) -> bool {
        self.seqs.contains_key(key)
    }

    pub fn session_sequences(&self, session: SessionId) -> usize {
        self.seqs.keys().filter(|k| k.session == session).count()
    }
}

/// Which sparse policies a backend serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serves {
    /// Selection on host views: every policy (`Backend::supports_sparse`).
    pub host: bool,
    /// Tactic on the backend's own device (`Backend::device_tactic`); then
    /// no other host policy, so that a step selects in one place.
    pub device_tactic: bool,
    /// `oracle_top_p` and `fixed_budget` on the backend's device
    /// (`Backend::device_baselines`).
    pub device_baselines: bool,
}

impl Serves {
    /// Selection on host views only (attention offload, the CPU backend).
    pub const fn host(sparse: bool) -> Serves {
        Serves {
            host: sparse,
            device_tactic: false,
            device_baselines: false,
        }
    }

    pub fn of<B: Backend>(b: &B) -> Serves {
        Serves {
            host: b.supports_sparse(),
            device_tactic: b.device_tactic(),
            device_baselines: b.device_baselines(),
        }
    }

    fn allows(&self, p: &AttentionPolicy) -> bool {
        match p {
            AttentionPolicy::Full => true,
            AttentionPolicy::Tactic { .. } => self.host || self.device_tactic,
            AttentionPolicy::OracleTopP { .. } | AttentionPolicy::FixedBudget { .. }
                if self.device_baselines =>
            {
                true
            }
            _ => self.host && !self.device_tactic,
        }
    }
}

/// The policies a backend serves (what `hello` lists).
pub fn policies(serves: Serves) -> Vec<String> {
    let all = [
        AttentionPolicy::Full,
        AttentionPolicy::Tactic {
            p: 0.9,
            cluster_size: None,
            recluster_limit: None,
        },
        AttentionPolicy::FixedBudget { tokens: 1, p: None },
        AttentionPolicy::OracleTopP { p: 0.9 },
    ];
    all.iter()
        .filter(|p| serves.allows(p))
        .map(|p| p.name().to_owned())
        .collect()
}

impl<B: Backend> Engine<B> {
    fn serves(&self) -> Serves {
        Serves::of(&self.backend)
    }
}

pub fn validate_policy(p: &AttentionPolicy, serves: Serves) -> Result<(), ErrorReply> {
    let bad = |m: &str| Err(ErrorReply::bad_request(format!("{}: {m}", p.name())));
    let unit = |x: f32| x > 0.0 && x <= 1.0;
    match *p {
        AttentionPolicy::Full => return Ok(()),
        AttentionPolicy::Tactic {
            p,
            cluster_size,
            recluster_limit,
        } => {
            if !unit(p) {
                return bad("p must be in (0, 1]");
            }
            if cluster_size.is_some_and(|c| !(2..=1024).contains(&c)) {
                return bad("cluster_size must be in 2..=1024");
            }
            if recluster_limit.is_some_and(|r| r < 16) {
                return bad("recluster_limit must be at least 16");
            }
        }
        AttentionPolicy::FixedBudget { tokens, p } => {
            if tokens == 0 {
                return bad("tokens must be at least 1");
            }
            if p.is_some_and(|p| !unit(p)) {
                return bad("p must be in (0, 1]");
            }
        }
        AttentionPolicy::OracleTopP { p } => {
            if !unit(p) {
                return bad("p must be in (0, 1]");
            }
        }
    }
    if !serves.allows(p) {
        let on = if serves.device_tactic {
            " (on its device)"
        } else {
            ""
        };
        return Err(ErrorReply::new(
            ErrorCode::Unsupported,
            format!(
                "attention policy {} runs on the CPU backend only; \
                 this daemon serves {}{on} only",
                p.name(),
                policies(serves).join(", ")
            ),
        ));
    }
    Ok(())
}
