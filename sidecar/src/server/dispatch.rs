//! What the executor serves: the model's engine (absent from a daemon
//! started with `--attention-only`) and the attention-only sequences beside
//! it, with every command routed to the one that holds its sequence. The
//! two share each session's sequence ids.

use super::executor::{Command, Outbox, ReplyTo};
use crate::backend::Backend;
use crate::engine::gauges::Gauges;
use crate::engine::step::StepWork;
use crate::engine::{Engine, SeqKey, SessionId};
use crate::offload::Offload;
use crate::offload::step::AttentionWork;
use std::sync::Arc;
use std::time::Instant;
use tacflow_ipc::codec::encode_reply;
use tacflow_ipc::*;

pub struct Served<B: Backend> {
    pub engine: Option<Engine<B>>,
    pub offload: Offload,
    pub gauges: Arc<Gauges>,
}

fn no_model(what: &str) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Unsupported,
        format!(
            "{what}: this daemon loaded no model (--attention-only); it serves attention-only \
             sequences (open_sequence with a layout, then attention_step)"
        ),
    )
}

fn unknown(key: SeqKey) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::UnknownSequence,
        format!("sequence {} is not open", key.seq),
    )
    .with("seq_id", key.seq)
}

impl<B: Backend> Served<B> {
    pub fn session_sequences(&self, session: SessionId) -> usize {
        let model = self
            .engine
            .as_ref()
            .map_or(0, |e| e.session_sequences(session));
        model + self.offload.session_sequences(session)
    }

    pub fn drop_session(&mut self, session: SessionId) -> usize {
        let model = self.engine.as_mut().map_or(0, |e| e.drop_session(session));
        model + self.offload.drop_session(session)
    }

    pub fn check_device(&self) -> Result<(), String> {
        self.engine
            .as_ref()
            .map_or(Ok(()), |e| e.backend().check_device())
    }

    fn engine(&mut self, what: &str) -> Result<&mut Engine<B>, ErrorReply> {
        self.engine.as_mut().ok_or_else(|| no_model(what))
    }

    fn model_has(&self, key: &SeqKey) -> bool {
        self.engine.as_ref().is_some_and(|e| e.has_sequence(key))
    }

    pub fn execute(
        &mut self,
        cmd: Command,
        to: &ReplyTo,
        out: &Outbox,
    ) -> Result<[Vec<u8>; 2], ErrorReply> {
        let key = |seq| SeqKey {
            session: to.session,
            seq,
        };
        let seq_reply = |seq_id: u64, n: usize| SequenceReply {
            request_id: to.request_id,
            seq_id,
            num_tokens: n as u64,
        };
        let ack = || {
            encode_reply(
                to.kind,
                &AckReply {
                    request_id: to.request_id,
                },
            )
        };
        match cmd {
            Command::Open { seq, opts, .. } => {
                let k = key(seq);
                if let Some(layout) = opts.layout {
                    if !opts.mode.is_daemon() || !opts.prefix.is_empty() {
                        return Err(ErrorReply::bad_request(
                            "an attention-only sequence takes no named blocks and no prefix",
                        ));
                    }
                    if self.model_has(&k) {
                        return Err(ErrorReply::new(
                            ErrorCode::SequenceExists,
                            format!("sequence {seq} is already open"),
                        )
                        .with("seq_id", seq));
                    }
                    self.offload
                        .open(k, layout, opts.policy, opts.diagnostics)?;
                    return Ok(encode_reply(to.kind, &seq_reply(seq, 0)));
                }
                if self.offload.contains(&k) {
                    return Err(ErrorReply::new(
                        ErrorCode::SequenceExists,
                        format!("sequence {seq} is already open (attention-only)"),
                    )
                    .with("seq_id", seq));
                }
                let n = opts.prefix.len();
                self.engine("open_sequence without a layout")?
                    .open_with(k, opts)
                    .map(|()| encode_reply(to.kind, &seq_reply(seq, n)))
            }
            Command::Reserve { count, .. } => {
                let blocks = self
                    .engine("reserve_blocks")?
                    .reserve_blocks(to.session, count)?;
                Ok(encode_reply(
                    to.kind,
                    &ReserveBlocksReply {
                        request_id: to.request_id,
                        blocks,
                        block_size: crate::engine::BLOCK_SIZE as u32,
                    },
                ))
            }
            Command::State { seq, .. } => {
                if self.offload.contains(&key(seq)) {
                    return Err(ErrorReply::new(
                        ErrorCode::Unsupported,
                        "sequence_state describes model sequences; this one is attention-only",
                    ));
                }
                self.engine("sequence_state")?
                    .sequence_state(key(seq), to.request_id)
                    .map(|r| encode_reply(to.kind, &r))
            }
            Command::Fork {
                parent,
                child,
                sampling,
                policy,
                diagnostics,
                ..
            } => {
                if self.offload.contains(&key(parent)) {
                    if sampling.is_some() {
                        return Err(ErrorReply::bad_request(
                            "an attention-only sequence samples nothing: fork it without sampling",
                        ));
                    }
                    if self.model_has(&key(child)) {
                        return Err(ErrorReply::new(
                            ErrorCode::SequenceExists,
                            format!("sequence {child} is already open"),
                        ));
                    }
                    let n = self
                        .offload
                        .fork(key(parent), key(child), policy, diagnostics)?;
                    return Ok(encode_reply(to.kind, &seq_reply(child, n)));
                }
                if self.offload.contains(&key(child)) {
                    return Err(ErrorReply::new(
                        ErrorCode::SequenceExists,
                        format!("sequence {child} is already open (attention-only)"),
                    ));
                }
                self.engine("fork_sequence")?
                    .fork_sequence(key(parent), key(child), sampling, policy, diagnostics)
                    .map(|n| encode_reply(to.kind, &seq_reply(child, n)))
            }
            Command::Truncate { seq, drop, .. } => {
                if self.offload.contains(&key(seq)) {
                    let n = self.offload.truncate(key(seq), drop)?;
                    return Ok(encode_reply(to.kind, &seq_reply(seq, n)));
                }
                let Some(e) = self.engine.as_mut() else {
                    return Err(unknown(key(seq)));
                };
                e.truncate_sequence(key(seq), drop)
                    .map(|n| encode_reply(to.kind, &seq_reply(seq, n)))
            }
            Command::Close { seq, .. } => {
                if self.offload.contains(&key(seq)) {
                    self.offload.close(key(seq));
                    return Ok(ack());
                }
                let Some(e) = self.engine.as_mut() else {
                    return Err(unknown(key(seq)));
                };
                e.close_sequence(key(seq)).map(|()| ack())
            }
            Command::Step { work, .. } => self.step(&work, to, out),
            Command::AttentionStep { work, .. } => self.attention_step(&work, to),
            Command::DropSession(_) | Command::Stop => unreachable!("handled by the loop"),
        }
    }

    fn step(
        &mut self,
        work: &StepWork,
        to: &ReplyTo,
        out: &Outbox,
    ) -> Result<[Vec<u8>; 2], ErrorReply> {
        let started = Instant::now();
        let queued_us = started.duration_since(to.received).as_micros() as u64;
        if let Some(i) = work.entries.iter().position(|e| {
            self.offload.contains(&SeqKey {
                session: to.session,
                seq: e.seq_id,
            })
        }) {
            return Err(ErrorReply::bad_request(format!(
                "entry {i}: sequence {} is attention-only: it takes attention_step, not step",
                work.entries[i].seq_id
            ))
            .with("entry", i));
        }
        let results = self.engine("step")?.step(work)?;
        out.gauges.step_run.observe(started.elapsed());
        Ok(encode_reply(
            to.kind,
            &StepReply {
                request_id: to.request_id,
                results,
                timing: StepTiming {
                    queued_us,
                    run_us: started.elapsed().as_micros() as u64,
                },
            },
        ))
    }

    fn attention_step(
        &mut self,
        work: &AttentionWork,
        to: &ReplyTo,
    ) -> Result<[Vec<u8>; 2], ErrorReply> {
        let started = Instant::now();
        let queued_us = started.duration_since(to.received).as_micros() as u64;
        if let Some(i) = work.seq_ids.iter().position(|&seq| {
            self.model_has(&SeqKey {
                session: to.session,
                seq,
            })
        }) {
            return Err(ErrorReply::bad_request(format!(
                "sequence {} runs the daemon's model; attention_step takes attention-only \
                 sequences (open_sequence with a layout)",
                work.seq_ids[i]
            ))
            .with("index", i));
        }
        let (num_tokens, attention) = self.offload.step(work)?;
        Ok(encode_reply(
            to.kind,
            &AttentionStepReply {
                request_id: to.request_id,
                layer: work.layer,
                num_tokens,
                attention,
                timing: StepTiming {
                    queued_us,
                    run_us: started.elapsed().as_micros() as u64,
                },
            },
        ))
    }
}
