//! One forward pass of a step chosen by the caller, outside the serving
//! loop: `bench-serve` replays its largest step this way to time each
//! node's lane by CUDA events.

use super::Engine;
use crate::backend::{Backend, StepMeta};
use crate::error::{Error, Result};
use crate::schedule::Schedule;

impl<B: Backend> Engine<B> {
    /// One forward pass of `meta` under the engine's plan, on its model and
    /// KV cache, with `observe(backend, node, before)` around each node
    /// ([`crate::model::Model::forward_observed`]); returns the schedule
    /// and the issue order that ran. Refused while a sequence is open: the
    /// step's block tables may name any block, which its KV append
    /// overwrites.
    pub fn observed_pass(
        &mut self,
        meta: &StepMeta,
        observe: &mut dyn FnMut(&B, usize, bool) -> Result<()>,
    ) -> Result<(Schedule, Vec<usize>)> {
        if !self.seqs.is_empty() {
            return Err(Error::Backend(format!(
                "a replayed pass overwrites KV blocks; {} sequences are open",
                self.seqs.len()
            )));
        }
        let (schedule, order) = self
            .plan
            .lay_out(&self.model.program(), meta)
            .map_err(|e| Error::Config(e.to_string()))?;
        let b = &self.backend;
        let mut each = |i: usize, before: bool| observe(b, i, before);
        self.model
            .forward_observed(b, &mut self.kv, meta, (&schedule, &order), &mut each)?;
        Ok((schedule, order))
    }
}
