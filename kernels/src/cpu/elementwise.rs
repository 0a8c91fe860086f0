//! Row-wise and element-wise ops of the decoder: embedding, RMSNorm, RoPE,
//! SwiGLU, residual add. Rows are independent, so each op splits rows over
//! rayon when there are enough of them.

use rayon::prelude::*;

/// Rows per rayon task: enough work per task to amortise the split.
fn chunk_rows(cols: usize) -> usize {
    (16_384 / cols.max(1)).max(1)
}

/// `out[t] = table[tokens[t]]`; `table` is `[vocab, dim]`.
pub fn embed(table: &[f32], dim: usize, tokens: &[u32], out: &mut [f32]) {
    assert_eq!(out.len(), tokens.len() * dim);
    for (row, &t) in out.chunks_exact_mut(dim).zip(tokens) {
        let t = t as usize;
        row.copy_from_slice(&table[t * dim..(t + 1) * dim]);
    }
}

/// RMSNorm as Llama defines it: `x / sqrt(mean(x²) + eps) * weight`,
/// accumulated in f32 like the Hugging Face reference.
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len() % dim, 0);
    let rows = chunk_rows(dim);
    out.par_chunks_mut(dim * rows)
        .zip(x.par_chunks(dim * rows))
        .for_each(|(o, xi)| {
            for (orow, xrow) in o.chunks_exact_mut(dim).zip(xi.chunks_exact(dim)) {
                let ms = xrow.iter().map(|v| v * v).sum::<f32>() / dim as f32;
                let r = 1.0 / (ms + eps).sqrt();
                for ((o, &v), &w) in orow.iter_mut().zip(xrow).zip(weight) {
                    *o = w * (v * r);
                }
            }
        });
}

/// Llama-3 RoPE frequency scaling parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

/// The inverse frequencies of rotary embeddings, `head_dim / 2` of them,
/// computed in f32 as the Hugging Face reference does, with Llama-3 scaling
/// when given (long wavelengths divided by `factor`, short ones kept, the
/// band between blended).
pub fn rope_inv_freq(head_dim: usize, theta: f32, scaling: Option<RopeScaling>) -> Vec<f32> {
    let half = head_dim / 2;
    let base: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let Some(s) = scaling else { return base };
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen > low_wavelen {
                f / s.factor
            } else if wavelen < high_wavelen {
                f
            } else {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

/// Rotates `n_heads` heads of width `head_dim`, starting at column `col` of
/// each row of `x` (rows of `row_len`), by `positions[row]` — the
/// "rotate half" convention of Llama checkpoints: element `i` pairs with
/// `i + head_dim/2`.
pub fn rope(
    x: &mut [f32],
    row_len: usize,
    col: usize,
    n_heads: usize,
    head_dim: usize,
    positions: &[u32],
    inv_freq: &[f32],
) {
    let half = head_dim / 2;
    assert_eq!(inv_freq.len(), half);
    assert_eq!(x.len(), positions.len() * row_len);
    assert!(col + n_heads * head_dim <= row_len);
    x.par_chunks_mut(row_len)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|&f| {
                    let a = pos as f32 * f;
                    (a.cos(), a.sin())
                })
                .unzip();
            for h in 0..n_heads {
                let head = &mut row[col + h * head_dim..col + (h + 1) * head_dim];
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * cos[i] - b * sin[i];
                    hi[i] = b * cos[i] + a * sin[i];
                }
            }
        });
}

/// SwiGLU: `out[t, i] = silu(gu[t, i]) * gu[t, inter + i]` for rows of
/// `gu = [gate | up]`.
pub fn silu_mul(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    assert_eq!(gate_up.len(), out.len() * 2);
    let rows = chunk_rows(inter);
    out.par_chunks_mut(inter * rows)
        .zip(gate_up.par_chunks(2 * inter * rows))
        .for_each(|(o, gu)| {
            for (orow, gurow) in o.chunks_exact_mut(inter).zip(gu.chunks_exact(2 * inter)) {
                let (g, u) = gurow.split_at(inter);
                for ((o, &g), &u) in orow.iter_mut().zip(g).zip(u) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            }
        });
}

/// `x += y`.
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    x.par_chunks_mut(16_384)
        .zip(y.par_chunks(16_384))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

/// `x[t] += bias` for every row.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    assert_eq!(x.len() % bias.len(), 0);
    for row in x.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsnorm_normalises() {
        let x = [3.0f32, 4.0, 0.0, 0.0];
        let mut out = [0.0; 4];
        rmsnorm(&x, &[1.0, 2.0, 1.0, 1.0], 0.0, &mut out);
        // rms = sqrt(25/4) = 2.5
        assert_eq!(out, [1.2, 3.2, 0.0, 0.0]);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let inv = rope_inv_freq(8, 10_000.0, None);
        let mut x: Vec<f32> = (0..16).map(|i| i as f32 - 7.5).collect();
        let orig = x.clone();
        rope(&mut x, 16, 0, 2, 8, &[0], &inv);
        assert_eq!(x, orig);
        rope(&mut x, 16, 0, 2, 8, &[1234], &inv);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3 * n0);
    }

    #[test]
    fn llama3_scaling_has_three_bands() {
        let s = RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 256.0,
        };
        let base = rope_inv_freq(16, 10_000.0, None);
        let scaled = rope_inv_freq(16, 10_000.0, Some(s));
        assert_eq!(scaled[0], base[0]); // short wavelength: kept
        assert_eq!(scaled[7], base[7] / 8.0); // long wavelength: divided
        let mid: Vec<usize> = (0..8)
            .filter(|&i| scaled[i] != base[i] && scaled[i] != base[i] / 8.0)
            .collect();
        assert!(!mid.is_empty(), "no blended band: {scaled:?}");
    }

    #[test]
    fn silu_mul_matches_definition() {
        let gu = [1.0f32, -2.0, 3.0, 4.0];
        let mut out = [0.0; 2];
        silu_mul(&gu, 2, &mut out);
        let silu = |x: f32| x / (1.0 + (-x).exp());
        assert_eq!(out, [silu(1.0) * 3.0, silu(-2.0) * 4.0]);
    }
}
