//! CUDA graphs: a decode step's kernels captured once per batch-size
//! bucket and replayed, so that a step costs one launch instead of one per
//! kernel (vLLM's `cuda_graph.py` does the same over persistent buffers).
//!
//! What a captured step requires:
//!
//! - **No allocation during capture.** Every buffer the step's kernels
//!   touch exists before capture and outlives the graph: the activations of
//!   the bucket (held per bucket, never given back to the pool while the
//!   graph lives), the attention split workspace and the GEMM scratch
//!   (grown to the largest bucket by eager warm-up steps first: a workspace
//!   regrown later moves, and every graph captured before must be dropped,
//!   [`GraphCache::clear`]). The capture runs in thread-local mode, so an
//!   allocation through the driver fails the capture, and [`Gpu::capture`]
//!   refuses a graph holding allocation, free, host-function or copy nodes.
//! - **No host memory read.** A captured kernel reads what its parameter
//!   struct pointed to at capture time. A step's metadata therefore lives in
//!   one persistent device buffer per bucket with fixed capacities
//!   ([`GraphStep`]), refilled in place (a host-to-device copy on the
//!   stream, outside the graph) before each replay. Nothing the host
//!   decides per step may be baked in: launch grids depend on the bucket's
//!   row count, and the attention's split plan on the step's longest
//!   context, so the plan is made for a ceiling ([`GraphKey::kv_pages`],
//!   a power of two of pages) and a step past it takes another graph.
//! - **Padding rows.** A batch of `n` rows runs as its bucket's `b >= n`
//!   rows ([`pad_step`]): the extra rows read token 0 at position 0, attend
//!   one key, and write their K and V to a padding slot of a KV block the
//!   engine never hands to a sequence; their logits are ignored.
//! - **No synchronisation.** `Gpu::set_sync_launches(true)` (the
//!   self-check's fault localisation) cannot be captured; turn it off.
//!
//! Host logic here ([`Buckets`], [`GraphCache`], [`pad_step`],
//! [`pack_fixed`]) is unit-tested without a GPU; the driver wrapper
//! ([`Gpu::capture`], [`StepGraph`]) is checked against eager execution by
//! the self-check. The daemon's CUDA backend runs its decode steps through
//! these pieces when the option `cuda_graphs` is on (the sidecar's
//! `backend::cuda::graphs`); regrowth of a workspace shows in
//! [`Gpu::workspace_generation`].

use super::device::{Gpu, drv};
use super::step::{DeviceStep, StepArrays};
use crate::error::{Error, Result};
use cudarc::driver::{CudaGraph, CudaSlice, sys};
use std::collections::HashMap;
use std::hash::Hash;

/// Batch sizes a graph is captured for, ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets(Vec<usize>);

impl Buckets {
    pub fn new(mut sizes: Vec<usize>) -> Result<Buckets> {
        sizes.sort_unstable();
        sizes.dedup();
        if sizes.first().is_none_or(|&s| s == 0) {
            return Err(Error::Shape(format!("graph buckets {sizes:?}")));
        }
        Ok(Buckets(sizes))
    }

    /// 1, 2, 4, 8, then every multiple of 8 up to `max` (vLLM's decode
    /// sizes): at most 7 padding rows past 8.
    pub fn decode(max: usize) -> Buckets {
        let mut s: Vec<usize> = [1, 2, 4].into_iter().filter(|&s| s <= max).collect();
        s.extend((8..=max).step_by(8));
        Buckets::new(s).unwrap_or_else(|_| Buckets(vec![1]))
    }

    /// The smallest bucket holding `rows` rows; `None` for none (0 rows,
    /// or more than the largest bucket: such a step runs eagerly).
    pub fn bucket_for(&self, rows: usize) -> Option<usize> {
        if rows == 0 {
            return None;
        }
        self.0.iter().copied().find(|&b| b >= rows)
    }

    pub fn sizes(&self) -> &[usize] {
        &self.0
    }
}

/// What a graph was captured for: its rows (the bucket) and the context
/// ceiling its attention plan covers, in KV blocks (a power of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GraphKey {
    pub rows: usize,
    pub kv_pages: usize,
}

impl GraphKey {
    /// The key of a step of `rows` rows whose longest row attends
    /// `max_kv_len` keys; `None` when no bucket holds it.
    pub fn for_step(buckets: &Buckets, rows: usize, max_kv_len: usize) -> Option<GraphKey> {
        Some(GraphKey {
            rows: buckets.bucket_for(rows)?,
            kv_pages: max_kv_len.div_ceil(16).max(1).next_power_of_two(),
        })
    }

    /// Keys the plan covers: `max_kv_len` of the persistent step.
    pub fn kv_ceiling(&self) -> usize {
        16 * self.kv_pages
    }
}

/// What the executor does with a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run the kernels as they are issued (no bucket, warming up, or a
    /// capture that failed before).
    Eager,
    /// Run the step under capture ([`Gpu::capture`]), then
    /// [`GraphCache::store`] the result and replay it.
    Capture,
    /// Refill the bucket's persistent step and launch its graph.
    Replay,
}

#[derive(Debug)]
enum Entry<G> {
    /// Eager runs so far.
    Warming(usize),
    Ready(G),
    /// The capture failed: eager for good (it would fail again).
    Refused,
}

/// Graphs by key, each captured after `warmup` eager runs of its key (the
/// runs that grow the workspaces and the pool to the bucket's size).
#[derive(Debug)]
pub struct GraphCache<K, G> {
    warmup: usize,
    entries: HashMap<K, Entry<G>>,
}

impl<K: Eq + Hash + Copy, G> GraphCache<K, G> {
    pub fn new(warmup: usize) -> GraphCache<K, G> {
        GraphCache {
            warmup,
            entries: HashMap::new(),
        }
    }

    /// What to do with a step of `key` (`None`: no bucket); counts an
    /// eager warm-up run.
    pub fn decide(&mut self, key: Option<K>) -> Action {
        let Some(key) = key else {
            return Action::Eager;
        };
        let e = self.entries.entry(key).or_insert(Entry::Warming(0));
        match e {
            Entry::Ready(_) => Action::Replay,
            Entry::Refused => Action::Eager,
            Entry::Warming(n) if *n >= self.warmup => Action::Capture,
            Entry::Warming(n) => {
                *n += 1;
                Action::Eager
            }
        }
    }

    /// The outcome of a capture of `key`: the graph, or `None` when it
    /// failed (that key then runs eagerly).
    pub fn store(&mut self, key: K, graph: Option<G>) {
        let e = graph.map_or(Entry::Refused, Entry::Ready);
        self.entries.insert(key, e);
    }

    pub fn get(&self, key: &K) -> Option<&G> {
        match self.entries.get(key) {
            Some(Entry::Ready(g)) => Some(g),
            _ => None,
        }
    }

    /// Whether the capture of `key` failed (its steps run eagerly for good).
    pub fn is_refused(&self, key: &K) -> bool {
        matches!(self.entries.get(key), Some(Entry::Refused))
    }

    /// Drops every graph (a workspace they point into was reallocated);
    /// keys warm up again.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn captured(&self) -> usize {
        self.entries
            .values()
            .filter(|e| matches!(e, Entry::Ready(_)))
            .count()
    }
}

/// Fixed capacities of a persistent step: `rows` rows (the bucket, logit
/// rows included) and `tables` block-table entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepCapacity {
    pub rows: usize,
    pub tables: usize,
}

impl StepCapacity {
    /// Start of each array in the packed buffer, in `step.rs`'s order
    /// (tokens, positions, slots, kv_len, table_off, tables, logit_rows).
    pub fn offsets(&self) -> [usize; 7] {
        let r = self.rows;
        [0, r, 2 * r, 3 * r, 4 * r, 5 * r, 5 * r + self.tables]
    }

    pub fn len(&self) -> usize {
        6 * self.rows + self.tables
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The bounds a captured step was checked against (its kernels do not
/// bounds-check): every refill must stay inside them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    pub vocab: u32,
    /// Slots of the KV cache (`num_blocks * 16`).
    pub slots: u32,
    /// Keys a row may attend ([`GraphKey::kv_ceiling`]).
    pub kv_len: u32,
    /// Where padding rows write their K and V: a slot of a block no
    /// sequence owns.
    pub pad_slot: u32,
}

impl StepLimits {
    fn check(&self, a: &StepArrays) -> Result<()> {
        let over = |what: &str, v: Option<&u32>, lim: u32| match v {
            Some(&v) if v >= lim => Err(Error::Shape(format!(
                "graph step: {what} {v} past the captured limit {lim}"
            ))),
            _ => Ok(()),
        };
        over("token", a.tokens.iter().max(), self.vocab)?;
        over("slot", a.slots.iter().max(), self.slots)?;
        over("block", a.tables.iter().max(), self.slots / 16)?;
        over("kv_len", a.kv_len.iter().max(), self.kv_len + 1)?;
        over("pad slot", Some(&self.pad_slot), self.slots)?;
        if a.kv_len.contains(&0) {
            return Err(Error::Shape("graph step: a row attends no key".into()));
        }
        Ok(())
    }
}

/// `a` padded to `cap.rows` rows (see the module doc) with one padding
/// block-table entry; logit rows padded with the last row.
pub fn pad_step(a: &StepArrays, cap: &StepCapacity, pad_slot: u32) -> Result<StepArrays> {
    let n = a.tokens.len();
    if n > cap.rows || a.logit_rows.len() > cap.rows || a.tables.len() >= cap.tables {
        return Err(Error::Shape(format!(
            "graph step: {n} rows, {} logit rows, {} table entries for a bucket of {} rows \
             and {} entries",
            a.logit_rows.len(),
            a.tables.len(),
            cap.rows,
            cap.tables
        )));
    }
    let mut p = a.clone();
    let pad_entry = a.tables.len() as u32;
    p.tables.resize(cap.tables, pad_slot / 16);
    for _ in n..cap.rows {
        p.tokens.push(0);
        p.positions.push(0);
        p.slots.push(pad_slot);
        p.kv_len.push(1);
        p.table_off.push(pad_entry);
    }
    p.logit_rows.resize(cap.rows, (cap.rows - 1) as u32);
    Ok(p)
}

/// A padded step (exactly `cap`'s lengths) packed at `cap`'s offsets.
pub fn pack_fixed(p: &StepArrays, cap: &StepCapacity) -> Result<Vec<u32>> {
    let parts: [&[u32]; 7] = [
        &p.tokens,
        &p.positions,
        &p.slots,
        &p.kv_len,
        &p.table_off,
        &p.tables,
        &p.logit_rows,
    ];
    let want = [
        cap.rows, cap.rows, cap.rows, cap.rows, cap.rows, cap.tables, cap.rows,
    ];
    if parts.iter().map(|x| x.len()).ne(want) {
        return Err(Error::Shape("graph step: not padded to its bucket".into()));
    }
    Ok(parts.concat())
}

/// A bucket's persistent step: one device buffer at fixed offsets, whose
/// maxima are the limits (so the wrappers check the captured launches
/// against them), refilled in place before each replay.
#[derive(Debug)]
pub struct GraphStep {
    pub step: DeviceStep,
    cap: StepCapacity,
    limits: StepLimits,
}

impl GraphStep {
    /// The buffer, holding an all-padding step until the first refill.
    pub fn new(gpu: &Gpu, cap: StepCapacity, limits: StepLimits) -> Result<GraphStep> {
        if cap.rows == 0 || limits.vocab == 0 || limits.slots < 16 {
            return Err(Error::Shape(format!("graph step {cap:?}, {limits:?}")));
        }
        let empty = pad_step(&StepArrays::default(), &cap, limits.pad_slot)?;
        let buf = gpu.upload(&pack_fixed(&empty, &cap)?)?;
        let step = DeviceStep {
            buf,
            offsets: cap.offsets(),
            rows: cap.rows,
            logit_rows: cap.rows,
            max_token: limits.vocab - 1,
            max_slot: limits.slots - 1,
            max_block: limits.slots / 16 - 1,
            max_kv_len: limits.kv_len,
            max_logit_row: cap.rows as u32 - 1,
            // A captured attention plans for the bucket's context ceiling.
            kv_len: vec![limits.kv_len; cap.rows],
            // Equal key counts: no row is taken for a prefill chunk (a
            // graph serves decode steps).
            table_off: vec![0; cap.rows],
        };
        Ok(GraphStep { step, cap, limits })
    }

    /// Writes step `a` (unpadded) into the buffer, in stream order: after
    /// the work issued before (the last replay's reads), before the next.
    pub fn refill(&mut self, gpu: &Gpu, a: &StepArrays) -> Result<()> {
        self.limits.check(a)?;
        let packed = pack_fixed(&pad_step(a, &self.cap, self.limits.pad_slot)?, &self.cap)?;
        gpu.upload_into(&packed, &mut self.step.buf)
    }
}

impl Gpu {
    /// `dst[..n] = src[..n]` on the stream (a replayed step's logit rows,
    /// out of the bucket's persistent buffer).
    pub fn copy_prefix(
        &self,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if src.len() < n || dst.len() < n {
            return Err(Error::Shape(format!(
                "copy of {n} values from {} into {}",
                src.len(),
                dst.len()
            )));
        }
        let mut d = dst.slice_mut(..n);
        self.stream()
            .memcpy_dtod(&src.slice(..n), &mut d)
            .map_err(drv("cuMemcpyDtoDAsync"))
    }
}

/// A captured, instantiated graph on the GPU's stream.
pub struct StepGraph {
    graph: CudaGraph,
    /// Kernel launches it holds.
    pub kernels: usize,
}

impl std::fmt::Debug for StepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepGraph")
            .field("kernels", &self.kernels)
            .finish()
    }
}

impl StepGraph {
    /// Replays the captured work on the GPU's stream.
    pub fn launch(&self) -> Result<()> {
        self.graph.launch().map_err(drv("cuGraphLaunch"))
    }

    /// Uploads the graph's resources ahead of its first launch.
    pub fn upload(&self) -> Result<()> {
        self.graph.upload().map_err(drv("cuGraphUpload"))
    }
}

/// Kernel nodes of a captured graph, or why it may not be replayed.
fn check_nodes(graph: sys::CUgraph) -> Result<usize> {
    use sys::CUgraphNodeType as T;
    let mut n = 0usize;
    // SAFETY: a null array asks for the count only.
    unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut n) }
        .result()
        .map_err(drv("cuGraphGetNodes"))?;
    let mut nodes = vec![std::ptr::null_mut(); n];
    // SAFETY: `nodes` has room for the `n` nodes the graph holds.
    unsafe { sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut n) }
        .result()
        .map_err(drv("cuGraphGetNodes"))?;
    let mut kernels = 0;
    for &node in nodes.iter().take(n) {
        let mut t = T::CU_GRAPH_NODE_TYPE_EMPTY;
        // SAFETY: `node` is a node of `graph`, which is alive.
        unsafe { sys::cuGraphNodeGetType(node, &mut t) }
            .result()
            .map_err(drv("cuGraphNodeGetType"))?;
        match t {
            T::CU_GRAPH_NODE_TYPE_KERNEL => kernels += 1,
            T::CU_GRAPH_NODE_TYPE_MEMSET
            | T::CU_GRAPH_NODE_TYPE_EMPTY
            | T::CU_GRAPH_NODE_TYPE_WAIT_EVENT
            | T::CU_GRAPH_NODE_TYPE_EVENT_RECORD => {}
            other => {
                return Err(Error::Shape(format!(
                    "captured step holds a {other:?} node: it allocates, frees, copies or \
                     calls the host, so it cannot be replayed over persistent buffers"
                )));
            }
        }
    }
    Ok(kernels)
}

impl Gpu {
    /// Runs `work` under stream capture and instantiates what it issued:
    /// the launches are recorded, not run. `work` must only launch kernels
    /// and GEMMs over buffers that outlive the graph (the module doc); the
    /// capture is ended even when it fails, so the stream stays usable.
    pub fn capture(&self, work: impl FnOnce(&Gpu) -> Result<()>) -> Result<StepGraph> {
        if self.sync_launches() {
            return Err(Error::Unsupported(
                "graph capture with synchronous launches (set_sync_launches(false))".into(),
            ));
        }
        self.stream()
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(drv("cuStreamBeginCapture"))?;
        let issued = work(self);
        let ended = self
            .stream()
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(drv("cuStreamEndCapture"));
        issued?;
        let graph =
            ended?.ok_or_else(|| Error::Unsupported("the capture recorded no work".into()))?;
        let kernels = check_nodes(graph.cu_graph())?;
        Ok(StepGraph { graph, kernels })
    }
}

#[cfg(test)]
mod tests;
