//! Schedules: the sequential pass, nano-batches on lanes, and seeded random
//! schedules for the tests.
//!
//! A nano-batched schedule cuts the dense ops (everything but attention)
//! at one set of row cuts and attention at another: attention may only cut
//! between sequences (a sequence's queries attend to all of its keys in one
//! launch), while the dense ops may cut anywhere, even inside a prefill.
//! Each lane's order is the restriction of one global order of the nodes,
//! itself a topological order of the dataflow, so lanes can never wait on
//! each other in a cycle; events are then added for exactly the cross-lane
//! dependencies that lane order and earlier events do not already imply.

use super::deps::{self, BitSet, ScheduleError};
use super::program::Program;
use super::{EventEdge, Node, Op, Schedule};
use crate::backend::StepMeta;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::Range;

/// The sequential pass: one lane, one node per op over all its rows, no
/// events; it runs exactly as the hard-coded loop does.
pub fn sequential(program: &Program, rows: usize, logit_rows: usize) -> Schedule {
    let nodes: Vec<Node> = program
        .ops()
        .into_iter()
        .map(|op| Node {
            op,
            rows: 0..if op.rowwise() { rows } else { logit_rows },
            lane: 0,
        })
        .collect();
    let lanes = vec![(0..nodes.len()).collect()];
    Schedule {
        nodes,
        lanes,
        events: vec![],
    }
}

/// Which lane runs which nodes: nano-batch `i`'s GEMMs run on
/// `gemm[i % gemm.len()]`, its other dense ops on `other[i % ..]`, and
/// attention piece `j` on `attention[j % ..]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneMap {
    pub gemm: Vec<usize>,
    pub other: Vec<usize>,
    pub attention: Vec<usize>,
}

impl LaneMap {
    /// Everything on one lane: nano-batches without overlap.
    pub fn single() -> LaneMap {
        LaneMap {
            gemm: vec![0],
            other: vec![0],
            attention: vec![0],
        }
    }

    /// NanoFlow's three streams: GEMMs, attention, the rest.
    pub fn nanoflow() -> LaneMap {
        LaneMap {
            gemm: vec![0],
            other: vec![2],
            attention: vec![1],
        }
    }

    /// Two-batch overlap: all of nano-batch `i` on lane `i % 2`.
    pub fn two_batch() -> LaneMap {
        LaneMap {
            gemm: vec![0, 1],
            other: vec![0, 1],
            attention: vec![0, 1],
        }
    }

    fn pick(list: &[usize], i: usize) -> usize {
        list[i % list.len()]
    }

    /// The lane of `op`'s piece `i`.
    pub fn lane(&self, op: Op, i: usize) -> usize {
        match op {
            Op::Attention(_) => Self::pick(&self.attention, i),
            op if op.is_gemm() => Self::pick(&self.gemm, i),
            _ => Self::pick(&self.other, i),
        }
    }

    /// How many lanes the map names.
    pub fn lanes(&self) -> usize {
        let all = self.gemm.iter().chain(&self.other).chain(&self.attention);
        all.max().map_or(1, |m| m + 1)
    }
}

/// How to cut a step into nano-batches and lay them on lanes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NanoSpec {
    /// Token-row cut points of the dense ops, ascending, inside the step:
    /// `k` cuts make `k + 1` nano-batches (`[384]` of 1024 rows is
    /// NanoFlow's 384/640).
    pub dense_cuts: Vec<usize>,
    /// Token-row cut points of attention, each a sequence boundary.
    pub attn_cuts: Vec<usize>,
    pub lanes: LaneMap,
    /// How far (in ops) nano-batch `i` trails nano-batch `i - 1` in the
    /// lanes' orders: with 0 the lanes run op by op, each op's pieces
    /// together; with more, the first nano-batch runs ahead, which lets its
    /// attention start while the next one's GEMMs run.
    pub skew: usize,
}

impl NanoSpec {
    /// No cut and one lane: the sequential pass.
    pub fn is_sequential(&self) -> bool {
        self.dense_cuts.is_empty() && self.attn_cuts.is_empty() && self.lanes.lanes() == 1
    }
}

/// `cuts` checked and turned into the ranges they make of `0..rows`.
fn pieces(
    cuts: &[usize],
    rows: usize,
    what: &'static str,
) -> Result<Vec<Range<usize>>, ScheduleError> {
    let mut out = vec![];
    let mut start = 0;
    for &cut in cuts {
        if cut <= start || cut >= rows {
            let why = "cuts must ascend strictly inside the step's rows";
            return Err(ScheduleError::BadCut { what, cut, why });
        }
        out.push(start..cut);
        start = cut;
    }
    out.push(start..rows);
    Ok(out)
}

/// The logit rows whose token rows fall in each dense piece (an empty
/// piece is dropped, but an op always keeps one node).
fn logit_pieces(dense: &[Range<usize>], meta: &StepMeta) -> Vec<(usize, Range<usize>)> {
    let below = |row: usize| {
        meta.logit_rows
            .iter()
            .filter(|&&r| (r as usize) < row)
            .count()
    };
    let all: Vec<_> = dense
        .iter()
        .enumerate()
        .map(|(i, r)| (i, below(r.start)..below(r.end)))
        .filter(|(_, r)| !r.is_empty())
        .collect();
    if all.is_empty() { vec![(0, 0..0)] } else { all }
}

/// The sequence boundaries of a step: where attention may be cut.
pub fn seq_boundaries(meta: &StepMeta) -> Vec<usize> {
    meta.seqs
        .iter()
        .map(|s| s.q_start)
        .filter(|&s| s > 0)
        .collect()
}

/// The nodes of a spec, each with its piece index (the nano-batch for dense
/// and logit ops, the attention piece for attention).
fn spec_nodes(
    program: &Program,
    meta: &StepMeta,
    spec: &NanoSpec,
) -> Result<Vec<(Node, usize)>, ScheduleError> {
    let rows = meta.tokens.len();
    let dense = pieces(&spec.dense_cuts, rows, "dense rows")?;
    let attn = pieces(&spec.attn_cuts, rows, "attention rows")?;
    let bounds = seq_boundaries(meta);
    if let Some(&cut) = spec.attn_cuts.iter().find(|c| !bounds.contains(c)) {
        let why = "attention cuts only between sequences";
        return Err(ScheduleError::BadCut {
            what: "attention rows",
            cut,
            why,
        });
    }
    let logits = logit_pieces(&dense, meta);
    let mut out = vec![];
    for op in program.ops() {
        let list: Vec<(usize, Range<usize>)> = match op {
            Op::Attention(_) => attn.iter().cloned().enumerate().collect(),
            op if op.rowwise() => dense.iter().cloned().enumerate().collect(),
            _ => logits.clone(),
        };
        for (i, rows) in list {
            let lane = spec.lanes.lane(op, i);
            out.push((Node { op, rows, lane }, i));
        }
    }
    Ok(out)
}

/// The nano-batched schedule of `spec`.
pub fn nano_batched(
    program: &Program,
    meta: &StepMeta,
    spec: &NanoSpec,
) -> Result<Schedule, ScheduleError> {
    let tagged = spec_nodes(program, meta, spec)?;
    let ops = program.ops();
    let step = |op: Op| ops.iter().position(|&o| o == op).unwrap();
    let keys: Vec<(usize, usize)> = tagged
        .iter()
        .map(|(n, i)| (step(n.op) + spec.skew * i, *i))
        .collect();
    let nodes: Vec<Node> = tagged.into_iter().map(|(n, _)| n).collect();
    let required = deps::required(&schedule_of(nodes.clone(), 0), meta);
    let order = priority_order(nodes.len(), &required, |v| (keys[v], v));
    Ok(laid_out(nodes, spec.lanes.lanes(), &order, &required))
}

/// A schedule with no lanes filled yet.
fn schedule_of(nodes: Vec<Node>, lanes: usize) -> Schedule {
    Schedule {
        nodes,
        lanes: vec![vec![]; lanes],
        events: vec![],
    }
}

/// A topological order of the dependencies, the ready node of least
/// `key` first.
fn priority_order<K: Ord>(
    n: usize,
    edges: &[(usize, usize)],
    key: impl Fn(usize) -> K,
) -> Vec<usize> {
    let mut succ = vec![vec![]; n];
    let mut indeg = vec![0usize; n];
    for &(a, b) in edges {
        succ[a].push(b);
        indeg[b] += 1;
    }
    let mut ready: BinaryHeap<_> = (0..n)
        .filter(|&v| indeg[v] == 0)
        .map(|v| Reverse((key(v), v)))
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse((_, v))) = ready.pop() {
        order.push(v);
        for &s in &succ[v] {
            indeg[s] -= 1;
            if indeg[s] == 0 {
                ready.push(Reverse((key(s), s)));
            }
        }
    }
    assert_eq!(
        order.len(),
        n,
        "dependencies of program order form no cycle"
    );
    order
}

/// `nodes` laid on their lanes in the order `order` (a topological order of
/// `required`, their [`deps::required`] pairs), with the events lane order
/// leaves needed.
pub fn laid_out(
    nodes: Vec<Node>,
    lanes: usize,
    order: &[usize],
    required: &[(usize, usize)],
) -> Schedule {
    let lanes = lanes.max(1 + nodes.iter().map(|n| n.lane).max().unwrap_or(0));
    let mut schedule = schedule_of(nodes, lanes);
    for &v in order {
        schedule.lanes[schedule.nodes[v].lane].push(v);
    }
    schedule.events = needed_events(&schedule, order, required);
    schedule
}

/// The fewest events that order every required pair given lane order:
/// visiting nodes in `order`, and each node's required predecessors latest
/// first, an event is added only for a predecessor that nothing yet makes
/// happen before. Latest first makes the set minimal: an earlier
/// predecessor can only be implied by a later one, never the reverse.
pub fn needed_events(
    schedule: &Schedule,
    order: &[usize],
    required: &[(usize, usize)],
) -> Vec<EventEdge> {
    let n = schedule.nodes.len();
    let mut rank = vec![0; n];
    for (i, &v) in order.iter().enumerate() {
        rank[v] = i;
    }
    let mut preds = vec![vec![]; n];
    for &(a, b) in required {
        preds[b].push(a);
    }
    let mut lane_prev = vec![None; n];
    for lane in &schedule.lanes {
        for w in lane.windows(2) {
            lane_prev[w[1]] = Some(w[0]);
        }
    }
    let mut before = vec![BitSet::new(n); n];
    let mut events = vec![];
    for &b in order {
        let mut set = BitSet::new(n);
        if let Some(p) = lane_prev[b] {
            set.union_with(&before[p]);
            set.insert(p);
        }
        preds[b].sort_by_key(|&a| Reverse(rank[a]));
        for &a in &preds[b] {
            if !set.contains(a) {
                set.union_with(&before[a]);
                set.insert(a);
                events.push(EventEdge {
                    before: a,
                    after: b,
                });
            }
        }
        before[b] = set;
    }
    events
}

/// A small seeded generator (SplitMix64): tests and the random schedules
/// must be reproducible from their seed alone.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(tacflow_kernels::rng::mix64(seed ^ 0x5eed))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        tacflow_kernels::rng::mix64(self.0)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Up to `max` distinct values of `from`, ascending.
    pub fn subset(&mut self, from: &[usize], max: usize) -> Vec<usize> {
        let mut pool = from.to_vec();
        let mut out = vec![];
        for _ in 0..self.below(max + 1).min(pool.len()) {
            out.push(pool.swap_remove(self.below(pool.len())));
        }
        out.sort_unstable();
        out
    }
}

/// A random valid schedule: random dense and attention cuts, each node on
/// a random one of 1-4 lanes, lane orders from a random topological order
/// of the dataflow, and the events that needs.
pub fn random(program: &Program, meta: &StepMeta, seed: u64) -> Schedule {
    let mut rng = Rng::new(seed);
    let rows = meta.tokens.len();
    let inner: Vec<usize> = (1..rows).collect();
    let spec = NanoSpec {
        dense_cuts: rng.subset(&inner, 3),
        attn_cuts: rng.subset(&seq_boundaries(meta), 3),
        lanes: LaneMap::single(),
        skew: 0,
    };
    let lanes = 1 + rng.below(4);
    let mut nodes: Vec<Node> = spec_nodes(program, meta, &spec)
        .expect("cuts drawn inside the step")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for n in &mut nodes {
        n.lane = rng.below(lanes);
    }
    let required = deps::required(&schedule_of(nodes.clone(), 0), meta);
    let keys: Vec<u64> = (0..nodes.len()).map(|_| rng.next_u64()).collect();
    let order = priority_order(nodes.len(), &required, |v| keys[v]);
    laid_out(nodes, lanes, &order, &required)
}

/// A random step: 1-6 sequences, decodes and prefills of up to 9 rows, the
/// last row of each sequence a logit row plus a few more.
#[cfg(test)]
pub(crate) fn random_meta(seed: u64) -> StepMeta {
    use crate::backend::SeqMeta;
    let mut rng = Rng::new(seed ^ 0xa11);
    let mut meta = StepMeta::default();
    for _ in 0..1 + rng.below(6) {
        let q_len = if rng.below(2) == 0 {
            1
        } else {
            1 + rng.below(9)
        };
        let q_start = meta.tokens.len();
        meta.seqs.push(SeqMeta {
            q_start,
            q_len,
            ctx_len: q_len + rng.below(40),
            block_table: vec![],
        });
        meta.tokens.extend((0..q_len).map(|_| 1));
        let last = (q_start + q_len - 1) as u32;
        let extra = (q_start..q_start + q_len).filter(|_| rng.below(5) == 0);
        let mut rows: Vec<u32> = extra.map(|r| r as u32).chain([last]).collect();
        rows.sort_unstable();
        rows.dedup();
        meta.logit_rows.extend(rows);
    }
    meta.positions = vec![0; meta.tokens.len()];
    meta.slots = (0..meta.tokens.len() as u32).collect();
    meta
}
