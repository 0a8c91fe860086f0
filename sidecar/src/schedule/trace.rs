//! Execution traces, and the checker that proves from a trace alone that a
//! run ordered every dependency of its step.
//!
//! A runner appends an [`Entry`] per node as it issues it: the node, its op,
//! rows and lane, the events (indices into `Schedule::events`) its lane
//! waited before it and those it signalled after it. [`check`] rebuilds
//! happens-before from what the trace shows, not from what the schedule
//! meant: two entries of one lane are ordered by the trace's order; an
//! event orders its signalling entry before a waiting entry only when the
//! signal comes first in the trace (a GPU stream that waits on an event not
//! yet recorded does not wait). A pair that merely ran in the right order,
//! with nothing ordering it, is a violation: on a GPU it is a race that
//! happened to be won.

use super::deps::{self, BitSet};
use super::{Buf, Node, Op, Schedule};
use crate::backend::StepMeta;
use std::collections::HashMap;
use std::ops::Range;

/// One node as a runner issued it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub node: usize,
    pub op: Op,
    pub rows: Range<usize>,
    pub lane: usize,
    /// Events the lane waited for before the node.
    pub waited: Vec<usize>,
    /// Events the lane signalled after the node.
    pub signalled: Vec<usize>,
}

/// A step's entries in the order they were issued.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trace {
    pub entries: Vec<Entry>,
}

impl Trace {
    pub fn push(&mut self, entry: Entry) {
        self.entries.push(entry);
    }

    /// The trace a faithful runner leaves when it issues `order`: each node
    /// waits the events into it and signals the events out of it.
    pub fn of_run(schedule: &Schedule, order: &[usize]) -> Trace {
        let mut trace = Trace::default();
        for &v in order {
            let node = &schedule.nodes[v];
            let events = schedule.events.iter().enumerate();
            let (waited, signalled) = events.fold((vec![], vec![]), |(mut w, mut s), (i, e)| {
                if e.after == v {
                    w.push(i);
                }
                if e.before == v {
                    s.push(i);
                }
                (w, s)
            });
            trace.push(Entry {
                node: v,
                op: node.op,
                rows: node.rows.clone(),
                lane: node.lane,
                waited,
                signalled,
            });
        }
        trace
    }
}

/// What a trace got wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Nodes `before` and `after` conflict on `rows` of `buf`, and nothing
    /// in the trace ordered `before` first.
    Unordered {
        before: usize,
        after: usize,
        buf: Buf,
        rows: Vec<Range<usize>>,
    },
    /// A node of the schedule never ran.
    NotRun { node: usize },
    /// A node ran more than once.
    RanTwice { node: usize },
    /// A node ran with another op, rows or lane than the schedule gives it
    /// (or does not exist in it).
    Mismatch { node: usize },
}

/// Checks that `trace` ran each node of `schedule` once, as scheduled, and
/// ordered every dependency of the step.
pub fn check(trace: &Trace, schedule: &Schedule, meta: &StepMeta) -> Result<(), Vec<Violation>> {
    let mut out = coverage(trace, schedule);
    let nodes: Vec<Node> = trace
        .entries
        .iter()
        .map(|e| Node {
            op: e.op,
            rows: e.rows.clone(),
            lane: e.lane,
        })
        .collect();
    let before = trace_happens_before(trace);
    for c in deps::conflicts(&nodes, meta) {
        if !before[c.after].contains(c.before) {
            out.push(Violation::Unordered {
                before: trace.entries[c.before].node,
                after: trace.entries[c.after].node,
                buf: c.buf,
                rows: c.rows,
            });
        }
    }
    if out.is_empty() { Ok(()) } else { Err(out) }
}

/// Each scheduled node run once, as scheduled.
fn coverage(trace: &Trace, schedule: &Schedule) -> Vec<Violation> {
    let mut runs = vec![0usize; schedule.nodes.len()];
    let mut out = vec![];
    for e in &trace.entries {
        let Some(n) = schedule.nodes.get(e.node) else {
            out.push(Violation::Mismatch { node: e.node });
            continue;
        };
        if (n.op, &n.rows, n.lane) != (e.op, &e.rows, e.lane) {
            out.push(Violation::Mismatch { node: e.node });
        }
        runs[e.node] += 1;
        if runs[e.node] == 2 {
            out.push(Violation::RanTwice { node: e.node });
        }
    }
    let not_run = runs.iter().enumerate().filter(|(_, r)| **r == 0);
    out.extend(not_run.map(|(node, _)| Violation::NotRun { node }));
    out
}

/// Per entry, the entries the trace shows happened before it: its lane's
/// previous entry, and for each event it waited, the latest entry before
/// it that signalled that event. Every such edge points forward in the
/// trace, so the trace's order is a topological order of them.
fn trace_happens_before(trace: &Trace) -> Vec<BitSet> {
    let n = trace.entries.len();
    let mut last_on_lane: HashMap<usize, usize> = HashMap::new();
    let mut last_signal: HashMap<usize, usize> = HashMap::new();
    let mut edges = vec![];
    for (i, e) in trace.entries.iter().enumerate() {
        if let Some(p) = last_on_lane.insert(e.lane, i) {
            edges.push((p, i));
        }
        let signals = e.waited.iter().filter_map(|ev| last_signal.get(ev));
        edges.extend(signals.map(|&s| (s, i)));
        for &ev in &e.signalled {
            last_signal.insert(ev, i);
        }
    }
    let order: Vec<usize> = (0..n).collect();
    deps::happens_before(n, &edges, &order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::build::{self, random_meta};
    use crate::schedule::order;
    use crate::schedule::program::Program;

    fn program() -> Program {
        crate::schedule::tests::program(false)
    }

    #[test]
    fn traces_of_valid_schedules_pass() {
        for seed in 0..100 {
            let meta = random_meta(seed);
            let s = build::random(&program(), &meta, seed);
            let order = order::random(&s, seed).unwrap();
            let trace = Trace::of_run(&s, &order);
            check(&trace, &s, &meta).unwrap_or_else(|v| panic!("seed {seed}: {v:?}"));
        }
    }

    /// A run of the schedule without event `i`, issued in an order that
    /// was valid with it: the pair still runs in the right order.
    #[test]
    fn a_missing_event_is_caught_though_the_pair_ran_in_order() {
        let mut checked = 0;
        for seed in 0..40 {
            let meta = random_meta(seed);
            let s = build::random(&program(), &meta, seed);
            let order = order::random(&s, seed + 1).unwrap();
            for (i, e) in s.events.iter().enumerate() {
                let mut cut = s.clone();
                cut.events.remove(i);
                let violations = check(&Trace::of_run(&cut, &order), &cut, &meta).unwrap_err();
                let named = violations.iter().any(|v| {
                    matches!(v, Violation::Unordered { before, after, .. }
                        if (*before, *after) == (e.before, e.after))
                });
                assert!(named, "seed {seed}: {e:?} not in {violations:?}");
                checked += 1;
            }
        }
        assert!(checked > 50, "only {checked} events tried");
    }

    #[test]
    fn a_wait_before_its_signal_orders_nothing() {
        let meta = random_meta(5);
        let spec = build::NanoSpec {
            dense_cuts: vec![meta.tokens.len() / 2],
            attn_cuts: vec![],
            lanes: build::LaneMap::nanoflow(),
            skew: 1,
        };
        let s = build::nano_batched(&program(), &meta, &spec).unwrap();
        // Lane by lane, last lane first: every cross-lane wait comes before
        // its signal.
        let order: Vec<usize> = s.lanes.iter().rev().flatten().copied().collect();
        let violations = check(&Trace::of_run(&s, &order), &s, &meta).unwrap_err();
        assert!(
            violations
                .iter()
                .all(|v| matches!(v, Violation::Unordered { .. }))
        );
        assert!(!violations.is_empty());
    }

    #[test]
    fn nodes_not_run_twice_or_changed_are_caught() {
        let meta = random_meta(9);
        let s = build::random(&program(), &meta, 9);
        let order = order::sequential(&s).unwrap();
        let mut trace = Trace::of_run(&s, &order);
        let dropped = trace.entries.pop().unwrap().node;
        trace.entries.push(trace.entries[0].clone());
        trace.entries[1].rows.end += 1;
        let bad = trace.entries[1].node;
        let v = check(&trace, &s, &meta).unwrap_err();
        assert!(v.contains(&Violation::NotRun { node: dropped }), "{v:?}");
        assert!(v.contains(&Violation::RanTwice {
            node: trace.entries[0].node
        }));
        assert!(v.contains(&Violation::Mismatch { node: bad }));
    }
}
