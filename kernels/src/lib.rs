//! tacflow's kernels and their CPU reference.
//!
//! | concept | CPU (reference) | CUDA |
//! | --- | --- | --- |
//! | GEMM `x·wᵀ` | [`cpu::gemm`] (`gemm` crate) | [`cuda::gemm`]: cuBLAS, bf16 in, f32 accumulate |
//! | embedding, RMSNorm, RoPE, SwiGLU, add | [`cpu::elementwise`] | [`cuda::rowwise`]: `rowwise.cu`, `rope.cu` |
//! | paged KV cache, append, block copies | [`cpu::kv_append`] (f32) | [`cuda::kv`]: `kv.cu` (bf16) |
//! | paged attention | [`cpu::attention`] | [`cuda::attention`]: `attention.cu`, `attention/*.cuh` |
//! | sampling | [`cpu::sampling`] | [`cuda::sampling`]: `sampling.cu` |
//! | random numbers | [`rng`] (counter-based) | `prelude.cuh` + `random.cu`, bit-identical |
//! | device, NVRTC, PTX cache | — | [`cuda::device`], [`cuda::nvrtc`] |
//!
//! The CPU side is the oracle: every GPU op is checked against it on fresh
//! random inputs.

pub mod cpu;
pub mod cuda;
pub mod error;
pub mod rng;
pub mod tactic;

pub use error::{Error, Result};
