//! `tacflowd`, the tacflow daemon: a Python LLM server hands it model
//! execution over ZeroMQ and shared memory.
//!
//! | concept | module |
//! | --- | --- |
//! | configuration (TOML, flags, environment) | [`config`] |
//! | I/O thread, executor thread, sessions, shutdown | [`server`] |
//! | sequences, KV blocks, steps | [`engine`] |
//! | attention-only sequences served layer by layer (`attention_step`) | [`offload`] |
//! | the decoder and its weights | [`model`] |
//! | the forward pass as ops x row ranges x lanes | [`schedule`] |
//! | `tune`: profile, search, cache the schedule the daemon loads | [`tune`] |
//! | `bench-serve`: offline throughput of a synthetic workload | [`serve_bench`] |
//! | the ops it runs on (CPU reference, CUDA) | [`backend`] |
//! | GPU against CPU, every kernel and whole models | [`selfcheck`] |
//! | GPU benchmarks (the `lab` feature: hidden subcommands) | `bench` |

pub mod backend;
#[cfg(feature = "lab")]
pub mod bench;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod model;
pub mod offload;
pub mod schedule;
pub mod selfcheck;
pub mod serve_bench;
pub mod server;
pub mod tune;

pub use config::Config;
pub use error::{Error, Result};
pub use server::{Shutdown, run};
