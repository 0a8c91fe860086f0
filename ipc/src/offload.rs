//! (1.4) Attention offload (`PROTOCOL.md` §4.7): a client that runs the
//! model itself (transformers, a serving stack) hands the daemon the new
//! q, k and v rows of every layer and gets the attention output back, while
//! the KV cache and the attention policy live in the daemon.
//!
//! An attention-only sequence declares its [`AttentionLayout`] when it is
//! opened; each [`AttentionStepRequest`] then carries one layer's rows for a
//! batch of such sequences, decode rows and prefill chunks mixed.

use crate::messages::{AttentionDiagnostics, PolicyStats, SessionToken, StepTiming};
use crate::tensor::TensorRef;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

fn is_false(b: &bool) -> bool {
    !*b
}

/// What the daemon must know of a model's attention to serve it: its
/// shapes, its score scale, and every feature that changes the scores. A
/// feature the daemon cannot honour exactly (today: logit softcapping,
/// sliding windows, attention sinks) is refused at `open_sequence`, never
/// approximated, so a client that declares what its model does cannot get
/// silently wrong outputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AttentionLayout {
    pub num_layers: u32,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    /// Multiplies `q·k` before the softmax (`head_dim^-0.5` for most models).
    pub scale: f32,
    /// `tanh` capping of the scores (Gemma 2's `attn_logit_softcapping`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softcap: Option<f32>,
    /// Keys older than this many positions are masked (Mistral, Gemma).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<u32>,
    /// Learned per-head sink logits in the softmax's denominator (gpt-oss).
    #[serde(default, skip_serializing_if = "is_false")]
    pub sinks: bool,
}

/// One layer of attention for a batch of attention-only sequences.
///
/// Rows are the sequences' new tokens, concatenated in `seq_ids` order:
/// `num_tokens[i]` rows for sequence `i` (one each when absent). `q` is
/// `[rows, num_heads, head_dim]`, `k` and `v` `[rows, num_kv_heads,
/// head_dim]`, `out` `[rows, num_heads, head_dim]`, each `f32`, `f16` or
/// `bf16` with any strides. The rows' k and v are appended to `layer`'s
/// cache of their sequence; row `j` of a sequence attends to its cache up
/// to and including itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttentionStepRequest {
    pub request_id: u64,
    pub session: SessionToken,
    pub layer: u32,
    pub seq_ids: Vec<u64>,
    /// (1.4) New rows per sequence; one each when absent (a decode step).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub num_tokens: Vec<u32>,
    /// (1.4) Position of each sequence's first new row: the layer's cached
    /// length, checked so that a layer sent twice or skipped is refused
    /// instead of corrupting the cache.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub positions: Vec<u64>,
    pub q: TensorRef,
    pub k: TensorRef,
    pub v: TensorRef,
    pub out: TensorRef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttentionStepReply {
    pub request_id: u64,
    pub layer: u32,
    /// Per sequence, the layer's cached length after the request.
    pub num_tokens: Vec<u64>,
    /// Per sequence opened with diagnostics whose rows were one decode row:
    /// what its policy read and kept at this layer (averaged over heads);
    /// `nil` for the others. Absent when no sequence has any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attention: Vec<Option<AttentionDiagnostics>>,
    pub timing: StepTiming,
}

/// The KV pool of attention-only sequences, apart from the model's, as
/// `hello` and `stats` report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AttentionPoolInfo {
    /// Tokens per block.
    pub block_size: u32,
    /// The pool's budget: K and V of every layer of every block, f32.
    pub total_bytes: u64,
    /// Bytes of the blocks sequences hold.
    pub used_bytes: u64,
    /// Blocks sequences hold (over every layout).
    pub blocks: u64,
    /// Open attention-only sequences.
    pub sequences: u64,
    /// `attention_step` requests served, by layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps_by_layer: Vec<u64>,
    /// Decode queries per policy, over layers and heads (sequences with
    /// diagnostics only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attention: BTreeMap<String, PolicyStats>,
}

/// An optional msgpack `bin` (serde writes `Vec<u8>` as an array).
pub(crate) mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_bytes(b),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<serde_bytes::ByteBuf>::deserialize(d)?.map(|b| b.into_vec()))
    }
}
