//! Decode steps as CUDA graphs (the option `cuda_graphs`): the executor's
//! side of `tacflow_kernels::cuda::graph`.
//!
//! A step qualifies ([`graph_key`]) when every sequence in it decodes one
//! token, with full attention (the model asks only then: no sparse
//! selection on the host) in the sequential schedule, on one lane,
//! without synchronous launches, its rows fit the
//! largest bucket ([`MAX_GRAPH_ROWS`]) and its block tables the bucket's
//! capacity. Logits written to regions are fine: the real logit rows are
//! copied out of the bucket's rows after the step. Every other step (a
//! prefill, a mixed step, more rows) runs eagerly as before.
//!
//! A qualifying step runs as its bucket's rows over persistent buffers:
//! the bucket's activations ([`Workspace`], one per bucket, shared by the
//! bucket's context ceilings: every use is ordered on the one stream) and
//! the key's [`GraphStep`], refilled in place. Its key's first
//! [`WARMUP`] steps run those buffers eagerly (they write every
//! activation, so nothing allocates later, and cuBLAS sets up for the
//! shapes), the next is captured and launched, later ones are replayed. A
//! capture that fails leaves its key eager over the same buffers (and the
//! step is run so). Padding rows write their K and V to the slot of the
//! block the engine reserved ([`Backend::set_pad_block`]).
//!
//! Workspace regrowth: the attention split workspace, the GEMM scratch and
//! (bf16 activations) the attention's f32 scratch grow, never shrink; a graph holds their addresses, so when
//! `Gpu::workspace_generation` has moved since the last graph step every
//! graph is dropped ([`GraphCache::clear`]) before anything is replayed,
//! and the keys warm up and are captured again (the sizes only grow, so
//! this settles). An allocation inside a capture fails the capture.
//!
//! [`Backend::set_pad_block`]: crate::backend::Backend::set_pad_block

use super::act::{Act, ActBuf};
use super::step::step_arrays;
use super::{CudaBackend, check};
use crate::backend::{GraphPass, StepMeta};
use crate::error::{Error, Result};
use crate::model::Workspace;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use tacflow_kernels::cuda::graph::{
    Action, Buckets, GraphCache, GraphKey, GraphStep, StepCapacity, StepGraph, StepLimits,
};
use tacflow_kernels::cuda::kv::BLOCK_TOKENS;
use tacflow_kernels::cuda::{DeviceStep, KvCache};
use tracing::{debug, warn};

/// The largest bucket: a decode step of more rows runs eagerly. Buckets
/// are 1, 2, 4, 8, 16, ..., 64 (`Buckets::decode`); each keeps a
/// workspace of its rows (with the logits, `rows * vocab` f32).
pub const MAX_GRAPH_ROWS: usize = 64;

/// Eager runs of a key before its capture.
pub const WARMUP: usize = 2;

/// The graph path's state; the executor thread owns it with the backend.
pub struct Graphs {
    buckets: Buckets,
    cache: GraphCache<GraphKey, StepGraph>,
    steps: HashMap<GraphKey, GraphStep>,
    workspaces: HashMap<usize, Workspace<CudaBackend>>,
    /// The KV block no sequence owns; no step qualifies without one.
    pad_block: Option<u32>,
    /// `Gpu::workspace_generation` when the cache was last checked.
    generation: u64,
    pub counts: GraphCounts,
}

/// A bucket's persistent buffers for one step.
struct BucketRun<'a> {
    step: &'a DeviceStep,
    rows: usize,
    kv: &'a mut KvCache,
    ws: &'a mut Workspace<CudaBackend>,
}

/// What the graph path did, by step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphCounts {
    /// Eager runs over a bucket's buffers (warm-up, or a refused key).
    pub eager: usize,
    pub captures: usize,
    pub refused: usize,
    pub replays: usize,
    /// Times every graph was dropped for a regrown workspace.
    pub clears: usize,
}

impl Graphs {
    /// Graphs captured after `warmup` eager runs of their key (a
    /// self-check's reference state never captures: `usize::MAX`).
    pub fn new(warmup: usize) -> Graphs {
        Graphs {
            buckets: Buckets::decode(MAX_GRAPH_ROWS),
            cache: GraphCache::new(warmup),
            steps: HashMap::new(),
            workspaces: HashMap::new(),
            pad_block: None,
            generation: 0,
            counts: GraphCounts::default(),
        }
    }

    pub fn set_pad_block(&mut self, block: u32) {
        self.pad_block = Some(block);
    }

    /// Graphs captured and not dropped.
    pub fn captured(&self) -> usize {
        self.cache.captured()
    }

    /// The key of `meta` when it qualifies and its capture did not fail.
    fn key(&self, meta: &StepMeta) -> Option<GraphKey> {
        self.pad_block?;
        graph_key(&self.buckets, meta).filter(|k| !self.cache.is_refused(k))
    }

    /// Drops every graph when a workspace moved since the last look.
    fn check_generation(&mut self, generation: u64) {
        if generation != self.generation {
            if self.cache.captured() > 0 {
                debug!(
                    graphs = self.cache.captured(),
                    "a workspace was regrown: dropping every graph"
                );
                self.counts.clears += 1;
            }
            self.cache.clear();
            self.generation = generation;
        }
    }
}

/// The fixed capacities of `key`'s persistent step: its rows, and a block
/// table of the ceiling's pages per row plus the padding rows' entry.
pub fn capacity(key: &GraphKey) -> StepCapacity {
    StepCapacity {
        rows: key.rows,
        tables: key.rows * key.kv_pages + 1,
    }
}

/// The graph key of a pure decode step (every sequence one row), `None`
/// for any other step, for more rows than the largest bucket, or for block
/// tables longer than the key's capacity.
pub fn graph_key(buckets: &Buckets, meta: &StepMeta) -> Option<GraphKey> {
    let rows = meta.tokens.len();
    let decode = rows == meta.seqs.len() && meta.seqs.iter().all(|s| s.q_len == 1);
    if !decode || meta.logit_rows.len() > rows {
        return None;
    }
    let longest = meta.seqs.iter().map(|s| s.ctx_len).max()?;
    let key = GraphKey::for_step(buckets, rows, longest)?;
    let tables: usize = meta.seqs.iter().map(pages_read).sum();
    (tables < capacity(&key).tables).then_some(key)
}

/// The block-table entries of `s` that its attention reads: those its
/// context covers. A table may name blocks past them (a client naming its
/// blocks ahead, as vLLM does); they are left out of a graph step, whose
/// table capacity is the bucket's context ceiling.
fn pages_read(s: &crate::backend::SeqMeta) -> usize {
    s.block_table.len().min(s.ctx_len.div_ceil(BLOCK_TOKENS))
}

/// `meta` with every block table cut to [`pages_read`].
fn trimmed(meta: &StepMeta) -> StepMeta {
    let mut m = meta.clone();
    for s in &mut m.seqs {
        s.block_table.truncate(pages_read(s));
    }
    m
}

impl CudaBackend {
    /// The backend with the graph path on (`cuda_graphs`), or refused with
    /// the reason where no step could take it.
    pub fn with_graphs(self, on: bool) -> Result<CudaBackend> {
        if !on {
            return Ok(self);
        }
        if self.gpu.lanes() > 1 {
            return Err(Error::Config(format!(
                "cuda_graphs captures one lane's steps; gpu_lanes is {}",
                self.gpu.lanes()
            )));
        }
        *self.graphs.borrow_mut() = Some(Graphs::new(WARMUP));
        Ok(self)
    }

    /// Puts `g` in place of the graph state, returning the old one
    /// (self-check: two states over one GPU).
    pub fn swap_graphs(&self, g: Option<Graphs>) -> Option<Graphs> {
        std::mem::replace(&mut *self.graphs.borrow_mut(), g)
    }

    /// What the current graph state did so far.
    pub fn graph_counts(&self) -> Option<GraphCounts> {
        self.graphs.borrow().as_ref().map(|g| g.counts)
    }

    pub(super) fn graph_step_ok(&self, meta: &StepMeta) -> bool {
        let g = self.graphs.borrow();
        let Some(g) = g.as_ref() else {
            return false;
        };
        self.gpu.lanes() == 1 && !self.gpu.sync_launches() && g.key(meta).is_some()
    }

    /// The step through its bucket (the module doc).
    pub(super) fn run_graph(
        &self,
        meta: &StepMeta,
        kv: &mut KvCache,
        pass: &mut dyn GraphPass<CudaBackend>,
    ) -> Result<Act> {
        let mut guard = self.graphs.borrow_mut();
        let g = guard
            .as_mut()
            .ok_or_else(|| Error::Backend("graph step without the graph path".into()))?;
        let key = g
            .key(meta)
            .ok_or_else(|| Error::Backend("graph step for a step that does not qualify".into()))?;
        g.check_generation(self.gpu.workspace_generation());
        let action = g.cache.decide(Some(key));
        let limits = StepLimits {
            vocab: pass.vocab() as u32,
            slots: (kv.num_blocks * BLOCK_TOKENS) as u32,
            kv_len: key.kv_ceiling() as u32,
            pad_slot: g.pad_block.unwrap_or(0) * BLOCK_TOKENS as u32,
        };
        let step = match g.steps.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(GraphStep::new(&self.gpu, capacity(&key), limits)?),
        };
        step.refill(&self.gpu, &step_arrays(&trimmed(meta))?)?;
        let ws = match g.workspaces.entry(key.rows) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(pass.workspace(self, key.rows)?),
        };
        let run = BucketRun {
            step: &step.step,
            rows: key.rows,
            kv,
            ws,
        };
        self.run_action(action, key, run, pass, &mut g.cache, &mut g.counts)?;
        self.logit_rows_of(g.workspaces[&key.rows].logits(), meta.logit_rows.len())
    }

    /// Warms up, captures or replays `key` over its bucket's buffers.
    fn run_action(
        &self,
        action: Action,
        key: GraphKey,
        r: BucketRun<'_>,
        pass: &mut dyn GraphPass<CudaBackend>,
        cache: &mut GraphCache<GraphKey, StepGraph>,
        counts: &mut GraphCounts,
    ) -> Result<()> {
        let (rows, kv, ws) = (r.rows, r.kv, r.ws);
        match action {
            Action::Eager => {
                pass.issue(self, r.step, rows, kv, ws)?;
                counts.eager += 1;
            }
            Action::Capture => {
                let mut issued = Ok(());
                let captured = self.gpu.capture(|_| {
                    issued = pass.issue(self, r.step, rows, kv, ws);
                    issued.as_ref().map_err(|e| {
                        tacflow_kernels::Error::Unsupported(format!("the pass under capture: {e}"))
                    })?;
                    Ok(())
                });
                match captured.and_then(|graph| {
                    graph.upload()?;
                    Ok(graph)
                }) {
                    Ok(graph) => {
                        debug!(
                            rows,
                            kv_pages = key.kv_pages,
                            kernels = graph.kernels,
                            "captured a decode step"
                        );
                        graph.launch()?;
                        cache.store(key, Some(graph));
                        counts.captures += 1;
                    }
                    Err(e) => {
                        warn!(cause = %e, rows, kv_pages = key.kv_pages, "decode step capture failed: its key runs eagerly");
                        cache.store(key, None);
                        counts.refused += 1;
                        pass.issue(self, r.step, rows, kv, ws)?;
                    }
                }
            }
            Action::Replay => {
                let graph = cache.get(&key).expect("decided Replay: captured");
                graph.launch()?;
                counts.replays += 1;
            }
        }
        Ok(())
    }

    /// The first `rows` rows of a bucket's logits, in a buffer of their
    /// own (the bucket's stay with the bucket).
    fn logit_rows_of(&self, logits: &Act, rows: usize) -> Result<Act> {
        check(rows <= logits.rows, || {
            format!("{rows} logit rows of a bucket of {}", logits.rows)
        })?;
        let n = rows * logits.cols;
        let mut out = self.pool.take(&self.gpu, n)?;
        self.gpu
            .copy_prefix(logits.f32("graph logits")?, &mut out, n)?;
        Ok(Act {
            rows,
            cols: logits.cols,
            buf: ActBuf::F32(out),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SeqMeta;

    /// Decode rows of sequences with contexts `ctx` (after the step),
    /// each on its own blocks, every row a logit row.
    fn decode(ctx: &[usize]) -> StepMeta {
        let mut m = StepMeta::default();
        let mut next_block = 0u32;
        for (i, &c) in ctx.iter().enumerate() {
            let blocks = c.div_ceil(16) as u32;
            let table: Vec<u32> = (next_block..next_block + blocks).collect();
            next_block += blocks;
            m.tokens.push(7 + i as u32);
            m.positions.push(c as u32 - 1);
            m.slots
                .push(table[(c - 1) / 16] * 16 + ((c - 1) % 16) as u32);
            m.seqs.push(SeqMeta {
                q_start: i,
                q_len: 1,
                ctx_len: c,
                block_table: table,
            });
            m.logit_rows.push(i as u32);
        }
        m
    }

    #[test]
    fn pure_decode_steps_qualify_with_their_bucket_and_ceiling() {
        let b = Buckets::decode(MAX_GRAPH_ROWS);
        let k = graph_key(&b, &decode(&[5, 40, 17])).unwrap();
        assert_eq!(
            k,
            GraphKey {
                rows: 4,
                kv_pages: 4
            },
            "3 rows pad to 4; 40 keys: 3 pages, ceiling 4"
        );
        assert_eq!(k.kv_ceiling(), 64);
        let k = graph_key(&b, &decode(&[1])).unwrap();
        assert_eq!((k.rows, k.kv_pages), (1, 1));
        let nine: Vec<usize> = (1..=9).collect();
        assert_eq!(graph_key(&b, &decode(&nine)).unwrap().rows, 16);
        // A context past the ceiling takes another key.
        let a = graph_key(&b, &decode(&[32, 3])).unwrap();
        let c = graph_key(&b, &decode(&[33, 3])).unwrap();
        assert_eq!((a.kv_pages, c.kv_pages), (2, 4));
        // Fewer logit rows than rows (an entry that does not sample).
        let mut m = decode(&[4, 9]);
        m.logit_rows = vec![1];
        assert_eq!(graph_key(&b, &m).map(|k| k.rows), Some(2));
    }

    #[test]
    fn other_steps_run_eagerly() {
        let b = Buckets::decode(MAX_GRAPH_ROWS);
        assert_eq!(graph_key(&b, &StepMeta::default()), None, "no rows");
        let too_many: Vec<usize> = vec![3; MAX_GRAPH_ROWS + 1];
        assert_eq!(
            graph_key(&b, &decode(&too_many)),
            None,
            "past the largest bucket"
        );
        assert!(graph_key(&b, &decode(&vec![3; MAX_GRAPH_ROWS])).is_some());
        // A prefill chunk: one sequence, two rows.
        let mut m = decode(&[20]);
        m.tokens.push(1);
        m.positions.push(20);
        m.slots.push(m.slots[0] + 1);
        m.seqs[0].q_len = 2;
        m.seqs[0].ctx_len = 21;
        assert_eq!(graph_key(&b, &m), None, "prefill");
        // A mixed step: a decode row and the prefill chunk.
        let mut mixed = decode(&[5]);
        mixed.tokens.extend([1, 2]);
        mixed.positions.extend([0, 1]);
        mixed.slots.extend([32, 33]);
        mixed.seqs.push(SeqMeta {
            q_start: 1,
            q_len: 2,
            ctx_len: 2,
            block_table: vec![2],
        });
        assert_eq!(graph_key(&b, &mixed), None, "mixed");
    }

    #[test]
    fn tables_named_ahead_of_the_context_are_trimmed_to_the_pages_read() {
        let b = Buckets::decode(MAX_GRAPH_ROWS);
        // 16 keys read one page, but the table names three (blocks named
        // ahead): the step qualifies, and its graph step holds one.
        let mut long = decode(&[16, 20]);
        long.seqs[0].block_table = vec![0, 5, 6];
        let k = graph_key(&b, &long).expect("qualifies on the pages it reads");
        let t = trimmed(&long);
        assert_eq!(t.seqs[0].block_table, vec![0]);
        assert_eq!(t.seqs[1].block_table, long.seqs[1].block_table);
        let a = step_arrays(&t).unwrap();
        let cap = capacity(&k);
        assert!(tacflow_kernels::cuda::graph::pad_step(&a, &cap, 16 * 99).is_ok());
        // Untrimmed, the same tables would not fit the bucket.
        let untrimmed = step_arrays(&long).unwrap();
        assert!(tacflow_kernels::cuda::graph::pad_step(&untrimmed, &cap, 16 * 99).is_err());
    }

    #[test]
    fn the_persistent_step_holds_a_full_batch_at_its_ceiling() {
        let b = Buckets::decode(MAX_GRAPH_ROWS);
        let m = decode(&[64, 64, 64, 64]);
        let k = graph_key(&b, &m).unwrap();
        let cap = capacity(&k);
        let tables: usize = m.seqs.iter().map(|s| s.block_table.len()).sum();
        assert_eq!((k.rows, tables), (4, 16));
        assert!(tables < cap.tables, "room for the padding rows' entry");
        let a = step_arrays(&m).unwrap();
        assert!(tacflow_kernels::cuda::graph::pad_step(&a, &cap, 16 * 99).is_ok());
    }

    #[test]
    fn the_state_needs_a_pad_block_and_drops_graphs_when_a_workspace_moves() {
        let b = Buckets::decode(MAX_GRAPH_ROWS);
        let m = decode(&[5, 6]);
        let mut g = Graphs::new(WARMUP);
        assert_eq!(g.key(&m), None, "no padding block yet");
        g.set_pad_block(9);
        let k = g.key(&m).unwrap();
        assert_eq!(Some(k), graph_key(&b, &m));
        g.check_generation(0);
        for _ in 0..WARMUP {
            assert_eq!(g.cache.decide(Some(k)), Action::Eager);
        }
        assert_eq!(g.cache.decide(Some(k)), Action::Capture);
        g.cache.store(k, None);
        assert_eq!(g.key(&m), None, "a refused key leaves the graph path");
        g.check_generation(3);
        assert_eq!(g.key(&m), Some(k), "regrowth: every key starts again");
        assert_eq!(g.cache.decide(Some(k)), Action::Eager);
    }
}
