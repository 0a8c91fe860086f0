//! The models the self-check runs whole: `tiny`, a Llama-3-8B-shaped model
//! cut to two layers (random weights generated on the GPU, regenerated on
//! the CPU), and SmolLM2 from its GGUF file on real text.

use super::model::{Scenario, compare};
use super::report::Row;
use crate::backend::cuda::CudaBackend;
use crate::model::ModelSpec;
use crate::model::config::ModelConfig;
use crate::model::weights::RandomSource;
use tacflow_kernels::rng::bits;

fn tokens(seed: u64, stream: u64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| (bits(seed, stream, i) % vocab as u64) as u32)
        .collect()
}

/// Prompts of `lens`, chunks of `chunks`, `steps` decode tokens for every
/// sequence and the fork of the first.
pub(super) fn random_scenario(
    seed: u64,
    vocab: usize,
    lens: &[usize],
    chunks: &[usize],
    steps: usize,
) -> Scenario {
    let mut s = 1000;
    let mut next = |n| {
        s += 1;
        tokens(seed, s, n, vocab)
    };
    Scenario {
        prompts: lens.iter().map(|&l| next(l)).collect(),
        chunks: chunks.to_vec(),
        decode: (0..=lens.len()).map(|_| next(steps)).collect(),
        fork: true,
        // Random weights leave many near-ties (tiny showed 3 in 357 below
        // 1e-2): the criterion for random models is the logits' error; this
        // is a sanity floor.
        min_agreement: 0.95,
        policy: tacflow_ipc::AttentionPolicy::Full,
        diagnostics: false,
    }
}

pub fn tiny(b: CudaBackend, seed: u64) -> Vec<Row> {
    let config = ModelConfig::tiny();
    let src = RandomSource {
        config: config.clone(),
        seed,
    };
    let sc = random_scenario(seed, config.vocab_size, &[77, 20, 5], &[37, 20, 3], 64);
    compare("model-tiny", b, &config, &src, &sc, 512)
}

/// Llama-3-8B's shapes with two layers: every GEMM, head count and the
/// vocabulary are the real ones.
pub fn llama3_8b(b: CudaBackend, seed: u64) -> Vec<Row> {
    let Some(mut config) = ModelConfig::preset("llama-3-8b") else {
        return vec![Row::fail("model-8b", "config", "no llama-3-8b preset")];
    };
    config.num_layers = 2;
    config.name = "llama-3-8b (2 layers)".into();
    let src = RandomSource {
        config: config.clone(),
        seed,
    };
    let sc = random_scenario(seed, config.vocab_size, &[129, 40], &[64, 40], 64);
    compare("model-8b", b, &config, &src, &sc, 128)
}

/// SmolLM2 on real text: one sequence prefilled in chunks of 512, then 64
/// teacher-forced decode steps; top-1 agreement at least 99.5%.
pub fn smollm2(b: CudaBackend, opts: &super::Options) -> Vec<Row> {
    let check = "smollm2";
    let (Some(path), Some(tok_path)) = (&opts.smollm2, &opts.tokens) else {
        return vec![Row::not_run(
            check,
            "SmolLM2 top-1 agreement",
            "NOT RUN: needs --smollm2 PATH.gguf and --tokens FILE",
        )];
    };
    let ids: Vec<u32> = match std::fs::read_to_string(tok_path) {
        Ok(t) => t
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect(),
        Err(e) => {
            return vec![Row::fail(
                check,
                "tokens",
                format!("{}: {e}", tok_path.display()),
            )];
        }
    };
    if ids.len() < 2048 + 64 {
        return vec![Row::fail(
            check,
            "tokens",
            format!("{} tokens, at least 2112 needed", ids.len()),
        )];
    }
    let spec = match ModelSpec::parse(&path.to_string_lossy(), 0).and_then(|s| s.open()) {
        Ok(s) => s,
        Err(e) => {
            return vec![Row::not_run(
                check,
                "load",
                format!("NOT RUN: cannot load {}: {e}", path.display()),
            )];
        }
    };
    let (config, src) = spec;
    let prompt = (ids.len() - 64).min(2560);
    let sc = Scenario {
        prompts: vec![ids[..prompt].to_vec()],
        chunks: vec![512],
        decode: vec![ids[prompt..prompt + 64].to_vec()],
        fork: false,
        min_agreement: 0.995,
        policy: tacflow_ipc::AttentionPolicy::Full,
        diagnostics: false,
    };
    let blocks = (prompt + 64).div_ceil(16) + 8;
    compare(check, b, &config, src.as_ref(), &sc, blocks)
}
