//! tacflow's kernels and their CPU reference.
//!
//! | concept | CPU (reference) | CUDA |
//! | --- | --- | --- |
//! | GEMM `x·wᵀ` | [`cpu::gemm`] (`gemm` crate) | cuBLAS, bf16 in, f32 accumulate |
//! | RMSNorm, RoPE, SwiGLU, add | [`cpu::elementwise`] | `cuda/*.cu` |
//! | paged attention | [`cpu::attention`] | `cuda/attention.cu` |
//! | sampling | [`cpu::sampling`] | `cuda/sampling.cu` |
//! | random numbers | [`rng`] (counter-based) | `rng.cuh`, bit-identical |
//!
//! The CPU side is the oracle: every GPU op is checked against it on fresh
//! random inputs.

pub mod cpu;
pub mod error;
pub mod rng;

pub use error::{Error, Result};
