//! Sessions as the I/O thread keeps them: token, lease, and the regions the
//! session registered. Sequences live in the engine, keyed by session id.

use crate::engine::SessionId;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tacflow_ipc::{ErrorCode, ErrorReply, HostRegion, SessionToken};

#[derive(Debug)]
pub struct Session {
    pub id: SessionId,
    pub token: SessionToken,
    pub deadline: Instant,
    pub regions: HashMap<u64, Arc<HostRegion>>,
    /// CUDA IPC regions, open in the daemon's context until removed.
    pub cuda_regions: HashMap<u64, Arc<super::cuda_regions::CudaRegion>>,
    pub mapped_bytes: u64,
    /// Requests of this session waiting for (or in) the executor.
    pub queued: u64,
    pub client: String,
    /// The peer's uid when the transport told it (an `ipc://` peer's
    /// credentials); `None` over TCP. Regions by name need it to be the
    /// daemon's own uid.
    pub peer_uid: Option<u32>,
    /// The protocol minor the client's `hello` spoke (1.3 and later get
    /// step idempotency).
    pub minor: u32,
}

#[derive(Debug)]
pub struct Sessions {
    by_token: HashMap<SessionToken, Session>,
    /// Session id → token, to account replies coming back from the executor.
    by_id: HashMap<SessionId, SessionToken>,
    next_id: SessionId,
    next_region: u64,
    lease: Duration,
    /// The daemon instance, reported with `unknown_session`.
    instance_id: String,
}

fn random_token() -> SessionToken {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source is available");
    SessionToken(b)
}

impl Sessions {
    pub fn new(lease: Duration, instance_id: String) -> Sessions {
        Sessions {
            by_token: HashMap::new(),
            by_id: HashMap::new(),
            next_id: 1,
            next_region: 1,
            lease,
            instance_id,
        }
    }

    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    pub fn open(
        &mut self,
        client: String,
        peer_uid: Option<u32>,
        now: Instant,
    ) -> (SessionToken, SessionId) {
        let token = random_token();
        let id = self.next_id;
        self.next_id += 1;
        self.by_token.insert(
            token,
            Session {
                id,
                token,
                deadline: now + self.lease,
                regions: HashMap::new(),
                cuda_regions: HashMap::new(),
                mapped_bytes: 0,
                queued: 0,
                client,
                peer_uid,
                minor: 0,
            },
        );
        self.by_id.insert(id, token);
        (token, id)
    }

    /// The live session of `token`, its lease renewed.
    pub fn touch(
        &mut self,
        token: &SessionToken,
        now: Instant,
    ) -> Result<&mut Session, ErrorReply> {
        let lease = self.lease;
        match self.by_token.get_mut(token) {
            Some(s) => {
                s.deadline = now + lease;
                Ok(s)
            }
            None => Err(ErrorReply::new(
                ErrorCode::UnknownSession,
                "unknown session: it was closed, its lease expired, or the daemon restarted",
            )
            .with("instance_id", self.instance_id.as_str())),
        }
    }

    /// A reply went out: the session's requests are done, and its lease
    /// counts from now.
    pub fn answered(&mut self, id: SessionId, now: Instant) {
        let lease = self.lease;
        if let Some(s) = self.by_id_mut(id) {
            s.queued = s.queued.saturating_sub(1);
            s.deadline = now + lease;
        }
    }

    pub fn by_id_mut(&mut self, id: SessionId) -> Option<&mut Session> {
        let token = self.by_id.get(&id)?;
        self.by_token.get_mut(token)
    }

    pub fn close(&mut self, token: &SessionToken) -> Option<Session> {
        let s = self.by_token.remove(token)?;
        self.by_id.remove(&s.id);
        Some(s)
    }

    /// Removes and returns the sessions whose lease ran out. A session with
    /// requests queued or running is alive: its client is waiting for them.
    pub fn expire(&mut self, now: Instant) -> Vec<Session> {
        let dead: Vec<SessionToken> = self
            .by_token
            .iter()
            .filter(|(_, s)| s.deadline <= now && s.queued == 0)
            .map(|(t, _)| *t)
            .collect();
        dead.iter().filter_map(|t| self.close(t)).collect()
    }

    /// Every session (for shutdown).
    pub fn drain(&mut self) -> Vec<Session> {
        self.by_id.clear();
        self.by_token.drain().map(|(_, s)| s).collect()
    }

    pub fn new_region_id(&mut self) -> u64 {
        let id = self.next_region;
        self.next_region += 1;
        id
    }

    pub fn total_regions(&self) -> usize {
        self.by_token
            .values()
            .map(|s| s.regions.len() + s.cuda_regions.len())
            .sum()
    }

    pub fn total_mapped_bytes(&self) -> u64 {
        self.by_token.values().map(|s| s.mapped_bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_sessions_and_leases_expire() {
        let t0 = Instant::now();
        let mut s = Sessions::new(Duration::from_millis(100), "inst".into());
        let (a, ida) = s.open("a".into(), Some(0), t0);
        let (b, _) = s.open("b".into(), None, t0);
        assert_ne!(a, b);
        assert_eq!(s.touch(&a, t0).unwrap().id, ida);
        // b is renewed, a is not.
        s.touch(&b, t0 + Duration::from_millis(80)).unwrap();
        s.touch(&b, t0).unwrap().queued = 1; // b waits for a long step
        let dead = s.expire(t0 + Duration::from_millis(500));
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].id, ida);
        let err = s.touch(&a, t0).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnknownSession);
        assert!(s.touch(&b, t0).is_ok());
        assert!(s.by_id_mut(ida).is_none());
        // Once answered, b's lease runs from the reply.
        let idb = s.touch(&b, t0).unwrap().id;
        s.answered(idb, t0 + Duration::from_millis(500));
        assert!(s.expire(t0 + Duration::from_millis(550)).is_empty());
        assert_eq!(s.expire(t0 + Duration::from_millis(700)).len(), 1);
    }
}
