//! The I/O thread: owns the ROUTER socket and the session table, decodes and
//! checks every request, answers the cheap ones itself (`requests.rs`) and
//! queues the rest for the executor, whose encoded replies it forwards.

use super::executor::{Command, Outgoing, ReplyTo, Shared};
use super::fatal::{Cause, Fault};
use super::fdpass::FdBroker;
use super::queue::{QueueLimits, hand_off};
use super::session::{Session, Sessions};
use super::systemd::Notifier;
use super::{ServerInfo, Shutdown};
use crate::config::Config;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};
use tacflow_ipc::codec::{decode_request, encode_error, encode_reply};
use tacflow_ipc::*;
use tracing::{debug, error, info, warn};

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
    /// Descriptors received on the companion socket.
    pub fds: Arc<FdBroker>,
    pub notifier: Notifier,
    /// The daemon's own uid: regions by name need a peer with it.
    pub uid: u32,
    pub stopping: bool,
    /// Shutdown gives up on the executor after this.
    pub stop_deadline: Option<Instant>,
    pub executor_done: bool,
    /// How long to busy-poll for the executor's reply after handing it work
    /// (see `executor::next_command`).
    pub spin: Duration,
    /// Last time work went to the executor or a reply came back.
    pub last_exchange: Instant,
    /// Scratch messages for the identity frame and the frame after it
    /// (whose metadata carries the peer's credentials).
    pub identity: zmq::Message,
    pub first: zmq::Message,
    /// Said once that peer credentials are missing.
    pub warned_no_credentials: bool,
    /// Set once a fatal fault was seen: the daemon answers it to everyone
    /// and exits at these times.
    pub failing: Option<Failing>,
}

/// The exit of a failing daemon: at `exit_at` (the linger after the fault,
/// for ZeroMQ to deliver the fault's replies) once the executor has let go,
/// and at `give_up_at` regardless (a helper thread's fault lets the step in
/// flight finish, for at most `shutdown_timeout_ms`).
#[derive(Debug, Clone, Copy)]
pub struct Failing {
    pub exit_at: Instant,
    pub give_up_at: Instant,
}

pub(super) type Reply = Result<[Vec<u8>; 2], ErrorReply>;

/// `localhost:uid:gid:pid`: what libzmq reports as `Peer-Address` for an
/// `ipc://` peer when it was built with `ZMQ_HAVE_SO_PEERCRED` (see
/// `.cargo/config.toml`). A TCP peer's address is an IP and names no uid.
pub fn peer_uid(peer_address: &str) -> Option<u32> {
    let mut parts = peer_address.split(':');
    let (host, uid) = (parts.next()?, parts.next()?);
    let (_gid, _pid) = (parts.next()?, parts.next()?);
    if host != "localhost" || parts.next().is_some() {
        return None;
    }
    uid.parse().ok()
}

impl Io {
    /// Serves until shutdown completes (or its bound runs out: `Err`), or
    /// until a fatal fault has been answered (`Err`: the daemon must exit).
    pub fn run(&mut self, shutdown: &Shutdown) -> crate::error::Result<()> {
        let mut next_expiry_check = Instant::now();
        loop {
            self.forward_replies();
            self.check_fatal();
            if let Some(end) = self.finished(Instant::now()) {
                self.close_sessions();
                return end;
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
            if shutdown.is_triggered() && !self.stopping && self.failing.is_none() {
                self.begin_stop();
            }
            if self.failing.is_none() && self.stop_deadline.is_some_and(|d| now > d) {
                error!(
                    timeout_ms = self.config.shutdown_timeout_ms,
                    "the step in flight did not finish within the shutdown timeout: giving up on it"
                );
                return Err(crate::error::Error::Backend(
                    "shutdown timed out waiting for the executor".into(),
                ));
            }
        }
    }

    /// `Some` once the loop should end: with the fault when failing, after
    /// its linger; `Ok` when the executor stopped after a shutdown.
    fn finished(&mut self, now: Instant) -> Option<crate::error::Result<()>> {
        let Some(f) = self.failing else {
            if !self.executor_done {
                return None;
            }
            // Whatever arrived after the executor stopped is answered too.
            self.read_requests();
            return Some(Ok(()));
        };
        if now < f.exit_at || (!self.executor_done && now < f.give_up_at) {
            return None;
        }
        let fault = self.shared.fatal.get().expect("failing has a fault");
        Some(Err(crate::error::Error::Fatal(fault.why.clone())))
    }

    fn close_sessions(&mut self) {
        for s in self.sessions.drain() {
            self.fds.session_closed(&s.token);
            debug!(
                session = s.id,
                regions = s.regions.len(),
                "session closed at exit"
            );
        }
    }

    /// Enters the failing state once a fault was recorded (by the executor,
    /// or by the panic hook for a helper thread): systemd hears why, the
    /// executor is told to stop (it answers what it has queued with the
    /// fault), and the exit is scheduled.
    fn check_fatal(&mut self) {
        if self.failing.is_some() {
            return;
        }
        let Some(fault) = self.shared.fatal.get() else {
            return;
        };
        let linger = Duration::from_millis(self.config.fatal_linger_ms);
        error!(
            reason = fault.cause.as_str(),
            linger_ms = self.config.fatal_linger_ms,
            "fatal: {}; answering every request `internal` and exiting",
            fault.why
        );
        self.notifier.failing(&fault.why);
        if !self.executor_done {
            let _ = self.cmd_tx.send(Command::Stop);
        }
        let now = Instant::now();
        self.failing = Some(Failing {
            exit_at: now + linger,
            give_up_at: now + linger + Duration::from_millis(self.config.shutdown_timeout_ms),
        });
    }

    /// Right after work went to the executor, waits for its reply by
    /// spinning on the queue (a wake-up from sleep would cost more than a
    /// short step). Returns whether something is ready to handle.
    fn spin_for_replies(&mut self) -> bool {
        if self.executor_done || self.shared.queue_depth.load(Relaxed) == 0 {
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
        self.notifier.stopping();
        self.stopping = true;
        self.stop_deadline =
            Some(Instant::now() + Duration::from_millis(self.config.shutdown_timeout_ms));
        self.shared.stopping.store(true, Relaxed);
        let _ = self.cmd_tx.send(Command::Stop);
    }

    /// A session ended (close, lease, shutdown): the executor frees its
    /// sequences; its regions are unmapped as their last user drops them.
    pub(super) fn session_ended(&mut self, s: Session) {
        self.fds.session_closed(&s.token);
        let _ = self.cmd_tx.send(Command::DropSession(s.id));
        self.publish_sessions();
    }

    /// Session, region and mapped-byte counts for `stats` and metrics.
    pub(super) fn publish_sessions(&self) {
        let g = &self.info.gauges;
        g.sessions.store(self.sessions.len() as u64, Relaxed);
        g.regions
            .store(self.sessions.total_regions() as u64, Relaxed);
        g.mapped_bytes
            .store(self.sessions.total_mapped_bytes(), Relaxed);
    }

    fn expire(&mut self, now: Instant) {
        for s in self.sessions.expire(now) {
            info!(
                session = s.id,
                client = %s.client,
                regions = s.regions.len(),
                "session lease expired: freeing its sequences and regions"
            );
            self.session_ended(s);
        }
        self.fds
            .expire(now.checked_sub(self.sessions.lease()).unwrap_or(now));
    }

    fn forward_replies(&mut self) {
        loop {
            match self.inbox.try_recv() {
                Ok(msg) => self.handle_outgoing(msg),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => return self.executor_vanished(),
            }
        }
    }

    /// The executor's thread ended without saying `Done` or `Failed` (a
    /// panic where nothing could catch it): nothing will answer its queue.
    fn executor_vanished(&mut self) {
        if self.executor_done {
            return;
        }
        self.executor_done = true;
        self.shared.fatal.raise(Fault::new(
            Cause::ExecutorPanic,
            "the executor thread ended unexpectedly",
        ));
    }

    fn handle_outgoing(&mut self, msg: Outgoing) {
        self.last_exchange = Instant::now();
        let (identity, session, frames) = match msg {
            Outgoing::Done | Outgoing::Failed => {
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
        self.send(&identity, frames);
    }

    fn send(&self, identity: &[u8], [kind, header]: [Vec<u8>; 2]) {
        let parts: [&[u8]; 3] = [identity, &kind, &header];
        if let Err(e) = self.router.send_multipart(parts, zmq::DONTWAIT) {
            debug!(cause = %e, "reply dropped (peer gone or its queue full)");
        }
    }

    /// The next request: the identity into `self.identity`, the first frame
    /// after it into `self.first` (whose metadata `hello` reads), and every
    /// frame after the identity as bytes.
    fn recv_request(&mut self) -> Option<Vec<Vec<u8>>> {
        self.router.recv(&mut self.identity, zmq::DONTWAIT).ok()?;
        let mut frames = Vec::with_capacity(2);
        if !self.identity.get_more() {
            return Some(frames);
        }
        self.router.recv(&mut self.first, 0).ok()?;
        frames.push(self.first.to_vec());
        let mut more = self.first.get_more();
        while more {
            let m = self.router.recv_msg(0).ok()?;
            more = m.get_more();
            frames.push(m.to_vec());
        }
        Some(frames)
    }

    fn read_requests(&mut self) {
        for _ in 0..READ_BATCH {
            let Some(rest) = self.recv_request() else {
                return;
            };
            let identity = self.identity.to_vec();
            let frames: Vec<&[u8]> = rest.iter().map(Vec::as_slice).collect();
            let received = Instant::now();
            let reply = match decode_request(&frames) {
                Ok(req) => {
                    let rid = req.request_id();
                    self.info.gauges.count_request(req.kind());
                    self.dispatch(&identity, req, received).map_err(|e| {
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
                Ok(Some(frames)) => self.send(&identity, frames),
                Ok(None) => {}
                Err(e) => {
                    self.info.gauges.count_error(e.code);
                    debug!(code = %e.code, "{}", e.message);
                    self.send(&identity, encode_error(&e));
                }
            }
        }
    }

    /// The peer uid of the request just received (read at `hello` only).
    /// The identity frame cannot tell: libzmq 4.3.4 leaves it without
    /// metadata when a poll prefetched the message (`router_t::xhas_in`).
    pub(super) fn current_peer_uid(&mut self) -> Option<u32> {
        let address = self.first.gets("Peer-Address");
        debug!(peer_address = ?address, "hello");
        if address == Some("localhost") && !self.warned_no_credentials {
            self.warned_no_credentials = true;
            warn!(
                "libzmq reports no credentials for ipc:// peers (built without \
                 ZMQ_HAVE_SO_PEERCRED, see .cargo/config.toml): regions by name are refused \
                 for every client; clients use memfds"
            );
        }
        address.and_then(peer_uid)
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
        if let Some(f) = self.shared.fatal.get()
            && kind != Kind::Health
        {
            return Err(f.reply());
        }
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
        let sid = self.sessions.touch(&token, now)?.id;
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
                let reply = PingReply {
                    request_id: rid,
                    lease_ms,
                };
                return Ok(Some(encode_reply(kind, &reply)));
            }
            Request::Close(_) => {
                if let Some(s) = self.sessions.close(&token) {
                    debug!(session = s.id, "session closed by its client");
                    self.session_ended(s);
                }
                return Ok(Some(encode_reply(kind, &AckReply { request_id: rid })));
            }
            Request::Stats(_) => return Ok(Some(encode_reply(kind, &self.stats(rid)))),
            Request::Health(_) => return Ok(Some(encode_reply(kind, &self.health(rid)))),
            Request::RegisterRegion(r) => {
                return self.register(&token, rid, r.region, kind).map(Some);
            }
            Request::UnregisterRegion(r) => {
                self.unregister(&token, r.region_id, now)?;
                return Ok(Some(encode_reply(kind, &AckReply { request_id: rid })));
            }
            Request::AttentionStep(r) => Command::AttentionStep {
                to,
                work: Box::new(self.prepare_attention(&token, *r)?),
            },
            Request::OpenSequence(r) => Command::Open {
                to,
                seq: r.seq_id,
                opts: crate::engine::SeqOptions {
                    policy: r.attention,
                    sampling: r.sampling,
                    diagnostics: r.diagnostics,
                    mode: r.blocks,
                    prefix: r.prefix,
                    prompt_len: r.prompt_len,
                    layout: r.layout,
                },
            },
            Request::ReserveBlocks(r) => Command::Reserve { to, count: r.count },
            Request::SequenceState(r) => Command::State { to, seq: r.seq_id },
            Request::ForkSequence(r) => Command::Fork {
                to,
                parent: r.parent,
                child: r.child,
                sampling: r.sampling,
                policy: r.attention,
                diagnostics: r.diagnostics,
            },
            Request::TruncateSequence(r) => Command::Truncate {
                to,
                seq: r.seq_id,
                drop: r.num_tokens,
            },
            Request::CloseSequence(r) => Command::Close { to, seq: r.seq_id },
            Request::Step(r) => {
                let work = self.prepare_step(&token, r)?;
                let idempotent = self.sessions.touch(&token, now)?.minor >= 3;
                Command::Step {
                    to,
                    work,
                    idempotent,
                }
            }
        };
        self.enqueue(&token, cmd)?;
        Ok(None)
    }

    fn enqueue(&mut self, token: &SessionToken, cmd: Command) -> Result<(), ErrorReply> {
        let limits = QueueLimits {
            max_queue: self.config.max_queue as u64,
            max_queued_requests: self.config.limits.max_queued_requests,
        };
        let s = self.sessions.touch(token, Instant::now())?;
        hand_off(
            &self.cmd_tx,
            cmd,
            &mut s.queued,
            &self.shared.queue_depth,
            limits,
        )?;
        self.last_exchange = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ipc_credentials_name_a_uid() {
        assert_eq!(peer_uid("localhost:1000:1000:4242"), Some(1000));
        assert_eq!(peer_uid("localhost:0:0:1"), Some(0));
        assert_eq!(peer_uid("localhost"), None, "libzmq without SO_PEERCRED");
        assert_eq!(peer_uid("127.0.0.1"), None);
        // An IPv6 TCP peer has colons but is not an ipc peer.
        assert_eq!(peer_uid("2001:db8::0:0:1"), None);
        assert_eq!(peer_uid("::1"), None);
        assert_eq!(peer_uid("localhost:x:0:1"), None);
        assert_eq!(peer_uid("localhost:1:2:3:4"), None);
    }
}
