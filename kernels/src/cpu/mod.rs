//! The CPU reference: every op of the model in f32, simple enough to trust
//! and fast enough to run real models (GEMMs and attention tiles through the
//! `gemm` crate, rows split over rayon). It is the oracle the GPU is checked
//! against.

pub mod attention;
pub mod elementwise;
pub mod fused;
pub mod gemm;
pub mod processing;
pub mod sampling;

pub use attention::{AttnSeq, KvLayer, kv_append, paged_attention};
pub use elementwise::*;
pub use gemm::matmul_nt;
pub use processing::{Processing, sample_processed};
pub use sampling::{SampleParams, Sampled, rank_from_top, rank_of, sample, token_logprob};
