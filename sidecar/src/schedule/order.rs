//! Issue orders: the order in which a backend hands a schedule's nodes to
//! its lanes.
//!
//! A lane runs its nodes in its own order, so only the lanes' heads are
//! ever ready; a head is issued once every node it waits an event of has
//! been issued, since a GPU stream that waits on an event not yet recorded
//! does not wait at all. Any order built here is a topological order of
//! lane order and events; which one is a choice of the caller:
//! [`sequential`] for the plain run, [`random`] for the adversarial
//! interleavings of the tests.

use super::Schedule;
use super::build::Rng;
use super::deps::{self, ScheduleError};

/// The lowest-numbered ready node first: the one-lane schedule of
/// [`super::build::sequential`] runs in program order.
pub fn sequential(schedule: &Schedule) -> Result<Vec<usize>, ScheduleError> {
    issue(schedule, |s, heads| {
        let lowest = heads.iter().map(|&l| s.lanes[l][0]);
        let node = lowest.min().unwrap();
        heads.iter().position(|&l| s.lanes[l][0] == node).unwrap()
    })
}

/// A random ready lane each time, from `seed`.
pub fn random(schedule: &Schedule, seed: u64) -> Result<Vec<usize>, ScheduleError> {
    let mut rng = Rng::new(seed);
    issue(schedule, move |_, heads| rng.below(heads.len()))
}

/// Issues every node, `pick` choosing among the ready lanes (given as lane
/// indices whose next node is ready) the index of the one to advance.
fn issue(
    schedule: &Schedule,
    mut pick: impl FnMut(&Schedule, &[usize]) -> usize,
) -> Result<Vec<usize>, ScheduleError> {
    deps::check_lanes(schedule)?;
    let n = schedule.nodes.len();
    let mut waits = vec![vec![]; n];
    for e in &schedule.events {
        if e.before >= n || e.after >= n {
            let (before, after) = (e.before, e.after);
            return Err(ScheduleError::EventMissingNode { before, after });
        }
        waits[e.after].push(e.before);
    }
    let mut issued = vec![false; n];
    let mut next = vec![0; schedule.lanes.len()];
    let mut order = Vec::with_capacity(n);
    while order.len() < n {
        let heads: Vec<usize> = (0..schedule.lanes.len())
            .filter(|&l| {
                let head = schedule.lanes[l].get(next[l]);
                head.is_some_and(|&v| waits[v].iter().all(|&a| issued[a]))
            })
            .collect();
        if heads.is_empty() {
            let edges = deps::edges(schedule);
            let nodes = deps::topo_order(n, &edges).err().unwrap_or_default();
            return Err(ScheduleError::Cycle { nodes });
        }
        let lane = heads[pick(schedule, &heads)];
        let v = schedule.lanes[lane][next[lane]];
        next[lane] += 1;
        issued[v] = true;
        order.push(v);
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::build::{self, random_meta};
    use crate::schedule::program::Program;

    /// Whether `order` issues every node once, each after its lane
    /// predecessor and the sources of its events.
    fn respects(schedule: &Schedule, order: &[usize]) -> bool {
        let mut at = vec![usize::MAX; schedule.nodes.len()];
        for (i, &v) in order.iter().enumerate() {
            at[v] = i;
        }
        let edges = deps::edges(schedule);
        order.len() == schedule.nodes.len()
            && at.iter().all(|&i| i != usize::MAX)
            && edges.iter().all(|&(a, b)| at[a] < at[b])
    }

    #[test]
    fn sequential_runs_the_one_lane_schedule_in_program_order() {
        let program = Program {
            layers: 3,
            qkv_bias: true,
            fusions: Default::default(),
        };
        let s = build::sequential(&program, 7, 2);
        let order = sequential(&s).unwrap();
        assert_eq!(order, (0..s.nodes.len()).collect::<Vec<_>>());
    }

    #[test]
    fn random_orders_respect_lanes_and_events() {
        let program = Program {
            layers: 2,
            qkv_bias: false,
            fusions: Default::default(),
        };
        let mut distinct = std::collections::HashSet::new();
        for seed in 0..40 {
            let meta = random_meta(seed);
            let s = build::random(&program, &meta, seed);
            for k in 0..3 {
                let order = random(&s, seed * 7 + k).unwrap();
                assert!(respects(&s, &order), "seed {seed}/{k}");
                distinct.insert(order);
            }
            assert!(respects(&s, &sequential(&s).unwrap()));
        }
        assert!(distinct.len() > 40, "random orders vary");
    }

    #[test]
    fn a_deadlocked_schedule_is_an_error() {
        let program = Program {
            layers: 1,
            qkv_bias: false,
            fusions: Default::default(),
        };
        let mut s = build::sequential(&program, 4, 1);
        let last = s.nodes.len() - 1;
        s.lanes = vec![vec![0], (1..=last).collect()];
        s.nodes[0].lane = 0;
        for n in &mut s.nodes[1..] {
            n.lane = 1;
        }
        use crate::schedule::EventEdge;
        s.events = vec![
            EventEdge {
                before: last,
                after: 0,
            },
            EventEdge {
                before: 0,
                after: 1,
            },
        ];
        assert!(matches!(sequential(&s), Err(ScheduleError::Cycle { .. })));
        assert!(matches!(random(&s, 3), Err(ScheduleError::Cycle { .. })));
    }
}
