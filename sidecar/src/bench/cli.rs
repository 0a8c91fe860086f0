//! The lab's subcommands (`bench-attention`, `bench-prefill`,
//! `capture-qk`, `bench-decode`, `bench-tactic`): hidden, built with the
//! `lab` feature only, flattened into `tacflowd`'s command line.

use anyhow::Context;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Paged decode attention in the Llama-3.1-8B shape against the copy
    /// bandwidth (the lab: built with `--features lab`); `--json` writes
    /// the numbers.
    #[command(hide = true)]
    BenchAttention {
        /// `batch:context` cases, comma-separated (kernels/ATTENTION.md's by
        /// default).
        #[arg(long, value_delimiter = ',')]
        cases: Vec<String>,
        /// The attention's shape, `HEADS/KV_HEADS/HEAD_DIM` (Llama-3.1-8B's
        /// by default; --variants and --timeline need that one).
        #[arg(long, default_value = "32/8/128")]
        shape: String,
        /// Time the alternative kernels and the first attention kernel too.
        #[arg(long)]
        variants: bool,
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long, default_value_t = 5)]
        seed: u64,
        /// Timed launches per kernel and case (0: about 0.15 s of them).
        #[arg(long, default_value_t = 0)]
        iters: usize,
        /// Only the kernels whose name contains one of these (profiling).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Also time the daemon's kernel with each of these split counts
        /// forced (comma-separated; the plan's choice is always timed).
        #[arg(long, value_delimiter = ',')]
        splits: Vec<usize>,
        /// Print where the time of one launch of each case goes: a timeline
        /// of every CTA (the default kernel's timeline variant).
        #[arg(long)]
        timeline: bool,
        /// With --timeline: write each timeline (a line per CTA) as CSV here.
        #[arg(long)]
        timeline_csv: Option<PathBuf>,
        /// Each sequence's pages in allocation order (consecutive blocks)
        /// instead of a random order.
        #[arg(long)]
        pages_in_order: bool,
    },
    /// The attention of prefill steps on the decode kernel and on the
    /// tensor-core prefill kernel, in the same run (the lab).
    #[command(hide = true)]
    BenchPrefill {
        /// `SEQS:CHUNK:CONTEXT[:DECODES]` cases, comma-separated
        /// (bench/prefill.rs's by default).
        #[arg(long, value_delimiter = ',')]
        cases: Vec<String>,
        /// `HEADS/KV_HEADS/HEAD_DIM` (head size 64 or 128).
        #[arg(long, default_value = "32/8/128")]
        shape: String,
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long, default_value_t = 5)]
        seed: u64,
    },
    /// The daemon's own post-RoPE queries and keys of a model on a text
    /// (token ids), on the CPU backend, in the capture format
    /// `bench-tactic --keys` reads (the lab).
    #[command(hide = true)]
    CaptureQk {
        /// The model, as `serve --model` takes it.
        #[arg(long)]
        model: String,
        /// Token ids, whitespace-separated.
        #[arg(long)]
        tokens: PathBuf,
        /// The capture directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Decode queries kept at the end of the text.
        #[arg(long, default_value_t = 64)]
        steps: usize,
        #[arg(long, default_value_t = 512)]
        chunk: usize,
        /// Use at most this many tokens.
        #[arg(long)]
        limit: Option<usize>,
        /// Keep only these layers (comma-separated; all by default).
        #[arg(long, value_delimiter = ',')]
        layers: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        seed: u64,
    },
    /// Decode-step time of a random model, host wall and GPU-only (the
    /// lab).
    #[command(hide = true)]
    BenchDecode {
        #[arg(long, default_value = "random:llama-3-8b")]
        model: String,
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64, 128])]
        batches: Vec<usize>,
        #[arg(long, default_value_t = 2048)]
        context: usize,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long, default_value_t = 5)]
        seed: u64,
    },
    /// Tactic's device path (the CPU backend's stand-in, or the CUDA
    /// backend's experimental GPU Tactic) at batches of sequences over
    /// controlled or captured keys: time per layer against full attention,
    /// success and tokens read against the oracle (kernels/TACTIC.md; the
    /// lab).
    #[command(hide = true)]
    BenchTactic {
        /// `cpu` or `cuda` (the CUDA backend with the experimental GPU
        /// Tactic, as the daemon builds it; no GPU is an error).
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// `HEADS/KV_HEADS/HEAD_DIM` of controlled keys (SmolLM2's by
        /// default; Llama-3-8B's is 32/8/128).
        #[arg(long, default_value = "9/3/64")]
        shape: String,
        #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 4096])]
        contexts: Vec<usize>,
        /// Sequences decoded together, each its own keys.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64])]
        batches: Vec<usize>,
        /// Controlled keys: the oracle's fraction of the tokens at P = 0.9
        /// each sequence's keys are calibrated to.
        #[arg(long, value_delimiter = ',', default_values_t = [0.02f64, 0.05, 0.10])]
        oracle_fraction: Vec<f64>,
        /// Decode steps per point (the first clusters).
        #[arg(long, default_value_t = 16)]
        steps: usize,
        /// Tactic's P (a list).
        #[arg(long, value_delimiter = ',', default_values_t = [0.9f32])]
        p: Vec<f32>,
        #[arg(long, default_value_t = 5)]
        seed: u64,
        /// Real keys: a capture directory (`bench/tactic/dump_qk.py`'s
        /// k_post.npy, q.npy, meta.json) instead of controlled keys.
        #[arg(long)]
        keys: Option<PathBuf>,
        /// On a GPU, the sequences of each batch whose quality the CPU
        /// reference measures (the CPU backend measures all).
        #[arg(long, default_value_t = 1)]
        quality_seqs: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// Runs a lab subcommand (logging already set up).
pub fn run(cmd: LabCommand) -> anyhow::Result<()> {
    match cmd {
        LabCommand::BenchAttention {
            cases,
            shape,
            variants,
            json,
            seed,
            iters,
            only,
            splits,
            timeline,
            timeline_csv,
            pages_in_order,
        } => {
            let cases = if cases.is_empty() {
                crate::bench::attention::CASES.to_vec()
            } else {
                cases
                    .iter()
                    .map(|c| {
                        let (b, t) = c.split_once(':').context("a case is BATCH:CONTEXT")?;
                        Ok((b.parse()?, t.parse()?))
                    })
                    .collect::<anyhow::Result<_>>()?
            };
            let opts = crate::bench::attention::Options {
                shape: parse_bench_shape(&shape)?,
                cases,
                variants,
                json,
                seed,
                iters,
                only,
                splits,
                timeline,
                timeline_csv,
                pages_in_order,
            };
            Ok(crate::bench::attention::run(&opts)?)
        }
        LabCommand::BenchPrefill {
            cases,
            shape,
            json,
            seed,
        } => {
            let cases = if cases.is_empty() {
                crate::bench::prefill::CASES.to_vec()
            } else {
                cases
                    .iter()
                    .map(|c| parse_prefill_case(c))
                    .collect::<anyhow::Result<_>>()?
            };
            let opts = crate::bench::prefill::Options {
                shape: parse_bench_shape(&shape)?,
                cases,
                json,
                seed,
            };
            Ok(crate::bench::prefill::run(&opts)?)
        }
        LabCommand::CaptureQk {
            model,
            tokens,
            out,
            steps,
            chunk,
            limit,
            layers,
            seed,
        } => {
            let opts = crate::bench::tactic::capture::Options {
                model,
                tokens,
                out,
                steps,
                chunk,
                limit,
                layers,
                seed,
            };
            Ok(crate::bench::tactic::capture::run(&opts)?)
        }
        LabCommand::BenchDecode {
            model,
            batches,
            context,
            steps,
            json,
            seed,
        } => {
            let opts = crate::bench::decode::Options {
                model,
                batches,
                context,
                steps,
                json,
                seed,
            };
            Ok(crate::bench::decode::run(&opts)?)
        }
        LabCommand::BenchTactic {
            backend,
            shape,
            contexts,
            batches,
            oracle_fraction,
            steps,
            p,
            seed,
            keys,
            quality_seqs,
            json,
        } => {
            use crate::bench::tactic::BackendKind;
            let backend = match backend.as_str() {
                "cpu" => BackendKind::Cpu,
                "cuda" => BackendKind::Cuda,
                other => anyhow::bail!("--backend is cpu or cuda, not {other}"),
            };
            let dims = shape
                .split('/')
                .map(|x| x.trim().parse::<usize>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .ok()
                .filter(|d| d.len() == 3 && d[1] > 0 && d[0] % d[1] == 0)
                .context("--shape is HEADS/KV_HEADS/HEAD_DIM, e.g. 9/3/64")?;
            let opts = crate::bench::tactic::Options {
                backend,
                shape: (dims[0], dims[1], dims[2]),
                contexts,
                batches,
                fractions: oracle_fraction,
                ps: p,
                steps,
                seed,
                keys,
                quality_seqs,
                json,
            };
            Ok(crate::bench::tactic::run(&opts)?)
        }
    }
}

/// `HEADS/KV_HEADS/HEAD_DIM` of an attention benchmark.
fn parse_bench_shape(shape: &str) -> anyhow::Result<crate::bench::attention::BenchShape> {
    let dims = shape
        .split('/')
        .map(|x| x.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .ok()
        .filter(|d| d.len() == 3)
        .context("--shape is HEADS/KV_HEADS/HEAD_DIM, e.g. 32/8/128")?;
    Ok(crate::bench::attention::BenchShape {
        heads: dims[0],
        kv_heads: dims[1],
        head_dim: dims[2],
    })
}

/// `SEQS:CHUNK:CONTEXT[:DECODES]` of `bench-prefill`.
fn parse_prefill_case(c: &str) -> anyhow::Result<(usize, usize, usize, usize)> {
    let f = c
        .split(':')
        .map(|x| x.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .ok()
        .filter(|f| f.len() == 3 || f.len() == 4)
        .context("a case is SEQS:CHUNK:CONTEXT[:DECODES], e.g. 1:512:4096")?;
    Ok((f[0], f[1], f[2], f.get(3).copied().unwrap_or(0)))
}
