//! Running a schedule on a backend: its nodes issued in a topological order
//! of lane order and events ([`super::order`]); before each node the lane
//! is chosen and its incoming events waited, after it its outgoing events
//! are signalled. On a GPU the lanes are streams and run concurrently,
//! ordered only by those events; the CPU runs every node as it is issued,
//! so the issue order is the execution order (the tests issue in seeded
//! random orders to play an adversarial GPU).
//!
//! A schedule of several lanes forks from lane 0 and joins back into it:
//! every other lane first waits for an event signalled on lane 0 before
//! the schedule's first node, and lane 0 ends waiting for an event from
//! every other lane after its last, even when a node failed. Lane 0 is
//! where a step's buffers are allocated and given back (a GPU backend's
//! pool, the step's upload), so everything before and after the schedule
//! is ordered against every lane's nodes. A one-lane schedule issues no
//! extra call.

use super::Schedule;
use crate::backend::Backend;
use crate::error::{Error, Result};

/// Issues `schedule`'s nodes in `order` on `b`, calling `run(i)` for node
/// `i` after its waits and before its signals. `order` must be a topological
/// order of the schedule's lane order and events (a wait on an event not
/// yet signalled would be a wait for nothing on a GPU): it is checked.
pub fn execute<B: Backend>(
    b: &B,
    schedule: &Schedule,
    order: &[usize],
    run: impl FnMut(usize) -> Result<()>,
) -> Result<()> {
    let n = schedule.nodes.len();
    if schedule.lanes.len() > b.lanes() {
        return Err(Error::Backend(format!(
            "the schedule has {} lanes, the backend runs {}",
            schedule.lanes.len(),
            b.lanes()
        )));
    }
    let mut incoming = vec![vec![]; n];
    let mut outgoing = vec![vec![]; n];
    for (e, edge) in schedule.events.iter().enumerate() {
        outgoing[edge.before].push(e);
        incoming[edge.after].push(e);
    }
    let events = schedule
        .events
        .iter()
        .map(|_| b.new_event())
        .collect::<Result<Vec<_>>>()?;
    let others: Vec<usize> = (1..schedule.lanes.len()).collect();
    fork(b, &others)?;
    let issued = issue(b, schedule, order, (&incoming, &outgoing), &events, run);
    let joined = join(b, &others);
    issued.and(joined)
}

/// Every lane in `others` waits for lane 0's point now.
fn fork<B: Backend>(b: &B, others: &[usize]) -> Result<()> {
    if others.is_empty() {
        return Ok(());
    }
    b.use_lane(0)?;
    let e = b.new_event()?;
    b.signal(&e)?;
    for &l in others {
        b.use_lane(l)?;
        b.wait(&e)?;
    }
    Ok(())
}

/// Lane 0 waits for every lane in `others`, and is current after.
fn join<B: Backend>(b: &B, others: &[usize]) -> Result<()> {
    if others.is_empty() {
        return Ok(());
    }
    let mut ends = Vec::with_capacity(others.len());
    for &l in others {
        b.use_lane(l)?;
        let e = b.new_event()?;
        b.signal(&e)?;
        ends.push(e);
    }
    b.use_lane(0)?;
    ends.iter().try_for_each(|e| b.wait(e))
}

/// Per node, the events it waits for and those it signals.
type Edges<'a> = (&'a [Vec<usize>], &'a [Vec<usize>]);

/// The nodes in `order`, each between its waits and its signals.
fn issue<B: Backend>(
    b: &B,
    schedule: &Schedule,
    order: &[usize],
    (incoming, outgoing): Edges<'_>,
    events: &[B::Event],
    mut run: impl FnMut(usize) -> Result<()>,
) -> Result<()> {
    let mut signalled = vec![false; events.len()];
    let mut lane = None;
    for &i in order {
        let node = &schedule.nodes[i];
        if lane != Some(node.lane) {
            b.use_lane(node.lane)?;
            lane = Some(node.lane);
        }
        for &e in &incoming[i] {
            if !signalled[e] {
                return Err(Error::Backend(format!(
                    "node {i} issued before node {} it waits for",
                    schedule.events[e].before
                )));
            }
            b.wait(&events[e])?;
        }
        run(i)?;
        for &e in &outgoing[i] {
            b.signal(&events[e])?;
            signalled[e] = true;
        }
    }
    Ok(())
}
