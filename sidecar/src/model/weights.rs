//! Where weights come from: a [`WeightSource`] yields the model's tensors in
//! the engine's own layout (q|k|v and gate|up fused), whatever the file
//! format. Sources: seeded random weights, Hugging Face safetensors folders,
//! GGUF files.

use crate::backend::HostData;
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use half::{bf16, f16};

/// The model's tensors, as the forward pass uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightKey {
    /// `[vocab, hidden]`.
    Embed,
    /// `[hidden]`.
    AttnNorm(usize),
    /// `[q_dim + 2 kv_dim, hidden]`: q rows, then k rows, then v rows.
    Qkv(usize),
    /// `[q_dim + 2 kv_dim]` (Qwen2).
    QkvBias(usize),
    /// `[hidden, q_dim]`.
    O(usize),
    MlpNorm(usize),
    /// `[2 intermediate, hidden]`: gate rows, then up rows.
    GateUp(usize),
    /// `[hidden, intermediate]`.
    Down(usize),
    FinalNorm,
    /// `[vocab, hidden]`; absent when embeddings are tied.
    LmHead,
}

impl WeightKey {
    /// A stable ordinal, used as the random stream of the tensor.
    pub fn ordinal(self) -> u64 {
        let layer = |kind: u64, l: usize| 16 + l as u64 * 8 + kind;
        match self {
            WeightKey::Embed => 0,
            WeightKey::FinalNorm => 1,
            WeightKey::LmHead => 2,
            WeightKey::AttnNorm(l) => layer(0, l),
            WeightKey::Qkv(l) => layer(1, l),
            WeightKey::QkvBias(l) => layer(2, l),
            WeightKey::O(l) => layer(3, l),
            WeightKey::MlpNorm(l) => layer(4, l),
            WeightKey::GateUp(l) => layer(5, l),
            WeightKey::Down(l) => layer(6, l),
        }
    }

    /// `(rows, cols)` of the tensor; vectors have one row.
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        let h = c.hidden_size;
        match self {
            WeightKey::Embed | WeightKey::LmHead => (c.vocab_size, h),
            WeightKey::AttnNorm(_) | WeightKey::MlpNorm(_) | WeightKey::FinalNorm => (1, h),
            WeightKey::Qkv(_) => (c.qkv_dim(), h),
            WeightKey::QkvBias(_) => (1, c.qkv_dim()),
            WeightKey::O(_) => (h, c.q_dim()),
            WeightKey::GateUp(_) => (2 * c.intermediate_size, h),
            WeightKey::Down(_) => (h, c.intermediate_size),
        }
    }
}

/// Tensor data owned by a source.
#[derive(Debug, Clone, PartialEq)]
pub enum HostTensor {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    Random {
        seed: u64,
        stream: u64,
        mean: f32,
        std: f32,
    },
}

impl HostTensor {
    pub fn data(&self) -> HostData<'_> {
        match self {
            HostTensor::F32(v) => HostData::F32(v),
            HostTensor::Bf16(v) => HostData::Bf16(v),
            HostTensor::F16(v) => HostData::F16(v),
            &HostTensor::Random {
                seed,
                stream,
                mean,
                std,
            } => HostData::Random {
                seed,
                stream,
                mean,
                std,
            },
        }
    }

    /// The values as f32 (generating random ones), `n` of them.
    pub fn to_f32(&self, n: usize) -> Vec<f32> {
        self.data().to_f32(n)
    }

    /// Concatenates row blocks (for fusing q|k|v and gate|up); the result
    /// keeps a common dtype, f32 if the parts differ.
    pub fn concat(parts: Vec<HostTensor>) -> Result<HostTensor> {
        let all_bf16 = parts.iter().all(|p| matches!(p, HostTensor::Bf16(_)));
        let all_f16 = parts.iter().all(|p| matches!(p, HostTensor::F16(_)));
        if all_bf16 {
            return Ok(HostTensor::Bf16(
                parts
                    .into_iter()
                    .flat_map(|p| match p {
                        HostTensor::Bf16(v) => v,
                        _ => unreachable!(),
                    })
                    .collect(),
            ));
        }
        if all_f16 {
            return Ok(HostTensor::F16(
                parts
                    .into_iter()
                    .flat_map(|p| match p {
                        HostTensor::F16(v) => v,
                        _ => unreachable!(),
                    })
                    .collect(),
            ));
        }
        let mut out = Vec::new();
        for p in parts {
            if matches!(p, HostTensor::Random { .. }) {
                return Err(Error::BadModel("cannot fuse generated tensors".into()));
            }
            out.extend(p.to_f32(0));
        }
        Ok(HostTensor::F32(out))
    }
}

/// A provider of the model's tensors.
pub trait WeightSource {
    /// The tensor for `key`, with `key.shape(config)` elements.
    fn tensor(&self, key: WeightKey) -> Result<HostTensor>;
    /// A short description for logs (`random seed 0`, a path).
    fn describe(&self) -> String;
}

/// Seeded random weights, scaled so that activations stay of order one
/// through any depth and logits are far from flat (greedy decoding then has
/// clear margins, which tests of exact token equality need).
#[derive(Debug, Clone)]
pub struct RandomSource {
    pub config: ModelConfig,
    pub seed: u64,
}

impl WeightSource for RandomSource {
    fn tensor(&self, key: WeightKey) -> Result<HostTensor> {
        let c = &self.config;
        let h = c.hidden_size as f32;
        let (mean, std) = match key {
            WeightKey::Embed if c.tie_word_embeddings => (0.0, 3.0 / h.sqrt()),
            WeightKey::Embed => (0.0, 1.0),
            WeightKey::LmHead => (0.0, 3.0 / h.sqrt()),
            WeightKey::AttnNorm(_) | WeightKey::MlpNorm(_) | WeightKey::FinalNorm => (1.0, 0.1),
            WeightKey::QkvBias(_) => (0.0, 0.1),
            WeightKey::Qkv(_) | WeightKey::GateUp(_) => (0.0, 1.0 / h.sqrt()),
            WeightKey::O(_) => (0.0, 1.0 / (c.q_dim() as f32).sqrt()),
            WeightKey::Down(_) => (0.0, 1.0 / (c.intermediate_size as f32).sqrt()),
        };
        Ok(HostTensor::Random {
            seed: self.seed,
            stream: key.ordinal(),
            mean,
            std,
        })
    }

    fn describe(&self) -> String {
        format!("random weights, seed {}", self.seed)
    }
}

/// Every key the model needs, in load order.
pub fn keys(c: &ModelConfig) -> Vec<WeightKey> {
    let mut k = vec![WeightKey::Embed];
    for l in 0..c.num_layers {
        k.extend([
            WeightKey::AttnNorm(l),
            WeightKey::Qkv(l),
            WeightKey::O(l),
            WeightKey::MlpNorm(l),
            WeightKey::GateUp(l),
            WeightKey::Down(l),
        ]);
        if c.qkv_bias {
            k.push(WeightKey::QkvBias(l));
        }
    }
    k.push(WeightKey::FinalNorm);
    if !c.tie_word_embeddings {
        k.push(WeightKey::LmHead);
    }
    k
}
