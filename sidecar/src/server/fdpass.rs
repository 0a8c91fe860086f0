//! The companion socket's thread (`PROTOCOL.md` §3.4): takes sealed memfds
//! from clients and keeps each under a fresh `fd_token` until the client
//! registers it on the main socket.
//!
//! ```text
//! client ──SEQPACKET + SCM_RIGHTS──► fdpass thread ──FdBroker──► I/O thread (register_region memfd)
//! ```
//!
//! The thread never maps anything: it checks the packet, the session token,
//! the seals and the size, and parks the descriptor in the [`FdBroker`],
//! which the I/O thread also holds. Descriptors nobody registers go when
//! their session ends or after a lease.

use super::Shutdown;
use crate::engine::SessionId;
use crate::engine::gauges::Gauges;
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockFlag, accept4, getsockopt, recvmsg, send, sockopt,
};
use std::collections::HashMap;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tacflow_ipc::codec::to_msgpack;
use tacflow_ipc::companion::{
    FdTransferReply, FdTransferRequest, MAX_PACKET_BYTES, check_memfd, decode_fd_request,
};
use tacflow_ipc::{ErrorCode, ErrorReply, SessionToken};
use tracing::{debug, warn};

/// Connections served at once; more are closed on arrival.
const MAX_CONNECTIONS: usize = 256;
/// A connection that sends nothing for this long is closed.
const IDLE: Duration = Duration::from_secs(10);

/// A descriptor waiting for its `register_region`.
#[derive(Debug)]
pub struct Pending {
    pub session: SessionId,
    pub fd: OwnedFd,
    pub byte_size: u64,
    /// The sender's uid (`SO_PEERCRED`), for the log.
    pub peer_uid: u32,
    received: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// Live session tokens (the I/O thread keeps this in step).
    live: HashMap<SessionToken, SessionId>,
    pending: HashMap<u64, Pending>,
}

/// What the companion thread and the I/O thread share.
#[derive(Debug, Default)]
pub struct FdBroker {
    state: Mutex<State>,
}

impl FdBroker {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn session_opened(&self, token: SessionToken, id: SessionId) {
        self.lock().live.insert(token, id);
    }

    /// The session ended: its token is dead and its descriptors close.
    pub fn session_closed(&self, token: &SessionToken) {
        let mut s = self.lock();
        if let Some(id) = s.live.remove(token) {
            s.pending.retain(|_, p| p.session != id);
        }
    }

    /// The descriptor sent under `fd_token` by `session`, if any.
    pub fn take(&self, session: SessionId, fd_token: u64) -> Option<Pending> {
        let mut s = self.lock();
        match s.pending.get(&fd_token) {
            Some(p) if p.session == session => s.pending.remove(&fd_token),
            _ => None,
        }
    }

    /// Closes descriptors received before `deadline` and never registered.
    pub fn expire(&self, deadline: Instant) {
        self.lock().pending.retain(|_, p| p.received >= deadline);
    }

    pub fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// Parks a checked descriptor; returns its token.
    fn offer(
        &self,
        req: &FdTransferRequest,
        fd: OwnedFd,
        peer_uid: u32,
        max_pending: u64,
    ) -> Result<u64, ErrorReply> {
        let mut s = self.lock();
        let Some(&session) = s.live.get(&req.session) else {
            return Err(ErrorReply::new(
                ErrorCode::UnknownSession,
                "fd transfer: unknown session (say hello on the main socket first)",
            ));
        };
        let waiting = s.pending.values().filter(|p| p.session == session).count() as u64;
        if waiting >= max_pending {
            return Err(ErrorReply::new(
                ErrorCode::LimitExceeded,
                "too many descriptors waiting for register_region in this session",
            )
            .with("max_regions", max_pending));
        }
        let token = loop {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).expect("the OS random source is available");
            let t = u64::from_le_bytes(b);
            if t != 0 && !s.pending.contains_key(&t) {
                break t;
            }
        };
        let pending = Pending {
            session,
            fd,
            byte_size: req.byte_size,
            peer_uid,
            received: Instant::now(),
        };
        s.pending.insert(token, pending);
        Ok(token)
    }
}

struct Conn {
    fd: OwnedFd,
    uid: u32,
    last: Instant,
}

/// What the companion thread needs.
pub struct Companion {
    pub listener: OwnedFd,
    pub broker: Arc<FdBroker>,
    pub gauges: Arc<Gauges>,
    /// Descriptors one session may have waiting (`limits.max_regions`).
    pub max_pending: u64,
}

impl Companion {
    /// Serves until `stop` is triggered.
    pub fn serve(self, stop: &Shutdown) {
        let mut conns: Vec<Conn> = Vec::new();
        while !stop.is_triggered() {
            let mut items = Vec::with_capacity(conns.len() + 1);
            items.push(zmq::PollItem::from_fd(
                self.listener.as_raw_fd(),
                zmq::POLLIN,
            ));
            items.extend(
                conns
                    .iter()
                    .map(|c| zmq::PollItem::from_fd(c.fd.as_raw_fd(), zmq::POLLIN)),
            );
            if zmq::poll(&mut items, 100).is_err() {
                continue;
            }
            let ready: Vec<bool> = items
                .iter()
                .map(|i| i.is_readable() || i.is_error())
                .collect();
            let now = Instant::now();
            let mut keep = Vec::with_capacity(conns.len());
            for (c, r) in conns.into_iter().zip(&ready[1..]) {
                let alive = if *r {
                    self.handle(&c)
                } else {
                    now - c.last < IDLE
                };
                if alive {
                    keep.push(Conn {
                        last: if *r { now } else { c.last },
                        ..c
                    });
                }
            }
            conns = keep;
            if ready[0] {
                self.accept(&mut conns);
            }
        }
    }

    fn accept(&self, conns: &mut Vec<Conn>) {
        let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
        while let Ok(raw) = accept4(self.listener.as_raw_fd(), flags) {
            // SAFETY: accept4 just returned this descriptor to us.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            if conns.len() >= MAX_CONNECTIONS {
                warn!("companion socket: too many connections, closing a new one");
                continue;
            }
            let uid = getsockopt(&fd, sockopt::PeerCredentials).map_or(u32::MAX, |c| c.uid());
            conns.push(Conn {
                fd,
                uid,
                last: Instant::now(),
            });
        }
    }

    /// Reads and answers one packet; `false` when the connection is done.
    fn handle(&self, c: &Conn) -> bool {
        let mut buf = vec![0u8; MAX_PACKET_BYTES];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let (n, flags, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
            match recvmsg::<()>(c.fd.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
                Ok(msg) => (msg.bytes, msg.flags, owned_fds(&msg)),
                Err(nix::errno::Errno::EAGAIN) => return true,
                Err(_) => return false,
            }
        };
        if n == 0 && fds.is_empty() {
            return false; // the peer closed its end
        }
        let reply = match self.transfer(&buf[..n], flags, fds, c.uid) {
            Ok(r) => to_msgpack(&r),
            Err(e) => {
                self.gauges.count_error(e.code);
                debug!(code = %e.code, uid = c.uid, "fd transfer refused: {}", e.message);
                to_msgpack(&e)
            }
        };
        send(
            c.fd.as_raw_fd(),
            &reply,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )
        .is_ok()
    }

    fn transfer(
        &self,
        packet: &[u8],
        flags: MsgFlags,
        mut fds: Vec<OwnedFd>,
        uid: u32,
    ) -> Result<FdTransferReply, ErrorReply> {
        let req = decode_fd_request(packet)?;
        let at = |e: ErrorReply| e.for_request(req.request_id);
        if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) || fds.len() != 1 {
            return Err(at(ErrorReply::bad_request(
                "fd transfer: send exactly one descriptor (SCM_RIGHTS) with a packet under 4 KiB",
            )
            .with("descriptors", fds.len())));
        }
        let fd = fds.pop().expect("one descriptor");
        check_memfd(&fd, req.byte_size).map_err(at)?;
        let token = self
            .broker
            .offer(&req, fd, uid, self.max_pending)
            .map_err(at)?;
        debug!(uid, byte_size = req.byte_size, "memfd received");
        Ok(FdTransferReply {
            request_id: req.request_id,
            fd_token: token,
        })
    }
}

/// Every descriptor a message carried, owned (closed when dropped).
fn owned_fds(msg: &nix::sys::socket::RecvMsg<'_, '_, ()>) -> Vec<OwnedFd> {
    let mut out = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: SCM_RIGHTS installed these descriptors in this
                // process for us alone.
                out.extend(
                    fds.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(size: i64) -> OwnedFd {
        use nix::fcntl::{FcntlArg, fcntl};
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let fd = memfd_create("t", MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&fd, size).unwrap();
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(tacflow_ipc::companion::required_seals()),
        )
        .unwrap();
        fd
    }

    #[test]
    fn descriptors_belong_to_their_session_and_die_with_it() {
        let b = FdBroker::default();
        let (ta, tb) = (SessionToken([1; 16]), SessionToken([2; 16]));
        b.session_opened(ta, 1);
        b.session_opened(tb, 2);
        let req = |session| FdTransferRequest {
            request_id: 1,
            session,
            byte_size: 4096,
        };
        let t1 = b.offer(&req(ta), sealed(4096), 0, 2).unwrap();
        assert!(b.take(2, t1).is_none(), "another session cannot take it");
        assert_eq!(b.take(1, t1).unwrap().byte_size, 4096);
        assert!(b.take(1, t1).is_none(), "taken once");
        b.offer(&req(ta), sealed(4096), 0, 2).unwrap();
        b.offer(&req(ta), sealed(4096), 0, 2).unwrap();
        let err = b.offer(&req(ta), sealed(4096), 0, 2).unwrap_err();
        assert_eq!(err.code, ErrorCode::LimitExceeded);
        b.session_closed(&ta);
        assert_eq!(b.pending_count(), 0);
        let err = b.offer(&req(ta), sealed(4096), 0, 2).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnknownSession);
        b.offer(&req(tb), sealed(4096), 0, 2).unwrap();
        b.expire(Instant::now() + Duration::from_secs(1));
        assert_eq!(b.pending_count(), 0);
    }
}
