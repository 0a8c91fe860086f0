//! Matrix products through the `gemm` crate (BLIS-style kernels with AVX2 /
//! AVX-512 / NEON paths, threaded with rayon): the CPU backend runs near the
//! cores' FMA rate without hand-written loops.

use gemm::Parallelism;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`, all row-major. `w` is laid out like a
/// PyTorch `nn.Linear` weight (`[out_features, in_features]`), so the
/// transpose is a stride choice, not a copy.
pub fn matmul_nt(x: &[f32], w: &[f32], out: &mut [f32], m: usize, n: usize, k: usize) {
    assert_eq!(x.len(), m * k, "matmul_nt: x is not [m, k]");
    assert_eq!(w.len(), n * k, "matmul_nt: w is not [n, k]");
    assert_eq!(out.len(), m * n, "matmul_nt: out is not [m, n]");
    let par = if m * n * k >= 1 << 18 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above prove every index the strides reach lies in
    // its slice: x rows of k (row stride k, col stride 1), wᵀ as a [k, n]
    // view of w (row stride 1, col stride k), out rows of n.
    unsafe {
        raw(
            m,
            n,
            k,
            out.as_mut_ptr(),
            n,
            false,
            x.as_ptr(),
            k,
            w.as_ptr(),
            1,
            k,
            1.0,
            par,
        )
    }
}

/// `out[m, n] (+)= alpha · a[m, k] · b` with `b` given by strides, single
/// threaded (for small products inside an already parallel loop).
///
/// # Safety
/// `out`, `a`, `b` must be valid for the extents their strides describe:
/// `out[i * out_rs + j]`, `a[i * a_rs + p]`, `b[p * b_rs + j * b_cs]`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_small(
    m: usize,
    n: usize,
    k: usize,
    out: *mut f32,
    out_rs: usize,
    accumulate: bool,
    a: *const f32,
    a_rs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    alpha: f32,
) {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        raw(
            m,
            n,
            k,
            out,
            out_rs,
            accumulate,
            a,
            a_rs,
            b,
            b_rs,
            b_cs,
            alpha,
            Parallelism::None,
        )
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn raw(
    m: usize,
    n: usize,
    k: usize,
    out: *mut f32,
    out_rs: usize,
    accumulate: bool,
    a: *const f32,
    a_rs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    alpha: f32,
    par: Parallelism,
) {
    // gemm computes dst = alpha_dst * dst + beta * lhs * rhs; its "alpha" is
    // the factor on the old dst, its "beta" the one on the product.
    // SAFETY: forwarded from the callers, which checked the extents.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_rs as isize,
            accumulate,
            a,
            1,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    s += x[i * k + p] as f64 * w[j * k + p] as f64;
                }
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    #[test]
    fn matches_naive_on_ragged_sizes() {
        for &(m, n, k) in &[(1, 1, 1), (3, 17, 5), (33, 65, 129), (128, 96, 64)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0)
                .collect();
            let mut out = vec![f32::NAN; m * n];
            matmul_nt(&x, &w, &mut out, m, n, k);
            let want = naive(&x, &w, m, n, k);
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{a} vs {b} at {m}x{n}x{k}"
                );
            }
        }
    }
}
