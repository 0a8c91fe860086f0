//! The dependencies a schedule must order, and its validation.
//!
//! Two nodes of different ops conflict when one writes rows of a buffer
//! that the other reads or writes ([`program::accesses`]); the one whose op
//! comes first in [`Program::ops`] must then happen before the other, since
//! the sequential pass is the meaning of a schedule. A schedule orders a
//! pair when a path of lane orders and events leads from one to the other
//! (happens-before is the transitive closure of both). [`validate`] proves
//! that before anything runs, so that a bad schedule is an error with the
//! nodes named, never a silent race on the GPU.

use super::program::{self, Access, Program};
use super::{Buf, Node, Op, Schedule};
use crate::backend::StepMeta;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

/// Why a schedule cannot run as it stands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("node {node} ({op:?}) has rows {rows:?} outside the step's 0..{limit}")]
    OutOfRows {
        node: usize,
        op: Op,
        rows: Range<usize>,
        limit: usize,
    },
    #[error("node {node} runs {op:?}, which the program does not have")]
    ForeignOp { node: usize, op: Op },
    #[error("op {op:?} has no node")]
    MissingOp { op: Op },
    #[error("op {op:?}: rows {rows:?} are covered by no node")]
    Uncovered { op: Op, rows: Range<usize> },
    #[error("op {op:?}: nodes {first} and {second} both cover rows {rows:?}")]
    Overlap {
        op: Op,
        first: usize,
        second: usize,
        rows: Range<usize>,
    },
    #[error("node {node} is in no lane")]
    NoLane { node: usize },
    #[error("node {node} is listed {times} times in lanes {lanes:?}")]
    ManyLanes {
        node: usize,
        times: usize,
        lanes: Vec<usize>,
    },
    #[error("lane {lane} lists node {node}, which does not exist")]
    LaneMissingNode { lane: usize, node: usize },
    #[error("node {node} says lane {says} but is listed in lane {listed}")]
    LaneMismatch {
        node: usize,
        says: usize,
        listed: usize,
    },
    #[error("event {before} -> {after} names a node that does not exist")]
    EventMissingNode { before: usize, after: usize },
    #[error("event {before} -> {after} joins two nodes of lane {lane}")]
    EventOnOneLane {
        before: usize,
        after: usize,
        lane: usize,
    },
    #[error("lane orders and events form a cycle (the step would deadlock): {nodes:?}")]
    Cycle { nodes: Vec<usize> },
    #[error(
        "nodes {before} ({before_op:?}) and {after} ({after_op:?}) conflict on \
         {buf:?} rows {rows:?}, but no lane order or event orders them"
    )]
    Unordered {
        before: usize,
        before_op: Op,
        after: usize,
        after_op: Op,
        buf: Buf,
        rows: Vec<Range<usize>>,
    },
    #[error("bad cut {cut} of {what}: {why}")]
    BadCut {
        what: &'static str,
        cut: usize,
        why: &'static str,
    },
}

/// A pair that must be ordered, and why: the buffer and rows it conflicts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub before: usize,
    pub after: usize,
    pub buf: Buf,
    pub rows: Vec<Range<usize>>,
}

/// Where `op` stands in [`Program::ops`], comparable across programs with
/// and without a QKV bias or fusions (the tests keep them in step): a fused
/// op stands where its first op does, and a layer's attention norm fused
/// into the previous layer's last add stands there.
pub fn position(op: Op) -> (usize, usize, usize) {
    use Op::*;
    let in_layer = |i| (1, op.layer().unwrap_or(0), i);
    match op {
        Embed => (0, 0, 0),
        AttnNorm(_) => in_layer(0),
        Qkv(_) => in_layer(1),
        QkvBias(_) => in_layer(2),
        Rope(_) => in_layer(3),
        KvAppend(_) => in_layer(4),
        Attention(_) => in_layer(5),
        OProj(_) => in_layer(6),
        AddAttn(_) => in_layer(7),
        MlpNorm(_) => in_layer(8),
        GateUp(_) => in_layer(9),
        SiluMul(_) => in_layer(10),
        Down(_) => in_layer(11),
        AddMlp(_) | AddMlpNorm(_) => in_layer(12),
        AddAttnNorm(_) => in_layer(7),
        RopeAppend(_) => in_layer(3),
        Gather => (2, 0, 0),
        FinalNorm => (2, 0, 1),
        LmHead => (2, 0, 2),
    }
}

/// The rows two sets of ascending, disjoint ranges share.
pub fn intersect(a: &[Range<usize>], b: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut out = vec![];
    for x in a {
        for y in b {
            let (s, e) = (x.start.max(y.start), x.end.min(y.end));
            if s < e {
                out.push(s..e);
            }
        }
    }
    out
}

/// One access of one node, as the conflict scan sees it.
struct Touch {
    node: usize,
    pos: (usize, usize, usize),
    write: bool,
    rows: Vec<Range<usize>>,
}

/// Every conflicting pair of nodes, per buffer, the earlier op first.
pub fn conflicts(nodes: &[Node], meta: &StepMeta) -> Vec<Conflict> {
    let mut by_buf: BTreeMap<Buf, Vec<Touch>> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        let pos = position(n.op);
        let (reads, writes) = program::accesses(n, meta);
        let all = reads.into_iter().map(|a| (a, false));
        for (Access { buf, rows }, w) in all.chain(writes.into_iter().map(|a| (a, true))) {
            let touch = Touch {
                node: i,
                pos,
                write: w,
                rows,
            };
            by_buf.entry(buf).or_default().push(touch);
        }
    }
    let mut out: Vec<Conflict> = vec![];
    for (buf, mut touches) in by_buf {
        touches.sort_by_key(|t| t.pos);
        for (j, y) in touches.iter().enumerate() {
            for x in &touches[..j] {
                if x.pos == y.pos || !(x.write || y.write) {
                    continue;
                }
                let rows = intersect(&x.rows, &y.rows);
                if !rows.is_empty() {
                    let (before, after) = (x.node, y.node);
                    out.push(Conflict {
                        before,
                        after,
                        buf,
                        rows,
                    });
                }
            }
        }
    }
    // A node that reads and writes one buffer meets a pair twice there.
    out.sort_by_key(|c| (c.before, c.after, c.buf));
    out.dedup_by_key(|c| (c.before, c.after, c.buf));
    out
}

/// Every pair of nodes that must be ordered, the earlier one first.
pub fn required(schedule: &Schedule, meta: &StepMeta) -> Vec<(usize, usize)> {
    let mut pairs: Vec<_> = conflicts(&schedule.nodes, meta)
        .into_iter()
        .map(|c| (c.before, c.after))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

/// A set of node indices, one bit each: happens-before sets of thousands
/// of nodes stay small and their unions fast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitSet(Vec<u64>);

impl BitSet {
    pub fn new(n: usize) -> BitSet {
        BitSet(vec![0; n.div_ceil(64)])
    }
    pub fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    pub fn contains(&self, i: usize) -> bool {
        self.0[i / 64] >> (i % 64) & 1 == 1
    }
    pub fn union_with(&mut self, other: &BitSet) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }
}

/// The edges of happens-before: each lane's consecutive nodes, then the
/// events. Assumes node indices in range (see [`check_lanes`]).
pub fn edges(schedule: &Schedule) -> Vec<(usize, usize)> {
    let lanes = schedule.lanes.iter();
    let lane_edges = lanes.flat_map(|l| l.windows(2).map(|w| (w[0], w[1])));
    let events = schedule.events.iter().map(|e| (e.before, e.after));
    lane_edges.chain(events).collect()
}

/// A topological order of `n` nodes under `edges`, or the nodes of a cycle.
pub fn topo_order(n: usize, edges: &[(usize, usize)]) -> Result<Vec<usize>, Vec<usize>> {
    let mut succ = vec![vec![]; n];
    let mut indeg = vec![0usize; n];
    for &(a, b) in edges {
        succ[a].push(b);
        indeg[b] += 1;
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(v) = ready.pop() {
        order.push(v);
        for &s in &succ[v] {
            indeg[s] -= 1;
            if indeg[s] == 0 {
                ready.push(s);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    Err(find_cycle(n, edges, &indeg))
}

/// A cycle among the nodes a topological sort could not place (each has a
/// predecessor that is also unplaced): walk predecessors until one repeats.
fn find_cycle(n: usize, edges: &[(usize, usize)], indeg: &[usize]) -> Vec<usize> {
    let mut pred = vec![None; n];
    for &(a, b) in edges {
        if indeg[a] > 0 && indeg[b] > 0 {
            pred[b] = Some(a);
        }
    }
    let mut at = (0..n).find(|&i| indeg[i] > 0).unwrap();
    let mut path = vec![];
    let mut index = HashMap::new();
    while let std::collections::hash_map::Entry::Vacant(e) = index.entry(at) {
        e.insert(path.len());
        path.push(at);
        at = pred[at].unwrap();
    }
    let mut cycle = path.split_off(index[&at]);
    cycle.reverse();
    cycle
}

/// Per node, the set of nodes that happen before it, from a topological
/// `order` of `edges`.
pub fn happens_before(n: usize, edges: &[(usize, usize)], order: &[usize]) -> Vec<BitSet> {
    let mut preds = vec![vec![]; n];
    for &(a, b) in edges {
        preds[b].push(a);
    }
    let mut before = vec![BitSet::new(n); n];
    for &v in order {
        let mut set = BitSet::new(n);
        for &p in &preds[v] {
            set.union_with(&before[p]);
            set.insert(p);
        }
        before[v] = set;
    }
    before
}

/// Checks every node is listed in exactly one lane, the one it names.
pub fn check_lanes(schedule: &Schedule) -> Result<(), ScheduleError> {
    let n = schedule.nodes.len();
    let mut listed: Vec<Vec<usize>> = vec![vec![]; n];
    for (lane, nodes) in schedule.lanes.iter().enumerate() {
        for &node in nodes {
            if node >= n {
                return Err(ScheduleError::LaneMissingNode { lane, node });
            }
            listed[node].push(lane);
        }
    }
    for (node, lanes) in listed.into_iter().enumerate() {
        match lanes[..] {
            [] => return Err(ScheduleError::NoLane { node }),
            [listed] if listed != schedule.nodes[node].lane => {
                let says = schedule.nodes[node].lane;
                return Err(ScheduleError::LaneMismatch { node, says, listed });
            }
            [_] => {}
            _ => {
                let times = lanes.len();
                return Err(ScheduleError::ManyLanes { node, times, lanes });
            }
        }
    }
    Ok(())
}

/// Checks every event joins two existing nodes of different lanes.
fn check_events(schedule: &Schedule) -> Result<(), ScheduleError> {
    let nodes = &schedule.nodes;
    for e in &schedule.events {
        let (before, after) = (e.before, e.after);
        let (Some(a), Some(b)) = (nodes.get(before), nodes.get(after)) else {
            return Err(ScheduleError::EventMissingNode { before, after });
        };
        if a.lane == b.lane {
            let lane = a.lane;
            return Err(ScheduleError::EventOnOneLane {
                before,
                after,
                lane,
            });
        }
    }
    Ok(())
}

/// Checks every node runs an op of the program within the step's rows, and
/// each op's nodes cover its rows exactly once.
fn check_coverage(
    schedule: &Schedule,
    program: &Program,
    meta: &StepMeta,
) -> Result<(), ScheduleError> {
    let limit = |op: Op| match op.rowwise() {
        true => meta.tokens.len(),
        false => meta.logit_rows.len(),
    };
    let mut by_op: HashMap<Op, Vec<usize>> =
        program.ops().into_iter().map(|o| (o, vec![])).collect();
    for (node, n) in schedule.nodes.iter().enumerate() {
        let (op, rows, limit) = (n.op, n.rows.clone(), limit(n.op));
        let Some(list) = by_op.get_mut(&op) else {
            return Err(ScheduleError::ForeignOp { node, op });
        };
        if rows.start > rows.end || rows.end > limit {
            return Err(ScheduleError::OutOfRows {
                node,
                op,
                rows,
                limit,
            });
        }
        list.push(node);
    }
    for op in program.ops() {
        check_cover(op, &by_op[&op], &schedule.nodes, limit(op))?;
    }
    Ok(())
}

/// Checks `list` (nodes of `op`) tile `0..limit`.
fn check_cover(op: Op, list: &[usize], nodes: &[Node], limit: usize) -> Result<(), ScheduleError> {
    if list.is_empty() {
        return Err(ScheduleError::MissingOp { op });
    }
    let mut sorted = list.to_vec();
    sorted.sort_by_key(|&i| (nodes[i].rows.start, nodes[i].rows.end));
    let (mut cursor, mut last) = (0, sorted[0]);
    for &i in &sorted {
        let rows = &nodes[i].rows;
        if rows.start > cursor {
            let rows = cursor..rows.start;
            return Err(ScheduleError::Uncovered { op, rows });
        }
        if rows.start < cursor {
            let rows = rows.start..cursor.min(rows.end);
            let (first, second) = (last, i);
            return Err(ScheduleError::Overlap {
                op,
                first,
                second,
                rows,
            });
        }
        (cursor, last) = (rows.end, i);
    }
    if cursor < limit {
        let rows = cursor..limit;
        return Err(ScheduleError::Uncovered { op, rows });
    }
    Ok(())
}

/// Proves, before anything runs, that `schedule` computes what the
/// sequential pass of `program` computes for the step `meta`.
pub fn validate(
    schedule: &Schedule,
    program: &Program,
    meta: &StepMeta,
) -> Result<(), ScheduleError> {
    check_coverage(schedule, program, meta)?;
    check_lanes(schedule)?;
    check_events(schedule)?;
    let n = schedule.nodes.len();
    let edges = edges(schedule);
    let order = topo_order(n, &edges).map_err(|nodes| ScheduleError::Cycle { nodes })?;
    match unordered_in(schedule, meta, &edges, &order)
        .into_iter()
        .next()
    {
        Some(c) => Err(unordered(schedule, c)),
        None => Ok(()),
    }
}

/// Every conflict of a schedule that nothing orders, given its happens-before
/// edges and a topological order of them.
fn unordered_in(
    schedule: &Schedule,
    meta: &StepMeta,
    edges: &[(usize, usize)],
    order: &[usize],
) -> Vec<Conflict> {
    let before = happens_before(schedule.nodes.len(), edges, order);
    let mut all = conflicts(&schedule.nodes, meta);
    all.retain(|c| !before[c.after].contains(c.before));
    all
}

/// Every conflict that nothing orders, for a schedule whose lanes and
/// events are well formed and acyclic (else the error [`validate`] gives).
pub fn unordered_conflicts(
    schedule: &Schedule,
    meta: &StepMeta,
) -> Result<Vec<Conflict>, ScheduleError> {
    check_lanes(schedule)?;
    check_events(schedule)?;
    let edges = edges(schedule);
    let order =
        topo_order(schedule.nodes.len(), &edges).map_err(|nodes| ScheduleError::Cycle { nodes })?;
    Ok(unordered_in(schedule, meta, &edges, &order))
}

/// The error for a conflict nothing orders.
pub fn unordered(schedule: &Schedule, c: Conflict) -> ScheduleError {
    ScheduleError::Unordered {
        before: c.before,
        before_op: schedule.nodes[c.before].op,
        after: c.after,
        after_op: schedule.nodes[c.after].op,
        buf: c.buf,
        rows: c.rows,
    }
}
