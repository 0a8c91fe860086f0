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

/// The loop's state: who waits, who runs, the KV blocks they hold.
struct Batcher<'a> {
    reqs: &'a [Request],
    /// KV blocks of the cache.
    total: usize,
    /// Blocks the running requests may grow into.
    reserved: usize,
    /// The next request to arrive.
    next: usize,
    waiting: VecDeque<usize>,
    running: Vec<Running>,
    out: Vec<Outcome>,
}

fn key(id: usize) -> SeqKey {
    SeqKey {
        session: SESSION,
        seq: id as u64,
    }
}

impl Batcher<'_> {
    /// KV blocks of a request's whole prompt and output.
    fn need(&self, id: usize) -> usize {
        let r = &self.reqs[id];
        blocks_for(r.prompt.len() + r.output_len, BLOCK_SIZE)
    }

    fn busy(&self) -> bool {
        self.next < self.reqs.len() || !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Queues what has arrived by `now`, then opens sequences for waiting
    /// requests, oldest first, while their blocks fit.
    fn admit<B: Backend>(&mut self, engine: &mut Engine<B>, now: f64) -> Result<()> {
        while self.next < self.reqs.len() && self.reqs[self.next].arrival <= now {
            self.waiting.push_back(self.next);
            self.next += 1;
        }
        while let Some(&id) = self.waiting.front() {
            if self.reserved + self.need(id) > self.total {
                break;
            }
            self.waiting.pop_front();
            self.reserved += self.need(id);
            let sampling = SamplingParams::default();
            engine
                .open_sequence(key(id), AttentionPolicy::Full, sampling, false)
                .map_err(reply)?;
            let last = 0;
            self.running.push(Running { id, sent: 0, last });
        }
        Ok(())
    }

    /// Takes a step's results, sampled at `at`, and closes the requests
    /// that are done.
    fn record<B: Backend>(
        &mut self,
        engine: &mut Engine<B>,
        entries: &[StepEntry],
        results: Vec<tacflow_ipc::StepResult>,
        at: f64,
    ) -> Result<()> {
        for (e, r) in entries.iter().zip(results) {
            let run = self.running.iter_mut().find(|x| x.id as u64 == e.seq_id);
            let run = run.expect("an entry of a running request");
            if run.sent < self.reqs[run.id].prompt.len() {
                run.sent += e.tokens.len();
            }
            if let Some(tok) = r.token {
                run.last = tok;
                self.out[run.id].token_times.push(at);
            }
        }
        let done = |x: &Running| self.out[x.id].token_times.len() >= self.reqs[x.id].output_len;
        let done: Vec<usize> = self
            .running
            .iter()
            .filter(|x| done(x))
            .map(|x| x.id)
            .collect();
        for id in done {
            engine.close_sequence(key(id)).map_err(reply)?;
            self.reserved -= self.need(id);
            self.running.retain(|x| x.id != id);
        }
        Ok(())
    }
}

/// Runs every request to completion; per request its outcome, and every
/// step's rows and time.
pub fn drive<B: Backend>(
    engine: &mut Engine<B>,
    reqs: &[Request],
    budget: usize,
) -> Result<(Vec<Outcome>, Vec<StepStat>)> {
    let out = reqs
        .iter()
        .map(|r| Outcome {
            arrival: r.arrival,
            token_times: vec![],
        })
        .collect();
    let mut b = Batcher {
        reqs,
        total: engine.kv_total_blocks(),
        reserved: 0,
        next: 0,
        waiting: VecDeque::new(),
        running: vec![],
        out,
    };
    if let Some(id) = (0..reqs.len()).find(|&id| b.need(id) > b.total) {
        let r = &reqs[id];
        return Err(Error::Config(format!(
            "a request of {} + {} tokens needs {} KV blocks; the cache has {}",
            r.prompt.len(),
            r.output_len,
            b.need(id),
            b.total
        )));
    }
    let (start, mut steps) = (Instant::now(), vec![]);
    while b.busy() {
        let now = start.elapsed().as_secs_f64();
        b.admit(engine, now)?;
        if b.running.is_empty() {
            let wait = reqs[b.next].arrival - now;
            std::thread::sleep(Duration::from_secs_f64(wait.max(0.0)));
            continue;
        }
        let (entries, stat) = plan_step(&b.running, reqs, budget);
        let work = StepWork {
            session: SESSION,
            logits: vec![None; entries.len()],
            entries,
        };
        let t = Instant::now();
        let results = engine.step(&work).map_err(reply)?;
        steps.push(StepStat {
            secs: t.elapsed().as_secs_f64(),
            ..stat
        });
        b.record(
            engine,
            &work.entries,
            results,
            start.elapsed().as_secs_f64(),
        )?;
    }
    Ok((b.out, steps))
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
