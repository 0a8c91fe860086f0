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
}

impl Synth {
    /// The construction of the module doc.
    pub fn heavy(n: usize, blobs: usize, group: usize, d: usize, seed: u64) -> Synth {
        let dirs: Vec<usize> = (0..group).map(|g| (3 + 7 * g) % d).collect();
        let mut centres = vec![0.0f32; blobs * d];
        for b in 0..blobs {
            for j in 0..d {
                centres[b * d + j] = normal(seed, 1, (b * d + j) as u64);
            }
            for (g, &a) in dirs.iter().enumerate() {
                centres[b * d + a] = T_SCALE * student_t3(seed, 2 + g as u64, b as u64);
            }
        }
        let mut keys = vec![0.0f32; n * d];
        for i in 0..n {
            let b = i % blobs;
            for j in 0..d {
                keys[i * d + j] = centres[b * d + j] + 0.1 * normal(seed, 9, (i * d + j) as u64);
            }
        }
        let mut queries = vec![0.0f32; group * d];
        for (g, &a) in dirs.iter().enumerate() {
            queries[g * d + a] = (d as f32).sqrt();
        }
        Synth {
            d,
            n,
            keys,
            queries,
        }
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
}
