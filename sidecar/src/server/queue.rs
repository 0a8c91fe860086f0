//! Admission to the executor's queue: a command is counted in its session
//! (`max_queued_requests`) and daemon-wide (`max_queue`) before it is sent,
//! and the counts come down as its reply goes out (`Sessions::answered`,
//! the executor's `queue_depth`). A send that fails is counted back out at
//! once: left raised, the counts would answer that session `busy` for ever.

use super::executor::Command;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::Sender;
use tacflow_ipc::{ErrorCode, ErrorReply};

/// The two bounds on waiting commands.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// All sessions together.
    pub max_queue: u64,
    /// One session.
    pub max_queued_requests: u64,
}

/// Counts `cmd` in (`queued`: its session's count; `depth`: the daemon's)
/// and sends it to the executor; refuses with `busy` at either bound, and
/// with `shutting_down` (counts restored) when the executor is gone.
pub fn hand_off(
    tx: &Sender<Command>,
    cmd: Command,
    queued: &mut u64,
    depth: &AtomicU64,
    limits: QueueLimits,
) -> Result<(), ErrorReply> {
    let d = depth.load(Relaxed);
    if d >= limits.max_queue {
        return Err(
            ErrorReply::new(ErrorCode::Busy, "the executor's queue is full; retry later")
                .with("queue_depth", d),
        );
    }
    let max = limits.max_queued_requests;
    if *queued >= max {
        return Err(ErrorReply::new(
            ErrorCode::Busy,
            "this session has too many requests waiting; retry later",
        )
        .with("queued", *queued)
        .with("max_queued_requests", max));
    }
    *queued += 1;
    depth.fetch_add(1, Relaxed);
    if tx.send(cmd).is_err() {
        *queued -= 1;
        depth.fetch_sub(1, Relaxed);
        return Err(ErrorReply::new(
            ErrorCode::ShuttingDown,
            "the executor has stopped",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    const LIMITS: QueueLimits = QueueLimits {
        max_queue: 3,
        max_queued_requests: 2,
    };

    #[test]
    fn a_sent_command_is_counted_until_the_bound() {
        let (tx, rx) = mpsc::channel();
        let (mut queued, depth) = (0, AtomicU64::new(0));
        for _ in 0..2 {
            hand_off(&tx, Command::Stop, &mut queued, &depth, LIMITS).unwrap();
        }
        assert_eq!((queued, depth.load(Relaxed)), (2, 2));
        let e = hand_off(&tx, Command::Stop, &mut queued, &depth, LIMITS).unwrap_err();
        assert_eq!(e.code, ErrorCode::Busy);
        assert_eq!(
            (queued, depth.load(Relaxed)),
            (2, 2),
            "a refusal counts nothing"
        );
        let mut other = 0;
        hand_off(&tx, Command::Stop, &mut other, &depth, LIMITS).unwrap();
        let e = hand_off(&tx, Command::Stop, &mut other, &depth, LIMITS).unwrap_err();
        assert_eq!(
            e.detail["queue_depth"],
            3u64.into(),
            "the daemon-wide bound"
        );
        assert_eq!(rx.try_iter().count(), 3);
    }

    #[test]
    fn a_failed_send_is_counted_back_out() {
        let (tx, rx) = mpsc::channel();
        drop(rx); // the executor is gone
        let (mut queued, depth) = (1, AtomicU64::new(1));
        let e = hand_off(&tx, Command::Stop, &mut queued, &depth, LIMITS).unwrap_err();
        assert_eq!(e.code, ErrorCode::ShuttingDown);
        assert_eq!((queued, depth.load(Relaxed)), (1, 1));
        // The session is not left at its bound: a later hand-off is judged
        // on the real counts (and fails only because the executor is gone).
        let e = hand_off(&tx, Command::Stop, &mut queued, &depth, LIMITS).unwrap_err();
        assert_eq!(e.code, ErrorCode::ShuttingDown);
    }
}
