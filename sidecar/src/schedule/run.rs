//! Running a schedule on a backend: its nodes issued in a topological order
//! of lane order and events ([`super::order`]); before each node the lane
//! is chosen and its incoming events waited, after it its outgoing events
//! are signalled. On a GPU the lanes are streams and run concurrently,
//! ordered only by those events; the CPU runs every node as it is issued,
//! so the issue order is the execution order (the tests issue in seeded
//! random orders to play an adversarial GPU).

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
    mut run: impl FnMut(usize) -> Result<()>,
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
