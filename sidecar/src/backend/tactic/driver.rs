//! The device path's bookkeeping, shared by every backend that keeps Tactic
//! states: the states of the sequences, created with the model's shape at
//! the first open; for each attention node, every entry's state planned
//! (grown where the rule says) and turned into the kernels' jobs; the
//! step's end.

use super::mem::DeviceMemory;
use super::state::{LayerPlan, StateId, TacticStates};
use crate::backend::{AttnDims, TacticEntry};
use crate::error::{Error, Result};
use tacflow_kernels::cuda::{ClusterJob, SelectJob};
use tacflow_kernels::tactic::{KMeansParams, TacticParams};

/// One entry of an attention node with its state planned.
#[derive(Debug, Clone, Copy)]
pub struct Planned {
    pub entry: TacticEntry,
    pub plan: LayerPlan,
}

/// A backend's Tactic states and the calls the [`crate::backend::Backend`]
/// methods forward to.
#[derive(Debug)]
pub struct TacticDevice<M: DeviceMemory> {
    /// Created at the first open, for that model's KV heads and head size.
    states: Option<TacticStates<M>>,
}

impl<M: DeviceMemory> Default for TacticDevice<M> {
    fn default() -> Self {
        TacticDevice { states: None }
    }
}

fn no_state(id: StateId) -> Error {
    Error::Backend(format!("no Tactic state {id}"))
}

impl<M: DeviceMemory> TacticDevice<M> {
    pub fn open(
        &mut self,
        id: StateId,
        params: &TacticParams,
        dims: AttnDims,
        layers: usize,
    ) -> Result<()> {
        let want = (dims.num_kv_heads, dims.head_dim);
        let states = self
            .states
            .get_or_insert_with(|| TacticStates::new(want.0, want.1));
        if states.dims() != want {
            return Err(Error::Backend(format!(
                "Tactic states of {:?} (KV heads, head size) asked for {want:?}",
                states.dims()
            )));
        }
        states.open(id, *params, layers)
    }

    pub fn fork(&mut self, parent: StateId, child: StateId) -> Result<()> {
        let states = self.states.as_mut().ok_or_else(|| no_state(parent))?;
        states.fork(parent, child)
    }

    pub fn reset(&mut self, id: StateId) {
        if let Some(s) = self.states.as_mut() {
            s.reset(id);
        }
    }

    pub fn close(&mut self, id: StateId) {
        if let Some(s) = self.states.as_mut() {
            s.close(id);
        }
    }

    pub fn end_step(&mut self, commit: bool) {
        if let Some(s) = self.states.as_mut() {
            if commit {
                s.commit();
            } else {
                s.rollback();
            }
        }
    }

    pub fn live_bytes(&self) -> usize {
        self.states.as_ref().map_or(0, TacticStates::live_bytes)
    }

    pub fn states(&self) -> Option<&TacticStates<M>> {
        self.states.as_ref()
    }

    pub fn states_mut(&mut self) -> Option<&mut TacticStates<M>> {
        self.states.as_mut()
    }

    /// Every entry's state of `layer` for this step, grown first where the
    /// rule says (the changes stand until the step ends).
    pub fn plan(&mut self, mem: &M, layer: usize, entries: &[TacticEntry]) -> Result<Vec<Planned>> {
        let Some(states) = self.states.as_mut() else {
            return match entries.first() {
                Some(e) => Err(no_state(e.state)),
                None => Ok(vec![]),
            };
        };
        entries
            .iter()
            .map(|&entry| {
                let plan =
                    states.prepare(mem, entry.state, layer, entry.ctx_len, entry.prompt_end)?;
                Ok(Planned { entry, plan })
            })
            .collect()
    }
}

/// The clustering runs of a node's plans, one job per KV head, grouped by
/// the k-means parameters a launch shares (seed, iterations).
pub fn cluster_jobs(planned: &[Planned], kv_heads: usize) -> Vec<(KMeansParams, Vec<ClusterJob>)> {
    let mut groups: Vec<(KMeansParams, Vec<ClusterJob>)> = vec![];
    for p in planned {
        let Some(run) = p.plan.run else { continue };
        let km = p.plan.params.kmeans;
        let at = match groups
            .iter()
            .position(|(g, _)| (g.seed, g.iterations) == (km.seed, km.iterations))
        {
            Some(i) => i,
            None => {
                groups.push((km, vec![]));
                groups.len() - 1
            }
        };
        groups[at].1.extend((0..kv_heads).map(|head| ClusterJob {
            state: p.plan.addr,
            layout: p.plan.layout,
            head,
            row: p.entry.row,
            start: run.start,
            n: run.n,
            k: run.k,
        }));
    }
    groups
}

/// The selections of a node's plans, one job per KV head, in entry order;
/// none for a prompt's end (it only clusters).
pub fn select_jobs(planned: &[Planned], kv_heads: usize) -> Vec<SelectJob> {
    planned
        .iter()
        .filter(|p| !p.entry.prompt_end)
        .flat_map(|p| {
            (0..kv_heads).map(move |head| SelectJob {
                state: p.plan.addr,
                layout: p.plan.layout,
                head,
                row: p.entry.row,
                ctx_len: p.entry.ctx_len,
                p: p.plan.params.p,
                margin: p.plan.params.margin,
            })
        })
        .collect()
}
