//! The executor thread: owns the engine (model, KV cache, sequences, CUDA
//! context) and runs one command at a time from its queue. It never touches
//! the client socket: replies go back to the I/O thread, already encoded,
//! through an [`Outbox`].

use super::systemd::Heartbeat;
use crate::backend::Backend;
use crate::engine::gauges::Gauges;
use crate::engine::step::StepWork;
use crate::engine::{Engine, SeqKey, SessionId};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};
use tacflow_ipc::codec::{encode_error, encode_reply};
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
        policy: AttentionPolicy,
        sampling: SamplingParams,
        diagnostics: bool,
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
    },
    /// The session ended: free its sequences. Not a client request, no reply.
    DropSession(SessionId),
    /// Finish: answer nothing more, push [`Outgoing::Done`] and return.
    Stop,
}

/// State shared by the executor and the I/O thread.
#[derive(Debug, Default)]
pub struct Shared {
    /// Set when shutdown begins: queued work is answered `shutting_down`.
    pub stopping: AtomicBool,
    /// Client commands in the queue or running.
    pub queue_depth: AtomicU64,
    /// The I/O thread is (about to be) asleep in its poll and must be woken
    /// for a reply.
    pub io_sleeping: AtomicBool,
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

fn send(out: &Outbox, to: &ReplyTo, frames: [Vec<u8>; 2]) {
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

/// Runs commands until [`Command::Stop`].
pub fn run<B: Backend>(
    mut engine: Engine<B>,
    rx: Receiver<Command>,
    out: Outbox,
    max_sequences: u64,
    spin: Duration,
    mut beat: Heartbeat,
) {
    let gauges = engine.gauges();
    gauges.mark_done();
    while let Some(cmd) = next_command(&rx, spin, &mut beat) {
        beat.tick();
        let to = match &cmd {
            Command::Stop => break,
            Command::DropSession(id) => {
                let n = engine.drop_session(*id);
                debug!(session = id, sequences = n, "session dropped");
                gauges.mark_done();
                continue;
            }
            Command::Open { to, .. }
            | Command::Fork { to, .. }
            | Command::Truncate { to, .. }
            | Command::Close { to, .. }
            | Command::Step { to, .. } => to.clone(),
        };
        out.shared.queue_depth.fetch_sub(1, Ordering::Relaxed);
        if out.shared.stopping.load(Ordering::Relaxed) {
            reply_err(
                &out,
                &to,
                ErrorReply::new(ErrorCode::ShuttingDown, "the daemon is shutting down"),
            );
            continue;
        }
        let span = info_span!(
            "request",
            kind = to.kind.name(),
            request_id = to.request_id,
            session = to.session
        );
        let _guard = span.enter();
        if matches!(cmd, Command::Open { .. } | Command::Fork { .. })
            && engine.session_sequences(to.session) as u64 >= max_sequences
        {
            reply_err(
                &out,
                &to,
                ErrorReply::new(
                    ErrorCode::LimitExceeded,
                    "too many sequences in this session",
                )
                .with("max_sequences", max_sequences),
            );
            continue;
        }
        execute(&mut engine, cmd, &to, &out);
        gauges.mark_done();
    }
    out.push(Outgoing::Done);
}

fn execute<B: Backend>(engine: &mut Engine<B>, cmd: Command, to: &ReplyTo, out: &Outbox) {
    let key = |seq| SeqKey {
        session: to.session,
        seq,
    };
    let seq_reply = |seq_id: u64, n: usize| SequenceReply {
        request_id: to.request_id,
        seq_id,
        num_tokens: n as u64,
    };
    let result = match cmd {
        Command::Open {
            seq,
            policy,
            sampling,
            diagnostics,
            ..
        } => engine
            .open_sequence(key(seq), policy, sampling, diagnostics)
            .map(|()| encode_reply(to.kind, &seq_reply(seq, 0))),
        Command::Fork {
            parent,
            child,
            sampling,
            policy,
            diagnostics,
            ..
        } => engine
            .fork_sequence(key(parent), key(child), sampling, policy, diagnostics)
            .map(|n| encode_reply(to.kind, &seq_reply(child, n))),
        Command::Truncate { seq, drop, .. } => engine
            .truncate_sequence(key(seq), drop)
            .map(|n| encode_reply(to.kind, &seq_reply(seq, n))),
        Command::Close { seq, .. } => engine.close_sequence(key(seq)).map(|()| {
            encode_reply(
                to.kind,
                &AckReply {
                    request_id: to.request_id,
                },
            )
        }),
        Command::Step { work, .. } => {
            let started = Instant::now();
            let queued_us = started.duration_since(to.received).as_micros() as u64;
            let result = engine.step(&work);
            if result.is_ok() {
                out.gauges.step_run.observe(started.elapsed());
            }
            result.map(|results| {
                encode_reply(
                    to.kind,
                    &StepReply {
                        request_id: to.request_id,
                        results,
                        timing: StepTiming {
                            queued_us,
                            run_us: started.elapsed().as_micros() as u64,
                        },
                    },
                )
            })
        }
        Command::DropSession(_) | Command::Stop => unreachable!("handled by the loop"),
    };
    match result {
        Ok(frames) => send(out, to, frames),
        Err(e) => reply_err(out, to, e),
    }
}
