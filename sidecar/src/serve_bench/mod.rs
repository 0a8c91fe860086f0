//! `tacflowd bench-serve`: offline throughput of a synthetic workload on
//! the daemon's own engine: `requests` prompts of `input_len` random tokens
//! each generating `output_len` tokens (EOS ignored), all arriving at once
//! or as a Poisson process of `rate` requests/s, batched by [`sched`]
//! within the engine's KV capacity, each step cut as `--overlap` says.
//!
//! It reports tokens/s (input + output), time per phase, time to first
//! token and inter-token latency percentiles, as a table and as JSON. The
//! JSON also holds a timeline of one step's lanes: on the CPU each node's
//! start and end as the cost model predicts them, the lanes one after
//! another as the CPU backend runs them; on the GPU as CUDA events
//! measured them ([`gpu`], which adds the GEMM rate and the fraction of
//! the compute-bound optimum); `bench/serve/timeline.py` draws it as a
//! PNG.
//!
//! A product subcommand, not one of the lab's (`bench`, the `lab`
//! feature): it runs nothing but the engine the daemon ships, and the
//! end-to-end tests run it from the product binary that `./scripts/test`
//! builds.
//!
//! | piece | file |
//! | --- | --- |
//! | the batching loop: admission, chunked prefill mixed with decode | [`sched`] |
//! | workload, report, predicted timeline | this file |
//! | the GPU: GEMM rate, optimum, timeline measured by events | [`gpu`] |

pub mod gpu;
pub mod sched;

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::config::{BackendKind, Config};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::schedule::Plan;
use crate::schedule::program::Program;
use crate::schedule::search::{self, CostModel, OpKind};
use crate::tune::{self, Shape};
use sched::{Outcome, Request, StepStat};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct Options {
    /// The daemon's configuration (model, backend, threads, KV blocks,
    /// overlap, schedule directory).
    pub config: Config,
    pub input_len: usize,
    pub output_len: usize,
    pub requests: usize,
    /// Requests per second (Poisson arrivals); all at once when absent.
    pub rate: Option<f64>,
    /// Tokens per step (decodes first, then prompt chunks).
    pub step_tokens: usize,
    pub seed: u64,
    pub json: Option<PathBuf>,
    /// The cost file the timeline is predicted from (by default the one
    /// `tune` wrote for this model and device).
    pub cost_file: Option<PathBuf>,
}

/// The synthetic requests: random prompts, seeded arrivals.
pub fn workload(o: &Options, vocab: usize) -> Vec<Request> {
    let mut rng = crate::schedule::build::Rng::new(o.seed);
    let mut t = 0.0;
    (0..o.requests)
        .map(|_| {
            if let Some(rate) = o.rate {
                // Exponential gaps: -ln(U) / rate, U uniform in (0, 1].
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                t += -(1.0 - u).ln() / rate;
            }
            let prompt = (0..o.input_len)
                .map(|_| 3 + rng.below(vocab - 3) as u32)
                .collect();
            Request {
                arrival: t,
                prompt,
                output_len: o.output_len,
            }
        })
        .collect()
}

/// Runs the benchmark and returns its report (also printed, and written
/// as JSON when asked): on the CPU, or on the GPU when asked for (`cuda`,
/// refused without a usable one) or found (`auto`).
pub fn run(o: &Options) -> Result<Value> {
    if o.output_len == 0 || o.input_len == 0 || o.requests == 0 || o.step_tokens == 0 {
        return Err(Error::Config(
            "bench-serve: input, output, requests and step tokens must be at least 1".into(),
        ));
    }
    let gpu = match o.config.backend {
        BackendKind::Cpu => None,
        BackendKind::Cuda => Some(crate::backend::cuda::probe().map_err(|why| {
            Error::Backend(format!(
                "bench-serve: the CUDA backend needs a GPU, and there is none usable ({why}); run on the CPU with --backend cpu"
            ))
        })?),
        BackendKind::Auto => crate::backend::cuda::probe().ok(),
    };
    let report = match gpu {
        Some(_) => gpu::run(o)?,
        None => run_cpu(o)?,
    };
    print_table(&report);
    if let Some(path) = &o.json {
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| Error::Backend(e.to_string()))?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))?;
    }
    Ok(report)
}

fn run_cpu(o: &Options) -> Result<Value> {
    tune::no_sm_share_on_cpu(&o.config)?;
    let config = o.config.resolved(BackendKind::Cpu);
    let b = CpuBackend {
        round_to_bf16: config.cpu_round_bf16,
        round_activations: config.activations() == crate::config::GpuActivations::Bf16,
        device_tactic: None,
    };
    let (model, src) = ModelSpec::parse(&config.model, config.seed)?.open()?;
    let capacity = crate::server::kv_capacity(&b, &config, &model);
    let mut engine = Engine::new(b, &model, src.as_ref(), capacity, None, |_, _| {})?;
    let mut ran = bench(o, &config, &mut engine, &model)?;
    ran.report["optimum"] = json!({
        "gemm_params": gemm_params(&model),
        "fraction": null,
        "why": "the optimum is the GEMM rate / (2 x GEMM parameters); the GEMM rate is measured on the GPU only",
    });
    let program = engine.model_program();
    // The CPU backend runs the lanes one after another.
    let t = timeline(o, &config, engine.backend(), &model, &program, &ran, true)?;
    ran.report["timeline"] = t;
    Ok(ran.report)
}

/// What a run of the workload left: its report so far, its steps, the
/// plan that ran them.
pub(crate) struct Ran {
    pub report: Value,
    pub steps: Vec<StepStat>,
    pub plan: Plan,
}

/// The workload on `engine` under the plan `config.overlap` names: the
/// report's throughput, phases, latencies and what ran it.
pub(crate) fn bench<B: Backend>(
    o: &Options,
    config: &Config,
    engine: &mut Engine<B>,
    model: &crate::model::config::ModelConfig,
) -> Result<Ran> {
    engine.set_fusions(crate::config::Fusion::program_fusions(config.fusion_list()));
    let program = engine.model_program();
    let plan = tune::at_start(config, engine.backend(), model, &program)?;
    engine.set_plan(plan.clone());
    let reqs = workload(o, model.vocab_size);
    let t0 = Instant::now();
    let (outcomes, steps) = sched::drive(engine, &reqs, o.step_tokens)?;
    let wall = t0.elapsed().as_secs_f64();
    let mut report = summary(o, &outcomes, &steps, wall);
    report["model"] = json!(model.name);
    report["device"] = json!(tune::key(engine.backend(), model, &program, tune::POLICY).device);
    report["overlap"] = json!(String::from(config.overlap.clone()));
    report["sm_share"] = json!(crate::config::SmShare::describe(&config.sm_share));
    report["kv_blocks"] = json!(engine.kv_total_blocks());
    Ok(Ran {
        report,
        steps,
        plan,
    })
}

/// The shape of the largest step that ran.
pub(crate) fn largest(steps: &[StepStat]) -> Shape {
    let big = steps.iter().max_by_key(|s| s.prefill_rows + s.decode_rows);
    let big = big.expect("at least one step ran");
    Shape {
        decodes: big.decode_rows,
        prefill: big.prefill_rows,
    }
}

/// Parameters in GEMMs: every linear layer and the LM head.
pub(crate) fn gemm_params(c: &crate::model::config::ModelConfig) -> usize {
    let per_layer = c.qkv_dim() * c.hidden_size
        + c.hidden_size * c.q_dim()
        + 3 * c.intermediate_size * c.hidden_size;
    c.num_layers * per_layer + c.vocab_size * c.hidden_size
}

/// Median, 90th and 99th percentile (NaN when empty).
fn percentiles(mut v: Vec<f64>) -> Value {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| match v.len() {
        0 => Value::Null,
        n => json!(v[((n - 1) as f64 * q).round() as usize] * 1e3),
    };
    json!({"p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "count": v.len()})
}

/// Throughput, phases and latencies.
fn summary(o: &Options, outs: &[Outcome], steps: &[StepStat], wall: f64) -> Value {
    let input: usize = o.input_len * o.requests;
    let output: usize = outs.iter().map(|x| x.token_times.len()).sum();
    let (mut prefill_s, mut decode_s) = (0.0, 0.0);
    let (mut mixed, mut prefill_only, mut decode_only) = (0, 0, 0);
    for s in steps {
        let rows = (s.prefill_rows + s.decode_rows) as f64;
        prefill_s += s.secs * s.prefill_rows as f64 / rows;
        decode_s += s.secs * s.decode_rows as f64 / rows;
        match (s.prefill_rows > 0, s.decode_rows > 0) {
            (true, true) => mixed += 1,
            (true, false) => prefill_only += 1,
            _ => decode_only += 1,
        }
    }
    let ttft = outs.iter().map(|x| x.token_times[0] - x.arrival).collect();
    let itl = outs
        .iter()
        .flat_map(|x| x.token_times.windows(2).map(|w| w[1] - w[0]))
        .collect();
    json!({
        "requests": o.requests, "input_len": o.input_len, "output_len": o.output_len,
        "rate": o.rate, "step_tokens": o.step_tokens,
        "input_tokens": input, "output_tokens": output, "wall_s": wall,
        "tokens_per_s": (input + output) as f64 / wall,
        "output_tokens_per_s": output as f64 / wall,
        "steps": steps.len(),
        "peak_running": steps.iter().map(|s| s.running).max().unwrap_or(0),
        "phases": {
            "prefill_s": prefill_s, "decode_s": decode_s,
            "split": "a mixed step's time is shared by its prefill and decode rows",
            "mixed_steps": mixed, "prefill_only_steps": prefill_only,
            "decode_only_steps": decode_only,
        },
        "ttft": percentiles(ttft),
        "itl": percentiles(itl),
    })
}

/// The predicted timeline of the largest step that ran, under the plan
/// that ran it; `{"missing": why}` without a cost file. `serial`: the
/// backend runs the lanes one after another (the CPU).
pub(crate) fn timeline<B: Backend>(
    o: &Options,
    config: &Config,
    b: &B,
    model: &crate::model::config::ModelConfig,
    program: &Program,
    ran: &Ran,
    serial: bool,
) -> Result<Value> {
    let key = tune::key(b, model, program, tune::POLICY);
    let path = match &o.cost_file {
        Some(p) => p.clone(),
        None => {
            let name = key.file_name().replace("schedule-", "cost-");
            tune::cache_dir(config)?.join(name)
        }
    };
    if !path.exists() {
        let why = format!("no cost file at {} (run `tacflowd tune`)", path.display());
        return Ok(json!({"missing": why}));
    }
    let costs = CostModel::load(&path)?;
    let shape = largest(&ran.steps);
    let meta = shape.meta(o.input_len);
    let plan = &ran.plan;
    let (schedule, order_) = plan
        .lay_out(program, &meta)
        .map_err(|e| Error::Config(e.to_string()))?;
    let shares = match plan {
        Plan::Tuned(t) => t.file.entry(meta.tokens.len()).shares.clone(),
        _ => vec![1.0; schedule.lanes.len()],
    };
    let spans = search::spans(&schedule, &order_, &costs, &shares, serial);
    let nodes: Vec<Value> = schedule
        .nodes
        .iter()
        .zip(&spans)
        .map(|(n, (s, e))| node_json(n, *s, *e))
        .collect();
    let makespan = spans.iter().map(|s| s.1).fold(0.0, f64::max);
    let source = match serial {
        true => "predicted by the cost model, lanes run one after another as on the CPU",
        false => "predicted by the cost model, lanes side by side",
    };
    Ok(json!({
        "step": shape.describe(o.input_len), "lanes": schedule.lanes.len(), "shares": shares,
        "predicted_us": makespan, "cost_file": path.display().to_string(),
        "source": source, "nodes": nodes,
    }))
}

/// A node of a timeline: its lane, op, rows, start and end.
pub(crate) fn node_json(n: &crate::schedule::Node, start_us: f64, end_us: f64) -> Value {
    json!({"lane": n.lane, "op": format!("{:?}", n.op), "kind": format!("{:?}", OpKind::of(n.op)),
           "rows": [n.rows.start, n.rows.end], "start_us": start_us, "end_us": end_us})
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.2}"));
    println!(
        "bench-serve: {} requests of {}+{} tokens on {} ({}), overlap {}",
        r["requests"], r["input_len"], r["output_len"], r["model"], r["device"], r["overlap"]
    );
    println!(
        "tokens/s (input+output) {}   wall {} s   steps {}",
        f(&r["tokens_per_s"]),
        f(&r["wall_s"]),
        r["steps"]
    );
    println!(
        "phases: prefill {} s, decode {} s",
        f(&r["phases"]["prefill_s"]),
        f(&r["phases"]["decode_s"])
    );
    let opt = &r["optimum"];
    if opt["fraction"].is_number() {
        println!(
            "optimum: GEMM {} TFLOP/s -> {} tokens/s; reached {}",
            f(&opt["gemm_tflops"]),
            f(&opt["tokens_per_s"]),
            f(&opt["fraction"])
        );
    }
    if let Some(us) = r["timeline"]["measured_us"].as_f64() {
        println!(
            "largest step measured {us:.1} us on {} lane(s), predicted {}",
            r["timeline"]["lanes"],
            f(&r["timeline"]["predicted_us"])
        );
    }
    for k in ["ttft", "itl"] {
        let p = &r[k];
        println!(
            "{k:>4} ms: p50 {}  p90 {}  p99 {}",
            f(&p["p50_ms"]),
            f(&p["p90_ms"]),
            f(&p["p99_ms"])
        );
    }
}
