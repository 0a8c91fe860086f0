//! The forward pass as a schedule: ops × row ranges × lanes, with explicit
//! dependencies.
//!
//! A step's forward pass is a fixed sequence of ops ([`Op`]: the embedding,
//! each layer's norm, GEMMs, RoPE, KV append, attention, adds, SwiGLU, then
//! the logits), each reading and writing whole rows of a few activation
//! buffers ([`Buf`]). A [`Schedule`] cuts each op into nodes over row ranges
//! of the step (nano-batches), puts each node on a lane (a CUDA stream on
//! the GPU; lanes run concurrently and are ordered only by events), and
//! names the events that order nodes of different lanes. The sequential
//! pass is the schedule of one lane with one node per op.
//!
//! | piece | file |
//! | --- | --- |
//! | ops, buffers, what each node reads and writes | [`program`] |
//! | schedules: the sequential pass, nano-batches on lanes | [`build`] |
//! | the dependencies a schedule must order, validation | [`deps`] |
//! | issue orders (sequential, seeded random) | [`order`] |
//! | execution traces and the checker that proves them ordered | [`trace`] |
//! | running a schedule on a backend | [`run`] |
//! | schedules from a cost model: the search | [`search`] |
//! | the schedule `tune` chose, as the daemon loads it | [`tuned`] |

pub mod build;
pub mod deps;
pub mod order;
pub mod program;
pub mod run;
pub mod search;
pub mod trace;
pub mod tuned;

#[cfg(test)]
pub(crate) mod tests;

use crate::backend::StepMeta;
use deps::ScheduleError;
use program::Program;
use std::ops::Range;

pub use program::{Buf, Op};

/// How the engine cuts each step's forward pass.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Plan {
    /// One lane, one node per op, issued in program order: today's pass,
    /// and the baseline of every overlap figure.
    #[default]
    Sequential,
    /// A seeded random valid schedule per step (random nano-batches, one
    /// to four lanes), issued in a seeded random order: the adversarial
    /// interleaving the tests run the CPU backend under.
    Random { seed: u64 },
    /// The schedule `tacflowd tune` chose (`--overlap`), cut to each
    /// step's rows and sequences, validated before it runs.
    Tuned(std::sync::Arc<tuned::Tuned>),
    /// This schedule and issue order, run as they are, unvalidated: what
    /// the trace checker must catch when a schedule is wrong (tests).
    #[cfg(test)]
    Given(std::sync::Arc<(Schedule, Vec<usize>)>),
}

impl Plan {
    /// The step's schedule and the order its nodes are issued in. A
    /// schedule other than the sequential one is validated first, so one
    /// that would break a dependency never runs.
    pub fn lay_out(
        &self,
        program: &Program,
        meta: &StepMeta,
    ) -> Result<(Schedule, Vec<usize>), ScheduleError> {
        match *self {
            Plan::Sequential => {
                let s = build::sequential(program, meta.tokens.len(), meta.logit_rows.len());
                let order = order::sequential(&s)?;
                Ok((s, order))
            }
            Plan::Random { seed } => {
                let s = build::random(program, meta, seed);
                deps::validate(&s, program, meta)?;
                let order = order::random(&s, seed)?;
                Ok((s, order))
            }
            Plan::Tuned(ref t) => t.lay_out(program, meta),
            #[cfg(test)]
            Plan::Given(ref given) => Ok((given.0.clone(), given.1.clone())),
        }
    }
}

/// One node: an op over a range of the step's rows, on a lane.
///
/// Row-wise ops ([`Op::rowwise`]) take rows of the step's token rows; the
/// three logit ops ([`Op::Gather`], [`Op::FinalNorm`], [`Op::LmHead`]) take
/// rows of the logit rows (`StepMeta::logit_rows`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub op: Op,
    pub rows: Range<usize>,
    pub lane: usize,
}

/// `before` happens before `after` across lanes: the lane of `after` waits,
/// before running it, for an event signalled on the lane of `before` after
/// running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventEdge {
    pub before: usize,
    pub after: usize,
}

/// A step's forward pass cut into nodes on lanes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Schedule {
    /// Every node, each op's nodes covering its rows exactly once.
    pub nodes: Vec<Node>,
    /// Per lane, its nodes (indices into `nodes`) in the order it runs them.
    pub lanes: Vec<Vec<usize>>,
    /// The cross-lane orderings.
    pub events: Vec<EventEdge>,
}
