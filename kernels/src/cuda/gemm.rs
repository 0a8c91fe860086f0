//! GEMMs through cuBLAS: bf16 operands, f32 accumulate, f32 output.

use super::device::{Gpu, check_len};
use crate::error::{Error, Result};
use cudarc::cublas::{result as blas, sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

fn dim(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Unsupported(format!("GEMM {what} = {v} exceeds i32")))
}

impl Gpu {
    /// `out[m, n] = x[m, k] · w[n, k]ᵀ`, every matrix row-major, `w` in
    /// PyTorch `nn.Linear` layout.
    ///
    /// cuBLAS is column-major. A row-major `[r, c]` matrix is, byte for
    /// byte, the column-major `[c, r]` matrix of its transpose, so we ask
    /// cuBLAS for `outᵀ[n, m] = w · xᵀ`: its `A` is our `w` read as the
    /// column-major `[k, n]` matrix `wᵀ` and transposed back (`OP_T`,
    /// `lda = k`), its `B` is our `x` read as the column-major `[k, m]`
    /// matrix `xᵀ` (`OP_N`, `ldb = k`), and its column-major `[n, m]`
    /// result (`ldc = n`) is exactly our row-major `[m, n]` output. No copy
    /// or transpose kernel is involved.
    ///
    /// `x` and `out` may be views of rows of larger buffers (an op over a
    /// nano-batch: `m` is then its row count); the handle is the current
    /// lane's, bound to its stream.
    pub fn gemm_nt(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &CudaSlice<bf16>,
        out: &mut impl DevicePtrMut<f32>,
        (m, n, k): (usize, usize, usize),
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        check_len("gemm x", x.len(), m * k)?;
        check_len("gemm w", w.len(), n * k)?;
        check_len("gemm out", out.len(), m * n)?;
        let (mi, ni, ki) = (dim("m", m)?, dim("n", n)?, dim("k", k)?);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (px, pw, po) = (self.ptr(x), self.ptr(w), self.ptr_mut(out));
        // SAFETY: the lengths were checked above against the extents the
        // leading dimensions imply (w: n rows of k, x: m rows of k, out: m
        // rows of n); alpha and beta are host scalars (pointer mode host);
        // the handle is the current lane's and runs on its stream, in that
        // stream's order with the launches that wrote x and read out.
        unsafe {
            blas::gemm_ex(
                *self.blas().handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                (&alpha) as *const f32 as *const _,
                pw as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                ki,
                px as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                ki,
                (&beta) as *const f32 as *const _,
                po as *mut _,
                sys::cudaDataType_t::CUDA_R_32F,
                ni,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Cublas {
            op: "cublasGemmEx",
            msg: e.to_string(),
        })
    }

    /// `out = x · wᵀ` for f32 rows `x`: the GEMM runs on `[hi; lo]`, the
    /// two bf16 halves of `x` (`split_bf16x2`), as `2m` rows, and the two
    /// halves of the result are summed. `x` is then seen to ~2^-17 rather
    /// than bf16's 2^-9 (rounding every GEMM input to bf16 put SmolLM2's
    /// decode logits 3.5e-2 from the f32 reference; see the commit), while
    /// `w` is still read once: nearly free for decode, twice the FLOPs for
    /// prefill.
    pub fn gemm_nt_f32(
        &self,
        x: &impl DevicePtr<f32>,
        w: &CudaSlice<bf16>,
        out: &mut impl DevicePtrMut<f32>,
        (m, n, k): (usize, usize, usize),
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        // The halves and the two-half product live in the current lane's
        // scratch buffers, kept between calls (grown, never shrunk, on the
        // lane's stream): no allocation per GEMM, and a GEMM on another lane
        // never shares them.
        let mut s = self.gemm_scratch();
        if s.halves.as_ref().is_none_or(|b| b.len() < 2 * m * k) {
            s.halves = Some(self.alloc::<bf16>(2 * m * k)?);
            self.note_workspace_regrowth();
        }
        if s.tmp.as_ref().is_none_or(|b| b.len() < 2 * m * n) {
            s.tmp = Some(self.alloc::<f32>(2 * m * n)?);
            self.note_workspace_regrowth();
        }
        let GemmScratch { halves, tmp } = &mut *s;
        let (halves, tmp) = (halves.as_mut().expect("set"), tmp.as_mut().expect("set"));
        self.split_bf16x2(x, halves, m * k)?;
        self.gemm_nt(halves, w, tmp, (2 * m, n, k))?;
        self.sum_halves(tmp, out, m * n)
    }
}

/// Scratch of [`Gpu::gemm_nt_f32`].
#[derive(Debug, Default)]
pub struct GemmScratch {
    halves: Option<CudaSlice<bf16>>,
    tmp: Option<CudaSlice<f32>>,
}
