//! Issue orders (a minimal sequential one until the orders land).

use super::Schedule;

/// Lane 0's nodes in lane order (one-lane schedules).
pub fn sequential(schedule: &Schedule) -> Vec<usize> {
    schedule.lanes.iter().flatten().copied().collect()
}
