//! What `health` says, judged from the fatal flag, how long the executor
//! has been on its command, and whether shutdown began. `status` is never
//! `ok` while the executor or the device is not.

use super::fatal::{Cause, Fault};
use std::time::Duration;

/// `health`'s verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// `ok`, `stopping`, `wedged` or `failing`.
    pub status: &'static str,
    /// `alive`, `wedged` or `dead`.
    pub executor: &'static str,
    /// `ok` or `failed`.
    pub device: &'static str,
    /// Why the status is not `ok`.
    pub reason: Option<String>,
}

/// Judges the daemon's state. `busy_for` is how long the executor has been
/// on its command (`None`: idle); past `wedged_after` it is `wedged`.
pub fn judge(
    fatal: Option<&Fault>,
    busy_for: Option<Duration>,
    wedged_after: Duration,
    stopping: bool,
) -> Verdict {
    if let Some(f) = fatal {
        return Verdict {
            status: "failing",
            executor: if f.cause.kills_executor() {
                "dead"
            } else {
                "alive"
            },
            device: if f.cause == Cause::DeviceFailed {
                "failed"
            } else {
                "ok"
            },
            reason: Some(f.why.clone()),
        };
    }
    if let Some(busy) = busy_for.filter(|b| *b > wedged_after) {
        return Verdict {
            status: "wedged",
            executor: "wedged",
            device: "ok",
            reason: Some(format!(
                "the executor has been on one command for {} ms (wedged after {} ms)",
                busy.as_millis(),
                wedged_after.as_millis()
            )),
        };
    }
    Verdict {
        status: if stopping { "stopping" } else { "ok" },
        executor: "alive",
        device: "ok",
        reason: stopping.then(|| "shutdown requested".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(120);

    #[test]
    fn ok_only_when_everything_is() {
        let v = judge(None, Some(Duration::from_secs(5)), BOUND, false);
        assert_eq!((v.status, v.executor, v.device), ("ok", "alive", "ok"));
        assert_eq!(v.reason, None);
        let v = judge(None, None, BOUND, true);
        assert_eq!(v.status, "stopping");
    }

    #[test]
    fn a_long_command_is_wedged() {
        let v = judge(None, Some(BOUND + Duration::from_millis(1)), BOUND, false);
        assert_eq!((v.status, v.executor), ("wedged", "wedged"));
        assert!(v.reason.unwrap().contains("120000 ms"));
    }

    #[test]
    fn a_fault_is_failing_and_says_what_died() {
        let device = Fault::new(Cause::DeviceFailed, "illegal address");
        let v = judge(Some(&device), None, BOUND, true);
        assert_eq!(
            (v.status, v.executor, v.device),
            ("failing", "dead", "failed")
        );
        let helper = Fault::new(Cause::ThreadPanic, "the metrics thread panicked");
        let v = judge(Some(&helper), Some(BOUND * 2), BOUND, false);
        assert_eq!((v.status, v.executor, v.device), ("failing", "alive", "ok"));
        let panic = Fault::new(Cause::ExecutorPanic, "boom");
        assert_eq!(judge(Some(&panic), None, BOUND, false).executor, "dead");
    }
}
