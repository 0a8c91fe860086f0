//! The ops of a forward pass in their one true order, and the rows of each
//! buffer a node reads and writes: what the dependencies of a schedule are
//! computed from.

use super::Node;
use crate::backend::StepMeta;
use std::ops::Range;

/// The activation buffers of a forward pass (and each layer's KV cache).
/// Token-row buffers have a row per token of the step; `Sel`, `Normed` and
/// `Logits` a row per logit row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Buf {
    /// The residual stream.
    X,
    /// A normed copy of `X` (attention's input, then the MLP's).
    H,
    /// Fused `[q | k | v]` rows.
    Qkv,
    Attn,
    /// An output projection (attention's, then the MLP's), before its add.
    Proj,
    GateUp,
    Act,
    /// Layer `l`'s KV cache, by the step row whose slot is written.
    Kv(usize),
    /// The residual rows whose logits are wanted.
    Sel,
    Normed,
    Logits,
}

/// One op of the forward pass; `usize` is the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Embed,
    AttnNorm(usize),
    Qkv(usize),
    QkvBias(usize),
    Rope(usize),
    KvAppend(usize),
    Attention(usize),
    OProj(usize),
    AddAttn(usize),
    MlpNorm(usize),
    GateUp(usize),
    SiluMul(usize),
    Down(usize),
    AddMlp(usize),
    /// `AddAttn` and `MlpNorm` in one op (`Backend::add_rmsnorm`).
    AddAttnNorm(usize),
    /// `AddMlp` of layer `l` and the `AttnNorm` of layer `l + 1` in one op.
    AddMlpNorm(usize),
    /// `Rope` and `KvAppend` in one op (`Backend::rope_kv_append`).
    RopeAppend(usize),
    /// The logit rows of the residual stream into `Sel`.
    Gather,
    FinalNorm,
    LmHead,
}

impl Op {
    /// Whether the op runs over token rows (else over logit rows).
    pub fn rowwise(self) -> bool {
        !matches!(self, Op::Gather | Op::FinalNorm | Op::LmHead)
    }

    /// The layer of a layer op.
    pub fn layer(self) -> Option<usize> {
        use Op::*;
        match self {
            AttnNorm(l) | Qkv(l) | QkvBias(l) | Rope(l) | KvAppend(l) | Attention(l) | OProj(l)
            | AddAttn(l) | MlpNorm(l) | GateUp(l) | SiluMul(l) | Down(l) | AddMlp(l)
            | AddAttnNorm(l) | AddMlpNorm(l) | RopeAppend(l) => Some(l),
            Embed | Gather | FinalNorm | LmHead => None,
        }
    }

    /// Whether the op is a GEMM (compute-bound at large row counts).
    pub fn is_gemm(self) -> bool {
        matches!(
            self,
            Op::Qkv(_) | Op::OProj(_) | Op::GateUp(_) | Op::Down(_) | Op::LmHead
        )
    }

    /// The buffers the op reads and those it writes.
    pub fn buffers(self) -> (&'static [Buf], &'static [Buf]) {
        use Buf::*;
        // The KV buffer is per layer: `accesses` fills in the layer.
        const KV: Buf = Kv(usize::MAX);
        match self {
            Op::Embed => (&[], &[X]),
            Op::AttnNorm(_) | Op::MlpNorm(_) => (&[X], &[H]),
            Op::Qkv(_) => (&[H], &[Qkv]),
            Op::QkvBias(_) | Op::Rope(_) => (&[Qkv], &[Qkv]),
            Op::KvAppend(_) => (&[Qkv], &[KV]),
            Op::RopeAppend(_) => (&[Qkv], &[Qkv, KV]),
            Op::Attention(_) => (&[Qkv, KV], &[Attn]),
            Op::OProj(_) => (&[Attn], &[Proj]),
            Op::AddAttn(_) | Op::AddMlp(_) => (&[X, Proj], &[X]),
            Op::AddAttnNorm(_) | Op::AddMlpNorm(_) => (&[X, Proj], &[X, H]),
            Op::GateUp(_) => (&[H], &[GateUp]),
            Op::SiluMul(_) => (&[GateUp], &[Act]),
            Op::Down(_) => (&[Act], &[Proj]),
            Op::Gather => (&[X], &[Sel]),
            Op::FinalNorm => (&[Sel], &[Normed]),
            Op::LmHead => (&[Normed], &[Logits]),
        }
    }
}

/// Which pairs of ops run fused (each fused op computes exactly what its
/// two ops compute in order; the backend's kernels make it one launch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fusions {
    /// A residual add and the RMSNorm after it.
    pub add_norm: bool,
    /// RoPE and the KV append.
    pub rope_append: bool,
    /// SwiGLU written in the dtype its GEMM reads.
    pub silu_gemm_input: bool,
}

/// The ops of a model's forward pass, in the order the sequential pass runs
/// them: a schedule must give the same result as this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Program {
    pub layers: usize,
    /// The QKV projection has a bias (Qwen2).
    pub qkv_bias: bool,
    pub fusions: Fusions,
}

impl Program {
    pub fn ops(&self) -> Vec<Op> {
        let f = self.fusions;
        let mut ops = vec![Op::Embed, Op::AttnNorm(0)];
        for l in 0..self.layers {
            ops.push(Op::Qkv(l));
            if self.qkv_bias {
                ops.push(Op::QkvBias(l));
            }
            if f.rope_append {
                ops.push(Op::RopeAppend(l));
            } else {
                ops.extend([Op::Rope(l), Op::KvAppend(l)]);
            }
            ops.extend([Op::Attention(l), Op::OProj(l)]);
            if f.add_norm {
                ops.push(Op::AddAttnNorm(l));
            } else {
                ops.extend([Op::AddAttn(l), Op::MlpNorm(l)]);
            }
            ops.extend([Op::GateUp(l), Op::SiluMul(l), Op::Down(l)]);
            let last = l + 1 == self.layers;
            if f.add_norm && !last {
                ops.push(Op::AddMlpNorm(l));
            } else {
                ops.push(Op::AddMlp(l));
                if !last {
                    ops.push(Op::AttnNorm(l + 1));
                }
            }
        }
        ops.extend([Op::Gather, Op::FinalNorm, Op::LmHead]);
        ops
    }
}

/// Rows of one buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub buf: Buf,
    /// Disjoint, ascending.
    pub rows: Vec<Range<usize>>,
}

impl Access {
    /// Whether the two touch a common row of the same buffer.
    pub fn overlaps(&self, other: &Access) -> bool {
        self.buf == other.buf
            && self.rows.iter().any(|a| {
                other
                    .rows
                    .iter()
                    .any(|b| a.start < b.end && b.start < a.end)
            })
    }
}

/// The rows of every step row's sequence: row `r` belongs to the sequence
/// whose rows are `seq_rows(meta)[i]` for the `i` that contains `r`.
fn seq_ranges(meta: &StepMeta) -> Vec<Range<usize>> {
    meta.seqs
        .iter()
        .map(|s| s.q_start..s.q_start + s.q_len)
        .collect()
}

/// Consecutive rows merged into ranges.
fn ranges_of(rows: impl IntoIterator<Item = usize>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = vec![];
    let mut sorted: Vec<usize> = rows.into_iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    for r in sorted {
        match out.last_mut() {
            Some(last) if last.end == r => last.end = r + 1,
            _ => out.push(r..r + 1),
        }
    }
    out
}

/// What `node` reads and what it writes, in rows of each buffer. Attention
/// over rows `R` reads the KV rows of every sequence that has a row in `R`
/// (a prefill chunk's rows see the keys its earlier rows append); the
/// gather reads the residual rows its logit rows name.
pub fn accesses(node: &Node, meta: &StepMeta) -> (Vec<Access>, Vec<Access>) {
    let (reads, writes) = node.op.buffers();
    let layer = node.op.layer().unwrap_or(0);
    let fix = |b: Buf| match b {
        Buf::Kv(_) => Buf::Kv(layer),
        other => other,
    };
    let own = vec![node.rows.clone()];
    let reads = reads
        .iter()
        .map(|&b| {
            let rows = match (node.op, b) {
                (Op::Attention(_), Buf::Kv(_)) => {
                    let r = &node.rows;
                    let seqs = seq_ranges(meta);
                    let touched = seqs
                        .into_iter()
                        .filter(|s| s.start < r.end && r.start < s.end);
                    ranges_of(touched.flatten())
                }
                (Op::Gather, Buf::X) => ranges_of(
                    meta.logit_rows[node.rows.clone()]
                        .iter()
                        .map(|&r| r as usize),
                ),
                _ => own.clone(),
            };
            Access { buf: fix(b), rows }
        })
        .collect();
    let writes = writes
        .iter()
        .map(|&b| Access {
            buf: fix(b),
            rows: own.clone(),
        })
        .collect();
    (reads, writes)
}
