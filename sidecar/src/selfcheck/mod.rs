//! `tacflowd selfcheck`: every GPU kernel and whole models against the CPU
//! reference (norm-wise, per dtype), a table printed last, a non-zero exit on any
//! failure, and a failure (never a pass) on a machine without a GPU.
//!
//! | piece | file |
//! | --- | --- |
//! | rows, tolerances, the table, norm-wise errors | [`report`] |
//! | random weights, GEMM, row-wise ops, KV cache | [`ops`] |
//! | paged attention | [`attention`] |
//! | sampling | [`sampling`] |
//! | whole models through the engine | [`model`], [`models`] |
//! | fused ops, CUDA graph replay, bf16 activations | [`fused`] |
//! | the tiny model's decode steps through the graph path | [`graphs`] |
//! | two lanes against one; every op over a row range | [`lanes`], [`ranges`] |
//! | two lanes held to SM shares by each mechanism | [`shares`] |
//! | Tactic's kernels, its selections over decode steps, a model on it | [`tactic`] |
//!
//! Each check group runs in a child process of its own (`--only NAME`), so
//! that a device fault, which poisons a CUDA context for good, fails that
//! group alone and the table still shows every other result.

pub mod attention;
pub mod fused;
pub mod graphs;
pub mod lanes;
pub mod model;
pub mod models;
pub mod ops;
pub mod ranges;
pub mod report;
pub mod sampling;
pub mod shares;
pub mod tactic;
mod tactic_baselines;
mod tactic_diag;

use crate::backend::cuda::CudaBackend;
use crate::backend::{SeqMeta, StepMeta};
use crate::error::{Error, Result};
use half::bf16;
use rayon::prelude::*;
use report::{Row, Status};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tacflow_kernels::rng::{bits, random_weight};

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Run this one group in this process (the parent passes it to children).
    pub only: Option<String>,
    /// SmolLM2's GGUF file; the real-model check is not run without it.
    pub smollm2: Option<PathBuf>,
    /// Token ids of real text (whitespace-separated) for the SmolLM2 check.
    pub tokens: Option<PathBuf>,
    /// Seed of every random input (fresh from the clock when absent).
    pub seed: Option<u64>,
    /// Run only these groups (all when empty).
    pub groups: Vec<String>,
    /// Every group's backend with prefill chunks on the tensor-core prefill
    /// kernel (`experimental_prefill_attention`): the model groups of head
    /// size 64 or 128 (`model-8b`, `smollm2`) then check it end to end; the
    /// `attention` group checks the kernel either way.
    pub prefill_kernel: bool,
}

/// Check groups, in order, with a time limit each.
pub const GROUPS: [(&str, u64); 15] = [
    ("random", 120),
    ("gemm", 120),
    ("rowwise", 120),
    ("kv", 60),
    ("attention", 300),
    ("sampling", 300),
    ("fused", 180),
    ("graphs", 180),
    ("model-tiny", 300),
    ("model-bf16", 300),
    ("lanes", 300),
    ("shares", 300),
    ("model-8b", 600),
    ("smollm2", 900),
    ("tactic", 900),
];

/// Shared state of a kernel check group: the backend and the random inputs.
pub struct Ctx {
    pub b: CudaBackend,
    pub seed: u64,
    next_stream: u64,
}

impl Ctx {
    pub fn new(b: CudaBackend, seed: u64) -> Ctx {
        Ctx {
            b,
            seed,
            next_stream: 1 << 40,
        }
    }

    fn stream(&mut self) -> u64 {
        self.next_stream += 1;
        self.next_stream
    }

    /// `n` fresh uniform values of mean `mean` and deviation `std`.
    pub fn rand(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        let (seed, s) = (self.seed, self.stream());
        (0..n as u64)
            .into_par_iter()
            .map(|i| random_weight(seed, s, i, mean, std))
            .collect()
    }

    /// `n` fresh integers below `below`.
    pub fn rand_u32(&mut self, n: usize, below: u32) -> Vec<u32> {
        let (seed, s) = (self.seed, self.stream());
        (0..n as u64)
            .map(|i| (bits(seed, s, i) % below as u64) as u32)
            .collect()
    }
}

/// Runs one case, turning an error into a failed row.
pub fn case(
    rows: &mut Vec<Row>,
    check: &str,
    name: impl Into<String>,
    f: impl FnOnce() -> Result<Row>,
) {
    let name = name.into();
    let t0 = Instant::now();
    let mut row = f().unwrap_or_else(|e| Row::fail(check, "", e.to_string()));
    row.check = check.into();
    row.case = name;
    eprintln!("  {:.2} s", t0.elapsed().as_secs_f64());
    rows.push(row);
}

pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.par_iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// A step of one sequence whose rows are its first `tokens.len()` slots.
pub fn one_seq_meta(tokens: &[u32]) -> StepMeta {
    let t = tokens.len();
    let n = t as u32;
    StepMeta {
        tokens: tokens.to_vec(),
        positions: (0..n).collect(),
        slots: (0..n).collect(),
        seqs: vec![SeqMeta {
            q_start: 0,
            q_len: t,
            ctx_len: t,
            block_table: (0..n.div_ceil(16)).collect(),
        }],
        logit_rows: vec![],
    }
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x7ac7)
}

/// Runs the self-check; `Ok(true)` when nothing failed.
pub fn run(opts: &Options) -> Result<bool> {
    match &opts.only {
        Some(group) => run_group(group, opts),
        None => run_all(opts),
    }
}

/// One group in this process: its rows go to stdout, tagged.
fn run_group(group: &str, opts: &Options) -> Result<bool> {
    let seed = opts.seed.unwrap_or_else(clock_seed);
    if !GROUPS.iter().any(|(g, _)| *g == group) {
        return Err(Error::Config(format!("no self-check group {group}")));
    }
    // The groups `lanes` and `shares` run nano-batches on two lanes.
    let lanes = if group == "lanes" || group == "shares" {
        2
    } else {
        1
    };
    let rows = match CudaBackend::with_lanes(0, lanes) {
        Err(e) => vec![Row::fail(group, "open the GPU", e.to_string())],
        Ok(b) => {
            let mut b = b.with_prefill_kernel(opts.prefill_kernel);
            b.gpu_mut().set_sync_launches(true);
            match load_lab(&mut b, group) {
                Ok(()) => dispatch(group, b, seed, opts),
                Err(e) => vec![Row::fail(group, "load the lab's kernels", e.to_string())],
            }
        }
    };
    for r in &rows {
        r.emit();
    }
    Ok(rows.iter().all(|r| r.status != Status::Fail))
}

/// A build with the `lab` feature checks the lab's attention kernels too.
#[cfg(feature = "lab")]
fn load_lab(b: &mut CudaBackend, group: &str) -> Result<()> {
    if group == "attention" {
        b.gpu_mut().load_lab()?;
    }
    Ok(())
}

#[cfg(not(feature = "lab"))]
fn load_lab(_: &mut CudaBackend, _: &str) -> Result<()> {
    Ok(())
}

fn dispatch(group: &str, b: CudaBackend, seed: u64, opts: &Options) -> Vec<Row> {
    match group {
        "model-tiny" => models::tiny(b, seed),
        "model-8b" => models::llama3_8b(b, seed),
        "model-bf16" => fused::model_bf16(b, seed),
        "graphs" => graphs::graphs(b, seed),
        "smollm2" => models::smollm2(b, opts),
        "tactic" => {
            let mut cx = Ctx::new(b, seed);
            let mut rows = tactic::tactic(&mut cx);
            rows.extend(tactic::model(cx.b, seed));
            rows
        }
        _ => {
            let mut cx = Ctx::new(b, seed);
            match group {
                "random" => ops::random(&mut cx),
                "gemm" => ops::gemm(&mut cx),
                "rowwise" => ops::rowwise(&mut cx),
                "kv" => ops::kv(&mut cx),
                "attention" => attention::attention(&mut cx),
                "fused" => fused::fused(&mut cx),
                "lanes" => lanes::lanes(&mut cx),
                "shares" => shares::shares(&mut cx),
                _ => sampling::sampling(&mut cx),
            }
        }
    }
}

/// Every group, each in a child process, then the table.
fn run_all(opts: &Options) -> Result<bool> {
    let seed = opts.seed.unwrap_or_else(clock_seed);
    eprintln!("selfcheck: seed {seed} (rerun with --seed {seed})");
    let mut rows = vec![];
    match crate::backend::cuda::probe() {
        Err(why) => rows.push(Row::fail(
            "gpu",
            "probe",
            format!("NO GPU, nothing was checked: {why}"),
        )),
        Ok(name) => {
            eprintln!("selfcheck: {name}");
            for (group, limit) in GROUPS {
                if !opts.groups.is_empty() && !opts.groups.iter().any(|g| g == group) {
                    continue;
                }
                if group == "smollm2" && opts.smollm2.is_none() {
                    rows.push(Row::not_run(
                        group,
                        "SmolLM2 top-1 agreement",
                        "NOT RUN: no --smollm2 PATH.gguf given",
                    ));
                    continue;
                }
                rows.extend(run_child(group, limit, seed, opts));
            }
        }
    }
    report::print_table(&rows);
    Ok(rows.iter().all(|r| r.status != Status::Fail))
}

/// Runs `group` in a child process with a time limit; its rows, or a
/// failed row saying how it ended.
fn run_child(group: &str, limit_s: u64, seed: u64, opts: &Options) -> Vec<Row> {
    eprintln!("\n== {group}");
    let t0 = Instant::now();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return vec![Row::fail(group, "start", e.to_string())],
    };
    let mut cmd = Command::new(exe);
    cmd.args(["selfcheck", "--only", group, "--seed", &seed.to_string()]);
    if let Some(p) = &opts.smollm2 {
        cmd.arg("--smollm2").arg(p);
    }
    if let Some(p) = &opts.tokens {
        cmd.arg("--tokens").arg(p);
    }
    if opts.prefill_kernel {
        cmd.arg("--experimental-prefill-attention");
    }
    let mut child = match cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn() {
        Ok(c) => c,
        Err(e) => return vec![Row::fail(group, "start", e.to_string())],
    };
    // Read stdout on a thread so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().expect("stdout was piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let deadline = t0 + Duration::from_secs(limit_s);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => break None,
        }
    };
    let mut rows = report::parse_rows(&reader.join().unwrap_or_default());
    eprintln!("== {group}: {:.1} s", t0.elapsed().as_secs_f64());
    match status {
        None => rows.push(Row::fail(
            group,
            "process",
            format!("killed after {limit_s} s"),
        )),
        Some(s) if s.code().is_none() => {
            rows.push(Row::fail(group, "process", format!("died: {s}")))
        }
        Some(_) if rows.is_empty() => rows.push(Row::fail(group, "process", "reported nothing")),
        Some(_) => {}
    }
    rows
}
