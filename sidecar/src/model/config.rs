//! Model configurations: Hugging Face `config.json` parsing, the built-in
//! presets, and the refusal of anything the engine would run approximately.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Llama-3 style RoPE frequency scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: u32,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub name: String,
    /// `llama`, `mistral` or `qwen2` (all run the same decoder).
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2).
    pub qkv_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Rows of the fused q|k|v projection.
    pub fn qkv_dim(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Parameters of the weights (for memory estimates and benchmarks).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let per_layer = h * self.qkv_dim()
            + self.q_dim() * h
            + 3 * h * self.intermediate_size
            + 2 * h
            + if self.qkv_bias { self.qkv_dim() } else { 0 };
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * per_layer + h + head
    }

    /// Checks internal consistency; every loader calls it.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::UnsupportedModel(format!("{}: {m}", self.name)));
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "{} query heads cannot be grouped over {} KV heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) || self.head_dim > 256 {
            return bad(format!(
                "head_dim {} is not supported (even, at most 256)",
                self.head_dim
            ));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return bad("empty dimensions".into());
        }
        if self.vocab_size > u32::MAX as usize / 2 {
            return bad(format!("vocab_size {} is too large", self.vocab_size));
        }
        Ok(())
    }

    /// The built-in test model: small, but with everything real models need
    /// (GQA, tied embeddings, Llama-3 RoPE scaling whose three frequency bands
    /// are all populated at head_dim 16).
    pub fn tiny() -> ModelConfig {
        ModelConfig {
            name: "tiny".into(),
            architecture: "llama".into(),
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 160,
            num_layers: 3,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: Some(Llama3RopeScaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 256,
            }),
            max_position_embeddings: 4096,
            tie_word_embeddings: true,
            qkv_bias: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }

    /// Shapes of public models, for random-weight runs at real sizes.
    pub fn preset(name: &str) -> Option<ModelConfig> {
        let llama3 = |name: &str, scaling: Option<Llama3RopeScaling>, ctx: usize| ModelConfig {
            name: name.into(),
            architecture: "llama".into(),
            vocab_size: 128_256,
            hidden_size: 4096,
            intermediate_size: 14_336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: scaling,
            max_position_embeddings: ctx,
            tie_word_embeddings: false,
            qkv_bias: false,
            bos_token_id: Some(128_000),
            eos_token_ids: vec![128_001, 128_009],
        };
        match name {
            "tiny" => Some(ModelConfig::tiny()),
            "llama-3-8b" => Some(llama3("llama-3-8b", None, 8192)),
            "llama-3.1-8b" => Some(llama3(
                "llama-3.1-8b",
                Some(Llama3RopeScaling {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                }),
                131_072,
            )),
            "smollm2-135m" => Some(ModelConfig {
                name: "smollm2-135m".into(),
                architecture: "llama".into(),
                vocab_size: 49_152,
                hidden_size: 576,
                intermediate_size: 1536,
                num_layers: 30,
                num_heads: 9,
                num_kv_heads: 3,
                head_dim: 64,
                rms_norm_eps: 1e-5,
                rope_theta: 100_000.0,
                rope_scaling: None,
                max_position_embeddings: 8192,
                tie_word_embeddings: true,
                qkv_bias: false,
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
            }),
            _ => None,
        }
    }

    pub const PRESETS: [&'static str; 4] = ["tiny", "llama-3-8b", "llama-3.1-8b", "smollm2-135m"];

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::BadModel(format!("{}: {e}", path.display())))?;
        let name = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Self::from_hf_json(&json, &name)
    }

    /// Parses the fields of a Hugging Face config that the Llama family uses,
    /// refusing options whose semantics the engine does not implement.
    pub fn from_hf_json(j: &serde_json::Value, name: &str) -> Result<ModelConfig> {
        let unsupported = |m: String| Err(Error::UnsupportedModel(format!("{name}: {m}")));
        let arch = j["model_type"].as_str().unwrap_or("").to_owned();
        if !["llama", "mistral", "qwen2"].contains(&arch.as_str()) {
            return unsupported(format!(
                "model_type {arch:?} is not supported (llama, mistral, qwen2)"
            ));
        }
        let int = |k: &str| -> Result<usize> {
            j[k].as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| Error::BadModel(format!("{name}: config.json lacks integer {k}")))
        };
        let hidden = int("hidden_size")?;
        let heads = int("num_attention_heads")?;
        let kv_heads = j["num_key_value_heads"]
            .as_u64()
            .map(|v| v as usize)
            .unwrap_or(heads);
        let head_dim = j["head_dim"]
            .as_u64()
            .map(|v| v as usize)
            .unwrap_or(hidden / heads.max(1));
        if let Some(act) = j["hidden_act"].as_str()
            && act != "silu"
        {
            return unsupported(format!("hidden_act {act:?} (only silu)"));
        }
        if j["mlp_bias"].as_bool() == Some(true) {
            return unsupported("mlp_bias".into());
        }
        let attention_bias = j["attention_bias"].as_bool().unwrap_or(false);
        if arch == "llama" && attention_bias {
            return unsupported(
                "attention_bias on a llama model (o_proj bias is not implemented)".into(),
            );
        }
        let max_pos = int("max_position_embeddings")?;
        if let Some(w) = j["sliding_window"].as_u64()
            && (w as usize) < max_pos
            && j["use_sliding_window"].as_bool() != Some(false)
        {
            return unsupported(format!(
                "sliding_window {w} below the context length {max_pos} (windowed attention is not implemented)"
            ));
        }
        // transformers 5 writes `rope_parameters` (theta included); older
        // configs write `rope_scaling` and a top-level `rope_theta`.
        let rope_params = if j["rope_parameters"].is_object() {
            &j["rope_parameters"]
        } else {
            &j["rope_scaling"]
        };
        let rope_theta = rope_params["rope_theta"]
            .as_f64()
            .or_else(|| j["rope_theta"].as_f64())
            .unwrap_or(10_000.0) as f32;
        let rope_scaling = match rope_params {
            serde_json::Value::Null => None,
            rs => {
                let kind = rs["rope_type"]
                    .as_str()
                    .or_else(|| rs["type"].as_str())
                    .unwrap_or("default");
                if kind == "default" {
                    None
                } else if kind != "llama3" {
                    return unsupported(format!(
                        "rope_scaling type {kind:?} (only llama3 is implemented)"
                    ));
                } else {
                    let f = |k: &str| -> Result<f32> {
                        rs[k].as_f64().map(|v| v as f32).ok_or_else(|| {
                            Error::BadModel(format!("{name}: rope_scaling lacks {k}"))
                        })
                    };
                    Some(Llama3RopeScaling {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")?
                            as u32,
                    })
                }
            }
        };
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            match v {
                serde_json::Value::Number(n) => {
                    n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
                }
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_u64().map(|x| x as u32))
                    .collect(),
                _ => vec![],
            }
        };
        let cfg = ModelConfig {
            name: name.to_owned(),
            architecture: arch.clone(),
            vocab_size: int("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: int("intermediate_size")?,
            num_layers: int("num_hidden_layers")?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: j["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: max_pos,
            tie_word_embeddings: j["tie_word_embeddings"].as_bool().unwrap_or(false),
            qkv_bias: arch == "qwen2" || attention_bias,
            bos_token_id: j["bos_token_id"].as_u64().map(|v| v as u32),
            eos_token_ids: ids(&j["eos_token_id"]),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The Hugging Face `config.json` of this configuration (for exporting a
    /// model that transformers loads as `LlamaForCausalLM`).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut j = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
        });
        if let Some(b) = self.bos_token_id {
            j["bos_token_id"] = b.into();
        }
        if let Some(&e) = self.eos_token_ids.first() {
            j["eos_token_id"] = e.into();
        }
        if let Some(s) = self.rope_scaling {
            j["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        j
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate() {
        for p in ModelConfig::PRESETS {
            ModelConfig::preset(p).unwrap().validate().unwrap();
        }
        let l = ModelConfig::preset("llama-3-8b").unwrap();
        // 8.03 B parameters.
        assert!(
            (l.num_params() as f64 - 8.03e9).abs() < 0.01e9,
            "{}",
            l.num_params()
        );
    }

    #[test]
    fn hf_round_trip() {
        let t = ModelConfig::tiny();
        let back = ModelConfig::from_hf_json(&t.to_hf_json(), "tiny").unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn transformers_5_rope_parameters_are_read() {
        let mut j = ModelConfig::tiny().to_hf_json();
        let scaling = j["rope_scaling"].take();
        j.as_object_mut().unwrap().remove("rope_scaling");
        j.as_object_mut().unwrap().remove("rope_theta");
        let mut params = scaling;
        params["rope_theta"] = 12_345.0.into();
        j["rope_parameters"] = params;
        let c = ModelConfig::from_hf_json(&j, "tiny").unwrap();
        assert_eq!(c.rope_theta, 12_345.0);
        assert_eq!(c.rope_scaling, ModelConfig::tiny().rope_scaling);
        j["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 100000.0});
        let c = ModelConfig::from_hf_json(&j, "tiny").unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (100_000.0, None));
        j["rope_parameters"] =
            serde_json::json!({"rope_type": "dynamic", "rope_theta": 1.0, "factor": 2.0});
        assert!(ModelConfig::from_hf_json(&j, "tiny").is_err());
    }

    #[test]
    fn unsupported_options_are_refused() {
        let mut j = ModelConfig::tiny().to_hf_json();
        j["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let e = ModelConfig::from_hf_json(&j, "m").unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
        let mut j = ModelConfig::tiny().to_hf_json();
        j["model_type"] = "gpt2".into();
        assert!(ModelConfig::from_hf_json(&j, "m").is_err());
        let mut j = ModelConfig::tiny().to_hf_json();
        j["model_type"] = "mistral".into();
        j["sliding_window"] = 128.into();
        let e = ModelConfig::from_hf_json(&j, "m").unwrap_err().to_string();
        assert!(e.contains("sliding_window"), "{e}");
        let mut j = ModelConfig::tiny().to_hf_json();
        j["num_key_value_heads"] = 3.into();
        assert!(ModelConfig::from_hf_json(&j, "m").is_err());
    }
}
