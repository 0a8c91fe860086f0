//! The CUDA side of every op: `.cu` sources compiled by NVRTC at start-up
//! for the device's architecture (PTX cached on disk by source hash +
//! arch), typed launch wrappers with `#[repr(C)]` parameter structs, and
//! cuBLAS GEMMs.
//!
//! | piece | file |
//! | --- | --- |
//! | finding libcuda / libnvrtc / libcublas without panicking | [`probe`] |
//! | the embedded sources and kernel names | [`sources`], `kernels/*.cu` |
//! | NVRTC and the PTX cache | [`nvrtc`] |
//! | context, stream, kernels, buffers | [`device`]; reused activation buffers: [`pool`] |
//! | a step's metadata on the device | [`step`] |
//! | GEMM (cuBLAS, row-major through column-major) | [`gemm`] |
//! | embedding, RMSNorm, RoPE, SwiGLU, adds, gather, random weights | [`rowwise`] |
//! | the paged bf16 KV cache, append, copy-on-write copies | [`kv`] |
//! | paged attention (decode and prefill) | [`attention`]; issue 4's kernel, the benchmark baseline: [`attention_regs`] |
//! | sampling and log-probabilities | [`sampling`] |
//! | event timing, the copy ceiling, a stream hold (benchmarks) | [`timing`] |
//!
//! Dtypes: weights and the KV cache are bf16; the residual stream and GEMM
//! outputs are f32; GEMM inputs (normed activations, attention output,
//! SwiGLU output) are bf16.

pub mod attention;
pub mod attention_regs;
pub mod device;
pub mod gemm;
pub mod kv;
pub mod nvrtc;
pub mod pool;
pub mod probe;
pub mod rowwise;
pub mod sampling;
pub mod sources;
pub mod step;
pub mod timing;

pub use attention::{AttnForce, AttnIo, AttnKernel, AttnPlan, AttnShape};
/// Device buffers are cudarc's, re-exported so users need no cudarc dependency.
pub use cudarc::driver::CudaSlice;
pub use device::{DeviceInfo, Gpu};
pub use kv::KvCache;
pub use pool::{BufferPool, Pooled};
pub use probe::probe;
pub use rowwise::{RmsOut, Rows};
pub use sources::{AttnLoad, AttnVariant};
pub use step::{DeviceStep, StepArrays};
pub use timing::Span;
