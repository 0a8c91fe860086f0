//! The keys and queries of one `bench-tactic` sequence: controlled
//! (`Synth` calibrated to an oracle fraction, kernels/TACTIC.md "Synthetic
//! keys") or real (a capture's post-RoPE keys and queries, [`super::real`]).

use rayon::prelude::*;
use tacflow_kernels::rng;
use tacflow_kernels::tactic::synth::{Calibration, Synth};

/// How far each step's queries turn from the construction's directions
/// (per dimension): enough that steps differ, little enough that the
/// scores keep the construction's heavy tails.
pub const TURN: f32 = 0.15;
/// The P at which the controlled keys' oracle fraction is calibrated.
pub const CAL_P: f32 = 0.9;

/// One sequence: its keys per KV head and its decode queries.
#[derive(Debug, Clone)]
pub struct SeqKeys {
    /// Tokens cached.
    pub n: usize,
    pub head_dim: usize,
    /// `[kv_head][n * d]`.
    pub keys: Vec<Vec<f32>>,
    /// `[step][num_heads * d]`: step `t` decodes at context
    /// `n - steps + 1 + t`.
    pub queries: Vec<Vec<f32>>,
    /// The seed of its values.
    pub seed: u64,
    /// Per KV head, where the calibration landed (controlled keys only).
    pub calibration: Vec<Calibration>,
}

/// The seed of sequence `s` of a point (its keys differ from every other
/// sequence's).
pub fn seq_seed(seed: u64, s: usize) -> u64 {
    rng::bits(seed, 77, s as u64)
}

/// Controlled keys: every KV head its own `Synth` (blobs of 8 tokens on
/// average) calibrated so that the oracle over the first step's queries
/// reads `fraction` of the tokens at P = [`CAL_P`].
pub fn controlled(
    n: usize,
    shape: (usize, usize, usize),
    fraction: f64,
    steps: usize,
    seed: u64,
) -> SeqKeys {
    let (nh, kvh, d) = shape;
    let g = nh / kvh;
    let made: Vec<(Synth, Calibration, u64)> = (0..kvh)
        .into_par_iter()
        .map(|h| {
            let hs = rng::bits(seed, 78, h as u64);
            let mut sy = Synth::heavy(n, (n / 8).max(1), g, d, hs);
            let q = sy.turned(TURN, hs, 0);
            let c = sy.calibrate(&q, CAL_P, fraction);
            (sy, c, hs)
        })
        .collect();
    let queries = (0..steps)
        .map(|t| {
            made.iter()
                .flat_map(|(sy, _, hs)| sy.turned(TURN, *hs, t as u64))
                .collect()
        })
        .collect();
    let calibration = made.iter().map(|m| m.1).collect();
    SeqKeys {
        n,
        head_dim: d,
        keys: made.into_iter().map(|m| m.0.keys).collect(),
        queries,
        seed,
        calibration,
    }
}

impl SeqKeys {
    /// Rows `[t0, t1)` as fused `[q | k | v]` rows (q zero, v seeded),
    /// rounded through bf16 when the cache the rows go to holds bf16 (so
    /// that a CPU copy holds what the GPU's cache holds).
    pub fn rows(&self, t0: usize, t1: usize, nh: usize, bf16: bool) -> Vec<f32> {
        let (kvh, d) = (self.keys.len(), self.head_dim);
        let w = (nh + 2 * kvh) * d;
        let mut rows = vec![0.0f32; (t1 - t0) * w];
        let round = |x: f32| {
            if bf16 {
                half::bf16::from_f32(x).to_f32()
            } else {
                x
            }
        };
        rows.par_chunks_mut(w).enumerate().for_each(|(i, row)| {
            let t = t0 + i;
            for (h, keys) in self.keys.iter().enumerate() {
                let k = nh * d + h * d;
                for j in 0..d {
                    row[k + j] = round(keys[t * d + j]);
                    let v =
                        rng::random_weight(self.seed, 50 + h as u64, (t * d + j) as u64, 0.0, 1.0);
                    row[(nh + kvh) * d + h * d + j] = round(v);
                }
            }
        });
        rows
    }
}
