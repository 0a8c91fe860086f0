//! What the test backend ([`super::faults::Faulty`]) saw of a schedule's
//! run, as a [`Trace`]: for each node, the lane it was issued on, the events
//! that lane waited for before it and those it signalled after it — as the
//! backend was asked, not as the schedule meant — so that
//! `schedule::trace::check` can prove from it that every dependency of the
//! step was ordered. Every op call is also checked against the rows of the
//! node it runs for: a node whose op ran over other rows is a mismatch.

use super::{RowRange, StepMeta};
use crate::schedule::Node;
use crate::schedule::trace::{Entry, Trace};
use std::sync::Mutex;

/// An event as the test backend hands it out: the inner backend's, tagged
/// with its index in the step (the runner creates one per schedule event,
/// in order, so the index is the event's index in `Schedule::events`).
#[derive(Debug)]
pub struct Tagged<E> {
    pub id: usize,
    pub inner: E,
}

#[derive(Debug, Default)]
struct State {
    on: bool,
    trace: Trace,
    current: Option<Entry>,
    lane: usize,
    next_event: usize,
    waits: Vec<usize>,
    mismatches: Vec<String>,
    meta: Option<StepMeta>,
}

/// What the recorder saw: the trace, the op calls whose rows were not their
/// node's, and the last step's metadata (what the trace's dependencies are
/// computed from).
#[derive(Debug, Default)]
pub struct Recorded {
    pub trace: Trace,
    pub mismatches: Vec<String>,
    pub meta: Option<StepMeta>,
}

/// The recorder; off until [`Recorder::start`].
#[derive(Debug, Default)]
pub struct Recorder(Mutex<State>);

impl Recorder {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records from now on, from an empty trace.
    pub fn start(&self) {
        *self.state() = State {
            on: true,
            ..State::default()
        };
    }

    /// What was recorded since [`Recorder::start`]; recording stops.
    pub fn take(&self) -> Recorded {
        let mut s = self.state();
        s.on = false;
        if let Some(e) = s.current.take() {
            s.trace.push(e);
        }
        Recorded {
            trace: std::mem::take(&mut s.trace),
            mismatches: std::mem::take(&mut s.mismatches),
            meta: s.meta.take(),
        }
    }

    pub(super) fn begin_step(&self, meta: &StepMeta) {
        let mut s = self.state();
        s.next_event = 0;
        s.waits.clear();
        if s.on {
            s.meta = Some(meta.clone());
        }
    }

    pub(super) fn use_lane(&self, lane: usize) {
        self.state().lane = lane;
    }

    pub(super) fn new_event(&self) -> usize {
        let mut s = self.state();
        s.next_event += 1;
        s.next_event - 1
    }

    pub(super) fn wait(&self, id: usize) {
        self.state().waits.push(id);
    }

    pub(super) fn signal(&self, id: usize) {
        let mut s = self.state();
        if let Some(e) = s.current.as_mut() {
            e.signalled.push(id);
        }
    }

    pub(super) fn begin_node(&self, index: usize, node: &Node) {
        let mut s = self.state();
        if !s.on {
            return;
        }
        if let Some(e) = s.current.take() {
            s.trace.push(e);
        }
        let waited = std::mem::take(&mut s.waits);
        s.current = Some(Entry {
            node: index,
            op: node.op,
            rows: node.rows.clone(),
            lane: s.lane,
            waited,
            signalled: vec![],
        });
    }

    /// An op over `rows` (of the current node, if recording).
    pub(super) fn op(&self, name: &str, rows: &RowRange) {
        let mut s = self.state();
        let Some(e) = s.current.as_ref() else { return };
        if &e.rows != rows {
            let msg = format!("node {} ({:?}): {name} ran over {rows:?}", e.node, e.op);
            s.mismatches.push(msg);
        }
    }
}
