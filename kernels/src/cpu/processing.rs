//! vLLM's logits processing before a draw, the reference for the daemon's
//! CPU sampler (the CUDA sampler does not implement it yet; the daemon
//! refuses these options there).
//!
//! In vLLM's order (its v1 sampler): the logit bias is added; then the
//! repetition penalty, over every token that occurs in the prompt or the
//! output (a positive logit divided by it, a zero or negative one
//! multiplied); then the frequency penalty times each token's count in the
//! output and the presence penalty for each token the output holds are
//! subtracted (the output only, as OpenAI defines them). Greedy sampling
//! takes the arg-max of the result; a random draw then applies temperature
//! and `min_p` (tokens whose probability is below `min_p` times the best
//! one's are cut), then `top_k` and `top_p`. Log-probabilities stay those of
//! the model's raw logits, as vLLM reports them by default.

use super::sampling::{SampleParams, Sampled, argmax, draw_cut, logsumexp, top_k};
use std::collections::HashMap;

/// One sampled row's processing: options, and the sequence's tokens.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Processing {
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    /// `(token, bias)`; every token is inside the vocabulary.
    pub logit_bias: Vec<(u32, f32)>,
    pub prompt: Vec<u32>,
    pub output: Vec<u32>,
}

impl Processing {
    /// Applies bias and penalties to `logits` in place (not `min_p`, which
    /// acts on probabilities after temperature).
    pub fn apply(&self, logits: &mut [f32]) {
        for &(t, b) in &self.logit_bias {
            logits[t as usize] += b;
        }
        let r = self.repetition_penalty;
        if r != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in self.prompt.iter().chain(&self.output) {
                seen[t as usize] = true;
            }
            for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, s)| **s) {
                *l = if *l > 0.0 { *l / r } else { *l * r };
            }
        }
        if self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &t in &self.output {
                *counts.entry(t).or_default() += 1;
            }
            for (&t, &c) in &counts {
                let l = &mut logits[t as usize];
                *l -= self.frequency_penalty * c as f32;
                *l -= self.presence_penalty;
            }
        }
    }
}

/// Samples one row with processing: the token from the processed logits,
/// the log-probabilities from the raw ones.
pub fn sample_processed(logits: &[f32], p: &SampleParams, proc: &Processing) -> Sampled {
    let mut l = logits.to_vec();
    proc.apply(&mut l);
    let token = if p.is_greedy() {
        argmax(&l) as u32
    } else {
        draw_cut(&l, p, proc.min_p)
    };
    let lse = logsumexp(logits);
    Sampled {
        token,
        logprob: logits[token as usize] - lse,
        top: top_k(logits, p.logprobs as usize)
            .into_iter()
            .map(|(i, v)| (i, v - lse))
            .collect(),
    }
}
