//! Faults that end the daemon: a panic on the executor or on a helper
//! thread, or a device the backend reports unusable.
//!
//! Whichever thread meets the fault records it once in [`FatalFlag`]; the
//! I/O thread sees it on its next loop turn (it polls at most every 100 ms,
//! and the executor wakes it), answers every request still waiting and every
//! new one `internal` with `detail.fatal` (except `health`, which says
//! `failing`), lingers so that ZeroMQ delivers those replies, and then
//! `run()` returns an error: the process exits non-zero and its supervisor
//! restarts it. A panic on the I/O thread itself aborts the process at once
//! ([`PanicHook`]): nothing is left that could answer.

use super::executor::Shared;
use std::any::Any;
use std::sync::{Arc, OnceLock};
use std::thread::ThreadId;
use tacflow_ipc::ErrorReply;

/// What kind of fault ends the daemon (sent as `detail.reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A panic inside a command or in the executor's loop.
    ExecutorPanic,
    /// `Backend::check_device` said the device cannot run work any more.
    DeviceFailed,
    /// A panic on a helper thread (companion socket, metrics, signals).
    ThreadPanic,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::ExecutorPanic => "executor_panic",
            Cause::DeviceFailed => "device_failed",
            Cause::ThreadPanic => "thread_panic",
        }
    }

    /// Whether the executor is gone after this fault (a helper thread's
    /// panic leaves it able to finish its command).
    pub fn kills_executor(self) -> bool {
        !matches!(self, Cause::ThreadPanic)
    }
}

/// One fatal fault: its kind and, in words, what happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub cause: Cause,
    pub why: String,
}

impl Fault {
    pub fn new(cause: Cause, why: impl Into<String>) -> Fault {
        Fault {
            cause,
            why: why.into(),
        }
    }

    /// The one reply every waiting and every new request gets.
    pub fn reply(&self) -> ErrorReply {
        ErrorReply::fatal(
            self.cause.as_str(),
            format!("the daemon is going down: {}", self.why),
        )
    }
}

/// The first fatal fault of this daemon: set once, read by every thread.
/// Later faults are consequences of the first (or races with it) and are
/// only logged.
#[derive(Debug, Default)]
pub struct FatalFlag(OnceLock<Fault>);

impl FatalFlag {
    /// Records `fault` unless one is recorded already; returns the one that
    /// stands.
    pub fn raise(&self, fault: Fault) -> &Fault {
        let _ = self.0.set(fault);
        self.0.get().expect("set just above")
    }

    pub fn get(&self) -> Option<&Fault> {
        self.0.get()
    }
}

/// A panic's message, as `std` prints it.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

type Hook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static>;

/// The process's panic hook while the daemon runs: prints as before, then
/// aborts when the panicking thread is the I/O thread, and records a fatal
/// fault when it is a helper thread. The executor catches its own panics
/// (`executor::run`); unnamed threads (rayon's workers) are left alone
/// because rayon hands their panic to the thread that waits for them.
/// Dropping the guard puts the previous hook back.
pub struct PanicHook {
    previous: Arc<Hook>,
}

impl PanicHook {
    pub fn install(shared: Arc<Shared>, io: ThreadId) -> PanicHook {
        let previous: Arc<Hook> = Arc::new(std::panic::take_hook());
        let prev = previous.clone();
        std::panic::set_hook(Box::new(move |info| {
            prev(info);
            let t = std::thread::current();
            if t.id() == io {
                tracing::error!("the I/O thread panicked: aborting");
                std::process::abort();
            }
            match t.name() {
                None | Some(super::EXECUTOR_THREAD) => {}
                Some(name) => {
                    let msg = panic_message(info.payload());
                    let why = format!("the {name} thread panicked: {msg}");
                    shared.fatal.raise(Fault::new(Cause::ThreadPanic, why));
                }
            }
        }));
        PanicHook { previous }
    }
}

impl Drop for PanicHook {
    fn drop(&mut self) {
        let prev = self.previous.clone();
        let _ = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| prev(info)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_fault_stands() {
        let f = FatalFlag::default();
        assert!(f.get().is_none());
        f.raise(Fault::new(Cause::DeviceFailed, "illegal address"));
        let kept = f.raise(Fault::new(Cause::ExecutorPanic, "a consequence"));
        assert_eq!(kept.cause, Cause::DeviceFailed);
        let r = kept.reply();
        assert!(r.is_fatal());
        assert!(r.message.contains("going down") && r.message.contains("illegal address"));
    }

    #[test]
    fn panic_messages_are_read() {
        let p = std::panic::catch_unwind(|| panic!("boom {}", 7)).unwrap_err();
        assert_eq!(panic_message(&*p), "boom 7");
        let p = std::panic::catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(panic_message(&*p), "static");
    }
}
