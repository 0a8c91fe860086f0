//! The executor thread: owns the engine (model, KV cache, sequences, CUDA
//! context) and runs one command at a time from its queue. It never touches
//! the client socket: replies go back to the I/O thread, already encoded,
//! through an [`Outbox`].

use super::dispatch::Served;
use super::fatal::{Cause, FatalFlag, Fault, panic_message};
use super::replay::{Replays, Seen, fingerprint};
use super::systemd::Heartbeat;
use crate::backend::Backend;
use crate::engine::gauges::Gauges;
use crate::engine::step::StepWork;
use crate::engine::{SeqOptions, SessionId};
use crate::offload::step::AttentionWork;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};
use tacflow_ipc::codec::encode_error;
use tacflow_ipc::*;
use tracing::{debug, error, info_span, warn};

/// Where a reply goes: the peer, the request it answers, and when the I/O
/// thread received it.
#[derive(Debug, Clone)]
pub struct ReplyTo {
    pub identity: Vec<u8>,
    pub session: SessionId,
    pub request_id: u64,
    pub kind: Kind,
    pub received: Instant,
}

#[derive(Debug)]
pub enum Command {
    Open {
        to: ReplyTo,
        seq: u64,
        opts: SeqOptions,
    },
    Fork {
        to: ReplyTo,
        parent: u64,
        child: u64,
        sampling: Option<SamplingParams>,
        policy: Option<AttentionPolicy>,
        diagnostics: Option<bool>,
    },
    Truncate {
        to: ReplyTo,
        seq: u64,
        drop: u64,
    },
    Close {
        to: ReplyTo,
        seq: u64,
    },
    Step {
        to: ReplyTo,
        work: StepWork,
        /// Answer a retry of this `request_id` from the first execution
        /// (`replay.rs`; sessions of protocol 1.3 and later).
        idempotent: bool,
    },
    /// (1.3) Grow the session's block reservation.
    Reserve {
        to: ReplyTo,
        count: u64,
    },
    /// (1.3) Report a sequence's state.
    State {
        to: ReplyTo,
        seq: u64,
    },
    /// (1.4) One layer of attention for attention-only sequences.
    AttentionStep {
        to: ReplyTo,
        work: Box<AttentionWork>,
    },
    /// The session ended: free its sequences. Not a client request, no reply.
    DropSession(SessionId),
    /// Finish: answer nothing more, push [`Outgoing::Done`] and return.
    Stop,
}

/// State shared by the executor and the I/O thread.
#[derive(Debug)]
pub struct Shared {
    /// Set when shutdown begins: queued work is answered `shutting_down`.
    pub stopping: AtomicBool,
    /// Client commands in the queue or running.
    pub queue_depth: AtomicU64,
    /// The I/O thread is (about to be) asleep in its poll and must be woken
    /// for a reply.
    pub io_sleeping: AtomicBool,
    /// The fault that ends the daemon, once one happened (`fatal.rs`).
    pub fatal: FatalFlag,
    /// Microseconds after `epoch` (plus one, so that 0 means idle) at which
    /// the executor began the command it runs: `health` reports it
    /// `wedged` when that is too long ago.
    busy_since_us: AtomicU64,
    epoch: Instant,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            stopping: AtomicBool::new(false),
            queue_depth: AtomicU64::new(0),
            io_sleeping: AtomicBool::new(false),
            fatal: FatalFlag::default(),
            busy_since_us: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Shared {
    fn set_busy(&self, busy: bool) {
        let v = if busy {
            self.epoch.elapsed().as_micros() as u64 + 1
        } else {
            0
        };
        self.busy_since_us.store(v, Ordering::Relaxed);
    }

    /// How long the executor has been on its current command; `None` while
    /// it waits for one.
    pub fn busy_for(&self) -> Option<Duration> {
        let since = self.busy_since_us.load(Ordering::Relaxed);
        (since != 0).then(|| {
            let now = self.epoch.elapsed().as_micros() as u64 + 1;
            Duration::from_micros(now.saturating_sub(since))
        })
    }
}

/// What the executor hands back to the I/O thread.
#[derive(Debug)]
pub enum Outgoing {
    Reply {
        identity: Vec<u8>,
        session: SessionId,
        frames: [Vec<u8>; 2],
    },
    /// The executor stopped: every reply is in.
    Done,
    /// The executor met a fatal fault (recorded in [`Shared::fatal`]): the
    /// command it was running and everything queued are answered, and it
    /// runs nothing more. Commands sent later are still answered with the
    /// fault until the I/O thread lets go of the queue.
    Failed,
}

/// The executor's way back to the I/O thread: a queue, plus a wake-up
/// through an in-process ZeroMQ pair that is sent only when the I/O thread
/// sleeps in its poll. A thread woken from sleep costs more than an empty
/// step's whole run, so the I/O thread spins on the queue for a moment
/// after handing work over and most replies need no wake-up at all.
pub struct Outbox {
    pub tx: Sender<Outgoing>,
    pub wake: zmq::Socket,
    pub shared: Arc<Shared>,
    /// Error replies are counted by code here (`stats`, metrics).
    pub gauges: Arc<Gauges>,
}

impl Outbox {
    pub fn push(&self, msg: Outgoing) {
        if self.tx.send(msg).is_err() {
            warn!("the I/O thread is gone; a reply is dropped");
            return;
        }
        // Pairs with the I/O thread's store of `io_sleeping` before its last
        // look at the queue: one of the two sides sees the other.
        fence(Ordering::SeqCst);
        if self.shared.io_sleeping.swap(false, Ordering::SeqCst)
            && let Err(e) = self.wake.send(&b""[..], zmq::DONTWAIT)
        {
            error!(cause = %e, "cannot wake the I/O thread");
        }
    }
}

pub(super) fn send(out: &Outbox, to: &ReplyTo, frames: [Vec<u8>; 2]) {
    out.push(Outgoing::Reply {
        identity: to.identity.clone(),
        session: to.session,
        frames,
    });
}

fn reply_err(out: &Outbox, to: &ReplyTo, e: ErrorReply) {
    debug!(code = %e.code, request_id = to.request_id, "{}", e.message);
    out.gauges.count_error(e.code);
    send(out, to, encode_error(&e.for_request(to.request_id)));
}

/// The next command. Waits by spinning for up to `spin` first: on a VM a
/// thread woken from sleep costs tens of microseconds, which is most of an
/// empty step's round trip, and a serving loop's next step usually arrives
/// within that window. Then sleeps, waking for the heartbeat when one is
/// due (a stuck step therefore stops the watchdog pings).
fn next_command(rx: &Receiver<Command>, spin: Duration, beat: &mut Heartbeat) -> Option<Command> {
    if !spin.is_zero() {
        let until = Instant::now() + spin;
        loop {
            match rx.try_recv() {
                Ok(c) => return Some(c),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            if Instant::now() >= until {
                break;
            }
            super::backoff();
        }
    }
    loop {
        let Some(wait) = beat.idle_timeout() else {
            return rx.recv().ok();
        };
        match rx.recv_timeout(wait) {
            Ok(c) => return Some(c),
            Err(RecvTimeoutError::Timeout) => beat.tick(),
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
}

/// How the executor runs: its limits and its waits.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub max_sequences: u64,
    /// Busy-wait for the next command before sleeping (`next_command`).
    pub spin: Duration,
}

/// Runs commands until [`Command::Stop`], or until a fatal fault: a panic
/// (inside a command or in the loop) or a device that
/// [`Backend::check_device`] reports unusable after a command failed. The
/// loop runs under `catch_unwind` with the command in flight kept outside
/// it, so that its client is answered even when it panicked.
pub fn run<B: Backend>(
    mut served: Served<B>,
    rx: Receiver<Command>,
    out: Outbox,
    tuning: Tuning,
    mut beat: Heartbeat,
) {
    let mut current: Option<ReplyTo> = None;
    let served = catch_unwind(AssertUnwindSafe(|| {
        serve(&mut served, &rx, &out, tuning, &mut beat, &mut current)
    }));
    let fault = match served {
        Ok(Ok(())) => {
            out.push(Outgoing::Done);
            return;
        }
        Ok(Err(fault)) => fault,
        Err(payload) => Fault::new(
            Cause::ExecutorPanic,
            format!("the executor panicked: {}", panic_message(&*payload)),
        ),
    };
    fail(fault, current, &rx, &out);
}

/// The loop of [`run`]; `Err` is a fatal fault, with `current` the
/// command it hit (if any).
fn serve<B: Backend>(
    served: &mut Served<B>,
    rx: &Receiver<Command>,
    out: &Outbox,
    tuning: Tuning,
    beat: &mut Heartbeat,
    current: &mut Option<ReplyTo>,
) -> Result<(), Fault> {
    let gauges = served.gauges.clone();
    gauges.mark_done();
    let mut replays = Replays::default();
    while let Some(cmd) = next_command(rx, tuning.spin, beat) {
        beat.tick();
        let Some(to) = reply_to(&cmd) else {
            match cmd {
                Command::DropSession(id) => {
                    replays.forget(id);
                    let n = served.drop_session(id);
                    debug!(session = id, sequences = n, "session dropped");
                    gauges.mark_done();
                    continue;
                }
                _ => break, // Stop
            }
        };
        out.shared.queue_depth.fetch_sub(1, Ordering::Relaxed);
        if let Some(e) = refusal(served, &cmd, &to, out, tuning) {
            reply_err(out, &to, e);
            continue;
        }
        let replay = match &cmd {
            Command::Step {
                work,
                idempotent: true,
                ..
            } => Some(fingerprint(work)),
            _ => None,
        };
        if let Some(fp) = replay {
            match replays.check(to.session, to.request_id, fp) {
                Seen::New => {}
                Seen::Again(frames) => {
                    debug!(request_id = to.request_id, "a retried step, answered again");
                    send(out, &to, frames);
                    gauges.mark_done();
                    continue;
                }
                Seen::Conflict(e) => {
                    reply_err(out, &to, e);
                    continue;
                }
            }
        }
        let span = info_span!(
            "request",
            kind = to.kind.name(),
            request_id = to.request_id,
            session = to.session
        );
        let _guard = span.enter();
        *current = Some(to.clone());
        out.shared.set_busy(true);
        let result = served.execute(cmd, &to, out);
        out.shared.set_busy(false);
        match result {
            Ok(frames) => {
                if let Some(fp) = replay {
                    replays.keep(to.session, to.request_id, fp, frames.clone());
                }
                send(out, &to, frames)
            }
            Err(e) => {
                if let Err(why) = served.check_device() {
                    let why = format!(
                        "the device failed: {why} (the {} failed: {e})",
                        to.kind.name()
                    );
                    return Err(Fault::new(Cause::DeviceFailed, why));
                }
                if let Some(fp) = replay {
                    let frames = encode_error(&e.clone().for_request(to.request_id));
                    replays.keep(to.session, to.request_id, fp, frames);
                }
                reply_err(out, &to, e);
            }
        }
        *current = None;
        gauges.mark_done();
    }
    Ok(())
}

fn reply_to(cmd: &Command) -> Option<ReplyTo> {
    match cmd {
        Command::Open { to, .. }
        | Command::Fork { to, .. }
        | Command::Truncate { to, .. }
        | Command::Close { to, .. }
        | Command::Reserve { to, .. }
        | Command::State { to, .. }
        | Command::AttentionStep { to, .. }
        | Command::Step { to, .. } => Some(to.clone()),
        Command::DropSession(_) | Command::Stop => None,
    }
}

/// Why a client command is answered without running it: the daemon is
/// going down or stopping, or the session is at its sequence limit.
fn refusal<B: Backend>(
    served: &Served<B>,
    cmd: &Command,
    to: &ReplyTo,
    out: &Outbox,
    tuning: Tuning,
) -> Option<ErrorReply> {
    if let Some(f) = out.shared.fatal.get() {
        return Some(f.reply());
    }
    if out.shared.stopping.load(Ordering::Relaxed) {
        return Some(ErrorReply::new(
            ErrorCode::ShuttingDown,
            "the daemon is shutting down",
        ));
    }
    let max = tuning.max_sequences;
    if matches!(cmd, Command::Open { .. } | Command::Fork { .. })
        && served.session_sequences(to.session) as u64 >= max
    {
        let e = ErrorReply::new(
            ErrorCode::LimitExceeded,
            "too many sequences in this session",
        );
        return Some(e.with("max_sequences", max));
    }
    None
}

/// After a fatal fault: answers the command in flight and everything queued
/// with the fault, tells the I/O thread, then answers whatever still
/// arrives until the I/O thread drops its end of the queue.
fn fail(fault: Fault, current: Option<ReplyTo>, rx: &Receiver<Command>, out: &Outbox) {
    let fault = out.shared.fatal.raise(fault).clone();
    error!(reason = fault.cause.as_str(), "{}", fault.why);
    out.shared.set_busy(false);
    let reply = fault.reply();
    if let Some(to) = current {
        reply_err(out, &to, reply.clone());
    }
    let answer = |cmd: Command| {
        if let Some(to) = reply_to(&cmd) {
            out.shared.queue_depth.fetch_sub(1, Ordering::Relaxed);
            reply_err(out, &to, reply.clone());
        }
    };
    while let Ok(cmd) = rx.try_recv() {
        answer(cmd);
    }
    out.push(Outgoing::Failed);
    while let Ok(cmd) = rx.recv() {
        answer(cmd);
    }
}

#[cfg(test)]
#[path = "executor_tests.rs"]
mod tests;
