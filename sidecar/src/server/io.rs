//! The I/O thread: owns the ROUTER socket and the session table, decodes and
//! checks every request, answers the cheap ones itself and queues the rest
//! for the executor, whose encoded replies it forwards.

use super::executor::{Command, Outgoing, ReplyTo, Shared};
use super::session::Sessions;
use super::{ServerInfo, Shutdown};
use crate::config::Config;
use crate::engine::step::{LogitsTarget, StepWork};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};
use tacflow_ipc::codec::{ERROR_KIND, decode_request, encode_error, encode_reply, from_msgpack};
use tacflow_ipc::*;
use tracing::{debug, info};

/// Requests read per wake-up before replies are forwarded again.
const READ_BATCH: usize = 256;

pub struct Io {
    pub router: zmq::Socket,
    /// Replies from the executor.
    pub inbox: Receiver<Outgoing>,
    /// Readable when the executor woke this thread (see `executor::Outbox`).
    pub wake: zmq::Socket,
    pub cmd_tx: Sender<Command>,
    pub sessions: Sessions,
    pub shared: Arc<Shared>,
    pub info: ServerInfo,
    pub config: Config,
    pub errors: BTreeMap<String, u64>,
    pub uid: u32,
    pub stopping: bool,
    pub executor_done: bool,
    /// How long to busy-poll for the executor's reply after handing it work
    /// (see `executor::next_command`).
    pub spin: Duration,
    /// Last time work went to the executor or a reply came back.
    pub last_exchange: Instant,
}

type Reply = Result<[Vec<u8>; 2], ErrorReply>;

impl Io {
    /// Serves until shutdown completes.
    pub fn run(&mut self, shutdown: &Shutdown) -> crate::error::Result<()> {
        let mut next_expiry_check = Instant::now();
        while !self.executor_done {
            self.forward_replies();
            if self.executor_done {
                break;
            }
            if !self.spin_for_replies() {
                self.sleep()?;
            }
            self.read_requests();
            let now = Instant::now();
            if now >= next_expiry_check {
                self.expire(now);
                next_expiry_check = now + Duration::from_millis(50);
            }
            if shutdown.is_triggered() && !self.stopping {
                self.begin_stop();
            }
        }
        // Whatever arrived after the executor stopped is answered too.
        self.read_requests();
        for s in self.sessions.drain() {
            debug!(
                session = s.id,
                regions = s.regions.len(),
                "session closed at shutdown"
            );
        }
        Ok(())
    }

    /// Right after work went to the executor, waits for its reply by
    /// spinning on the queue (a wake-up from sleep would cost more than a
    /// short step). Returns whether something is ready to handle.
    fn spin_for_replies(&mut self) -> bool {
        if self.shared.queue_depth.load(Relaxed) == 0 {
            return false;
        }
        let until = self.last_exchange + self.spin;
        let mut i = 0u32;
        while Instant::now() < until {
            match self.inbox.try_recv() {
                Ok(msg) => {
                    self.handle_outgoing(msg);
                    return true;
                }
                Err(TryRecvError::Disconnected) => return true,
                Err(TryRecvError::Empty) => {}
            }
            i += 1;
            if i.is_multiple_of(4)
                && self
                    .router
                    .get_events()
                    .is_ok_and(|e| e.contains(zmq::POLLIN))
            {
                return true;
            }
            super::backoff();
        }
        false
    }

    /// Sleeps in a poll of the client socket and the executor's wake-up.
    fn sleep(&mut self) -> crate::error::Result<()> {
        self.shared.io_sleeping.store(true, Relaxed);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // A reply pushed before the flag was visible is seen here.
        if let Ok(msg) = self.inbox.try_recv() {
            self.shared.io_sleeping.store(false, Relaxed);
            self.handle_outgoing(msg);
            return Ok(());
        }
        let mut items = [
            self.router.as_poll_item(zmq::POLLIN),
            self.wake.as_poll_item(zmq::POLLIN),
        ];
        let polled = zmq::poll(&mut items, 100);
        self.shared.io_sleeping.store(false, Relaxed);
        if items[1].is_readable() {
            while self.wake.recv_bytes(zmq::DONTWAIT).is_ok() {}
        }
        match polled {
            Ok(_) | Err(zmq::Error::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn begin_stop(&mut self) {
        info!("shutdown requested: finishing the step in flight, refusing new work");
        self.stopping = true;
        self.shared.stopping.store(true, Relaxed);
        let _ = self.cmd_tx.send(Command::Stop);
    }

    fn expire(&mut self, now: Instant) {
        for s in self.sessions.expire(now) {
            info!(
                session = s.id,
                client = %s.client,
                regions = s.regions.len(),
                "session lease expired: freeing its sequences and regions"
            );
            let _ = self.cmd_tx.send(Command::DropSession(s.id));
        }
    }

    fn forward_replies(&mut self) {
        while let Ok(msg) = self.inbox.try_recv() {
            self.handle_outgoing(msg);
        }
    }

    fn handle_outgoing(&mut self, msg: Outgoing) {
        self.last_exchange = Instant::now();
        let (identity, session, frames) = match msg {
            Outgoing::Done => {
                self.executor_done = true;
                return;
            }
            Outgoing::Reply {
                identity,
                session,
                frames,
            } => (identity, session, frames),
        };
        self.sessions.answered(session, self.last_exchange);
        if frames[0][..] == [ERROR_KIND]
            && let Ok(e) = from_msgpack::<ErrorReply>(&frames[1])
        {
            *self.errors.entry(e.code.as_str().to_owned()).or_default() += 1;
        }
        self.send(&identity, frames);
    }

    fn send(&self, identity: &[u8], [kind, header]: [Vec<u8>; 2]) {
        let parts: [&[u8]; 3] = [identity, &kind, &header];
        if let Err(e) = self.router.send_multipart(parts, zmq::DONTWAIT) {
            debug!(cause = %e, "reply dropped (peer gone or its queue full)");
        }
    }

    fn read_requests(&mut self) {
        for _ in 0..READ_BATCH {
            let parts = match self.router.recv_multipart(zmq::DONTWAIT) {
                Ok(p) => p,
                Err(_) => return,
            };
            let Some((identity, rest)) = parts.split_first() else {
                continue;
            };
            let frames: Vec<&[u8]> = rest.iter().map(Vec::as_slice).collect();
            let received = Instant::now();
            let reply = match decode_request(&frames) {
                Ok(req) => {
                    let rid = req.request_id();
                    self.dispatch(identity, req, received).map_err(|e| {
                        if e.request_id.is_none() {
                            e.for_request(rid)
                        } else {
                            e
                        }
                    })
                }
                Err(e) => Err(e),
            };
            match reply {
                Ok(Some(frames)) => self.send(identity, frames),
                Ok(None) => {}
                Err(e) => {
                    *self.errors.entry(e.code.as_str().to_owned()).or_default() += 1;
                    debug!(code = %e.code, "{}", e.message);
                    self.send(identity, encode_error(&e));
                }
            }
        }
    }

    /// Answers a request, or queues it (`Ok(None)`: the executor replies).
    fn dispatch(
        &mut self,
        identity: &[u8],
        req: Request,
        now: Instant,
    ) -> Result<Option<[Vec<u8>; 2]>, ErrorReply> {
        let kind = req.kind();
        let rid = req.request_id();
        if self.stopping && !matches!(kind, Kind::Health | Kind::Ping) {
            return Err(ErrorReply::new(
                ErrorCode::ShuttingDown,
                "the daemon is shutting down",
            ));
        }
        if let Request::Hello(h) = &req {
            return self.hello(h, now).map(Some);
        }
        let token = req
            .session()
            .expect("every request but hello has a session");
        let lease_ms = self.sessions.lease().as_millis() as u64;
        let session = self.sessions.touch(&token, now)?;
        let sid = session.id;
        let to = ReplyTo {
            identity: identity.to_vec(),
            session: sid,
            request_id: rid,
            kind,
            received: now,
        };
        let cmd = match req {
            Request::Hello(_) => unreachable!(),
            Request::Ping(_) => {
                return Ok(Some(encode_reply(
                    kind,
                    &PingReply {
                        request_id: rid,
                        lease_ms,
                    },
                )));
            }
            Request::Close(_) => {
                if let Some(s) = self.sessions.close(&token) {
                    debug!(session = s.id, "session closed by its client");
                    let _ = self.cmd_tx.send(Command::DropSession(s.id));
                }
                return Ok(Some(encode_reply(kind, &AckReply { request_id: rid })));
            }
            Request::Stats(_) => return Ok(Some(encode_reply(kind, &self.stats(rid)))),
            Request::Health(_) => return Ok(Some(encode_reply(kind, &self.health(rid)))),
            Request::RegisterRegion(r) => {
                return self.register(&token, rid, r.region, kind).map(Some);
            }
            Request::UnregisterRegion(r) => {
                let s = self.sessions.touch(&token, now)?;
                let region = s.regions.remove(&r.region_id).ok_or_else(|| {
                    ErrorReply::new(
                        ErrorCode::UnknownRegion,
                        format!("region {} is not registered", r.region_id),
                    )
                    .with("region_id", r.region_id)
                })?;
                s.mapped_bytes -= region.size();
                return Ok(Some(encode_reply(kind, &AckReply { request_id: rid })));
            }
            Request::AttentionStep(_) => {
                return Err(ErrorReply::new(
                    ErrorCode::Unsupported,
                    "attention_step is specified in protocol 1.0 but not served by this daemon yet",
                ));
            }
            Request::OpenSequence(r) => Command::Open {
                to,
                seq: r.seq_id,
                policy: r.attention,
                sampling: r.sampling,
                diagnostics: r.diagnostics,
            },
            Request::ForkSequence(r) => Command::Fork {
                to,
                parent: r.parent,
                child: r.child,
                sampling: r.sampling,
                policy: r.attention,
            },
            Request::TruncateSequence(r) => Command::Truncate {
                to,
                seq: r.seq_id,
                drop: r.num_tokens,
            },
            Request::CloseSequence(r) => Command::Close { to, seq: r.seq_id },
            Request::Step(r) => {
                let work = self.prepare_step(&token, r)?;
                Command::Step { to, work }
            }
        };
        self.enqueue(&token, cmd)?;
        Ok(None)
    }

    fn enqueue(&mut self, token: &SessionToken, cmd: Command) -> Result<(), ErrorReply> {
        let depth = self.shared.queue_depth.load(Relaxed);
        if depth >= self.config.max_queue as u64 {
            return Err(ErrorReply::new(
                ErrorCode::Busy,
                "the executor's queue is full; retry later",
            )
            .with("queue_depth", depth));
        }
        let max = self.config.limits.max_queued_requests;
        let s = self.sessions.touch(token, Instant::now())?;
        if s.queued >= max {
            return Err(ErrorReply::new(
                ErrorCode::Busy,
                "this session has too many requests waiting; retry later",
            )
            .with("queued", s.queued)
            .with("max_queued_requests", max));
        }
        s.queued += 1;
        self.shared.queue_depth.fetch_add(1, Relaxed);
        self.last_exchange = Instant::now();
        self.cmd_tx
            .send(cmd)
            .map_err(|_| ErrorReply::new(ErrorCode::ShuttingDown, "the executor has stopped"))
    }

    fn hello(&mut self, h: &HelloRequest, now: Instant) -> Reply {
        let (session, id) = self.sessions.open(h.client.clone(), now);
        info!(session = id, client = %h.client, "session opened");
        let g = &self.info.gauges;
        let l = &self.config.limits;
        Ok(encode_reply(
            Kind::Hello,
            &HelloReply {
                request_id: h.request_id,
                session,
                instance_id: self.info.instance_id.clone(),
                protocol: PROTOCOL_VERSION,
                daemon: format!("tacflowd {}", env!("CARGO_PKG_VERSION")),
                model: self.info.model.clone(),
                backend: self.info.backend.clone(),
                kv: KvInfo {
                    block_size: self.info.block_size,
                    total_blocks: g.kv_total_blocks.load(Relaxed),
                    free_blocks: g.kv_free_blocks.load(Relaxed),
                },
                attention_policies: self.info.policies.clone(),
                lease_ms: self.sessions.lease().as_millis() as u64,
                limits: Limits {
                    max_sequences: l.max_sequences,
                    max_regions: l.max_regions,
                    max_mapped_bytes: l.max_mapped_bytes,
                    max_queued_requests: l.max_queued_requests,
                    max_step_tokens: l.max_step_tokens,
                },
            },
        ))
    }

    fn register(&mut self, token: &SessionToken, rid: u64, desc: RegionDesc, kind: Kind) -> Reply {
        let limits = self.config.limits.clone();
        let uid = self.uid;
        let s = self.sessions.touch(token, Instant::now())?;
        if s.regions.len() as u64 >= limits.max_regions {
            return Err(ErrorReply::new(
                ErrorCode::LimitExceeded,
                "too many regions in this session",
            )
            .with("max_regions", limits.max_regions));
        }
        let (name, byte_size) = match desc {
            RegionDesc::Shm { name, byte_size } => (name, byte_size),
            RegionDesc::Memfd { .. } => {
                return Err(ErrorReply::new(
                    ErrorCode::Unsupported,
                    "memfd regions need the companion socket, which this daemon does not serve yet",
                ));
            }
            RegionDesc::Cuda { .. } => {
                return Err(ErrorReply::new(
                    ErrorCode::Unsupported,
                    "CUDA regions are not served by this daemon yet",
                ));
            }
        };
        if s.mapped_bytes.saturating_add(byte_size) > limits.max_mapped_bytes {
            return Err(ErrorReply::new(
                ErrorCode::LimitExceeded,
                "too many bytes mapped for this session",
            )
            .with("mapped_bytes", s.mapped_bytes)
            .with("max_mapped_bytes", limits.max_mapped_bytes));
        }
        let region = HostRegion::open_shm(&name, byte_size).map_err(|e| match e {
            tacflow_ipc::Error::Protocol(r) => r,
            other => ErrorReply::bad_request(other.to_string()),
        })?;
        if region.owner_uid() != uid {
            return Err(ErrorReply::new(
                ErrorCode::PermissionDenied,
                format!(
                    "shared memory {name} belongs to uid {}, not the daemon's uid {uid}; pass a sealed memfd instead",
                    region.owner_uid()
                ),
            ));
        }
        let region_id = self.sessions.new_region_id();
        let s = self.sessions.touch(token, Instant::now())?;
        s.mapped_bytes += byte_size;
        s.regions.insert(region_id, Arc::new(region));
        debug!(session = s.id, region_id, byte_size, "region registered");
        Ok(encode_reply(
            kind,
            &RegisterRegionReply {
                request_id: rid,
                region_id,
                byte_size,
            },
        ))
    }

    /// Checks a step's limits and resolves its logits targets.
    fn prepare_step(
        &mut self,
        token: &SessionToken,
        r: StepRequest,
    ) -> Result<StepWork, ErrorReply> {
        let total: u64 = r.entries.iter().map(|e| e.tokens.len() as u64).sum();
        let max = self.config.limits.max_step_tokens;
        if total > max {
            return Err(ErrorReply::new(
                ErrorCode::LimitExceeded,
                format!("step has {total} tokens, the limit is {max}"),
            )
            .with("max_step_tokens", max));
        }
        let vocab = u64::from(self.info.model.vocab_size);
        let s = self.sessions.touch(token, Instant::now())?;
        let mut logits = Vec::with_capacity(r.entries.len());
        for (i, e) in r.entries.iter().enumerate() {
            let Some(t) = &e.logits else {
                logits.push(None);
                continue;
            };
            let at = |err: ErrorReply| {
                let msg = format!("entry {i} logits: {}", err.message);
                ErrorReply {
                    message: msg,
                    ..err
                }
                .with("entry", i)
            };
            let region = s.regions.get(&t.region_id).ok_or_else(|| {
                at(ErrorReply::new(
                    ErrorCode::UnknownRegion,
                    format!("region {} is not registered", t.region_id),
                )
                .with("region_id", t.region_id))
            })?;
            let view = t.resolve(region.size()).map_err(at)?;
            view.expect_dtype("logits", &[DType::F32, DType::F16, DType::Bf16])
                .map_err(at)?;
            view.expect_shape("logits", &[e.tokens.len() as u64, vocab])
                .map_err(at)?;
            logits.push(Some(LogitsTarget {
                region: region.clone(),
                view,
            }));
        }
        Ok(StepWork {
            session: s.id,
            entries: r.entries,
            logits,
        })
    }

    fn stats(&self, rid: u64) -> StatsReply {
        let g = &self.info.gauges;
        StatsReply {
            request_id: rid,
            instance_id: self.info.instance_id.clone(),
            uptime_s: g.start.elapsed().as_secs_f64(),
            steps: g.steps.load(Relaxed),
            prefill_tokens: g.prefill_tokens.load(Relaxed),
            decode_tokens: g.decode_tokens.load(Relaxed),
            sessions: self.sessions.len() as u64,
            sequences: g.sequences.load(Relaxed),
            regions: self.sessions.total_regions() as u64,
            kv_total_blocks: g.kv_total_blocks.load(Relaxed),
            kv_free_blocks: g.kv_free_blocks.load(Relaxed),
            queue_depth: self.shared.queue_depth.load(Relaxed),
            errors: self.errors.clone(),
            attention: g.attention.lock().map(|a| a.clone()).unwrap_or_default(),
        }
    }

    fn health(&self, rid: u64) -> HealthReply {
        HealthReply {
            request_id: rid,
            status: if self.stopping { "stopping" } else { "ok" }.into(),
            instance_id: self.info.instance_id.clone(),
            backend: self.info.backend.clone(),
            executor_idle_ms: self.info.gauges.idle_ms(),
        }
    }
}
