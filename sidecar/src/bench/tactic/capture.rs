//! `tacflowd capture-qk`: the daemon's own post-RoPE queries and keys of a
//! model on a text (token ids), in the capture format `bench-tactic --keys`
//! reads ([`super::real`]): the model runs on the CPU backend with bf16
//! weights, as the GPU holds them, the prompt prefilled in chunks; every
//! layer's attention op records its rows (`model::capture`).
//!
//! Written: `k_post.npy` `[layers, kv_heads, n, d]`, `q.npy` `[layers,
//! steps, heads, d]` (the queries at positions `n - steps .. n`: a query
//! depends only on its own token's pass, so a prefilled position's query is
//! the one a decode step there computes), and `meta.json` (`window_ends`
//! `[n]`, `steps`, the model and the source).

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, KvLayout, SeqMeta, StepMeta};
use crate::error::{Error, Result};
use crate::model::capture::QkCapture;
use crate::model::{Model, ModelSpec};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct Options {
    /// A model spec as `serve --model` takes it (a GGUF file, a folder,
    /// `random:...`).
    pub model: String,
    /// Token ids, whitespace-separated.
    pub tokens: PathBuf,
    pub out: PathBuf,
    /// Decode queries kept at the end.
    pub steps: usize,
    /// Prefill chunk.
    pub chunk: usize,
    /// Use at most this many tokens of the file.
    pub limit: Option<usize>,
    /// Keep only these layers (all when empty), to keep a capture small.
    pub layers: Vec<usize>,
    pub seed: u64,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("{}: {e}", path.display()))
}

fn read_tokens(path: &Path, limit: Option<usize>) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let mut ids = text
        .split_whitespace()
        .map(|w| {
            w.parse::<u32>()
                .map_err(|e| io_err(path, format!("{w}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(n) = limit {
        ids.truncate(n);
    }
    Ok(ids)
}

/// The step of prompt positions `a..b` of one sequence whose block table
/// is the identity (slot = position).
fn chunk_meta(ids: &[u32], a: usize, b: usize, blocks: usize) -> StepMeta {
    StepMeta {
        tokens: ids[a..b].to_vec(),
        positions: (a as u32..b as u32).collect(),
        slots: (a as u32..b as u32).collect(),
        seqs: vec![SeqMeta {
            q_start: 0,
            q_len: b - a,
            ctx_len: b,
            block_table: (0..blocks as u32).collect(),
        }],
        logit_rows: vec![],
    }
}

pub fn run(opts: &Options) -> Result<()> {
    let ids = read_tokens(&opts.tokens, opts.limit)?;
    let n = ids.len();
    if opts.steps == 0 || n <= opts.steps || opts.chunk == 0 {
        return Err(Error::Config(format!(
            "capture-qk: {n} tokens for {} decode queries in chunks of {}",
            opts.steps, opts.chunk
        )));
    }
    let (config, src) = ModelSpec::parse(&opts.model, opts.seed)?.open()?;
    if let Some(&l) = opts.layers.iter().find(|&&l| l >= config.num_layers) {
        return Err(Error::Config(format!(
            "capture-qk: layer {l} of a model of {}",
            config.num_layers
        )));
    }
    let b = CpuBackend {
        round_to_bf16: true,
        round_activations: false,
        device_tactic: None,
    };
    let t0 = Instant::now();
    let model = Model::load(&b, &config, src.as_ref(), |_, _| {})?;
    eprintln!(
        "capture-qk: {} loaded in {:.1} s; {n} tokens in chunks of {}",
        config.name,
        t0.elapsed().as_secs_f64(),
        opts.chunk
    );
    let blocks = n.div_ceil(16);
    let mut kv = b.kv_cache(&KvLayout {
        num_layers: config.num_layers,
        num_blocks: blocks,
        block_size: 16,
        num_kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
    })?;
    let (nh, kvh, d) = (config.num_heads, config.num_kv_heads, config.head_dim);
    *model.capture.borrow_mut() = Some(QkCapture::new(config.num_layers, nh, kvh, d));
    for a in (0..n).step_by(opts.chunk) {
        let e = (a + opts.chunk).min(n);
        model.forward(&b, &mut kv, &chunk_meta(&ids, a, e, blocks))?;
        eprintln!(
            "capture-qk: {e}/{n} tokens ({:.1} s)",
            t0.elapsed().as_secs_f64()
        );
    }
    let cap = model.capture.borrow_mut().take().unwrap_or_default();
    if cap.missed > 0 || !cap.complete_to(n) {
        return Err(Error::Backend(format!(
            "capture-qk: the pass recorded {} of its rows ({} attention ops without host rows)",
            if cap.complete_to(n) { "all" } else { "not all" },
            cap.missed
        )));
    }
    let layers: Vec<usize> = if opts.layers.is_empty() {
        (0..config.num_layers).collect()
    } else {
        opts.layers.clone()
    };
    write(opts, &cap, &layers, n, &config.name)?;
    eprintln!(
        "capture-qk: wrote {} ({} layers, {n} keys, {} queries) in {:.1} s",
        opts.out.display(),
        layers.len(),
        opts.steps,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The three files of the capture.
fn write(opts: &Options, cap: &QkCapture, layers: &[usize], n: usize, model: &str) -> Result<()> {
    let (nh, kvh, d) = (cap.heads, cap.kv_heads, cap.head_dim);
    std::fs::create_dir_all(&opts.out).map_err(|e| io_err(&opts.out, e))?;
    // k_post[l][h][t][:] from the per-position rows [h * d ..].
    let mut k = Vec::with_capacity(layers.len() * kvh * n * d);
    for &l in layers {
        for h in 0..kvh {
            for t in 0..n {
                k.extend_from_slice(&cap.k[l][t][h * d..(h + 1) * d]);
            }
        }
    }
    let mut q = Vec::with_capacity(layers.len() * opts.steps * nh * d);
    for &l in layers {
        for t in n - opts.steps..n {
            q.extend_from_slice(&cap.q[l][t]);
        }
    }
    write_npy(&opts.out.join("k_post.npy"), &[layers.len(), kvh, n, d], &k)?;
    write_npy(
        &opts.out.join("q.npy"),
        &[layers.len(), opts.steps, nh, d],
        &q,
    )?;
    let meta = serde_json::json!({
        "window_ends": [n],
        "steps": opts.steps,
        "model": model,
        "layers": layers,
        "source": "tacflowd capture-qk (CPU backend, bf16 weights)",
        "tokens": opts.tokens.display().to_string(),
    });
    let path = opts.out.join("meta.json");
    std::fs::write(&path, meta.to_string()).map_err(|e| io_err(&path, e))
}

/// A little-endian f32 `.npy` (format 1.0, C order).
fn write_npy(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|x| x.to_string()).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        dims.join(", ")
    );
    // Magic (6) + version (2) + length (2) + header + newline: a multiple of 64.
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| io_err(path, e))?);
    let mut put = |b: &[u8]| f.write_all(b).map_err(|e| io_err(path, e));
    put(b"\x93NUMPY\x01\x00")?;
    put(&(header.len() as u16).to_le_bytes())?;
    put(header.as_bytes())?;
    for x in data {
        put(&x.to_le_bytes())?;
    }
    f.flush().map_err(|e| io_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::tactic::real::Capture;

    /// The tiny model captured, then read back by bench-tactic's reader.
    #[test]
    fn a_capture_of_the_tiny_model_reads_back() {
        let dir = std::env::temp_dir().join(format!("tacflow-capture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tokens = dir.join("ids.txt");
        let ids: Vec<String> = (0..70).map(|i| ((i * 7) % 50).to_string()).collect();
        std::fs::write(&tokens, ids.join(" ")).unwrap();
        let opts = Options {
            model: "tiny".into(),
            tokens,
            out: dir.join("cap"),
            steps: 8,
            chunk: 32,
            limit: None,
            layers: vec![],
            seed: 3,
        };
        run(&opts).unwrap();
        let cap = Capture::open(&opts.out).unwrap();
        let (nh, kvh, d) = cap.shape();
        assert!(nh > 0 && kvh > 0 && nh % kvh == 0 && d > 0);
        let s = cap.sequence(1, 8).unwrap();
        assert_eq!(s.n, 70);
        assert_eq!(s.queries.len(), 8);
        assert_eq!(s.keys.len(), kvh);
        assert!(s.keys[0].iter().any(|&x| x != 0.0), "keys recorded");
        // Too few tokens for the queries asked.
        let short = Options {
            limit: Some(8),
            ..opts.clone()
        };
        assert!(run(&short).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
