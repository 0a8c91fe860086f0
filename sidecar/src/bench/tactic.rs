//! `tacflowd bench-tactic`: Tactic's decode path on a backend's device path
//! (the CPU backend's host stand-in, or the CUDA backend with the
//! experimental GPU Tactic) at batches of sequences, each its own keys, one
//! layer, against the product's full attention on the same cache.
//!
//! Keys: controlled ([`keys::controlled`]: `Synth` calibrated so that the
//! oracle reads a chosen fraction of the tokens at P = 0.9) or real
//! ([`real`]: a capture's post-RoPE keys and queries). Each point
//! (context, fraction, batch) decodes `steps` steps ending at the context
//! from a clustering of everything before the first (the first step
//! clusters). Per P: the device path's time per layer (the first step
//! apart), full attention's, and the selection's quality from the CPU
//! reference (`TacticSeq`) on the same keys and queries.
//!
//! | file | what |
//! | --- | --- |
//! | [`device`] | the backends and what the bench needs of them |
//! | [`keys`] | one sequence's keys, controlled |
//! | [`real`] | captured keys |
//! | [`capture`] | the daemon's own q and k captured (`capture-qk`) |
//! | [`point`] | one point measured |
//! | [`report`] | the table and the JSON |

pub mod capture;
pub mod device;
pub mod keys;
pub mod point;
pub mod real;
pub mod report;

use crate::error::{Error, Result};
use device::{Cpu, Cuda, Device};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub backend: BackendKind,
    /// Query heads, KV heads, head size (controlled keys; real keys bring
    /// their own).
    pub shape: (usize, usize, usize),
    pub contexts: Vec<usize>,
    pub batches: Vec<usize>,
    /// Oracle fractions at P = 0.9 the controlled keys are calibrated to.
    pub fractions: Vec<f64>,
    pub ps: Vec<f32>,
    pub steps: usize,
    pub seed: u64,
    /// A capture directory (`real`): real keys instead of controlled ones.
    pub keys: Option<PathBuf>,
    /// Sequences of a batch whose quality the CPU reference measures on a
    /// GPU (the CPU backend measures every one).
    pub quality_seqs: usize,
    pub json: Option<PathBuf>,
}

/// What the keys of a point are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Keys {
    /// Calibrated to this oracle fraction at P = 0.9.
    Controlled(f64),
    Real,
}

pub fn run(opts: &Options) -> Result<()> {
    let rows = match opts.backend {
        BackendKind::Cpu => measure_all(&Cpu::default(), opts)?,
        BackendKind::Cuda => measure_all(&Cuda::new()?, opts)?,
    };
    report::print(opts, &rows);
    if let Some(path) = &opts.json {
        super::write_json(path, &report::json(opts, &rows))?;
    }
    Ok(())
}

/// Every point of `opts` on `dev`: one row per (keys, context, batch, P).
pub fn measure_all<D: Device>(dev: &D, opts: &Options) -> Result<Vec<report::Row>> {
    if opts.steps == 0 || opts.ps.is_empty() || opts.batches.contains(&0) {
        return Err(Error::Config(
            "bench-tactic needs steps, batches of at least 1 and a P".into(),
        ));
    }
    let mut rows = vec![];
    if let Some(dir) = &opts.keys {
        let cap = real::Capture::open(dir)?;
        eprintln!("real keys {}", dir.display());
        let make = |s: usize| cap.sequence(s, opts.steps);
        let p = point::Point {
            keys: Keys::Real,
            shape: cap.shape(),
            batches: &opts.batches,
            make: &make,
        };
        return point::measure(dev, opts, &p);
    }
    let (nh, kvh, _) = opts.shape;
    if kvh == 0 || nh % kvh != 0 {
        return Err(Error::Config(
            "--shape: heads must be a multiple of KV heads".into(),
        ));
    }
    if opts.contexts.iter().any(|&c| c <= opts.steps) {
        return Err(Error::Config("each context must exceed the steps".into()));
    }
    for &context in &opts.contexts {
        for &f in &opts.fractions {
            {
                eprintln!("context {context}, oracle fraction {f}");
                let make = |s: usize| {
                    let seed = keys::seq_seed(opts.seed, s);
                    Ok(keys::controlled(context, opts.shape, f, opts.steps, seed))
                };
                let p = point::Point {
                    keys: Keys::Controlled(f),
                    shape: opts.shape,
                    batches: &opts.batches,
                    make: &make,
                };
                rows.extend(point::measure(dev, opts, &p)?);
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests;
