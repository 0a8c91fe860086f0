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

use super::sampling::{SampleParams, Sampled, argmax, draw_cut, logsumexp, rank_of, top_k};
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
        rank: (p.logprobs > 0).then(|| rank_of(logits, token)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_then_repetition_then_frequency_and_presence() {
        let mut l = vec![2.0f32, -1.0, 0.5, 3.0, 1.0];
        let p = Processing {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            logit_bias: vec![(4, -2.0)],
            prompt: vec![0, 1],
            output: vec![1, 2, 2],
            ..Processing::default()
        };
        p.apply(&mut l);
        // 0: prompt, positive: 2 / 2. 1: negative: -1 * 2, then one output
        // occurrence: - 0.5 - 0.25. 2: 0.5 / 2, then two: - 1.0 - 0.25.
        // 3: untouched. 4: biased to -1, not seen.
        let want = [1.0, -2.75, -1.0, 3.0, -1.0];
        for (g, w) in l.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{l:?}");
        }
    }

    #[test]
    fn min_p_cuts_by_the_best_tokens_probability_and_greedy_sees_the_penalties() {
        // Probabilities ∝ e^0, e^-1, e^-3: min_p 0.2 keeps the first two.
        let logits = [0.0f32, -1.0, -3.0];
        let proc = Processing {
            min_p: 0.2,
            repetition_penalty: 1.0,
            ..Processing::default()
        };
        let mut seen = [0u32; 3];
        for pos in 0..3000 {
            let p = SampleParams {
                temperature: 1.0,
                position: pos,
                seed: 5,
                ..SampleParams::greedy()
            };
            seen[sample_processed(&logits, &p, &proc).token as usize] += 1;
        }
        assert_eq!(seen[2], 0, "{seen:?}");
        let frac = seen[1] as f64 / 3000.0;
        let want = (-1f64).exp() / (1.0 + (-1f64).exp());
        assert!((frac - want).abs() < 0.03, "{frac} vs {want}");
        let bias = Processing {
            logit_bias: vec![(2, 5.0)],
            repetition_penalty: 1.0,
            ..Processing::default()
        };
        let s = sample_processed(&logits, &SampleParams::greedy(), &bias);
        assert_eq!(s.token, 2);
        assert!(
            (s.logprob - (-3.0 - logsumexp(&logits))).abs() < 1e-6,
            "raw logprob"
        );
    }
}
