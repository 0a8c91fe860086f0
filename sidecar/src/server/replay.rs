//! Step idempotency: the last replies of each session's steps, so that a
//! step retried with the same `request_id` (the client timed out and sent
//! it again) is answered from its first execution and never runs twice.
//!
//! Served to sessions whose `hello` spoke protocol 1.3 or later (older
//! clients may reuse request ids across steps). The executor keeps the
//! replies of a session's last [`REPLAY_DEPTH`] steps, successes and
//! errors alike, and forgets them when the session ends. A retry carries
//! the same step: the same `request_id` with other entries is refused
//! `bad_request`, since the first one may have run.

use crate::engine::SessionId;
use crate::engine::step::StepWork;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use tacflow_ipc::{ErrorReply, StepEntry};

/// Replies kept per session.
pub const REPLAY_DEPTH: usize = 8;

/// One kept reply.
#[derive(Debug)]
struct Kept {
    request_id: u64,
    fingerprint: u64,
    frames: [Vec<u8>; 2],
}

/// What to do with a step before running it.
#[derive(Debug, PartialEq)]
pub enum Seen {
    /// Not answered before: run it.
    New,
    /// Answered before: send these frames again.
    Again([Vec<u8>; 2]),
    /// The id answered another step.
    Conflict(ErrorReply),
}

#[derive(Debug, Default)]
pub struct Replays {
    by_session: HashMap<SessionId, VecDeque<Kept>>,
}

/// What identifies a step's content: every field of every entry but the
/// logits target's region contents.
pub fn fingerprint(work: &StepWork) -> u64 {
    let mut h = DefaultHasher::new();
    for e in &work.entries {
        hash_entry(e, &mut h);
    }
    h.finish()
}

fn hash_entry(e: &StepEntry, h: &mut DefaultHasher) {
    e.seq_id.hash(h);
    e.tokens.hash(h);
    e.positions.hash(h);
    e.sample.hash(h);
    e.blocks.hash(h);
    e.logits.as_ref().map(|t| format!("{t:?}")).hash(h);
}

impl Replays {
    pub fn check(&self, session: SessionId, request_id: u64, fingerprint: u64) -> Seen {
        let Some(k) = self
            .by_session
            .get(&session)
            .and_then(|q| q.iter().find(|k| k.request_id == request_id))
        else {
            return Seen::New;
        };
        if k.fingerprint == fingerprint {
            Seen::Again(k.frames.clone())
        } else {
            Seen::Conflict(
                ErrorReply::bad_request(format!(
                    "request_id {request_id} already answered another step of this session \
                     (a retried step must be sent unchanged)"
                ))
                .with("request_id", request_id),
            )
        }
    }

    pub fn keep(
        &mut self,
        session: SessionId,
        request_id: u64,
        fingerprint: u64,
        frames: [Vec<u8>; 2],
    ) {
        let q = self.by_session.entry(session).or_default();
        if q.len() == REPLAY_DEPTH {
            q.pop_front();
        }
        q.push_back(Kept {
            request_id,
            fingerprint,
            frames,
        });
    }

    pub fn forget(&mut self, session: SessionId) {
        self.by_session.remove(&session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(x: u8) -> [Vec<u8>; 2] {
        [vec![x], vec![x, x]]
    }

    #[test]
    fn keeps_the_last_replies_per_session_and_spots_a_changed_retry() {
        let mut r = Replays::default();
        for id in 0..(REPLAY_DEPTH as u64 + 2) {
            r.keep(1, id, 100 + id, frames(id as u8));
        }
        assert_eq!(r.check(1, 0, 100), Seen::New, "the oldest were dropped");
        assert_eq!(r.check(1, 1, 101), Seen::New);
        assert_eq!(r.check(1, 2, 102), Seen::Again(frames(2)));
        assert!(matches!(r.check(1, 2, 999), Seen::Conflict(_)));
        assert_eq!(r.check(2, 2, 102), Seen::New, "another session");
        r.forget(1);
        assert_eq!(r.check(1, 9, 109), Seen::New);
    }
}
