//! The executor loop on the CPU backend with the built-in tiny model: order
//! of replies, `Stop`, and (with the fault-injecting backend) what a panic,
//! a lost device and a recoverable error do.

use super::*;
use crate::backend::cpu::CpuBackend;
use crate::engine::{Engine, KvCapacity};
use crate::model::ModelSpec;
use crate::server::systemd::Notifier;
use std::sync::mpsc;
use tacflow_ipc::codec::{ERROR_KIND, from_msgpack};

const SESSION: SessionId = 1;

fn engine<B: Backend>(backend: B) -> Engine<B> {
    let (config, src) = ModelSpec::parse("tiny", 0).unwrap().open().unwrap();
    Engine::new(
        backend,
        &config,
        src.as_ref(),
        KvCapacity::Blocks(64),
        None,
        |_, _| {},
    )
    .unwrap()
}

fn cpu() -> CpuBackend {
    CpuBackend {
        round_to_bf16: false,
        round_activations: false,
        device_tactic: None,
    }
}

fn to(request_id: u64, kind: Kind) -> ReplyTo {
    ReplyTo {
        identity: vec![request_id as u8],
        session: SESSION,
        request_id,
        kind,
        received: Instant::now(),
    }
}

fn open(request_id: u64, seq: u64) -> Command {
    Command::Open {
        to: to(request_id, Kind::OpenSequence),
        seq,
        opts: crate::engine::SeqOptions::default(),
    }
}

fn close(request_id: u64, seq: u64) -> Command {
    Command::Close {
        to: to(request_id, Kind::CloseSequence),
        seq,
    }
}

fn step(request_id: u64, seq: u64) -> Command {
    let entry = StepEntry {
        seq_id: seq,
        tokens: vec![1],
        positions: None,
        sample: true,
        logits: None,
        blocks: None,
    };
    Command::Step {
        to: to(request_id, Kind::Step),
        work: StepWork {
            session: SESSION,
            entries: vec![entry],
            logits: vec![None],
        },
        idempotent: false,
    }
}

/// What came back for one request: its id, and the error if it failed.
#[derive(Debug)]
struct Answer {
    request_id: u64,
    error: Option<ErrorReply>,
}

fn answer(msg: Outgoing) -> Option<Answer> {
    let Outgoing::Reply { frames, .. } = msg else {
        return None;
    };
    if frames[0] == [ERROR_KIND] {
        let e: ErrorReply = from_msgpack(&frames[1]).unwrap();
        return Some(Answer {
            request_id: e.request_id.unwrap(),
            error: Some(e),
        });
    }
    #[derive(serde::Deserialize)]
    struct Id {
        request_id: u64,
    }
    let id: Id = from_msgpack(&frames[1]).unwrap();
    Some(Answer {
        request_id: id.request_id,
        error: None,
    })
}

/// Starts the executor on the engine `make` builds (on the executor's
/// thread: an engine is not `Send`), with `cmds` already queued and counted
/// in `queue_depth` as the I/O thread counts them.
fn start<B: Backend + 'static>(
    make: impl FnOnce() -> Engine<B> + Send + 'static,
    cmds: Vec<Command>,
) -> (
    mpsc::Sender<Command>,
    mpsc::Receiver<Outgoing>,
    Arc<Shared>,
    std::thread::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel();
    let (out_tx, out_rx) = mpsc::channel();
    let shared = Arc::new(Shared::default());
    for c in cmds {
        if reply_to(&c).is_some() {
            shared.queue_depth.fetch_add(1, Ordering::Relaxed);
        }
        tx.send(c).unwrap();
    }
    let wake = zmq::Context::new().socket(zmq::PAIR).unwrap();
    let sh = shared.clone();
    let t = std::thread::Builder::new()
        .name(crate::server::EXECUTOR_THREAD.into())
        .spawn(move || {
            let engine = make();
            let gauges = engine.gauges();
            let out = Outbox {
                tx: out_tx,
                wake,
                shared: sh,
                gauges: gauges.clone(),
            };
            let beat = Heartbeat::new(Notifier::disabled(), None, gauges.clone());
            let tuning = Tuning {
                max_sequences: 8,
                spin: Duration::ZERO,
            };
            let served = Served {
                offload: crate::offload::Offload::new(1 << 20, 1 << 16, true, gauges.clone()),
                engine: Some(engine),
                gauges: out.gauges.clone(),
            };
            run(served, rx, out, tuning, beat)
        })
        .unwrap();
    (tx, out_rx, shared, t)
}

/// Every message until `Done` or `Failed` (returned last).
fn collect(rx: &mpsc::Receiver<Outgoing>) -> (Vec<Answer>, Outgoing) {
    let mut answers = vec![];
    loop {
        let msg = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        if matches!(msg, Outgoing::Done | Outgoing::Failed) {
            return (answers, msg);
        }
        answers.push(answer(msg).unwrap());
    }
}

#[test]
fn commands_are_answered_in_order_until_stop() {
    let cmds = vec![
        open(1, 7),
        open(2, 7), // exists: an error, and the loop goes on
        step(3, 7),
        close(4, 7),
        Command::Stop,
        open(5, 8), // after Stop: never run
    ];
    let (_tx, rx, shared, t) = start(|| engine(cpu()), cmds);
    let (answers, last) = collect(&rx);
    assert!(matches!(last, Outgoing::Done));
    let ids: Vec<u64> = answers.iter().map(|a| a.request_id).collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    let e = answers[1].error.as_ref().unwrap();
    assert_eq!(e.code, ErrorCode::SequenceExists);
    assert!(answers[0].error.is_none() && answers[2].error.is_none());
    t.join().unwrap();
    assert!(shared.fatal.get().is_none());
    assert_eq!(shared.busy_for(), None, "idle after the last command");
}

#[test]
fn a_fault_raised_elsewhere_is_answered_to_queued_commands() {
    let (tx, rx, shared, t) = start(|| engine(cpu()), vec![]);
    shared.fatal.raise(Fault::new(
        Cause::ThreadPanic,
        "the metrics thread panicked",
    ));
    shared.queue_depth.fetch_add(1, Ordering::Relaxed);
    tx.send(open(1, 1)).unwrap();
    tx.send(Command::Stop).unwrap();
    let (answers, last) = collect(&rx);
    assert!(matches!(last, Outgoing::Done));
    let e = answers[0].error.as_ref().unwrap();
    assert!(
        e.is_fatal() && e.message.contains("metrics thread"),
        "{e:?}"
    );
    t.join().unwrap();
    assert_eq!(shared.queue_depth.load(Ordering::Relaxed), 0);
}

/// With the fault-injecting backend (`backend::faults`).
mod faults {
    use super::*;
    use crate::backend::faults::Faulty;

    fn armed(plan: &str) -> impl FnOnce() -> Engine<Faulty<CpuBackend>> + Send + 'static {
        let plan = plan.parse().unwrap();
        move || {
            let e = engine(Faulty::new(cpu()));
            e.backend().arm(plan);
            e
        }
    }

    /// Runs `open 1; step 2 (the fault); open 3; close 4` and returns the
    /// answers, the fault recorded, and the queue depth left.
    fn fail_on_step(plan: &str) -> (Vec<Answer>, Fault, u64) {
        let cmds = vec![open(1, 1), step(2, 1), open(3, 2), close(4, 1)];
        let (tx, rx, shared, t) = start(armed(plan), cmds);
        let (mut answers, last) = collect(&rx);
        assert!(matches!(last, Outgoing::Failed));
        // Sent after the fault: still answered, once, until the queue's
        // sender lets go.
        shared.queue_depth.fetch_add(1, Ordering::Relaxed);
        tx.send(open(5, 3)).unwrap();
        drop(tx);
        t.join().unwrap();
        answers.extend(rx.try_iter().filter_map(answer));
        let depth = shared.queue_depth.load(Ordering::Relaxed);
        (answers, shared.fatal.get().unwrap().clone(), depth)
    }

    fn assert_one_fatal_each(answers: &[Answer], reason: &str) {
        let ids: Vec<u64> = answers.iter().map(|a| a.request_id).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5], "exactly one reply each");
        assert!(answers[0].error.is_none(), "the open before the fault ran");
        for a in &answers[1..] {
            let e = a.error.as_ref().unwrap();
            assert!(e.is_fatal(), "{e:?}");
            assert_eq!(e.detail["reason"], reason.into());
            assert!(e.message.contains("going down"));
        }
    }

    #[test]
    fn a_panic_in_a_command_is_answered_and_the_queue_drained() {
        let (answers, fault, depth) = fail_on_step("panic@step:1");
        assert_one_fatal_each(&answers, "executor_panic");
        assert_eq!(fault.cause, Cause::ExecutorPanic);
        assert!(fault.why.contains("panicked"), "{}", fault.why);
        assert_eq!(depth, 0);
    }

    #[test]
    fn a_lost_device_ends_the_executor() {
        let (answers, fault, depth) = fail_on_step("device_lost@step:1");
        assert_one_fatal_each(&answers, "device_failed");
        assert_eq!(fault.cause, Cause::DeviceFailed);
        assert_eq!(depth, 0);
    }

    #[test]
    fn an_error_with_the_device_fine_keeps_serving() {
        let cmds = vec![open(1, 1), step(2, 1), step(3, 1), Command::Stop];
        let (_tx, rx, shared, t) = start(armed("error@step:1"), cmds);
        let (answers, last) = collect(&rx);
        assert!(matches!(last, Outgoing::Done));
        let e = answers[1].error.as_ref().unwrap();
        assert!(!e.is_fatal(), "{e:?}");
        assert!(answers[2].error.is_none(), "the next step runs");
        t.join().unwrap();
        assert!(shared.fatal.get().is_none());
    }
}
