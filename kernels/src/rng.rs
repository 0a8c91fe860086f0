//! A counter-based random generator shared bit for bit by the CPU and the
//! GPU: random weights and sampling draws are pure functions of
//! `(seed, stream, index)`, so both backends produce identical values with no
//! state to carry between launches. The CUDA twin is `rng.cuh`; keep them in
//! step (the GPU self-check compares them).

/// SplitMix64's finaliser: a bijective 64-bit mixer with full avalanche.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64 random bits for element `index` of `stream` under `seed`.
#[inline]
pub fn bits(seed: u64, stream: u64, index: u64) -> u64 {
    mix64(seed ^ mix64(stream ^ mix64(index)))
}

/// Uniform in `[0, 1)` with 24 random bits (exact in f32).
#[inline]
pub fn uniform01(seed: u64, stream: u64, index: u64) -> f32 {
    (bits(seed, stream, index) >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// `sqrt(3)`: a uniform on `[-a, a]` has standard deviation `a / sqrt(3)`.
pub const SQRT3: f32 = 1.732_050_8;

/// A weight drawn uniformly with mean `mean` and standard deviation `std`.
#[inline]
pub fn random_weight(seed: u64, stream: u64, index: u64, mean: f32, std: f32) -> f32 {
    let u = uniform01(seed, stream, index);
    (u * 2.0 - 1.0) * (std * SQRT3) + mean
}

/// The stream that sampling draws come from (distinct from every weight
/// stream, which are tensor ordinals below 2^32).
pub const SAMPLING_STREAM: u64 = 0x5a4d_504c_0000_0000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_range_and_spread() {
        let n = 100_000;
        let mut sum = 0.0f64;
        let mut sq = 0.0f64;
        for i in 0..n {
            let x = random_weight(7, 3, i, 0.0, 2.0);
            assert!(x.abs() <= 2.0 * SQRT3);
            sum += x as f64;
            sq += (x as f64) * (x as f64);
        }
        let mean = sum / n as f64;
        let std = (sq / n as f64 - mean * mean).sqrt();
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((std - 2.0).abs() < 0.02, "{std}");
    }

    #[test]
    fn streams_and_seeds_differ() {
        assert_ne!(bits(1, 0, 0), bits(2, 0, 0));
        assert_ne!(bits(1, 0, 0), bits(1, 1, 0));
        assert_ne!(bits(1, 0, 0), bits(1, 0, 1));
        assert_eq!(bits(5, 6, 7), bits(5, 6, 7));
    }
}
