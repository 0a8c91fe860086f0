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
//! | context, kernels, buffers | [`device`]; reused activation buffers: [`pool`] |
//! | lanes (streams, each with its cuBLAS handle and workspaces), events | [`lane`] |
//! | holding a lane to a share of the SMs: bounded grid, cuBLAS target, green context | [`share`], [`green`] |
//! | intervals timed by CUDA events on a lane's stream | [`timing`] |
//! | rows of a buffer, in place (row ranges of an op) | [`view`] |
//! | a step's metadata on the device, and a row range of it | [`step`] |
//! | GEMM (cuBLAS, row-major through column-major) | [`gemm`] |
//! | embedding, RMSNorm, RoPE, SwiGLU, adds, gather, random weights | [`rowwise`] |
//! | the paged bf16 KV cache, append, copy-on-write copies | [`kv`] |
//! | paged attention (decode and prefill) | [`attention`] |
//! | prefill chunks on tensor cores (`experimental_prefill_attention`) | [`prefill`] |
//! | fused ops: residual add + RMSNorm, RoPE + KV append, SwiGLU into bf16 | [`fused`] |
//! | CUDA graphs: capture and replay of a step per batch-size bucket | [`graph`] |
//! | sampling and log-probabilities | [`sampling`] |
//! | Tactic's clustering, selection and sparse attention | [`tactic`] |
//! | a kernel that faults the context on purpose (feature `fault-injection`, the fail-fast tests) | `fault` |
//! | the lab (feature `lab`): its modules, kernels chosen by hand, the first attention kernel as a baseline, the copy and read ceilings, a stream hold | `lab`, `attention_regs`, `timing` |
//!
//! Dtypes: weights and the KV cache are bf16; the residual stream and every
//! activation are f32. A GEMM takes its f32 input either as two bf16 halves
//! (`hi`, `lo = x - hi`, stacked as twice the rows: `split_bf16x2`, then
//! `sum_halves_f32`), so that cuBLAS's bf16 tensor cores see it to ~2^-17,
//! or, for an activation already in bf16, as it is; it writes f32.

pub mod attention;
#[cfg(feature = "lab")]
pub mod attention_regs;
pub mod device;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod fused;
pub mod gemm;
pub mod graph;
pub mod green;
pub mod ipc;
pub mod kv;
#[cfg(feature = "lab")]
pub mod lab;
pub mod lane;
pub mod nvrtc;
pub mod pool;
pub mod prefill;
pub mod probe;
pub mod rowwise;
pub mod sampling;
pub mod share;
pub mod sources;
pub mod step;
pub mod tactic;
pub mod timing;
pub mod view;

pub use attention::{AttnIo, AttnOverride, AttnPlan, AttnShape};
/// Device buffers are cudarc's, re-exported so users need no cudarc dependency.
pub use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
pub use device::{DeviceInfo, Gpu};
pub use fused::Heads;
pub use kv::KvCache;
pub use lane::LaneEvent;
pub use pool::{BufferPool, Pooled};
pub use probe::probe;
pub use rowwise::{RmsOut, Rows};
pub use share::SmMechanism;
pub use sources::{AttnLoad, AttnVariant};
pub use step::{DeviceStep, StepArrays, StepRows};
pub use tactic::{
    BudgetJob, ClusterJob, JobDiag, OracleJob, SelectJob, SelectionHost, TacticShape,
    TacticWorkspace,
};
pub use timing::{Mark, Span};
pub use view::{row_view, row_view_mut};
