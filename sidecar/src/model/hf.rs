//! Hugging Face model folders: `config.json` plus `*.safetensors`, sharded
//! (`model.safetensors.index.json`) or not. Files are memory-mapped; tensors
//! are copied out once, fused into the engine's layout.

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::weights::{HostTensor, WeightKey, WeightSource, keys};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A mapped safetensors folder.
pub struct HfSource {
    dir: PathBuf,
    config: ModelConfig,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
    files: Vec<Mmap>,
}

impl std::fmt::Debug for HfSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfSource").field("dir", &self.dir).finish()
    }
}

fn map(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the model file is opened read-only; if another process
    // truncates it while mapped we may fault, as any reader of a file would.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

fn parse<'a>(m: &'a Mmap, path: &Path) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(m).map_err(|e| Error::BadModel(format!("{}: {e}", path.display())))
}

impl HfSource {
    pub fn open(dir: &Path) -> Result<HfSource> {
        let config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let j: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::BadModel(format!("{}: {e}", index_path.display())))?;
            let map = j["weight_map"].as_object().ok_or_else(|| {
                Error::BadModel(format!("{}: no weight_map", index_path.display()))
            })?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            files.sort();
            files.dedup();
            files
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(Error::BadModel(format!(
                    "{}: neither model.safetensors nor model.safetensors.index.json",
                    dir.display()
                )));
            }
            vec!["model.safetensors".into()]
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            let path = dir.join(name);
            let m = map(&path)?;
            for t in parse(&m, &path)?.names() {
                index.insert(t.to_string(), i);
            }
            files.push(m);
        }
        Ok(HfSource {
            dir: dir.to_owned(),
            config,
            index,
            files,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// One named tensor, checked against the expected element count.
    fn named(&self, name: &str, numel: usize) -> Result<HostTensor> {
        let &fi = self.index.get(name).ok_or_else(|| {
            Error::BadModel(format!("{}: missing tensor {name}", self.dir.display()))
        })?;
        let st = parse(&self.files[fi], &self.dir)?;
        let view = st
            .tensor(name)
            .map_err(|e| Error::BadModel(format!("{name}: {e}")))?;
        let n: usize = view.shape().iter().product();
        if n != numel {
            return Err(Error::BadModel(format!(
                "{name}: shape {:?} has {n} values, the config implies {numel}",
                view.shape()
            )));
        }
        let bytes = view.data();
        Ok(match view.dtype() {
            Dtype::F32 => HostTensor::F32(bytemuck::pod_collect_to_vec::<u8, f32>(bytes)),
            Dtype::BF16 => HostTensor::Bf16(bytemuck::pod_collect_to_vec::<u8, bf16>(bytes)),
            Dtype::F16 => HostTensor::F16(bytemuck::pod_collect_to_vec::<u8, f16>(bytes)),
            other => {
                return Err(Error::UnsupportedModel(format!(
                    "{name}: dtype {other:?} (f32, bf16, f16 are supported)"
                )));
            }
        })
    }
}

/// The Hugging Face names of a layer's tensors.
fn layer_name(l: usize, leaf: &str) -> String {
    format!("model.layers.{l}.{leaf}")
}

impl WeightSource for HfSource {
    fn tensor(&self, key: WeightKey) -> Result<HostTensor> {
        let c = &self.config;
        let h = c.hidden_size;
        match key {
            WeightKey::Embed => self.named("model.embed_tokens.weight", c.vocab_size * h),
            WeightKey::FinalNorm => self.named("model.norm.weight", h),
            WeightKey::LmHead => self.named("lm_head.weight", c.vocab_size * h),
            WeightKey::AttnNorm(l) => self.named(&layer_name(l, "input_layernorm.weight"), h),
            WeightKey::MlpNorm(l) => {
                self.named(&layer_name(l, "post_attention_layernorm.weight"), h)
            }
            WeightKey::Qkv(l) => HostTensor::concat(vec![
                self.named(&layer_name(l, "self_attn.q_proj.weight"), c.q_dim() * h)?,
                self.named(&layer_name(l, "self_attn.k_proj.weight"), c.kv_dim() * h)?,
                self.named(&layer_name(l, "self_attn.v_proj.weight"), c.kv_dim() * h)?,
            ]),
            WeightKey::QkvBias(l) => HostTensor::concat(vec![
                self.named(&layer_name(l, "self_attn.q_proj.bias"), c.q_dim())?,
                self.named(&layer_name(l, "self_attn.k_proj.bias"), c.kv_dim())?,
                self.named(&layer_name(l, "self_attn.v_proj.bias"), c.kv_dim())?,
            ]),
            WeightKey::O(l) => self.named(&layer_name(l, "self_attn.o_proj.weight"), h * c.q_dim()),
            WeightKey::GateUp(l) => {
                let i = c.intermediate_size;
                HostTensor::concat(vec![
                    self.named(&layer_name(l, "mlp.gate_proj.weight"), i * h)?,
                    self.named(&layer_name(l, "mlp.up_proj.weight"), i * h)?,
                ])
            }
            WeightKey::Down(l) => self.named(
                &layer_name(l, "mlp.down_proj.weight"),
                h * c.intermediate_size,
            ),
        }
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

/// Writes a model as a Hugging Face folder (`config.json` and one f32
/// `model.safetensors`) that transformers loads as `LlamaForCausalLM`: the
/// fused tensors are split back into their projections.
pub fn export(config: &ModelConfig, src: &dyn WeightSource, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let c = config;
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| {
        tensors.insert(name, (shape, data));
    };
    for key in keys(c) {
        let (rows, cols) = key.shape(c);
        let data = src.tensor(key)?.to_f32(rows * cols);
        let split = |data: &[f32], parts: &[usize]| -> Vec<Vec<f32>> {
            let mut out = Vec::new();
            let mut at = 0;
            for &r in parts {
                out.push(data[at * cols..(at + r) * cols].to_vec());
                at += r;
            }
            out
        };
        match key {
            WeightKey::Embed => put("model.embed_tokens.weight".into(), vec![rows, cols], data),
            WeightKey::FinalNorm => put("model.norm.weight".into(), vec![cols], data),
            WeightKey::LmHead => put("lm_head.weight".into(), vec![rows, cols], data),
            WeightKey::AttnNorm(l) => {
                put(layer_name(l, "input_layernorm.weight"), vec![cols], data)
            }
            WeightKey::MlpNorm(l) => put(
                layer_name(l, "post_attention_layernorm.weight"),
                vec![cols],
                data,
            ),
            WeightKey::O(l) => put(
                layer_name(l, "self_attn.o_proj.weight"),
                vec![rows, cols],
                data,
            ),
            WeightKey::Down(l) => put(
                layer_name(l, "mlp.down_proj.weight"),
                vec![rows, cols],
                data,
            ),
            WeightKey::Qkv(l) => {
                let (q, kv) = (c.q_dim(), c.kv_dim());
                let mut p = split(&data, &[q, kv, kv]).into_iter();
                for (name, r) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                    put(
                        layer_name(l, &format!("self_attn.{name}.weight")),
                        vec![r, cols],
                        p.next().unwrap(),
                    );
                }
            }
            WeightKey::QkvBias(l) => {
                let (q, kv) = (c.q_dim(), c.kv_dim());
                let parts = [
                    data[..q].to_vec(),
                    data[q..q + kv].to_vec(),
                    data[q + kv..].to_vec(),
                ];
                for (name, d) in ["q_proj", "k_proj", "v_proj"].iter().zip(parts) {
                    let n = d.len();
                    put(layer_name(l, &format!("self_attn.{name}.bias")), vec![n], d);
                }
            }
            WeightKey::GateUp(l) => {
                let i = c.intermediate_size;
                let mut p = split(&data, &[i, i]).into_iter();
                put(
                    layer_name(l, "mlp.gate_proj.weight"),
                    vec![i, cols],
                    p.next().unwrap(),
                );
                put(
                    layer_name(l, "mlp.up_proj.weight"),
                    vec![i, cols],
                    p.next().unwrap(),
                );
            }
        }
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, (s, d))| (n, s, bytemuck::cast_slice::<f32, u8>(&d).to_vec()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            let v = safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map_err(|e| Error::BadModel(format!("{n}: {e}")))?;
            Ok((n.clone(), v))
        })
        .collect::<Result<_>>()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let st_path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &st_path)
        .map_err(|e| Error::BadModel(format!("{}: {e}", st_path.display())))?;
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&c.to_hf_json()).expect("json");
    std::fs::write(&cfg_path, text).map_err(|e| Error::io(&cfg_path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::RandomSource;

    #[test]
    fn export_then_load_gives_the_same_tensors() {
        let dir = std::env::temp_dir().join(format!("tacflow-hf-{}", std::process::id()));
        let mut c = ModelConfig::tiny();
        c.num_layers = 2;
        let src = RandomSource {
            config: c.clone(),
            seed: 3,
        };
        export(&c, &src, &dir).unwrap();
        let hf = HfSource::open(&dir).unwrap();
        assert_eq!(hf.config().num_layers, 2);
        for key in keys(&c) {
            let (r, cols) = key.shape(&c);
            let a = src.tensor(key).unwrap().to_f32(r * cols);
            let b = hf.tensor(key).unwrap().to_f32(r * cols);
            assert_eq!(a, b, "{key:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
