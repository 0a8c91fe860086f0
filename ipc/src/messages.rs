//! The request and reply bodies of protocol v1 (`PROTOCOL.md` §4).
//!
//! Each body is a msgpack map with string keys. Optional fields are left out
//! when empty and default when missing; unknown fields are ignored, which is
//! how v1.x adds fields without breaking older peers.

pub use crate::blocks::*;
pub use crate::offload::*;
pub use crate::sampling::*;
use crate::tensor::TensorRef;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The protocol version this build speaks: major, minor.
/// 1.1 serves the companion socket and `memfd` regions and adds
/// `region_kinds` and `fd_socket` to `hello`. 1.2 adds `executor`,
/// `device` and `reason` to `health` and marks a fatal `internal` error
/// (`detail.fatal`): optional fields only, so 1.0 and 1.1 clients are served.
/// 1.3 adds client-named KV blocks (`reserve_blocks`, named-block
/// sequences), `sequence_state`, step idempotency and vLLM's sampling
/// options (`blocks.rs`, `sampling.rs`); its new fields are left out when
/// they hold their default, so a 1.2 request's bytes are unchanged.
/// 1.4 serves `attention_step` for attention-only sequences (`offload.rs`)
/// and CUDA IPC regions, with the same rule for its new fields.
pub const PROTOCOL_VERSION: (u32, u32) = (1, 4);

/// A session token: 128 random bits chosen by the daemon at `hello`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionToken(pub [u8; 16]);

impl std::fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a whole token: logs are readable by more people than
        // the socket is.
        write!(f, "SessionToken({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

impl Serialize for SessionToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for SessionToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b = serde_bytes::ByteBuf::deserialize(d)?;
        let arr: [u8; 16] = b.as_slice().try_into().map_err(|_| {
            serde::de::Error::custom(format!("session token must be 16 bytes, got {}", b.len()))
        })?;
        Ok(SessionToken(arr))
    }
}

// ---------------------------------------------------------------- hello

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloRequest {
    pub request_id: u64,
    /// `[major, minor]` the client speaks. A different major is refused with
    /// `unsupported_version`.
    pub protocol: (u32, u32),
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloReply {
    pub request_id: u64,
    pub session: SessionToken,
    /// Changes at every daemon start: a client that sees another value knows
    /// that every sequence and region it had is gone.
    pub instance_id: String,
    pub protocol: (u32, u32),
    pub daemon: String,
    pub model: ModelInfo,
    pub backend: BackendInfo,
    pub kv: KvInfo,
    pub attention_policies: Vec<String>,
    /// The session ends this long after its last request.
    pub lease_ms: u64,
    pub limits: Limits,
    /// Region kinds this session may register (1.1): `shm` only when the
    /// peer has the daemon's own uid, `memfd` when the companion socket is
    /// served. Absent from a 1.0 daemon.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub region_kinds: Vec<String>,
    /// Path of the companion socket for `memfd` regions (1.1), so that a
    /// client connected over TCP on the same host finds it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_socket: Option<String>,
    /// (1.4) The pool of attention-only sequences; absent from a daemon
    /// that does not serve `attention_step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_pool: Option<AttentionPoolInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub vocab_size: u32,
    pub hidden_size: u32,
    pub num_layers: u32,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub max_context: u32,
    /// Data type of the weights as the backend holds them.
    pub dtype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// `"cpu"` or `"cuda"`.
    pub kind: String,
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvInfo {
    pub block_size: u32,
    pub total_blocks: u64,
    pub free_blocks: u64,
}

/// Per-session limits (a request beyond one is answered `limit_exceeded`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_sequences: u64,
    pub max_regions: u64,
    pub max_mapped_bytes: u64,
    pub max_queued_requests: u64,
    pub max_step_tokens: u64,
}

// ---------------------------------------------------------------- session

/// The body of every request that needs nothing but its session
/// (`ping`, `close`, `stats`, `health`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRequest {
    pub request_id: u64,
    pub session: SessionToken,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingReply {
    pub request_id: u64,
    pub lease_ms: u64,
}

/// A reply that carries nothing but the echo (`close`, `unregister_region`,
/// `close_sequence`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AckReply {
    pub request_id: u64,
}

// ---------------------------------------------------------------- regions

/// Where a region's memory lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RegionDesc {
    /// A POSIX shared-memory object the client created (`shm_open` name).
    Shm { name: String, byte_size: u64 },
    /// A sealed memfd the client sent over the companion Unix socket; the
    /// daemon answered that transfer with this `fd_token`.
    Memfd { fd_token: u64, byte_size: u64 },
    /// CUDA device memory exported with `cuIpcGetMemHandle`.
    Cuda {
        #[serde(with = "serde_bytes")]
        ipc_handle: Vec<u8>,
        device_uuid: String,
        byte_size: u64,
        #[serde(default)]
        offset: u64,
        /// (1.4) An interprocess event (`cuIpcGetEventHandle`, 64 bytes) the
        /// client records after writing a request's inputs: the daemon's
        /// stream waits for it before reading them.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "crate::offload::opt_bytes"
        )]
        event_handle: Option<Vec<u8>>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRegionRequest {
    pub request_id: u64,
    pub session: SessionToken,
    pub region: RegionDesc,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRegionReply {
    pub request_id: u64,
    pub region_id: u64,
    pub byte_size: u64,
    /// (1.4, CUDA regions) The daemon's interprocess event (64 bytes),
    /// recorded after it wrote a request's outputs: the client's stream
    /// waits for it before reading them.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::offload::opt_bytes"
    )]
    pub event_handle: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnregisterRegionRequest {
    pub request_id: u64,
    pub session: SessionToken,
    pub region_id: u64,
}

// ---------------------------------------------------------------- sequences

/// How a sequence's decode attention chooses the tokens it reads.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case")]
pub enum AttentionPolicy {
    /// Exact attention over every cached token: the stock side of an A/B.
    #[default]
    Full,
    /// Tactic: the fewest tokens carrying a fraction `p` of the attention mass.
    Tactic {
        p: f32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cluster_size: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recluster_limit: Option<u32>,
    },
    /// Quest-style pages ranked by key bounds, up to a fixed token budget.
    FixedBudget {
        tokens: u32,
        /// Target mass the diagnostics measure success against (0.9 when
        /// absent); the selection itself ignores it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        p: Option<f32>,
    },
    /// Exact scores, exact smallest set reaching `p` (evaluation only).
    OracleTopP { p: f32 },
}

impl AttentionPolicy {
    pub fn name(&self) -> &'static str {
        match self {
            AttentionPolicy::Full => "full",
            AttentionPolicy::Tactic { .. } => "tactic",
            AttentionPolicy::FixedBudget { .. } => "fixed_budget",
            AttentionPolicy::OracleTopP { .. } => "oracle_top_p",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenSequenceRequest {
    pub request_id: u64,
    pub session: SessionToken,
    pub seq_id: u64,
    #[serde(default)]
    pub attention: AttentionPolicy,
    #[serde(default)]
    pub sampling: SamplingParams,
    /// Report the true and estimated attention mass and the tokens read in
    /// every step reply.
    #[serde(default)]
    pub diagnostics: bool,
    /// (1.3) Who names the sequence's KV blocks: the daemon (default) or
    /// the client, per step, from its reservation.
    #[serde(default, skip_serializing_if = "BlockMode::is_daemon")]
    pub blocks: BlockMode,
    /// (1.3, named blocks only) Tokens already cached in the blocks the
    /// first step will name (a prefix-cache hit): the sequence starts with
    /// them, uncomputed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix: Vec<u32>,
    /// (1.3) How many of the sequence's first tokens are its prompt (for the
    /// penalties and prompt log-probabilities); when absent, every token
    /// appended up to and including the first entry that samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_len: Option<u64>,
    /// (1.4) Makes the sequence attention-only: it holds no tokens, only
    /// the k and v rows `attention_step` appends, laid out as declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<AttentionLayout>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceReply {
    pub request_id: u64,
    pub seq_id: u64,
    /// Tokens cached for the sequence after the request.
    pub num_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForkSequenceRequest {
    pub request_id: u64,
    pub session: SessionToken,
    pub parent: u64,
    pub child: u64,
    /// Sampling for the child; the parent's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingParams>,
    /// Attention policy for the child; the parent's when absent (an A/B of
    /// policies on one shared prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<AttentionPolicy>,
    /// Diagnostics for the child; the parent's setting when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TruncateSequenceRequest {
    pub request_id: u64,
    pub session: SessionToken,
    pub seq_id: u64,
    /// How many of the last cached tokens to drop.
    pub num_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloseSequenceRequest {
    pub request_id: u64,
    pub session: SessionToken,
    pub seq_id: u64,
}

// ---------------------------------------------------------------- step

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEntry {
    pub seq_id: u64,
    /// New tokens to append: a prompt chunk, or one token to decode.
    pub tokens: Vec<u32>,
    /// RoPE positions of the new tokens; `cached..cached+n` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<Vec<u32>>,
    /// Sample a token after the last new token (false for a prompt chunk
    /// that is not the prompt's last).
    #[serde(default = "yes")]
    pub sample: bool,
    /// Where to write the logits of every new token: shape `[n, vocab]`,
    /// dtype `f32`, `f16` or `bf16`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits: Option<TensorRef>,
    /// (1.3, named-block sequences only) The sequence's whole block table,
    /// ids of the session's reservation: the first `ceil((len + n) /
    /// block_size)` ids hold its tokens; later ones are ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Vec<u32>>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRequest {
    pub request_id: u64,
    pub session: SessionToken,
    pub entries: Vec<StepEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub seq_id: u64,
    /// Tokens cached after this step.
    pub num_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u32>,
    /// Log-probability of `token` under the model's distribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprob: Option<f32>,
    /// The most likely tokens with their log-probabilities, best first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_logprobs: Vec<(u32, f32)>,
    /// (1.4) vLLM's rank of `token`: how many tokens are at least as likely,
    /// itself included; present when `sampling.logprobs` > 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<AttentionDiagnostics>,
    /// (1.3) One per new token of the entry that lies in the prompt, for a
    /// sequence sampled with `prompt_logprobs`: that token's log-probability
    /// given the tokens before it, and the most likely tokens there; `nil`
    /// where the row before it was never computed (the sequence's first
    /// token, the first after a named prefix or a truncation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_logprobs: Vec<Option<PromptLogprob>>,
    /// (1.4) vLLM's rank of each token of `prompt_logprobs` (`nil` where
    /// that has `nil`), in the same order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_ranks: Vec<Option<u32>>,
}

/// What a sparse policy read and how much attention mass it kept, averaged
/// over the step's decode queries (layers × query heads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AttentionDiagnostics {
    pub policy: String,
    /// Token-equivalents read over context length (`PROTOCOL.md` §4.6).
    pub tokens_read_fraction: f64,
    /// Tokens attended (selected) over context length.
    pub selected_fraction: f64,
    /// Mean true attention mass of the selections.
    pub true_mass: f64,
    /// Mean mass the selector believed it had.
    pub estimated_mass: f64,
    /// Smallest true mass over (layer, head).
    pub min_true_mass: f64,
    /// Fraction of (layer, head) whose true mass reached the target.
    pub success_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StepTiming {
    /// From the I/O thread receiving the request to the executor taking it.
    pub queued_us: u64,
    /// From the executor taking it to the reply being ready.
    pub run_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReply {
    pub request_id: u64,
    pub results: Vec<StepResult>,
    pub timing: StepTiming,
}

// ---------------------------------------------------------------- stats, health

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StatsReply {
    pub request_id: u64,
    pub instance_id: String,
    pub uptime_s: f64,
    pub steps: u64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub sessions: u64,
    pub sequences: u64,
    pub regions: u64,
    pub kv_total_blocks: u64,
    pub kv_free_blocks: u64,
    pub queue_depth: u64,
    pub errors: BTreeMap<String, u64>,
    /// Per attention policy: decode queries, mean fraction of tokens read,
    /// mean true mass, success rate (sequences with diagnostics only).
    #[serde(default)]
    pub attention: BTreeMap<String, PolicyStats>,
    /// (1.4) The pool of attention-only sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_pool: Option<AttentionPoolInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PolicyStats {
    pub decode_steps: u64,
    pub tokens_read_fraction: f64,
    pub true_mass: f64,
    pub success_rate: f64,
    /// `[layer][head]` mean true mass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub true_mass_by_layer_head: Vec<Vec<f64>>,
    /// `[layer][head]` mean fraction of tokens read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens_read_by_layer_head: Vec<Vec<f64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReply {
    pub request_id: u64,
    /// `"ok"`; `"stopping"` once shutdown began; `"wedged"` while the
    /// executor has been on one command longer than the daemon's bound;
    /// `"failing"` after a fatal fault, until the daemon exits. Never `"ok"`
    /// unless `executor` is `"alive"` and `device` is `"ok"`.
    pub status: String,
    pub instance_id: String,
    pub backend: BackendInfo,
    /// Milliseconds since the executor last finished a command.
    pub executor_idle_ms: u64,
    /// (1.2) `"alive"`, `"wedged"` (on one command too long) or `"dead"`
    /// (it panicked or gave up on a failed device). Absent from a 1.1 daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<String>,
    /// (1.2) `"ok"`, or `"failed"` once the backend reported the device
    /// unusable. Absent from a 1.1 daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// (1.2) Why the status is not `"ok"`, in words; absent when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
