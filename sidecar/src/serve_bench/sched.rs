//! The batching loop `bench-serve` drives the engine with: continuous
//! batching with chunked prefill, as vLLM's scheduler does for the daemon
//! when it serves (the daemon runs the steps it is given; the server in
//! front of it decides them).
//!
//! Each step first gives every running sequence that is decoding its one
//! token, then fills the token budget with prompt chunks, oldest request
//! first. A request is admitted when the KV blocks of its whole prompt and
//! output fit beside those of the requests already running (no preemption:
//! an admitted request always finishes).

use crate::backend::Backend;
use crate::engine::kv_cache::blocks_for;
use crate::engine::step::StepWork;
use crate::engine::{BLOCK_SIZE, Engine, SeqKey};
use crate::error::{Error, Result};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tacflow_ipc::{AttentionPolicy, SamplingParams, StepEntry};

const SESSION: u64 = 1;

/// One synthetic request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Seconds after the start at which it arrives.
    pub arrival: f64,
    pub prompt: Vec<u32>,
    pub output_len: usize,
}

/// What happened to a request.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub arrival: f64,
    /// When each output token was sampled (seconds after the start).
    pub token_times: Vec<f64>,
}

/// One step as it ran.
#[derive(Debug, Clone, Copy)]
pub struct StepStat {
    pub prefill_rows: usize,
    pub decode_rows: usize,
    /// Requests admitted (holding KV blocks) during the step.
    pub running: usize,
    pub secs: f64,
}

struct Running {
    id: usize,
    /// Prompt tokens sent so far.
    sent: usize,
    last: u32,
}

/// Runs every request to completion; per request its outcome, and every
/// step's rows and time.
pub fn drive<B: Backend>(
    engine: &mut Engine<B>,
    reqs: &[Request],
    budget: usize,
) -> Result<(Vec<Outcome>, Vec<StepStat>)> {
    let total = engine.kv_total_blocks();
    let need = |r: &Request| blocks_for(r.prompt.len() + r.output_len, BLOCK_SIZE);
    if let Some(r) = reqs.iter().find(|r| need(r) > total) {
        return Err(Error::Config(format!(
            "a request of {} + {} tokens needs {} KV blocks; the cache has {total}",
            r.prompt.len(),
            r.output_len,
            need(r)
        )));
    }
    let mut out: Vec<Outcome> = reqs
        .iter()
        .map(|r| Outcome {
            arrival: r.arrival,
            token_times: vec![],
        })
        .collect();
    let (mut waiting, mut running) = (VecDeque::new(), Vec::<Running>::new());
    let (mut next, mut reserved, mut steps) = (0, 0, vec![]);
    let start = Instant::now();
    while next < reqs.len() || !waiting.is_empty() || !running.is_empty() {
        let now = start.elapsed().as_secs_f64();
        while next < reqs.len() && reqs[next].arrival <= now {
            waiting.push_back(next);
            next += 1;
        }
        while let Some(&id) = waiting.front() {
            if reserved + need(&reqs[id]) > total {
                break;
            }
            waiting.pop_front();
            reserved += need(&reqs[id]);
            let key = SeqKey {
                session: SESSION,
                seq: id as u64,
            };
            let sampling = SamplingParams::default();
            engine
                .open_sequence(key, AttentionPolicy::Full, sampling, false)
                .map_err(reply)?;
            running.push(Running {
                id,
                sent: 0,
                last: 0,
            });
        }
        if running.is_empty() {
            let wait = reqs[next].arrival - now;
            std::thread::sleep(Duration::from_secs_f64(wait.max(0.0)));
            continue;
        }
        let (entries, stat) = plan_step(&running, reqs, budget);
        let work = StepWork {
            session: SESSION,
            logits: vec![None; entries.len()],
            entries,
        };
        let t = Instant::now();
        let results = engine.step(&work).map_err(reply)?;
        let secs = t.elapsed().as_secs_f64();
        steps.push(StepStat { secs, ..stat });
        let at = start.elapsed().as_secs_f64();
        for (e, r) in work.entries.iter().zip(results) {
            let run = running.iter_mut().find(|x| x.id as u64 == e.seq_id);
            let run = run.expect("an entry of a running request");
            if run.sent < reqs[run.id].prompt.len() {
                run.sent += e.tokens.len();
            }
            if let Some(tok) = r.token {
                run.last = tok;
                out[run.id].token_times.push(at);
            }
        }
        let done: Vec<usize> = running
            .iter()
            .filter(|x| out[x.id].token_times.len() >= reqs[x.id].output_len)
            .map(|x| x.id)
            .collect();
        for id in done {
            let key = SeqKey {
                session: SESSION,
                seq: id as u64,
            };
            engine.close_sequence(key).map_err(reply)?;
            reserved -= need(&reqs[id]);
            running.retain(|x| x.id != id);
        }
    }
    Ok((out, steps))
}

/// The next step's entries: every decode, then prompt chunks in the
/// budget that is left.
fn plan_step(running: &[Running], reqs: &[Request], budget: usize) -> (Vec<StepEntry>, StepStat) {
    let mut stat = StepStat {
        prefill_rows: 0,
        decode_rows: 0,
        running: running.len(),
        secs: 0.0,
    };
    let mut entries = vec![];
    let entry = |id: usize, tokens: Vec<u32>, sample| StepEntry {
        seq_id: id as u64,
        tokens,
        positions: None,
        sample,
        logits: None,
        blocks: None,
    };
    for r in running.iter().filter(|r| r.sent == reqs[r.id].prompt.len()) {
        entries.push(entry(r.id, vec![r.last], true));
        stat.decode_rows += 1;
    }
    let mut left = budget.saturating_sub(stat.decode_rows);
    for r in running.iter().filter(|r| r.sent < reqs[r.id].prompt.len()) {
        if left == 0 {
            break;
        }
        let prompt = &reqs[r.id].prompt;
        let n = left.min(prompt.len() - r.sent);
        let last = r.sent + n == prompt.len();
        entries.push(entry(r.id, prompt[r.sent..r.sent + n].to_vec(), last));
        stat.prefill_rows += n;
        left -= n;
    }
    (entries, stat)
}

fn reply(e: tacflow_ipc::ErrorReply) -> Error {
    Error::Backend(format!("bench-serve: the engine refused a step: {e:?}"))
}
