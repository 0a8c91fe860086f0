//! One step: validate every entry, plan the KV blocks, run the model, sample,
//! write logits, then commit. Until the commit nothing a client can observe
//! has changed, so a step that fails anywhere leaves every sequence as it
//! was: its fresh blocks go back to the allocator, the policy states the
//! selector grew are reverted (`undo`), those the backend keeps are put back
//! by the backend (`Backend::tactic_end_step`), and its diagnostics are not
//! counted.

use super::kv_cache::{AppendPlan, append_cost, plan_append};
use super::sparse::{self, Outcome, PolicyState, Selector, StepDiag};
use super::{BLOCK_SIZE, Engine, SeqKey, SessionId, sampling};
use crate::backend::tactic::StateId;
use crate::backend::{Backend, SeqMeta, StepMeta};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tacflow_ipc::{
    AttentionDiagnostics, ErrorCode, ErrorReply, HostRegion, PromptLogprob, StepEntry, StepResult,
    TensorView,
};
use tacflow_kernels::cpu::{Processing, SampleParams};

/// Where an entry's logits go, already checked against its region by the
/// I/O thread (shape `[n, vocab]`, a float dtype, in bounds).
#[derive(Debug, Clone)]
pub struct LogitsTarget {
    pub region: Arc<HostRegion>,
    pub view: TensorView,
}

/// A step as the executor receives it.
#[derive(Debug)]
pub struct StepWork {
    pub session: SessionId,
    pub entries: Vec<StepEntry>,
    /// One per entry.
    pub logits: Vec<Option<LogitsTarget>>,
}

/// The raw logits of an entry's last row, kept by its sequence for the next
/// prompt chunk (`prompt_logprobs`), or nothing.
type KeptRow = Option<Vec<f32>>;
/// An entry's prompt logprobs and their ranks (`prompt_logprobs`, `prompt_ranks`).
type ScoredPrompt = (Vec<Option<PromptLogprob>>, Vec<Option<u32>>);

fn entry_error(code: ErrorCode, i: usize, msg: String) -> ErrorReply {
    ErrorReply::new(code, format!("entry {i}: {msg}")).with("entry", i)
}

impl<B: Backend> Engine<B> {
    /// Checks every entry against the sequences and the model; returns the
    /// sequence keys in entry order.
    fn validate(&self, work: &StepWork) -> Result<Vec<SeqKey>, ErrorReply> {
        let vocab = self.model.config.vocab_size as u32;
        let mut seen = HashSet::with_capacity(work.entries.len());
        let mut keys = Vec::with_capacity(work.entries.len());
        for (i, e) in work.entries.iter().enumerate() {
            let key = SeqKey {
                session: work.session,
                seq: e.seq_id,
            };
            let seq = self.seqs.get(&key).ok_or_else(|| {
                entry_error(
                    ErrorCode::UnknownSequence,
                    i,
                    format!("sequence {} is not open", e.seq_id),
                )
                .with("seq_id", e.seq_id)
            })?;
            if !seen.insert(e.seq_id) {
                return Err(entry_error(
                    ErrorCode::BadRequest,
                    i,
                    format!("sequence {} appears twice in one step", e.seq_id),
                ));
            }
            if e.tokens.is_empty() {
                return Err(entry_error(ErrorCode::BadRequest, i, "no tokens".into()));
            }
            if let Some(&t) = e.tokens.iter().find(|&&t| t >= vocab) {
                return Err(entry_error(
                    ErrorCode::BadRequest,
                    i,
                    format!("token {t} is outside the vocabulary of {vocab}"),
                ));
            }
            if let Some(p) = &e.positions
                && p.len() != e.tokens.len()
            {
                return Err(entry_error(
                    ErrorCode::ShapeMismatch,
                    i,
                    format!("{} positions for {} tokens", p.len(), e.tokens.len()),
                ));
            }
            let new_len = seq.len + e.tokens.len();
            if new_len > self.max_context {
                return Err(entry_error(
                    ErrorCode::ContextTooLong,
                    i,
                    format!(
                        "sequence {} would hold {new_len} tokens, the limit is {}",
                        e.seq_id, self.max_context
                    ),
                )
                .with("max_context", self.max_context));
            }
            keys.push(key);
        }
        Ok(keys)
    }

    /// Runs one step. On error no sequence has changed.
    pub fn step(&mut self, work: &StepWork) -> Result<Vec<StepResult>, ErrorReply> {
        if work.entries.is_empty() {
            return Ok(vec![]);
        }
        let keys = self.validate(work)?;
        let mut named = self.plan_named(work.session, &work.entries, &keys)?;
        // Cost first, so that a step that does not fit allocates nothing.
        let needed: usize = keys
            .iter()
            .zip(&work.entries)
            .zip(&named)
            .filter(|(_, n)| n.is_none())
            .map(|((k, e), _)| {
                let s = &self.seqs[k];
                append_cost(&self.alloc, &s.table, s.len, e.tokens.len(), BLOCK_SIZE)
            })
            .sum();
        let free = self.alloc.free_count();
        if needed > free {
            return Err(ErrorReply::new(
                ErrorCode::OutOfKvBlocks,
                format!("step needs {needed} KV blocks, {free} are free"),
            )
            .with("needed", needed)
            .with("free", free));
        }
        let mut names = Vec::with_capacity(keys.len());
        let plans: Vec<AppendPlan> = keys
            .iter()
            .zip(&work.entries)
            .zip(named.iter_mut())
            .map(|((k, e), n)| {
                if let Some((plan, ids)) = n.take() {
                    names.push(Some(ids));
                    return plan;
                }
                names.push(None);
                let s = &self.seqs[k];
                plan_append(&mut self.alloc, &s.table, s.len, e.tokens.len(), BLOCK_SIZE)
                    .expect("cost was checked")
            })
            .collect();
        let mut outcome = Outcome::default();
        match self.run(work, &keys, &plans, &mut outcome) {
            Ok((results, kept)) => {
                self.commit(work, &keys, plans, names, outcome, kept);
                Ok(results)
            }
            Err(e) => {
                self.roll_back(&keys, &plans, outcome);
                Err(e)
            }
        }
    }

    /// How many logit rows an entry needs, its last ones: every row when
    /// its logits are written or its prompt tokens scored (a token's row is
    /// the one before it), else the last when it samples.
    fn entry_rows(&self, k: &SeqKey, e: &StepEntry, logits: bool) -> usize {
        let n = e.tokens.len();
        if logits || sampling::prompt_scored(&self.seqs[k], n) > 0 {
            n
        } else {
            usize::from(e.sample)
        }
    }

    fn build_meta(&self, work: &StepWork, keys: &[SeqKey], plans: &[AppendPlan]) -> StepMeta {
        let total: usize = work.entries.iter().map(|e| e.tokens.len()).sum();
        let mut m = StepMeta {
            tokens: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            slots: Vec::with_capacity(total),
            seqs: Vec::with_capacity(keys.len()),
            logit_rows: Vec::new(),
        };
        for ((k, e), (p, target)) in keys
            .iter()
            .zip(&work.entries)
            .zip(plans.iter().zip(&work.logits))
        {
            let len = self.seqs[k].len;
            let n = e.tokens.len();
            let q_start = m.tokens.len();
            m.tokens.extend_from_slice(&e.tokens);
            match &e.positions {
                Some(pos) => m.positions.extend_from_slice(pos),
                None => m.positions.extend((len..len + n).map(|x| x as u32)),
            }
            m.slots
                .extend((len..len + n).map(|s| {
                    p.table[s / BLOCK_SIZE] * BLOCK_SIZE as u32 + (s % BLOCK_SIZE) as u32
                }));
            let rows = self.entry_rows(k, e, target.is_some());
            m.logit_rows
                .extend((q_start + n - rows..q_start + n).map(|r| r as u32));
            m.seqs.push(SeqMeta {
                q_start,
                q_len: n,
                ctx_len: len + n,
                block_table: p.table.clone(),
            });
        }
        m
    }

    /// Everything up to (not including) the commit: the results, and per
    /// entry the logit row its sequence keeps for the next prompt chunk.
    /// `outcome` receives what the selections did, whether or not the step
    /// gets to its end.
    fn run(
        &mut self,
        work: &StepWork,
        keys: &[SeqKey],
        plans: &[AppendPlan],
        outcome: &mut Outcome,
    ) -> Result<(Vec<StepResult>, Vec<KeptRow>), ErrorReply> {
        let meta = self.build_meta(work, keys, plans);
        let cow: Vec<(u32, u32)> = plans.iter().filter_map(|p| p.cow).collect();
        if !cow.is_empty() {
            self.backend
                .copy_blocks(&mut self.kv, &cow)
                .map_err(|e| e.to_reply())?;
        }
        let logits = self.forward_sparse(work, keys, &meta, outcome);
        let logits = logits.map_err(|e| e.to_reply())?;
        let (params, procs, row_of_entry) = self.sample_params(work, keys, meta.logit_rows.len());
        let scored: Vec<usize> = keys
            .iter()
            .zip(&work.entries)
            .map(|(k, e)| sampling::prompt_scored(&self.seqs[k], e.tokens.len()))
            .collect();
        let want_logits = work.logits.iter().any(Option::is_some) || scored.iter().any(|&m| m > 0);
        let out = self
            .backend
            .sample_processed(&logits, &params, &procs, want_logits)
            .map_err(|e| e.to_reply())?;
        let diags = self.attention_diags(work, keys, &outcome.diags);
        let vocab = self.model.config.vocab_size;
        let mut results = Vec::with_capacity(keys.len());
        let mut kept = Vec::with_capacity(keys.len());
        for (i, ((k, e), target)) in keys.iter().zip(&work.entries).zip(&work.logits).enumerate() {
            let (r0, rows) = row_of_entry[i];
            if let Some(t) = target {
                let all = out.logits.as_ref().expect("logits were asked for");
                t.region
                    .write_matrix_f32(&t.view, &all[r0 * vocab..(r0 + rows) * vocab])
                    .map_err(|err| err.with("entry", i))?;
            }
            let ((plp, ranks), keep) =
                self.score_prompt(e, &self.seqs[k], scored[i], &out, row_of_entry[i]);
            kept.push(keep);
            let sampled = if e.sample {
                out.sampled[r0 + rows - 1].clone()
            } else {
                None
            };
            results.push(StepResult {
                seq_id: k.seq,
                num_tokens: (self.seqs[k].len + e.tokens.len()) as u64,
                token: sampled.as_ref().map(|s| s.token),
                logprob: sampled.as_ref().map(|s| s.logprob),
                rank: sampled.as_ref().and_then(|s| s.rank),
                top_logprobs: sampled.map(|s| s.top).unwrap_or_default(),
                attention: diags[i].clone(),
                prompt_logprobs: plp,
                prompt_ranks: ranks,
            });
        }
        Ok((results, kept))
    }

    /// An entry's prompt logprobs (`m` of its tokens scored, with their
    /// ranks) and the row its sequence keeps for the next chunk, from the
    /// step's host logits.
    fn score_prompt(
        &self,
        e: &StepEntry,
        s: &super::Sequence,
        m: usize,
        out: &crate::backend::SampleOutput,
        (r0, rows): (usize, usize),
    ) -> (ScoredPrompt, KeptRow) {
        if m == 0 {
            return ((vec![], vec![]), None);
        }
        let vocab = self.model.config.vocab_size;
        let all = out.logits.as_ref().expect("logits were asked for");
        let mine = &all[r0 * vocab..(r0 + rows) * vocab];
        let plp = sampling::prompt_logprobs(s, &e.tokens, m, mine, vocab);
        let n = e.tokens.len();
        let keep = (m == n && sampling::prompt_continues(s, n, e.sample))
            .then(|| mine[(n - 1) * vocab..].to_vec());
        (plp, keep)
    }

    /// Sampling parameters and vLLM's processing per logit row (the last
    /// row of each sampling entry draws the token that will sit at position
    /// `len + n`), and per entry its first logit row and row count.
    #[allow(clippy::type_complexity)]
    fn sample_params(
        &self,
        work: &StepWork,
        keys: &[SeqKey],
        num_rows: usize,
    ) -> (
        Vec<Option<SampleParams>>,
        Vec<Option<Processing>>,
        Vec<(usize, usize)>,
    ) {
        let mut params = vec![None; num_rows];
        let mut procs = vec![None; num_rows];
        let mut row_of_entry = Vec::with_capacity(keys.len());
        let mut r = 0;
        for (k, (e, target)) in keys.iter().zip(work.entries.iter().zip(&work.logits)) {
            let n = e.tokens.len();
            let rows = self.entry_rows(k, e, target.is_some());
            if e.sample {
                let s = &self.seqs[k];
                params[r + rows - 1] = Some(SampleParams {
                    temperature: s.sampling.temperature,
                    top_p: s.sampling.top_p,
                    top_k: s.sampling.top_k,
                    seed: s.sampling.seed.expect("filled in at open"),
                    position: (s.len + n) as u64,
                    logprobs: s.sampling.logprobs,
                });
                procs[r + rows - 1] = super::sampling::processing(s, &e.tokens);
            }
            row_of_entry.push((r, rows));
            r += rows;
        }
        (params, procs, row_of_entry)
    }

    /// Per entry, the attention diagnostics its sequence asked for: full
    /// attention's for a decode entry without a sparse policy, the
    /// selector's for one with.
    fn attention_diags(
        &self,
        work: &StepWork,
        keys: &[SeqKey],
        sparse: &[(usize, StepDiag)],
    ) -> Vec<Option<AttentionDiagnostics>> {
        let mut diags: Vec<_> = keys
            .iter()
            .zip(&work.entries)
            .map(|(k, e)| {
                let s = &self.seqs[k];
                let full = e.tokens.len() == 1 && s.state.is_full() && s.diagnostics;
                full.then(StepDiag::full)
            })
            .collect();
        for (i, d) in sparse {
            diags[*i] = Some(AttentionDiagnostics {
                policy: self.seqs[&keys[*i]].policy.name().to_owned(),
                ..d.summary.clone()
            });
        }
        diags
    }

    /// The forward pass, with the sparse policies of the step's decode
    /// entries selecting layer by layer. The selector grows those entries'
    /// states in place and notes in `outcome` how to undo that; the
    /// backend builds its own states of the prompts that end in the step.
    fn forward_sparse(
        &mut self,
        work: &StepWork,
        keys: &[SeqKey],
        meta: &StepMeta,
        outcome: &mut Outcome,
    ) -> crate::error::Result<B::Act> {
        let c = &self.model.config;
        let dims = (c.num_heads, c.num_kv_heads, c.head_dim);
        let layers = c.num_layers;
        let sparse: HashMap<SeqKey, usize> = keys
            .iter()
            .zip(&work.entries)
            .enumerate()
            .filter(|(_, (k, e))| e.tokens.len() == 1 && !self.seqs[*k].state.is_full())
            .map(|(i, (k, _))| (*k, i))
            .collect();
        // Prompts that end in this step (a chunk of two tokens or more that
        // samples) on a state the backend keeps: clustered at their last
        // row rather than at their first decode step.
        let prompt_ends: Vec<(usize, StateId)> = keys
            .iter()
            .zip(&work.entries)
            .enumerate()
            .filter_map(|(i, (k, e))| {
                let s = &self.seqs[k];
                let ends = e.tokens.len() > 1 && e.sample && s.prompt_len.is_none();
                ends.then(|| s.state.device_id().map(|id| (i, id)))
                    .flatten()
            })
            .collect();
        // Every sequence of a step is distinct, so one pass over the map
        // lends each sparse entry its state; entry order keeps the
        // diagnostics' sums deterministic.
        let mut entries: Vec<(usize, &mut PolicyState, bool)> = self
            .seqs
            .iter_mut()
            .filter_map(|(k, s)| sparse.get(k).map(|&i| (i, &mut s.state, s.diagnostics)))
            .collect();
        entries.sort_by_key(|e| e.0);
        let mut selector =
            Selector::new(entries, keys.len(), layers, dims).with_prompt_ends(prompt_ends);
        let logits = self.model.forward_with(
            &self.backend,
            &mut self.kv,
            meta,
            Some(&mut selector),
            &self.plan,
        );
        // The diagnostic mode's one wait: the backend's measures, read back.
        let measured = match logits {
            Ok(_) if selector.wants_device_diagnostics() => self
                .backend
                .tactic_diagnostics()
                .and_then(|m| selector.absorb(&m)),
            _ => Ok(()),
        };
        *outcome = selector.finish();
        measured?;
        logits
    }

    /// Puts back what a failed step changed: policy states, then blocks
    /// (latest plan first, so that the free list is exactly as it was).
    fn roll_back(&mut self, keys: &[SeqKey], plans: &[AppendPlan], outcome: Outcome) {
        self.backend.tactic_end_step(false);
        for (i, undo) in outcome.undo {
            let s = self.seqs.get_mut(&keys[i]).expect("validated");
            s.state.revert(undo);
        }
        for p in plans.iter().rev() {
            self.alloc.release_all(&p.fresh);
        }
        self.publish();
    }

    fn commit(
        &mut self,
        work: &StepWork,
        keys: &[SeqKey],
        plans: Vec<AppendPlan>,
        names: Vec<Option<Vec<u32>>>,
        outcome: Outcome,
        kept: Vec<KeptRow>,
    ) {
        self.backend.tactic_end_step(true);
        let (mut prefill, mut decode) = (0u64, 0u64);
        let each = keys.iter().zip(&work.entries).zip(plans).zip(names);
        for ((((k, e), p), ids), row) in each.zip(kept) {
            if let Some((shared, _)) = p.cow {
                self.alloc.release(shared);
            }
            let s = self.seqs.get_mut(k).expect("validated");
            s.table = p.table;
            if let Some(ids) = ids {
                s.names = ids;
            }
            s.prompt_row = row;
            s.len += e.tokens.len();
            s.tokens.extend_from_slice(&e.tokens);
            if e.sample && s.prompt_len.is_none() {
                s.prompt_len = Some(s.len);
            }
            if e.tokens.len() == 1 {
                decode += 1;
            } else {
                prefill += e.tokens.len() as u64;
            }
        }
        self.gauges.steps.fetch_add(1, Relaxed);
        self.gauges.prefill_tokens.fetch_add(prefill, Relaxed);
        self.gauges.decode_tokens.fetch_add(decode, Relaxed);
        self.count_diags(keys, &outcome.diags);
        self.publish();
    }

    /// Adds a committed step's sparse diagnostics to the daemon's totals.
    fn count_diags(&mut self, keys: &[SeqKey], diags: &[(usize, StepDiag)]) {
        if diags.is_empty() {
            return;
        }
        for (i, d) in diags {
            let name = self.seqs[&keys[*i]].policy.name();
            self.policy_totals
                .entry(name.to_owned())
                .or_default()
                .add(d);
        }
        if let Ok(mut g) = self.gauges.attention.lock() {
            *g = sparse::publish(&self.policy_totals);
        }
    }
}
