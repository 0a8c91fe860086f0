//! Llama models in GGUF files: the [`ModelConfig`] from the metadata and
//! llama.cpp's tensor names mapped onto [`WeightKey`]s.
//!
//! llama.cpp's converter reorders the rows of `attn_q` and `attn_k` for its
//! interleaved rotary embedding: within each head, the Hugging Face rows
//! `[x_0 .. x_{d/2}, y_0 .. y_{d/2}]` (rotate-half pairs `(x_i, y_i)`) are
//! stored as `[x_0, y_0, x_1, y_1, ...]`. The engine uses the Hugging Face
//! layout, so [`unpermute_heads`] undoes it, as transformers' GGUF loader does
//! (heads counted with `head_count` for q and `head_count_kv` for k).

use super::{GgufFile, Value};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::weights::{HostTensor, WeightKey, WeightSource};
use std::path::Path;

/// A llama GGUF file as a weight source.
#[derive(Debug)]
pub struct GgufSource {
    file: GgufFile,
    config: ModelConfig,
}

/// Tensors of one layer, by their llama.cpp names.
const LAYER_TENSORS: [&str; 9] = [
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

impl GgufSource {
    pub fn open(path: &Path) -> Result<GgufSource> {
        let file = GgufFile::open(path)?;
        let config = config_from_metadata(&file)?;
        check_tensor_names(&file, &config)?;
        Ok(GgufSource { file, config })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// One tensor as f32, checked to be `rows × cols` (stored as
    /// `dims = [cols, rows]`, or `[cols]` for a vector).
    fn named(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        let t = self.file.tensor_info(name).ok_or_else(|| {
            Error::BadModel(format!(
                "{}: missing tensor {name}",
                self.file.path.display()
            ))
        })?;
        let want: Vec<u64> = if rows == 1 {
            vec![cols as u64]
        } else {
            vec![cols as u64, rows as u64]
        };
        if t.dims != want {
            return Err(Error::BadModel(format!(
                "{}: {name} has dims {:?}, the config implies {want:?}",
                self.file.path.display(),
                t.dims
            )));
        }
        self.file.dequantize(name)
    }
}

fn layer_name(l: usize, leaf: &str) -> String {
    format!("blk.{l}.{leaf}.weight")
}

impl WeightSource for GgufSource {
    fn tensor(&self, key: WeightKey) -> Result<HostTensor> {
        let c = &self.config;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let data = match key {
            WeightKey::Embed => self.named("token_embd.weight", c.vocab_size, h)?,
            WeightKey::LmHead => self.named("output.weight", c.vocab_size, h)?,
            WeightKey::FinalNorm => self.named("output_norm.weight", 1, h)?,
            WeightKey::AttnNorm(l) => self.named(&layer_name(l, "attn_norm"), 1, h)?,
            WeightKey::MlpNorm(l) => self.named(&layer_name(l, "ffn_norm"), 1, h)?,
            WeightKey::Qkv(l) => {
                let q = self.named(&layer_name(l, "attn_q"), c.q_dim(), h)?;
                let k = self.named(&layer_name(l, "attn_k"), c.kv_dim(), h)?;
                let v = self.named(&layer_name(l, "attn_v"), c.kv_dim(), h)?;
                let mut out = unpermute_heads(&q, c.num_heads, h);
                out.extend(unpermute_heads(&k, c.num_kv_heads, h));
                out.extend(v);
                out
            }
            WeightKey::O(l) => self.named(&layer_name(l, "attn_output"), h, c.q_dim())?,
            WeightKey::GateUp(l) => {
                let mut out = self.named(&layer_name(l, "ffn_gate"), i, h)?;
                out.extend(self.named(&layer_name(l, "ffn_up"), i, h)?);
                out
            }
            WeightKey::Down(l) => self.named(&layer_name(l, "ffn_down"), h, i)?,
            WeightKey::QkvBias(_) => {
                return Err(Error::UnsupportedModel(
                    "llama GGUF files carry no q/k/v biases".into(),
                ));
            }
        };
        Ok(HostTensor::F32(data))
    }

    fn describe(&self) -> String {
        self.file.path.display().to_string()
    }
}

/// Undoes llama.cpp's rotary row order for `n_head` heads of a `[rows, cols]`
/// matrix: Hugging Face row `i·d/2 + j` of a head is stored row `2j + i`.
pub fn unpermute_heads(data: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    reorder_heads(data, n_head, cols, |half, i, j| (i * half + j, 2 * j + i))
}

/// The converter's order, from Hugging Face rows (for tests that write files).
pub fn permute_heads(data: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    reorder_heads(data, n_head, cols, |half, i, j| (2 * j + i, i * half + j))
}

/// Moves rows within each head: `map(d/2, i, j)` gives `(dst, src)` for
/// `i` in 0..2, `j` in 0..d/2.
fn reorder_heads(
    data: &[f32],
    n_head: usize,
    cols: usize,
    map: impl Fn(usize, usize, usize) -> (usize, usize),
) -> Vec<f32> {
    let per_head = data.len() / cols / n_head;
    let half = per_head / 2;
    let mut out = vec![0f32; data.len()];
    for head in 0..n_head {
        let base = head * per_head;
        for i in 0..2 {
            for j in 0..half {
                let (dst, src) = map(half, i, j);
                out[(base + dst) * cols..][..cols]
                    .copy_from_slice(&data[(base + src) * cols..][..cols]);
            }
        }
    }
    out
}

/// Reads a typed metadata value of the model.
struct Meta<'a> {
    file: &'a GgufFile,
}

impl Meta<'_> {
    fn bad(&self, m: String) -> Error {
        Error::BadModel(format!("{}: {m}", self.file.path.display()))
    }

    fn unsupported(&self, m: String) -> Error {
        Error::UnsupportedModel(format!("{}: {m}", self.file.path.display()))
    }

    /// An integer, or an array of equal integers (per-layer values, which
    /// llama.cpp allows; the engine needs them uniform).
    fn uint(&self, key: &str) -> Result<Option<usize>> {
        let v = match self.file.get(key) {
            None => return Ok(None),
            Some(Value::Array(a)) => {
                let vals: Option<Vec<u64>> = a.iter().map(Value::as_u64).collect();
                match vals.as_deref() {
                    Some([first, rest @ ..]) if rest.iter().all(|v| v == first) => Some(*first),
                    Some([_, ..]) => {
                        return Err(self.unsupported(format!("{key} differs between layers")));
                    }
                    _ => None,
                }
            }
            Some(v) => v.as_u64(),
        };
        v.map(|v| Some(v as usize))
            .ok_or_else(|| self.bad(format!("{key} is not an unsigned integer")))
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.uint(key)?
            .ok_or_else(|| self.bad(format!("metadata lacks {key}")))
    }

    fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(format!("{key} is not a number"))),
        }
    }

    fn string(&self, key: &str) -> Option<&str> {
        self.file.get(key).and_then(Value::as_str)
    }
}

/// The model's configuration, refusing what the engine would run only
/// approximately.
fn config_from_metadata(f: &GgufFile) -> Result<ModelConfig> {
    let m = Meta { file: f };
    let arch = m.string("general.architecture").unwrap_or("");
    if arch != "llama" {
        return Err(m.unsupported(format!(
            "general.architecture {arch:?} (only llama is supported)"
        )));
    }
    let key = |k: &str| format!("llama.{k}");
    if m.uint(&key("expert_count"))?.unwrap_or(0) > 0 {
        return Err(m.unsupported("mixture of experts (llama.expert_count)".into()));
    }
    let hidden = m.required(&key("embedding_length"))?;
    let heads = m.required(&key("attention.head_count"))?;
    let kv_heads = m.uint(&key("attention.head_count_kv"))?.unwrap_or(heads);
    let head_dim = match m.uint(&key("attention.key_length"))? {
        Some(k) => k,
        None => hidden / heads.max(1),
    };
    if let Some(v) = m.uint(&key("attention.value_length"))?
        && v != head_dim
    {
        return Err(m.unsupported(format!(
            "value_length {v} differs from key_length {head_dim}"
        )));
    }
    if let Some(r) = m.uint(&key("rope.dimension_count"))?
        && r != head_dim
    {
        return Err(m.unsupported(format!(
            "rope.dimension_count {r} below head_dim {head_dim} (partial rotary embeddings)"
        )));
    }
    check_rope_scaling(&m)?;
    let embed = f
        .tensor_info("token_embd.weight")
        .ok_or_else(|| m.bad("no token_embd.weight".into()))?;
    let vocab = match embed.dims[..] {
        [h, v] if h as usize == hidden => v as usize,
        _ => {
            return Err(m.bad(format!(
                "token_embd.weight has dims {:?}, expected [{hidden}, vocab]",
                embed.dims
            )));
        }
    };
    if let Some(v) = m.uint(&key("vocab_size"))?
        && v != vocab
    {
        return Err(m.bad(format!("llama.vocab_size {v} but {vocab} embedding rows")));
    }
    let token = |k: &str| m.uint(&format!("tokenizer.ggml.{k}_token_id"));
    let mut eos_token_ids: Vec<u32> = token("eos")?.into_iter().map(|t| t as u32).collect();
    if let Some(eot) = token("eot")?
        && !eos_token_ids.contains(&(eot as u32))
    {
        eos_token_ids.push(eot as u32);
    }
    let name = m
        .string("general.name")
        .map(str::to_owned)
        .unwrap_or_else(|| {
            f.path
                .file_stem()
                .map_or("model".into(), |s| s.to_string_lossy().into_owned())
        });
    let eps = m
        .float(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| m.bad("metadata lacks llama.attention.layer_norm_rms_epsilon".into()))?;
    let config = ModelConfig {
        name,
        architecture: "llama".into(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: m.required(&key("feed_forward_length"))?,
        num_layers: m.required(&key("block_count"))?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: eps as f32,
        rope_theta: m.float(&key("rope.freq_base"))?.unwrap_or(10_000.0) as f32,
        rope_scaling: None,
        max_position_embeddings: m.required(&key("context_length"))?,
        tie_word_embeddings: f.tensor_info("output.weight").is_none(),
        qkv_bias: false,
        bos_token_id: token("bos")?.map(|t| t as u32),
        eos_token_ids,
    };
    config.validate()?;
    Ok(config)
}

/// Plain RoPE only: llama.cpp's linear and YaRN scaling and Llama-3.1's
/// frequency factors (stored as a `rope_freqs.weight` tensor, not as
/// metadata) are not implemented for GGUF.
fn check_rope_scaling(m: &Meta<'_>) -> Result<()> {
    if let Some(kind) = m.string("llama.rope.scaling.type")
        && kind != "none"
    {
        return Err(m.unsupported(format!("llama.rope.scaling.type {kind:?} (only none)")));
    }
    for k in ["llama.rope.scaling.factor", "llama.rope.scale_linear"] {
        if let Some(v) = m.float(k)?
            && v != 0.0
            && v != 1.0
        {
            return Err(m.unsupported(format!("{k} {v} (RoPE scaling is not implemented)")));
        }
    }
    if m.file.tensor_info("rope_freqs.weight").is_some() {
        return Err(m.unsupported(
            "rope_freqs.weight (Llama-3.1 RoPE frequency factors) is not implemented for GGUF"
                .into(),
        ));
    }
    Ok(())
}

/// Every tensor in the file must be one the engine uses: a bias or an extra
/// projection that we ignored would silently change the model.
fn check_tensor_names(f: &GgufFile, c: &ModelConfig) -> Result<()> {
    for t in &f.tensors {
        let known = match t.name.as_str() {
            "token_embd.weight" | "output_norm.weight" | "output.weight" => true,
            n => n
                .strip_prefix("blk.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(l, leaf)| {
                    Some((l.parse::<usize>().ok()?, leaf.strip_suffix(".weight")?))
                })
                .is_some_and(|(l, leaf)| l < c.num_layers && LAYER_TENSORS.contains(&leaf)),
        };
        if !known {
            return Err(Error::UnsupportedModel(format!(
                "{}: tensor {} is not part of a plain llama decoder",
                f.path.display(),
                t.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::write::{Tensor, f32_tensor, gguf};
    use super::super::{GgmlType, Value};
    use super::*;
    use crate::model::weights::{RandomSource, keys};
    use half::f16;

    #[test]
    fn unpermute_matches_the_converter_by_hand() {
        // One head of dim 4, one column: stored [x0, y0, x1, y1].
        assert_eq!(unpermute_heads(&[0., 1., 2., 3.], 1, 1), [0., 2., 1., 3.]);
        // Two heads of dim 4, two columns: rows move, columns stay together.
        let stored: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let hf = unpermute_heads(&stored, 2, 2);
        let rows: Vec<f32> = hf.chunks(2).map(|r| r[0] / 2.0).collect();
        assert_eq!(rows, [0., 2., 1., 3., 4., 6., 5., 7.]);
        assert!(hf.chunks(2).all(|r| r[1] == r[0] + 1.0));
        // Head dim 6: [x0 y0 x1 y1 x2 y2] → [x0 x1 x2 y0 y1 y2].
        let hf = unpermute_heads(&[0., 1., 2., 3., 4., 5.], 1, 1);
        assert_eq!(hf, [0., 2., 4., 1., 3., 5.]);
        let back = permute_heads(&hf, 1, 1);
        assert_eq!(back, [0., 1., 2., 3., 4., 5.]);
    }

    /// A llama GGUF of `c` with the weights of `src`, written as llama.cpp's
    /// converter would (q/k rows permuted); the embedding in F16.
    fn write_model(c: &ModelConfig, src: &RandomSource, extra: Vec<Tensor>) -> Vec<u8> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let get = |k: WeightKey| {
            let (r, cols) = k.shape(c);
            src.tensor(k).unwrap().to_f32(r * cols)
        };
        let mat = |name: String, rows: usize, cols: usize, v: &[f32]| {
            f32_tensor(&name, vec![cols as u64, rows as u64], v)
        };
        let embed = get(WeightKey::Embed);
        let mut t = vec![Tensor {
            name: "token_embd.weight".into(),
            dims: vec![h as u64, c.vocab_size as u64],
            ty: GgmlType::F16,
            bytes: embed
                .iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect(),
        }];
        t.push(f32_tensor(
            "output_norm.weight",
            vec![h as u64],
            &get(WeightKey::FinalNorm),
        ));
        for l in 0..c.num_layers {
            let qkv = get(WeightKey::Qkv(l));
            let (q, rest) = qkv.split_at(c.q_dim() * h);
            let (k, v) = rest.split_at(c.kv_dim() * h);
            let gu = get(WeightKey::GateUp(l));
            let (gate, up) = gu.split_at(i * h);
            t.extend([
                f32_tensor(
                    &layer_name(l, "attn_norm"),
                    vec![h as u64],
                    &get(WeightKey::AttnNorm(l)),
                ),
                mat(
                    layer_name(l, "attn_q"),
                    c.q_dim(),
                    h,
                    &permute_heads(q, c.num_heads, h),
                ),
                mat(
                    layer_name(l, "attn_k"),
                    c.kv_dim(),
                    h,
                    &permute_heads(k, c.num_kv_heads, h),
                ),
                mat(layer_name(l, "attn_v"), c.kv_dim(), h, v),
                mat(
                    layer_name(l, "attn_output"),
                    h,
                    c.q_dim(),
                    &get(WeightKey::O(l)),
                ),
                f32_tensor(
                    &layer_name(l, "ffn_norm"),
                    vec![h as u64],
                    &get(WeightKey::MlpNorm(l)),
                ),
                mat(layer_name(l, "ffn_gate"), i, h, gate),
                mat(layer_name(l, "ffn_up"), i, h, up),
                mat(layer_name(l, "ffn_down"), h, i, &get(WeightKey::Down(l))),
            ]);
        }
        t.extend(extra);
        gguf(&metadata(c), &t, 32)
    }

    fn metadata(c: &ModelConfig) -> Vec<(&'static str, Value)> {
        let u = |v: usize| Value::U32(v as u32);
        vec![
            ("general.architecture", Value::String("llama".into())),
            ("general.name", Value::String(c.name.clone())),
            ("llama.context_length", u(c.max_position_embeddings)),
            ("llama.embedding_length", u(c.hidden_size)),
            ("llama.block_count", u(c.num_layers)),
            ("llama.feed_forward_length", u(c.intermediate_size)),
            ("llama.attention.head_count", u(c.num_heads)),
            ("llama.attention.head_count_kv", u(c.num_kv_heads)),
            ("llama.rope.freq_base", Value::F32(c.rope_theta)),
            ("llama.rope.dimension_count", u(c.head_dim)),
            (
                "llama.attention.layer_norm_rms_epsilon",
                Value::F32(c.rms_norm_eps),
            ),
            ("tokenizer.ggml.bos_token_id", u(1)),
            ("tokenizer.ggml.eos_token_id", u(2)),
            (
                "tokenizer.ggml.tokens",
                Value::Array(
                    (0..c.vocab_size)
                        .map(|i| Value::String(format!("t{i}")))
                        .collect(),
                ),
            ),
        ]
    }

    fn tiny() -> ModelConfig {
        let mut c = ModelConfig::tiny();
        c.rope_scaling = None;
        c.num_layers = 2;
        c
    }

    fn open(bytes: &[u8], name: &str) -> Result<GgufSource> {
        let p = std::env::temp_dir().join(format!("tacflow-{}-{name}.gguf", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        let r = GgufSource::open(&p);
        std::fs::remove_file(&p).unwrap();
        r
    }

    #[test]
    fn a_written_model_reads_back_in_the_hugging_face_layout() {
        let c = tiny();
        let src = RandomSource {
            config: c.clone(),
            seed: 5,
        };
        let g = open(&write_model(&c, &src, vec![]), "model").unwrap();
        let mut want = c.clone();
        want.eos_token_ids = vec![2];
        assert_eq!(g.config(), &want);
        for key in keys(&c) {
            let (r, cols) = key.shape(&c);
            let mut a = src.tensor(key).unwrap().to_f32(r * cols);
            if key == WeightKey::Embed {
                a.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32());
            }
            let b = g.tensor(key).unwrap().to_f32(r * cols);
            assert_eq!(a, b, "{key:?}");
        }
    }

    #[test]
    fn untied_head_and_per_layer_arrays() {
        let mut c = tiny();
        c.tie_word_embeddings = false;
        let src = RandomSource {
            config: c.clone(),
            seed: 6,
        };
        let (h, v) = (c.hidden_size, c.vocab_size);
        let head = f32_tensor(
            "output.weight",
            vec![h as u64, v as u64],
            &src.tensor(WeightKey::LmHead).unwrap().to_f32(h * v),
        );
        let mut bytes = write_model(&c, &src, vec![head]);
        let g = open(&bytes, "untied").unwrap();
        assert!(!g.config().tie_word_embeddings);
        let lm = g.tensor(WeightKey::LmHead).unwrap().to_f32(h * v);
        assert_eq!(lm, src.tensor(WeightKey::LmHead).unwrap().to_f32(h * v));
        // A per-layer head count that differs between layers is refused.
        let mut meta = metadata(&c);
        meta[6].1 = Value::Array(vec![Value::U32(4), Value::U32(2)]);
        bytes = gguf(&meta, &[], 32);
        let e = open(&bytes, "arrays").unwrap_err().to_string();
        assert!(e.contains("differs between layers"), "{e}");
    }

    #[test]
    fn model_spec_takes_gguf_paths() {
        use crate::model::ModelSpec;
        let spec = ModelSpec::parse("/models/m.GGUF", 0).unwrap();
        assert_eq!(spec, ModelSpec::Gguf("/models/m.GGUF".into()));
        let missing = ModelSpec::parse("/nonexistent/m.gguf", 0).unwrap();
        let e = missing.open().err().unwrap().to_string();
        assert!(e.contains("/nonexistent/m.gguf"), "{e}");
    }

    #[test]
    fn unsupported_models_are_refused() {
        let c = tiny();
        let src = RandomSource {
            config: c.clone(),
            seed: 7,
        };
        let good = write_model(&c, &src, vec![]);
        let refuse = |bytes: Vec<u8>, needle: &str| {
            let e = open(&bytes, needle.split(' ').next().unwrap()).unwrap_err();
            assert!(matches!(e, Error::UnsupportedModel(_)), "{e}");
            assert!(e.to_string().contains(needle), "{e}");
        };
        let bias = f32_tensor("blk.0.attn_q.bias", vec![64], &[0.0; 64]);
        refuse(write_model(&c, &src, vec![bias]), "blk.0.attn_q.bias");
        let freqs = f32_tensor("rope_freqs.weight", vec![8], &[1.0; 8]);
        refuse(write_model(&c, &src, vec![freqs]), "rope_freqs");
        let with = |k: &'static str, v: Value| {
            let mut m = metadata(&c);
            m.retain(|(key, _)| *key != k);
            m.push((k, v));
            gguf(&m, &[], 32)
        };
        refuse(
            with("general.architecture", Value::String("gpt2".into())),
            "gpt2",
        );
        refuse(
            with("llama.rope.scaling.type", Value::String("yarn".into())),
            "yarn",
        );
        refuse(
            with("llama.rope.dimension_count", Value::U32(8)),
            "partial rotary",
        );
        refuse(with("llama.expert_count", Value::U32(8)), "experts");
        // The good file opens.
        open(&good, "good").unwrap();
    }
}
