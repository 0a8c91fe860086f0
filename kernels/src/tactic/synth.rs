//! Seeded synthetic keys and queries whose scores are heavy-tailed, as a
//! real model's are (kernels/TACTIC.md, "Synthetic keys"): the unit tests,
//! the GPU self-check and `tacflowd bench-tactic` draw from here.
//!
//! `blobs` centres in `d` dimensions; key `i` is centre `i % blobs` plus
//! N(0, 0.1²) noise per dimension (blobs interleaved by position, so that
//! a clustering has to find them, not read them off the positions). The `G`
//! query heads are coordinate axes `a_g = (3 + 7g) mod d` scaled by `√d`;
//! each centre's coordinate `a_g` is a Student-t(3) draw times `T_SCALE`,
//! its other coordinates N(0, 1). So head `g`'s scores `q·k/√d` are, per
//! blob, Student-t(3) x `T_SCALE` plus small noise: a few blobs carry most
//! of the mass, unevenly across heads. Every draw is a pure function of
//! `(seed, stream, index)` through [`crate::rng`].
//!
//! [`Synth::calibrate`] rescales the t draws so that the oracle at a given
//! P reads a chosen fraction of the keys (`bench-tactic`'s controlled
//! keys).

use crate::rng;

/// At 1.0 the exact set reaching 0.9 holds ~1% of 4096 such scores at the
/// median, ~13% on average: sparse but uneven, as on the real model.
pub const T_SCALE: f32 = 1.0;

/// A standard normal from two uniforms (Box–Muller), seeded.
pub fn normal(seed: u64, stream: u64, i: u64) -> f32 {
    let u1 = rng::uniform01(seed, stream, 2 * i).max(1e-7);
    let u2 = rng::uniform01(seed, stream, 2 * i + 1);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Student-t with 3 degrees of freedom: `Z / sqrt(χ²₃ / 3)`.
pub fn student_t3(seed: u64, stream: u64, i: u64) -> f32 {
    let z = normal(seed, stream, 4 * i);
    let chi: f32 = (1..4)
        .map(|j| normal(seed, stream, 4 * i + j).powi(2))
        .sum();
    z / (chi / 3.0).sqrt()
}

/// Keys `[n, d]` and the group's query rows `[G, d]` (unscaled).
#[derive(Debug, Clone)]
pub struct Synth {
    pub d: usize,
    pub n: usize,
    pub keys: Vec<f32>,
    pub queries: Vec<f32>,
    /// The Student-t scale the keys were built with (`T_SCALE` unless
    /// calibrated): the heavier, the fewer keys carry the mass.
    pub scale: f32,
    blobs: usize,
    seed: u64,
    /// The query axes `a_g`.
    dirs: Vec<usize>,
    /// The t draws at scale 1, `[blobs, G]`.
    t: Vec<f32>,
}

/// What [`Synth::calibrate`] reached: the scale it chose, the oracle's
/// fraction there (measured on the keys as built at that scale), and how
/// many bisection steps it took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    pub scale: f32,
    pub fraction: f64,
    pub steps: usize,
}

/// Bisection bounds on the scale (log scale) and its stopping rule: within
/// `CAL_TOL` of the target, relative, or `CAL_STEPS` halvings.
const CAL_RANGE: (f32, f32) = (1.0 / 64.0, 256.0);
const CAL_TOL: f64 = 0.02;
const CAL_STEPS: usize = 40;

impl Synth {
    /// The construction of the module doc.
    pub fn heavy(n: usize, blobs: usize, group: usize, d: usize, seed: u64) -> Synth {
        Synth::scaled(n, blobs, group, d, seed, T_SCALE)
    }

    /// [`Synth::heavy`] with the t draws times `scale` instead of
    /// `T_SCALE` (the same draws: only coordinates `a_g` change).
    pub fn scaled(n: usize, blobs: usize, group: usize, d: usize, seed: u64, scale: f32) -> Synth {
        use rayon::prelude::*;
        let dirs: Vec<usize> = (0..group).map(|g| (3 + 7 * g) % d).collect();
        let t: Vec<f32> = (0..blobs * group)
            .map(|i| student_t3(seed, 2 + (i % group) as u64, (i / group) as u64))
            .collect();
        let mut centres = vec![0.0f32; blobs * d];
        for b in 0..blobs {
            for j in 0..d {
                centres[b * d + j] = normal(seed, 1, (b * d + j) as u64);
            }
        }
        let mut keys = vec![0.0f32; n * d];
        keys.par_chunks_mut(d).enumerate().for_each(|(i, k)| {
            let b = i % blobs;
            for (j, x) in k.iter_mut().enumerate() {
                *x = centres[b * d + j] + 0.1 * normal(seed, 9, (i * d + j) as u64);
            }
        });
        let mut queries = vec![0.0f32; group * d];
        for (g, &a) in dirs.iter().enumerate() {
            queries[g * d + a] = (d as f32).sqrt();
        }
        let mut s = Synth {
            d,
            n,
            keys,
            queries,
            scale: 0.0,
            blobs,
            seed,
            dirs,
            t,
        };
        s.set_scale(scale);
        s
    }

    /// Rebuilds coordinates `a_g` at `scale`: the keys equal
    /// [`Synth::scaled`]'s at that scale, bit for bit.
    pub fn set_scale(&mut self, scale: f32) {
        use rayon::prelude::*;
        let (d, blobs, seed) = (self.d, self.blobs, self.seed);
        let (dirs, t) = (&self.dirs, &self.t);
        let g = dirs.len();
        self.keys.par_chunks_mut(d).enumerate().for_each(|(i, k)| {
            let b = i % blobs;
            for (gi, &a) in dirs.iter().enumerate() {
                k[a] = scale * t[b * g + gi] + 0.1 * normal(seed, 9, (i * d + a) as u64);
            }
        });
        self.scale = scale;
    }

    /// The group's queries turned by seeded noise of deviation `spread`
    /// (distinct decode steps over the same keys).
    pub fn turned(&self, spread: f32, seed: u64, step: u64) -> Vec<f32> {
        self.queries
            .iter()
            .enumerate()
            .map(|(i, &x)| x + spread * normal(seed, 1000 + step, i as u64))
            .collect()
    }

    /// Each query row's scores `q·k/√d` over all `n` keys, `[rows][n]`.
    fn scores(&self, q: &[f32]) -> Vec<Vec<f32>> {
        use rayon::prelude::*;
        let (d, r) = (self.d, 1.0 / (self.d as f32).sqrt());
        q.chunks(d)
            .map(|qh| {
                self.keys
                    .par_chunks(d)
                    .map(|k| crate::tactic::keys::dot(qh, k) * r)
                    .collect()
            })
            .collect()
    }

    /// The oracle's fraction of the keys for query rows `q` (`[rows, d]`)
    /// at `p`: each row's smallest set reaching `p`, unioned, over `n`.
    pub fn oracle_fraction(&self, q: &[f32], p: f32) -> f64 {
        union_fraction(&self.scores(q), p)
    }

    /// Sets the scale, by bisection on its logarithm, so that the oracle
    /// over query rows `q` at `p` reads `target` of the keys (within 2%
    /// relative, or the closest of 40 halvings of [1/64, 256]). The
    /// fraction falls as the scale grows (heavier tails put the mass on
    /// fewer blobs). The scores are affine in the scale
    /// (`u + scale · w[blob]`), so a step costs the oracle's sorts only.
    pub fn calibrate(&mut self, q: &[f32], p: f32, target: f64) -> Calibration {
        let (d, g, r) = (self.d, self.dirs.len(), 1.0 / (self.d as f32).sqrt());
        let at = self.scores(q);
        // w[row][blob] = Σ_g q[a_g] t[blob, g] / √d; u = score − scale·w.
        let w: Vec<Vec<f32>> = q
            .chunks(d)
            .map(|qh| {
                (0..self.blobs)
                    .map(|b| {
                        let s: f32 = (0..g)
                            .map(|gi| qh[self.dirs[gi]] * self.t[b * g + gi])
                            .sum();
                        s * r
                    })
                    .collect()
            })
            .collect();
        let u: Vec<Vec<f32>> = at
            .iter()
            .zip(&w)
            .map(|(s, wr)| {
                let blobs = self.blobs;
                s.iter()
                    .enumerate()
                    .map(|(i, &x)| x - self.scale * wr[i % blobs])
                    .collect()
            })
            .collect();
        let fraction_at = |scale: f32| {
            let s: Vec<Vec<f32>> = u
                .iter()
                .zip(&w)
                .map(|(ur, wr)| {
                    ur.iter()
                        .enumerate()
                        .map(|(i, &x)| x + scale * wr[i % self.blobs])
                        .collect()
                })
                .collect();
            union_fraction(&s, p)
        };
        let (mut lo, mut hi) = (CAL_RANGE.0.ln(), CAL_RANGE.1.ln());
        let mut best = (f64::INFINITY, self.scale);
        let mut steps = 0;
        while steps < CAL_STEPS {
            steps += 1;
            let mid = 0.5 * (lo + hi);
            let f = fraction_at(mid.exp());
            if (f - target).abs() < best.0 {
                best = ((f - target).abs(), mid.exp());
            }
            if (f - target).abs() <= CAL_TOL * target {
                break;
            }
            if f > target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        self.set_scale(best.1);
        Calibration {
            scale: best.1,
            fraction: self.oracle_fraction(q, p),
            steps,
        }
    }
}

/// The union of each row's oracle set at `p`, as a fraction of the keys.
fn union_fraction(scores: &[Vec<f32>], p: f32) -> f64 {
    let n = scores.first().map_or(0, Vec::len);
    let mut mark = vec![false; n];
    let (mut order, mut set) = (vec![], vec![]);
    for s in scores {
        set.clear();
        crate::tactic::oracle_top_p(s, p, &mut order, &mut set);
        for &i in &set {
            mark[i as usize] = true;
        }
    }
    mark.iter().filter(|&&m| m).count() as f64 / n.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_keys_equal_a_rebuild_at_that_scale() {
        let mut a = Synth::heavy(300, 40, 3, 64, 7);
        a.set_scale(2.5);
        let b = Synth::scaled(300, 40, 3, 64, 7, 2.5);
        assert_eq!(a.keys, b.keys);
        assert_eq!(
            Synth::scaled(300, 40, 3, 64, 7, T_SCALE).keys,
            Synth::heavy(300, 40, 3, 64, 7).keys
        );
    }

    #[test]
    fn calibration_hits_the_oracle_fraction() {
        for (f, seed) in [(0.02, 1u64), (0.05, 2), (0.10, 3)] {
            let mut s = Synth::heavy(4096, 512, 4, 128, seed);
            let q = s.turned(0.15, seed, 0);
            let c = s.calibrate(&q, 0.9, f);
            assert!(
                (c.fraction - f).abs() <= 0.1 * f,
                "target {f}: reached {} at scale {} in {} steps",
                c.fraction,
                c.scale,
                c.steps
            );
            assert_eq!(c.fraction, s.oracle_fraction(&q, 0.9));
            assert_eq!(s.keys, Synth::scaled(4096, 512, 4, 128, seed, c.scale).keys);
        }
    }
}
