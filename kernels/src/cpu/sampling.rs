//! Token sampling, the reference for the GPU sampler.
//!
//! Greedy takes the arg-max, ties to the lowest id. Otherwise: logits divided
//! by the temperature, softmax, tokens ranked by probability (ties by id), cut
//! to the `top_k` best and then to the shortest prefix whose probability
//! reaches `top_p`; a uniform draw `u` from the counter-based generator, keyed
//! by `(seed, position)`, picks the first ranked token whose running sum
//! exceeds `u` times the kept mass. Log-probabilities are of the model's own
//! distribution (before temperature and cuts).
//!
//! Masses are integers: each token's probability relative to the best one,
//! `exp(v/T - m)` by [`sampling_exp`], times 2^32 and rounded. Integer sums
//! do not depend on their order, and `sampling_exp` is a fixed sequence of
//! rounded f32 operations that `cuda/kernels/sampling.cu` repeats exactly,
//! so the GPU's parallel sampler draws the very same token as this
//! sequential one. (With f32 running sums, as first written, the two
//! disagreed on most draws from kept sets of thousands of tokens: the
//! rounding of a long sequential sum moves it across many token
//! boundaries.)

use crate::rng::{SAMPLING_STREAM, bits};

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
    /// vLLM's rank of `token` ([`rank_of`]), when `logprobs` > 0.
    pub rank: Option<u32>,
}

/// vLLM's rank of `token` in a row of logits: how many tokens are at least
/// as likely, itself included (1 for the most likely; ties count). Compared
/// on the raw logits, which order the tokens as their log-probabilities do;
/// NaN is never at least as likely.
pub fn rank_of(logits: &[f32], token: u32) -> u32 {
    let t = logits[token as usize];
    let above = logits.iter().filter(|&&v| v >= t).count() as u32;
    above.max(1)
}

/// [`rank_of`] from a row's best tokens alone (`top`, best first, as the
/// samplers list them), or `None` where they cannot tell: `token` is not
/// among them, or another listed token has its very log-probability (equal
/// log-probabilities may hide distinct logits, and ties may continue past
/// the list). Every token listed before it is then strictly more likely.
pub fn rank_from_top(token: u32, logprob: f32, top: &[(u32, f32)]) -> Option<u32> {
    let at = top.iter().position(|&(t, _)| t == token)?;
    if at + 1 == top.len() || top.iter().any(|&(t, lp)| t != token && lp == logprob) {
        return None;
    }
    Some(at as u32 + 1)
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

/// A token's log-probability under a row of logits (log-softmax, no
/// temperature or cut), the row's `k` best tokens with theirs, best first,
/// and the token's rank ([`rank_of`]): one prompt position of vLLM's prompt
/// logprobs.
pub fn token_logprob(logits: &[f32], token: u32, k: usize) -> (f32, Vec<(u32, f32)>, u32) {
    let lse = logsumexp(logits);
    let top = top_k(logits, k)
        .into_iter()
        .map(|(i, v)| (i, v - lse))
        .collect();
    (logits[token as usize] - lse, top, rank_of(logits, token))
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
        rank: (p.logprobs > 0).then(|| rank_of(logits, token)),
    }
}

/// `exp(x)` for `x <= 0` as a fixed sequence of rounded f32 operations
/// (Cody-Waite reduction by ln 2, a degree-6 Taylor polynomial, scaling by
/// 2^n), within 2 ulp; `sampling.cu` evaluates the same operations in the
/// same order, so both give the same bits. Rust never contracts `a * b + c`
/// into an FMA; the CUDA twin spells every step with `__fmul_rn` /
/// `__fadd_rn`.
pub fn sampling_exp(x: f32) -> f32 {
    // Constants by their bits, so both sides provably use the same values.
    // LN2_HI has 8 trailing zero bits (n * LN2_HI is exact); LN2_LO is
    // ln 2 - LN2_HI.
    let ln2_hi = f32::from_bits(0x3f31_7200);
    let ln2_lo = f32::from_bits(0x35bf_be8e);
    let log2_e = f32::from_bits(0x3fb8_aa3b);
    let coeffs = [
        0x3c08_8889,
        0x3d2a_aaab,
        0x3e2a_aaab,
        0x3f00_0000,
        0x3f80_0000,
        0x3f80_0000,
    ];
    if x.is_nan() {
        return x;
    }
    if x < -104.0 {
        return 0.0;
    }
    let n = (x * log2_e).round_ties_even();
    let r = (x - n * ln2_hi) - n * ln2_lo;
    let mut p = f32::from_bits(0x3ab6_0b61); // 1/720
    for c in coeffs {
        p = p * r + f32::from_bits(c); // 1/120, 1/24, 1/6, 1/2, 1, 1
    }
    let n = n as i32;
    if n >= -126 {
        p * f32::from_bits(((n + 127) as u32) << 23)
    } else {
        p * f32::from_bits(((n + 64 + 127) as u32) << 23) * f32::from_bits((127 - 64) << 23)
    }
}

/// A token's mass: `sampling_exp(v / T - m)` in units of 2^-32, rounded to
/// nearest even.
pub fn sampling_mass(v: f32, inv_t: f32, m: f32) -> u64 {
    (sampling_exp(v * inv_t - m) * 4_294_967_296.0).round_ties_even() as u64
}

fn draw(logits: &[f32], p: &SampleParams) -> u32 {
    draw_cut(logits, p, 0.0)
}

/// [`draw`] with vLLM's `min_p` cut: a token is kept only if its mass is at
/// least `min_p` times the best token's (`min_p` 0 keeps every token). Like
/// `top_k`, the cut keeps a prefix of the ranking; `top_p` then applies to
/// what both kept.
pub(crate) fn draw_cut(logits: &[f32], p: &SampleParams, min_p: f32) -> u32 {
    let inv_t = 1.0 / p.temperature;
    let k = if p.top_k == 0 {
        logits.len()
    } else {
        (p.top_k as usize).min(logits.len())
    };
    // Rank by logit (same order as by probability), ties by id.
    let ranked = top_k(logits, k);
    let m = ranked[0].1 * inv_t;
    let mut mass: Vec<u64> = ranked
        .iter()
        .map(|&(_, v)| sampling_mass(v, inv_t, m))
        .collect();
    if min_p > 0.0 {
        // The best token's mass is 2^32 exactly.
        let floor = min_p as f64 * 4_294_967_296.0;
        let keep = mass.iter().take_while(|&&q| q as f64 >= floor).count();
        mass.truncate(keep.max(1));
    }
    let z: u64 = mass.iter().sum();
    // Shortest prefix reaching top_p of the (top-k renormalised) mass.
    let target = (p.top_p.clamp(0.0, 1.0) as f64 * z as f64).ceil() as u64;
    let mut kept = 0u64;
    let mut n = 0;
    for &q in &mass {
        kept += q;
        n += 1;
        if kept >= target {
            break;
        }
    }
    // u * kept with u = u24 / 2^24, exactly.
    let u24 = bits(p.seed, SAMPLING_STREAM, p.position) >> 40;
    let u = ((u24 as u128 * kept as u128) >> 24) as u64;
    let mut acc = 0u64;
    for (i, &q) in mass[..n].iter().enumerate() {
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
    fn token_logprob_is_the_log_softmax_at_the_token_and_its_best() {
        let row = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        let (lp, top, rank) = token_logprob(&row, 2, 3);
        assert!((lp as f64 - (-2.0 - lse)).abs() < 1e-6, "{lp}");
        assert_eq!(rank, 5, "the least likely of five");
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 0], "best first, ties by id");
        for (i, v) in top {
            assert!((v as f64 - (row[i as usize] as f64 - lse)).abs() < 1e-6);
        }
        assert!(token_logprob(&row, 0, 0).1.is_empty());
        assert_eq!(token_logprob(&row, 3, 0).2, 2, "ties count: 3.0 twice");
    }

    #[test]
    fn ranks_count_every_token_at_least_as_likely() {
        let row = [1.0f32, 3.0, -2.0, 3.0, 0.5, f32::NAN, 1.0];
        assert_eq!(rank_of(&row, 1), 2, "tied with token 3");
        assert_eq!(rank_of(&row, 0), 4, "3.0 twice, then 1.0 twice");
        assert_eq!(rank_of(&row, 2), 6, "NaN is never at least as likely");
        // From the best tokens alone: exact where they can tell.
        let lse = logsumexp(&row[..5]);
        let lp = |t: usize| row[t] - lse;
        let top: Vec<(u32, f32)> = [1u32, 3, 0, 4]
            .iter()
            .map(|&t| (t, lp(t as usize)))
            .collect();
        assert_eq!(rank_from_top(0, lp(0), &top), Some(3));
        assert_eq!(
            rank_from_top(1, lp(1), &top),
            None,
            "tied with a listed token"
        );
        assert_eq!(
            rank_from_top(4, lp(4), &top),
            None,
            "last listed: ties may go on"
        );
        assert_eq!(rank_from_top(2, lp(2), &top), None, "not listed");
        // A sampled row reports it when it lists logprobs.
        let p = SampleParams {
            logprobs: 2,
            ..SampleParams::greedy()
        };
        let s = sample(&row[..5], &p);
        assert_eq!((s.token, s.rank), (1, Some(2)));
        assert_eq!(sample(&row[..5], &SampleParams::greedy()).rank, None);
    }

    #[test]
    fn sampling_exp_is_within_two_ulp_of_exp() {
        let mut worst = 0.0f64;
        for i in 0..200_000 {
            let x = -(i as f32) * 5e-4;
            let want = (x as f64).exp();
            let got = sampling_exp(x) as f64;
            if want > 1e-37 {
                worst = worst.max((got - want).abs() / want);
            }
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(sampling_exp(0.0), 1.0);
        assert_eq!(sampling_exp(-200.0), 0.0);
        assert!(sampling_exp(-100.0) > 0.0);
    }

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
