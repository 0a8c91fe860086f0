//! (1.3) Client-named KV blocks and the sequence-state query
//! (`PROTOCOL.md` §4.8, §4.9): a server that accounts KV blocks itself
//! (vLLM's block manager, its prefix cache) reserves blocks from the daemon
//! and names them, by its own ids, in every step.

use crate::messages::{AttentionPolicy, SessionToken};
use crate::sampling::SamplingParams;
use serde::{Deserialize, Serialize};

/// Who chooses a sequence's KV blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockMode {
    /// The daemon allocates, shares on fork and copies on write.
    #[default]
    Daemon,
    /// Each step names the whole block table from the session's reservation.
    Named,
}

impl BlockMode {
    pub fn is_daemon(&self) -> bool {
        *self == BlockMode::Daemon
    }
}

/// Grows the session's reservation by `count` blocks: ids
/// `old_size..old_size + count`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReserveBlocksRequest {
    pub request_id: u64,
    pub session: SessionToken,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReserveBlocksReply {
    pub request_id: u64,
    /// The reservation's size after the request: ids `0..blocks` are valid.
    pub blocks: u64,
    /// Tokens per block.
    pub block_size: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceStateRequest {
    pub request_id: u64,
    pub session: SessionToken,
    pub seq_id: u64,
}

/// What the daemon holds for one sequence: enough for a client that lost
/// track (a timed-out step) to know whether its step ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceStateReply {
    pub request_id: u64,
    pub seq_id: u64,
    pub num_tokens: u64,
    /// The prompt's length when known (given, or fixed by the first
    /// sampling entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_len: Option<u64>,
    pub mode: BlockMode,
    pub attention: AttentionPolicy,
    /// The sequence's sampling, with the seed in effect (the one the daemon
    /// picked when none was given).
    pub sampling: SamplingParams,
    pub diagnostics: bool,
    /// KV blocks holding the sequence's tokens.
    pub num_blocks: u64,
    /// Named-block sequences: the reservation ids of those blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block_ids: Vec<u32>,
}
