//! A sequence's sampling options as the engine holds them: validation
//! against the backend, fresh seeds for sequences opened without one, and
//! vLLM's logits processing for each sampled row (the reference is
//! `tacflow_kernels::cpu::processing`), and vLLM's prompt logprobs.

use super::{Engine, SeqOptions, Sequence};
use crate::backend::Backend;
use rayon::prelude::*;
use tacflow_ipc::{BlockMode, ErrorCode, ErrorReply, PromptLogprob, SamplingParams};
use tacflow_kernels::cpu::{Processing, token_logprob};
use tacflow_kernels::rng::bits;

/// The counter-based stream fresh seeds are drawn from.
const SEED_STREAM: u64 = 0x5345_4544_0000_0000;

/// Seeds for sequences opened without one: distinct per sequence, random
/// per daemon start (tests fix the base).
#[derive(Debug, Clone)]
pub struct SeedSource {
    base: u64,
    next: u64,
}

impl SeedSource {
    pub fn from_os() -> SeedSource {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).expect("the OS random source is available");
        SeedSource::seeded(u64::from_le_bytes(b))
    }

    pub fn seeded(base: u64) -> SeedSource {
        SeedSource { base, next: 0 }
    }

    pub fn fresh(&mut self) -> u64 {
        self.next += 1;
        bits(self.base, SEED_STREAM, self.next)
    }
}

fn bad(msg: String) -> Result<(), ErrorReply> {
    Err(ErrorReply::bad_request(format!("sampling: {msg}")))
}

impl<B: Backend> Engine<B> {
    /// Draws later fresh seeds from `base` (tests: reproducible seeds).
    pub fn set_seed_base(&mut self, base: u64) {
        self.seeds = SeedSource::seeded(base);
    }

    /// Checks a sequence's sampling: ranges, token ids, and that the
    /// backend implements every option asked for (`unsupported` if not).
    pub(super) fn validate_sampling(&self, s: &SamplingParams) -> Result<(), ErrorReply> {
        let vocab = self.model.config.vocab_size as u32;
        let ok = s.temperature.is_finite()
            && s.temperature >= 0.0
            && s.top_p.is_finite()
            && s.top_p > 0.0
            && s.top_p <= 1.0
            && s.logprobs <= 64;
        if !ok {
            return bad(
                "temperature must be finite and >= 0, top_p in (0, 1], logprobs at most 64".into(),
            );
        }
        if !(0.0..=1.0).contains(&s.min_p) {
            return bad(format!("min_p must be in [0, 1], not {}", s.min_p));
        }
        for (name, v) in [
            ("presence_penalty", s.presence_penalty),
            ("frequency_penalty", s.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], not {v}"));
            }
        }
        if !(s.repetition_penalty.is_finite() && s.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be finite and > 0, not {}",
                s.repetition_penalty
            ));
        }
        for &(t, b) in &s.logit_bias {
            if t >= vocab || !b.is_finite() {
                return bad(format!(
                    "logit_bias [{t}, {b}]: the token must be below {vocab} and the bias finite"
                ));
            }
        }
        if s.prompt_logprobs.is_some_and(|k| k > 64) {
            return bad("prompt_logprobs at most 64".into());
        }
        if s.prompt_logprobs.is_some() && !self.backend.supports_processing() {
            return Err(ErrorReply::new(
                ErrorCode::Unsupported,
                "prompt_logprobs: this backend does not compute it",
            ));
        }
        if s.uses_processing() && !self.backend.supports_processing() {
            return Err(ErrorReply::new(
                ErrorCode::Unsupported,
                "min_p, presence/frequency/repetition penalties and logit_bias: this \
                 backend's sampler does not implement them",
            ));
        }
        Ok(())
    }

    /// A prefix is named-mode only, in the vocabulary, within the context.
    pub(super) fn validate_prefix(&self, o: &SeqOptions) -> Result<(), ErrorReply> {
        if o.prefix.is_empty() {
            return Ok(());
        }
        if o.mode != BlockMode::Named {
            return Err(ErrorReply::bad_request(
                "prefix: only a named-block sequence starts with cached tokens",
            ));
        }
        let vocab = self.model.config.vocab_size as u32;
        if let Some(&t) = o.prefix.iter().find(|&&t| t >= vocab) {
            return Err(ErrorReply::bad_request(format!(
                "prefix: token {t} is outside the vocabulary of {vocab}"
            )));
        }
        if o.prefix.len() > self.max_context {
            return Err(ErrorReply::new(
                ErrorCode::ContextTooLong,
                format!(
                    "prefix of {} tokens, the limit is {}",
                    o.prefix.len(),
                    self.max_context
                ),
            )
            .with("max_context", self.max_context));
        }
        Ok(())
    }
}

/// The processing of a row sampled after `new` is appended to `s`, or
/// `None` when the sequence uses no option that needs it. Until the prompt's
/// length is fixed, every token so far is the prompt.
pub fn processing(s: &Sequence, new: &[u32]) -> Option<Processing> {
    let p = &s.sampling;
    if !p.uses_processing() {
        return None;
    }
    let all: Vec<u32> = s.tokens.iter().chain(new).copied().collect();
    let prompt_len = s.prompt_len.unwrap_or(all.len()).min(all.len());
    let (prompt, output) = all.split_at(prompt_len);
    Some(Processing {
        min_p: p.min_p,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        repetition_penalty: p.repetition_penalty,
        logit_bias: p.logit_bias.clone(),
        prompt: prompt.to_vec(),
        output: output.to_vec(),
    })
}

/// How many of the `n` tokens an entry appends to `s` are prompt tokens whose
/// log-probabilities the sequence asked for (`prompt_logprobs`): the entry's
/// first ones, up to `prompt_len`, or all of them until the prompt is fixed.
pub fn prompt_scored(s: &Sequence, n: usize) -> usize {
    if s.sampling.prompt_logprobs.is_none() {
        return 0;
    }
    match s.prompt_len {
        None => n,
        Some(p) => p.saturating_sub(s.len).min(n),
    }
}

/// Whether the prompt goes on after an entry of `n` tokens (`sample` as it
/// says) is appended to `s`: the entry's last row then scores the next
/// chunk's first token and is kept.
pub fn prompt_continues(s: &Sequence, n: usize, sample: bool) -> bool {
    match s.prompt_len {
        None => !sample,
        Some(p) => s.len + n < p,
    }
}

/// vLLM's prompt logprobs of an entry's first `m` tokens: each scored
/// against the raw logits of the row before it, `rows` (the entry's own,
/// `[n, vocab]`) or, for its first token, the row kept from the previous
/// step. `None` where that row was never computed: the sequence's first
/// token, and the first after a named-block prefix or a truncation. With
/// each, the token's rank there (vLLM's).
pub fn prompt_logprobs(
    s: &Sequence,
    tokens: &[u32],
    m: usize,
    rows: &[f32],
    vocab: usize,
) -> (Vec<Option<PromptLogprob>>, Vec<Option<u32>>) {
    let k = s.sampling.prompt_logprobs.unwrap_or(0) as usize;
    (0..m)
        .into_par_iter()
        .map(|j| {
            let prev = match j {
                0 => s.prompt_row.as_deref(),
                _ => Some(&rows[(j - 1) * vocab..j * vocab]),
            };
            match prev.map(|row| token_logprob(row, tokens[j], k)) {
                Some((lp, top, rank)) => (Some((lp, top)), Some(rank)),
                None => (None, None),
            }
        })
        .unzip()
}
