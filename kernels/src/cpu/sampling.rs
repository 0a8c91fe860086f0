//! Token sampling, the reference for the GPU sampler.
//!
//! Greedy takes the arg-max, ties to the lowest id. Otherwise: logits divided
//! by the temperature, softmax, tokens ranked by probability (ties by id), cut
//! to the `top_k` best and then to the shortest prefix whose probability
//! reaches `top_p`; a uniform draw `u` from the counter-based generator, keyed
//! by `(seed, position)`, picks the first ranked token whose running sum
//! exceeds `u` times the kept mass. Log-probabilities are of the model's own
//! distribution (before temperature and cuts).

use crate::rng::{SAMPLING_STREAM, uniform01};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: u64,
    /// Position of the token being sampled: the draw's counter.
    pub position: u64,
    /// How many top log-probabilities to report.
    pub logprobs: u32,
}

impl SampleParams {
    pub fn greedy() -> SampleParams {
        SampleParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            position: 0,
            logprobs: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    /// `(token, logprob)` best first, `logprobs` of them.
    pub top: Vec<(u32, f32)>,
}

/// Index of the largest value, the lowest index among equals; NaN never wins.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in x.iter().enumerate() {
        if v > bv {
            best = i;
            bv = v;
        }
    }
    best
}

/// `log Σ exp(x)`, stable.
pub fn logsumexp(x: &[f32]) -> f32 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return m;
    }
    let s: f32 = x.iter().map(|v| (v - m).exp()).sum();
    m + s.ln()
}

/// The `k` largest entries as `(index, value)`, best first, ties by index.
pub fn top_k(x: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(x.len());
    if k == 0 {
        return vec![];
    }
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| {
        x[*b as usize]
            .total_cmp(&x[*a as usize])
            .then_with(|| a.cmp(b))
    };
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx.into_iter().map(|i| (i, x[i as usize])).collect()
}

/// Samples one token from a row of logits.
pub fn sample(logits: &[f32], p: &SampleParams) -> Sampled {
    let lse = logsumexp(logits);
    let token = if p.is_greedy() {
        argmax(logits) as u32
    } else {
        draw(logits, p)
    };
    let top = top_k(logits, p.logprobs as usize)
        .into_iter()
        .map(|(i, v)| (i, v - lse))
        .collect();
    Sampled {
        token,
        logprob: logits[token as usize] - lse,
        top,
    }
}

fn draw(logits: &[f32], p: &SampleParams) -> u32 {
    let inv_t = 1.0 / p.temperature;
    let k = if p.top_k == 0 {
        logits.len()
    } else {
        (p.top_k as usize).min(logits.len())
    };
    // Rank by logit (same order as by probability), ties by id.
    let ranked = top_k(logits, k);
    let m = ranked[0].1 * inv_t;
    let probs: Vec<f32> = ranked.iter().map(|&(_, v)| (v * inv_t - m).exp()).collect();
    let z: f32 = probs.iter().sum();
    // Shortest prefix reaching top_p of the (top-k renormalised) mass.
    let target = p.top_p.clamp(0.0, 1.0) * z;
    let mut kept = 0.0f32;
    let mut n = 0;
    for &q in &probs {
        kept += q;
        n += 1;
        if kept >= target {
            break;
        }
    }
    let u = uniform01(p.seed, SAMPLING_STREAM, p.position) * kept;
    let mut acc = 0.0f32;
    for (i, &q) in probs[..n].iter().enumerate() {
        acc += q;
        if acc > u {
            return ranked[i].0;
        }
    }
    ranked[n - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_lowest_index_on_ties() {
        let s = sample(&[1.0, 3.0, 3.0, -1.0], &SampleParams::greedy());
        assert_eq!(s.token, 1);
        assert!((s.logprob - (3.0 - logsumexp(&[1.0, 3.0, 3.0, -1.0]))).abs() < 1e-6);
    }

    #[test]
    fn top_logprobs_are_sorted_and_normalised() {
        let logits = [0.0f32, 2.0, 1.0, 2.0];
        let s = sample(
            &logits,
            &SampleParams {
                logprobs: 3,
                ..SampleParams::greedy()
            },
        );
        let ids: Vec<u32> = s.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        let total: f32 = logits.iter().map(|&v| (v - logsumexp(&logits)).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn seeded_draws_are_reproducible_and_respect_the_cuts() {
        let logits: Vec<f32> = (0..100).map(|i| -(i as f32) * 0.1).collect();
        let base = SampleParams {
            temperature: 1.0,
            top_p: 0.5,
            top_k: 0,
            seed: 42,
            position: 0,
            logprobs: 0,
        };
        // top_p 0.5 over a geometric-like distribution keeps a short prefix.
        let mut seen = std::collections::BTreeSet::new();
        for pos in 0..2000 {
            let p = SampleParams {
                position: pos,
                ..base
            };
            let a = sample(&logits, &p).token;
            assert_eq!(a, sample(&logits, &p).token);
            seen.insert(a);
        }
        let probs: Vec<f32> = logits.iter().map(|v| v.exp()).collect();
        let z: f32 = probs.iter().sum();
        let mut cum = 0.0;
        let mut keep = 0;
        for q in &probs {
            cum += q / z;
            keep += 1;
            if cum >= 0.5 {
                break;
            }
        }
        assert!(
            *seen.iter().max().unwrap() < keep as u32,
            "{seen:?} vs {keep}"
        );
        assert!(
            seen.len() > keep / 2,
            "draws should spread over the kept set"
        );
        let k2 = SampleParams {
            top_k: 2,
            top_p: 1.0,
            ..base
        };
        for pos in 0..200 {
            assert!(
                sample(
                    &logits,
                    &SampleParams {
                        position: pos,
                        ..k2
                    }
                )
                .token
                    < 2
            );
        }
    }
}
