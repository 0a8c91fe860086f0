//! References of the fused ops: each does in one pass over a row what two
//! unfused ops do, with the same arithmetic in the same order, so that it
//! equals the composition exactly (the tests below hold it to that).

use half::bf16;

/// The paged cache one fused op writes to: K and V of one layer,
/// `[num_blocks, kv_heads, block_size, head_dim]` each.
#[derive(Debug)]
pub struct KvLayerMut<'a> {
    pub k: &'a mut [f32],
    pub v: &'a mut [f32],
    pub kv_heads: usize,
    pub block_size: usize,
    pub head_dim: usize,
}

/// For every row: `x += y`, then `out = x / sqrt(mean(x²) + eps) * w`
/// (`add_inplace` then `rmsnorm`). `x`, `y` and `out` are rows of
/// `w.len()`.
pub fn add_rmsnorm(x: &mut [f32], y: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let dim = w.len();
    assert!(x.len() == y.len() && x.len() == out.len() && x.len().is_multiple_of(dim));
    for ((xr, yr), or) in x
        .chunks_exact_mut(dim)
        .zip(y.chunks_exact(dim))
        .zip(out.chunks_exact_mut(dim))
    {
        xr.iter_mut().zip(yr).for_each(|(a, b)| *a += b);
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &wi) in or.iter_mut().zip(xr.iter()).zip(w) {
            *o = wi * (v * r);
        }
    }
}

/// For every row of `qkv` (rows of `row_len`: `heads` q heads, `kv.kv_heads`
/// k heads, then as many v heads, from column 0): rotates its q and k heads
/// by `positions[row]` ("rotate half", as `rope`), then writes the rotated
/// k and the v to slot `slots[row]` of the cache (as `kv_append`).
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_append(
    qkv: &mut [f32],
    row_len: usize,
    heads: usize,
    positions: &[u32],
    slots: &[u32],
    inv_freq: &[f32],
    kv: KvLayerMut<'_>,
) {
    let (d, kvh, bs) = (kv.head_dim, kv.kv_heads, kv.block_size);
    let half = d / 2;
    assert_eq!(inv_freq.len(), half);
    assert_eq!(qkv.len(), positions.len() * row_len);
    assert_eq!(positions.len(), slots.len());
    assert!((heads + 2 * kvh) * d <= row_len);
    for ((row, &pos), &slot) in qkv.chunks_exact_mut(row_len).zip(positions).zip(slots) {
        for h in 0..heads + kvh {
            let head = &mut row[h * d..(h + 1) * d];
            for i in 0..half {
                let a = pos as f32 * inv_freq[i];
                let (sin, cos) = (a.sin(), a.cos());
                let (lo, hi) = (head[i], head[i + half]);
                head[i] = lo * cos - hi * sin;
                head[i + half] = hi * cos + lo * sin;
            }
        }
        let slot = slot as usize;
        let base = (slot / bs) * kvh * bs * d + (slot % bs) * d;
        for h in 0..kvh {
            let dst = base + h * bs * d;
            let (k_col, v_col) = ((heads + h) * d, (heads + kvh + h) * d);
            kv.k[dst..dst + d].copy_from_slice(&row[k_col..k_col + d]);
            kv.v[dst..dst + d].copy_from_slice(&row[v_col..v_col + d]);
        }
    }
}

/// SwiGLU (`silu_mul`) with each output rounded to bf16, as the input of a
/// bf16 GEMM: rows of `[gate | up]` into rows of `inter`.
pub fn silu_mul_bf16(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    assert_eq!(gate_up.len(), out.len() * 2);
    for (orow, gurow) in out
        .chunks_exact_mut(inter)
        .zip(gate_up.chunks_exact(2 * inter))
    {
        let (g, u) = gurow.split_at(inter);
        for ((o, &g), &u) in orow.iter_mut().zip(g).zip(u) {
            *o = bf16::from_f32(g / (1.0 + (-g).exp()) * u).to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{add_inplace, kv_append, rmsnorm, rope, rope_inv_freq, silu_mul};
    use crate::rng::random_weight;

    fn rand(n: usize, stream: u64, mean: f32, std: f32) -> Vec<f32> {
        (0..n as u64)
            .map(|i| random_weight(11, stream, i, mean, std))
            .collect()
    }

    #[test]
    fn add_rmsnorm_is_add_then_rmsnorm_exactly() {
        // Ragged widths, one row, large magnitudes.
        for (rows, dim, scale) in [(1usize, 1usize, 1.0f32), (3, 33, 1.0), (7, 256, 1e18)] {
            let x = rand(rows * dim, 1, 0.5, scale);
            let y = rand(rows * dim, 2, 0.0, scale);
            let w = rand(dim, 3, 1.0, 0.1);
            let (mut xf, mut of) = (x.clone(), vec![f32::NAN; rows * dim]);
            add_rmsnorm(&mut xf, &y, &w, 1e-5, &mut of);
            let (mut xc, mut oc) = (x, vec![0.0; rows * dim]);
            add_inplace(&mut xc, &y);
            rmsnorm(&xc, &w, 1e-5, &mut oc);
            assert_eq!(xf, xc, "the residual stream");
            assert_eq!(of, oc, "the normed rows");
        }
    }

    #[test]
    fn rope_kv_append_is_rope_then_kv_append_exactly() {
        for (heads, kvh, d, t) in [
            (4usize, 2usize, 16usize, 37usize),
            (3, 1, 8, 1),
            (2, 2, 64, 17),
        ] {
            let row_len = (heads + 2 * kvh) * d + 3; // a tail that stays
            let x = rand(t * row_len, 4, 0.0, 1.0);
            let positions: Vec<u32> = (0..t as u32).map(|i| i * 977 % 5000).collect();
            // Scattered slots over blocks 1.. of 16, crossing a block boundary.
            let slots: Vec<u32> = (0..t as u32).map(|i| 16 + (i * 7) % 48).collect();
            let inv = rope_inv_freq(d, 10_000.0, None);
            let n = 4 * kvh * 16 * d;
            let (mut kf, mut vf) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            let mut qf = x.clone();
            let kv = KvLayerMut {
                k: &mut kf,
                v: &mut vf,
                kv_heads: kvh,
                block_size: 16,
                head_dim: d,
            };
            rope_kv_append(&mut qf, row_len, heads, &positions, &slots, &inv, kv);
            let (mut kc, mut vc) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            let mut qc = x;
            rope(&mut qc, row_len, 0, heads + kvh, d, &positions, &inv);
            kv_append(
                &mut kc,
                &mut vc,
                (kvh, 16, d),
                &qc,
                row_len,
                heads * d,
                &slots,
            );
            assert_eq!(qf, qc, "rotated rows");
            let same =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same(&kf, &kc) && same(&vf, &vc), "the cache, NaNs included");
        }
    }

    #[test]
    fn silu_mul_bf16_rounds_silu_mul_once() {
        let gu = rand(3 * 2 * 100, 5, 0.0, 3.0);
        let mut want = vec![0.0; 300];
        silu_mul(&gu, 100, &mut want);
        let mut got = vec![0.0; 300];
        silu_mul_bf16(&gu, 100, &mut got);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(*g, bf16::from_f32(*w).to_f32());
        }
    }
}
