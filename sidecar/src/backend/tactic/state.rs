//! Each sequence's Tactic state on the device, and the rules that grow it:
//! the GPU twin of `tacflow_kernels::tactic::TacticSeq`'s bookkeeping.
//!
//! A sequence has, per layer, one allocation holding every KV head's
//! clusterings ([`StateLayout`]). It is written by the clustering kernels of
//! the step that creates it and never written again: re-clustering the tail
//! makes a larger allocation, copies the old clusters in and appends the
//! new ones. That one rule gives the rest:
//!
//! - a fork shares its parent's allocations (`Arc`), as the CPU reference
//!   copies its clusterings, at no cost, and neither can change what the
//!   other reads;
//! - a step that fails puts back the allocations it replaced ([`undo`]),
//!   so the state is exactly what it was before the step;
//! - memory is freed when the last sequence holding an allocation closes,
//!   truncates or re-clusters.
//!
//! The host knows upper bounds only (k-means' `k` per run; how many
//! clusters survive is written by the device into the allocation), which
//! is enough to size every allocation and launch with no synchronisation.
//!
//! [`undo`]: TacticStates::rollback

use super::mem::DeviceMemory;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tacflow_kernels::tactic::layout::{StateLayout, clusters_for};
use tacflow_kernels::tactic::{Init, Spread, TacticParams};

/// The backend's name for a sequence's state (the engine picks it).
pub type StateId = u64;

/// One (sequence, layer)'s clusterings on the device.
#[derive(Debug)]
pub struct LayerState<M: DeviceMemory> {
    pub buf: M::Buf,
    pub layout: StateLayout,
    /// Bytes alive over every state of the manager (decremented on drop).
    live: Arc<AtomicUsize>,
}

impl<M: DeviceMemory> Drop for LayerState<M> {
    fn drop(&mut self) {
        self.live
            .fetch_sub(self.layout.bytes as usize, Ordering::Relaxed);
    }
}

/// A run of slots k-means clusters on the device this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterRun {
    /// First slot of the run (0, or where the old tail started).
    pub start: usize,
    /// Slots in the run.
    pub n: usize,
    /// Clusters k-means starts from (at most `n`).
    pub k: usize,
}

/// What one sequence's layer asks of the device this step: cluster `run`
/// (if any) into the state at `addr`, then select on it.
#[derive(Debug, Clone, Copy)]
pub struct LayerPlan {
    pub addr: u64,
    pub layout: StateLayout,
    pub run: Option<ClusterRun>,
    pub params: TacticParams,
}

#[derive(Debug)]
struct SeqState<M: DeviceMemory> {
    params: TacticParams,
    layers: Vec<Option<Arc<LayerState<M>>>>,
}

/// A layer's state as it was before the step in flight replaced it.
#[derive(Debug)]
struct Replaced<M: DeviceMemory> {
    id: StateId,
    layer: usize,
    old: Option<Arc<LayerState<M>>>,
}

/// Every sequence's state on one device. The device's memory is passed to
/// the calls that allocate (the backend owns it; the states only hold
/// allocations).
#[derive(Debug)]
pub struct TacticStates<M: DeviceMemory> {
    kv_heads: usize,
    head_dim: usize,
    seqs: HashMap<StateId, SeqState<M>>,
    /// What the step in flight replaced, in order.
    undo: Vec<Replaced<M>>,
    live: Arc<AtomicUsize>,
}

/// Why the device cannot run `params` (`None`: it can). The kernels
/// implement the default estimator: stratified initialisation, the pooled
/// shape at scale 1, ranking by the estimate, cluster granularity; the
/// protocol sets only `p`, the cluster size and the re-clustering limit.
pub fn unsupported(params: &TacticParams) -> Option<String> {
    let d = TacticParams::new(params.p);
    let same = params.kmeans.init == Init::Stratified
        && params.spread == Spread::Pooled
        && params.spread_scale == d.spread_scale
        && params.rank_by_estimate
        && !params.token_level;
    if !same {
        return Some("only the default estimator runs on the device".into());
    }
    if params.kmeans.cluster_size == 0 || params.kmeans.iterations > 64 {
        return Some(format!(
            "cluster size {} and {} iterations",
            params.kmeans.cluster_size, params.kmeans.iterations
        ));
    }
    None
}

impl<M: DeviceMemory> TacticStates<M> {
    /// States for a model with `kv_heads` KV heads of `head_dim`.
    pub fn new(kv_heads: usize, head_dim: usize) -> TacticStates<M> {
        TacticStates {
            kv_heads,
            head_dim,
            seqs: HashMap::new(),
            undo: Vec::new(),
            live: Arc::default(),
        }
    }

    /// The model shape the states are laid out for: KV heads, head size.
    pub fn dims(&self) -> (usize, usize) {
        (self.kv_heads, self.head_dim)
    }

    /// Bytes the states hold on the device (shared allocations once).
    pub fn live_bytes(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// A new sequence with no clustering yet (built at its first decode
    /// step, per layer).
    pub fn open(&mut self, id: StateId, params: TacticParams, layers: usize) -> Result<()> {
        if let Some(why) = unsupported(&params) {
            return Err(Error::Backend(format!("Tactic on the device: {why}")));
        }
        self.check_idle("open")?;
        if self.seqs.contains_key(&id) {
            return Err(Error::Backend(format!("Tactic state {id} exists")));
        }
        let layers = vec![None; layers];
        self.seqs.insert(id, SeqState { params, layers });
        Ok(())
    }

    /// `child` starts with `parent`'s clusterings, shared: they cover the
    /// prefix both hold, and neither ever writes them again.
    pub fn fork(&mut self, parent: StateId, child: StateId) -> Result<()> {
        self.check_idle("fork")?;
        if self.seqs.contains_key(&child) {
            return Err(Error::Backend(format!("Tactic state {child} exists")));
        }
        let p = self
            .seqs
            .get(&parent)
            .ok_or_else(|| Error::Backend(format!("no Tactic state {parent}")))?;
        let copy = SeqState {
            params: p.params,
            layers: p.layers.clone(),
        };
        self.seqs.insert(child, copy);
        Ok(())
    }

    /// Forgets the clusterings (a truncation dropped tokens they cover);
    /// the next decode step builds them again over the remaining cache.
    pub fn reset(&mut self, id: StateId) {
        debug_assert!(self.undo.is_empty(), "reset inside a step");
        if let Some(s) = self.seqs.get_mut(&id) {
            s.layers.iter_mut().for_each(|l| *l = None);
        }
    }

    /// Drops the sequence; its memory goes once no fork shares it.
    pub fn close(&mut self, id: StateId) {
        debug_assert!(self.undo.is_empty(), "close inside a step");
        self.seqs.remove(&id);
    }

    pub fn contains(&self, id: StateId) -> bool {
        self.seqs.contains_key(&id)
    }

    pub fn params(&self, id: StateId) -> Option<TacticParams> {
        self.seqs.get(&id).map(|s| s.params)
    }

    /// The state of `id`'s `layer`, if built.
    pub fn layer(&self, id: StateId, layer: usize) -> Option<&LayerState<M>> {
        self.seqs.get(&id)?.layers.get(layer)?.as_deref()
    }

    /// The allocation of `id`'s `layer` to write, when no other sequence
    /// shares it (a state built or grown by the step in flight never is):
    /// what a host stand-in for the device's kernels writes through.
    pub fn buffer_mut(&mut self, id: StateId, layer: usize) -> Option<&mut M::Buf> {
        let st = self.seqs.get_mut(&id)?.layers.get_mut(layer)?.as_mut()?;
        Arc::get_mut(st).map(|s| &mut s.buf)
    }

    /// The state `id`'s `layer` selects on at a decode step with `ctx_len`
    /// tokens cached (this step's included), grown first by the rule of
    /// `TacticSeq::select_layer`: the first decode step clusters every
    /// token before its own; once more than `recluster_limit` tokens are
    /// past the clustering, the tail before this step's token is clustered
    /// on its own and appended. At the row that ends the prompt
    /// (`prompt_end`, `ctx_len` tokens cached with its own) a state not yet
    /// built is built over all `ctx_len` of them: the tokens the first
    /// decode step (`ctx_len + 1` cached) would cluster, so that step only
    /// selects; a state already built is left as it is. A new or grown
    /// state replaces the old one until [`TacticStates::commit`] or
    /// [`TacticStates::rollback`]; on an error nothing has changed.
    pub fn prepare(
        &mut self,
        mem: &M,
        id: StateId,
        layer: usize,
        ctx_len: usize,
        prompt_end: bool,
    ) -> Result<LayerPlan> {
        let (kv_heads, head_dim) = (self.kv_heads, self.head_dim);
        let s = self
            .seqs
            .get(&id)
            .ok_or_else(|| Error::Backend(format!("no Tactic state {id}")))?;
        let params = s.params;
        let old = s
            .layers
            .get(layer)
            .ok_or_else(|| Error::Backend(format!("layer {layer} of {}", s.layers.len())))?
            .clone();
        let clustered = if prompt_end {
            ctx_len
        } else {
            ctx_len.saturating_sub(1)
        };
        let size = params.kmeans.cluster_size;
        let (new, run) = match &old {
            Some(st) if clustered < st.layout.len as usize => {
                return Err(Error::Backend(format!(
                    "Tactic state {id} covers {} slots of a context of {ctx_len}",
                    st.layout.len
                )));
            }
            Some(st)
                if prompt_end || ctx_len - st.layout.len as usize <= params.recluster_limit =>
            {
                return Ok(plan(mem, st, None, params));
            }
            Some(st) => {
                let start = st.layout.len as usize;
                let n = clustered - start;
                let k = clusters_for(n, size);
                (self.grow(mem, st, k, n)?, ClusterRun { start, n, k })
            }
            None => {
                let k = clusters_for(clustered, size);
                let layout = StateLayout::new(kv_heads, head_dim, k, clustered);
                let buf = mem.alloc_zeroed(layout.bytes as usize)?;
                let st = self.adopt(buf, layout);
                let run = ClusterRun {
                    start: 0,
                    n: clustered,
                    k,
                };
                (st, run)
            }
        };
        let p = plan(mem, &new, (run.n > 0).then_some(run), params);
        let slot = &mut self.seqs.get_mut(&id).expect("looked up above").layers[layer];
        let old = slot.replace(Arc::new(new));
        self.undo.push(Replaced { id, layer, old });
        Ok(p)
    }

    /// The step succeeded: what it built stays.
    pub fn commit(&mut self) {
        self.undo.clear();
    }

    /// The step failed: every layer it replaced gets its old state back,
    /// newest change first, and what the step allocated is freed.
    pub fn rollback(&mut self) {
        while let Some(r) = self.undo.pop() {
            if let Some(s) = self.seqs.get_mut(&r.id) {
                s.layers[r.layer] = r.old;
            }
        }
    }

    /// A larger allocation holding `st`'s clusters, with room for a run of
    /// `n` slots in at most `k` clusters per head.
    fn grow(&self, mem: &M, st: &LayerState<M>, k: usize, n: usize) -> Result<LayerState<M>> {
        let layout = st.layout.grown(k, n);
        let mut buf = mem.alloc(layout.bytes as usize)?;
        for (from, to, bytes) in st.layout.copies_into(&layout) {
            mem.copy(&st.buf, from, &mut buf, to, bytes)?;
        }
        Ok(self.adopt(buf, layout))
    }

    fn adopt(&self, buf: M::Buf, layout: StateLayout) -> LayerState<M> {
        self.live
            .fetch_add(layout.bytes as usize, Ordering::Relaxed);
        LayerState {
            buf,
            layout,
            live: self.live.clone(),
        }
    }

    fn check_idle(&self, what: &str) -> Result<()> {
        if self.undo.is_empty() {
            Ok(())
        } else {
            Err(Error::Backend(format!(
                "Tactic states: {what} while a step is in flight"
            )))
        }
    }
}

fn plan<M: DeviceMemory>(
    mem: &M,
    st: &LayerState<M>,
    run: Option<ClusterRun>,
    params: TacticParams,
) -> LayerPlan {
    LayerPlan {
        addr: mem.addr(&st.buf),
        layout: st.layout,
        run,
        params,
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
