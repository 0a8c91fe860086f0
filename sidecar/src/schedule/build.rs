//! Schedules (a minimal sequential one until the builders land).

use super::program::Program;
use super::{Node, Schedule};

/// One lane, one node per op over all its rows, no events.
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
    Schedule {
        lanes: vec![(0..nodes.len()).collect()],
        nodes,
        events: vec![],
    }
}
