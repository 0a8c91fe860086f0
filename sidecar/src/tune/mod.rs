//! `tacflowd tune`: profile the ops on the backend in use, write the cost
//! file, search a schedule for each representative step shape, and cache
//! the choice per (model, device, attention policy) where `serve
//! --overlap auto` finds it (docs/SCHEDULES.md).
//!
//! | piece | file |
//! | --- | --- |
//! | timing each op kind at row counts × shares (CPU threads) | [`profile`] |
//! | the same on the GPU: SM shares, CUDA events | [`gpu`] |
//! | the schedule the daemon runs at start (`--overlap`) | [`at_start`] |
//! | profile → cost file → search → schedule file | this file |

pub mod gpu;
pub mod profile;

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, SeqMeta, StepMeta};
use crate::config::{BackendKind, Config, Overlap};
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::model::config::ModelConfig;
use crate::schedule::program::Program;
use crate::schedule::search::{self, COST_FILE_VERSION, CostFile, CostModel, SearchSpace};
use crate::schedule::tuned::{SCHEDULE_FILE_VERSION, ScheduleFile, ScheduleKey, TunedStep};
use crate::schedule::{Plan, build};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tracing::info;

/// The only policy profiled so far: the attention op timed is full
/// attention.
pub const POLICY: &str = "full";

/// A representative step: `decodes` sequences decoding one token at
/// `context` cached tokens, and optionally one prefill chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub decodes: usize,
    pub prefill: usize,
}

impl std::str::FromStr for Shape {
    type Err = String;
    /// `8` (eight decodes) or `8+56` (eight decodes and a 56-row prefill).
    fn from_str(s: &str) -> std::result::Result<Shape, String> {
        let (d, p) = s.split_once('+').unwrap_or((s, "0"));
        let num = |x: &str| x.trim().parse::<usize>().map_err(|e| format!("{s}: {e}"));
        let shape = Shape {
            decodes: num(d)?,
            prefill: num(p)?,
        };
        if shape.decodes + shape.prefill == 0 {
            return Err(format!("{s}: a step needs at least one row"));
        }
        Ok(shape)
    }
}

impl Shape {
    /// The step's metadata (enough for the search: rows, sequences,
    /// logit rows).
    pub fn meta(&self, context: usize) -> StepMeta {
        let mut m = profile::decode_step(self.decodes, context);
        if self.prefill > 0 {
            let q_start = m.tokens.len();
            m.tokens
                .extend((0..self.prefill).map(|i| i as u32 % 11 + 3));
            m.positions.extend(0..self.prefill as u32);
            m.slots.extend(0..self.prefill as u32);
            m.seqs.push(SeqMeta {
                q_start,
                q_len: self.prefill,
                ctx_len: self.prefill,
                block_table: vec![],
            });
            m.logit_rows.push((q_start + self.prefill - 1) as u32);
        }
        m
    }

    pub fn describe(&self, context: usize) -> String {
        match self.prefill {
            0 => format!("{} decodes at {context}", self.decodes),
            p => format!("{} decodes at {context} + a {p}-row prefill", self.decodes),
        }
    }
}

/// What `tacflowd tune` is asked.
#[derive(Debug, Clone)]
pub struct Options {
    /// The daemon's configuration: model, backend, threads, fusions,
    /// schedule directory (the schedule must be tuned for what `serve`
    /// runs).
    pub config: Config,
    /// Row counts profiled.
    pub rows: Vec<usize>,
    /// Cached tokens of each decode sequence, when profiling attention and
    /// in the representative steps.
    pub context: usize,
    pub shapes: Vec<Shape>,
    /// The SM-share grid of the search.
    pub share_step: f64,
    /// The attention policy.
    pub policy: String,
    /// Where to write the cost file (by default beside the schedule).
    pub cost_file: Option<PathBuf>,
}

/// A hash of what a schedule depends on: the op shapes and the program.
pub fn fingerprint(c: &ModelConfig, p: &Program) -> String {
    let text = format!(
        "{}|{}|{}|{}|{}|{}|{}|{}|{:?}",
        c.hidden_size,
        c.intermediate_size,
        c.num_layers,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size,
        c.qkv_bias,
        p
    );
    // FNV-1a, 64 bits: stable across builds and platforms.
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{}-{h:016x}", c.name)
}

/// The key of a model on a backend.
pub fn key<B: Backend>(b: &B, c: &ModelConfig, p: &Program, policy: &str) -> ScheduleKey {
    let (kind, device) = b.describe();
    ScheduleKey {
        fingerprint: fingerprint(c, p),
        device: format!("{kind} ({device})"),
        policy: policy.to_string(),
    }
}

/// The schedule cache directory: `schedule_dir`, else
/// `$XDG_CACHE_HOME/tacflow`, else `~/.cache/tacflow`.
pub fn cache_dir(config: &Config) -> Result<PathBuf> {
    if let Some(d) = &config.schedule_dir {
        return Ok(d.clone());
    }
    let xdg = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty());
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"));
    xdg.map(PathBuf::from)
        .or(home)
        .map(|d| d.join("tacflow"))
        .ok_or_else(|| Error::Config("no schedule_dir, XDG_CACHE_HOME or HOME".into()))
}

/// The backend `tune` profiles on: the CPU, or the GPU when asked for
/// (`cuda`, refused without a usable one) or found (`auto`).
fn backend_for(config: &Config) -> Result<BackendKind> {
    let gpu = match config.backend {
        BackendKind::Cpu => return Ok(BackendKind::Cpu),
        BackendKind::Cuda => crate::backend::cuda::probe(),
        BackendKind::Auto => match crate::backend::cuda::probe() {
            Ok(dev) => Ok(dev),
            Err(_) => return Ok(BackendKind::Cpu),
        },
    };
    match gpu {
        Ok(_) => Ok(BackendKind::Cuda),
        Err(why) => Err(Error::Backend(format!(
            "tune: the CUDA backend needs a GPU, and there is none usable ({why}); profile on the CPU with --backend cpu"
        ))),
    }
}

/// Profiles, writes the cost file, searches and caches the schedule;
/// returns the schedule file's path.
pub fn run(opts: &Options, mut say: impl FnMut(&str)) -> Result<PathBuf> {
    if opts.policy != POLICY {
        return Err(Error::Config(format!(
            "tune: only the `{POLICY}` policy is profiled so far, not `{}`",
            opts.policy
        )));
    }
    match backend_for(&opts.config)? {
        BackendKind::Cuda => run_gpu(opts, &mut say),
        _ => {
            no_sm_share_on_cpu(&opts.config)?;
            run_cpu(opts, &mut say)
        }
    }
}

/// `sm_share` names GPU mechanisms; on the CPU it is refused, not ignored.
pub fn no_sm_share_on_cpu(config: &Config) -> Result<()> {
    if config.sm_share.is_empty() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "--sm-share {} holds GPU lanes to SM shares; the CPU backend has no SMs (its shares are threads): drop it, or run on the GPU",
        crate::config::SmShare::describe(&config.sm_share)
    )))
}

/// What the profile was taken on, for the cost file and the search.
struct Profiled {
    model: ModelConfig,
    program: Program,
    key: ScheduleKey,
    points: Vec<search::CostPoint>,
    /// The SM-share mechanisms the points were measured through (GPU).
    sm_share: Option<String>,
    /// How the backend runs lanes (the search's `serial`), and how many.
    serial: bool,
    lanes: usize,
}

fn run_cpu(opts: &Options, say: &mut impl FnMut(&str)) -> Result<PathBuf> {
    let config = opts.config.resolved(BackendKind::Cpu);
    let b = CpuBackend {
        round_to_bf16: config.cpu_round_bf16,
        round_activations: config.activations() == crate::config::GpuActivations::Bf16,
        device_tactic: None,
    };
    let (model, _) = ModelSpec::parse(&config.model, config.seed)?.open()?;
    let program = program_of(&model, &config);
    let key = key(&b, &model, &program, &opts.policy);
    say(&format!(
        "tune: {} on {}, policy {}",
        model.name, key.device, key.policy
    ));
    let shares = profile::CpuThreads::new()?;
    let grid = profile::Grid {
        rows: opts.rows.clone(),
        context: opts.context,
    };
    let t0 = Instant::now();
    let points = profile::profile(&b, &model, &grid, &shares, |l| say(l))?;
    say(&format!(
        "profiled {} points in {:.1} s",
        points.len(),
        t0.elapsed().as_secs_f64()
    ));
    // The CPU backend runs lanes one after another.
    let p = Profiled {
        model,
        program,
        key,
        points,
        sm_share: None,
        serial: true,
        lanes: crate::config::MAX_GPU_LANES,
    };
    finish(opts, &config, p, say)
}

fn run_gpu(opts: &Options, say: &mut impl FnMut(&str)) -> Result<PathBuf> {
    let config = opts.config.resolved(BackendKind::Cuda);
    crate::config::SmShare::check(&config.sm_share)?;
    if config.sm_share.is_empty() {
        return Err(Error::Config(
            "tune on the GPU profiles SM shares through a mechanism: give --sm-share grid,cublas (or grid, cublas, green)".into(),
        ));
    }
    // One lane is profiled; the GEMM inputs' dtype is what `serve` runs
    // with `gpu_lanes` lanes.
    let mut b =
        crate::backend::cuda::CudaBackend::new(0)?.with_activations(config.activations())?;
    let (model, _) = ModelSpec::parse(&config.model, config.seed)?.open()?;
    let program = program_of(&model, &config);
    let key = key(&b, &model, &program, &opts.policy);
    let mechs = crate::config::SmShare::describe(&config.sm_share);
    say(&format!(
        "tune: {} on {}, policy {}, SM shares through {mechs}, schedules of at most {} lanes",
        model.name, key.device, key.policy, config.gpu_lanes
    ));
    let grid = profile::Grid {
        rows: opts.rows.clone(),
        context: opts.context,
    };
    let t0 = Instant::now();
    let points = gpu::profile(&mut b, &model, &grid, &config.sm_share, |l| say(l))?;
    say(&format!(
        "profiled {} points in {:.1} s",
        points.len(),
        t0.elapsed().as_secs_f64()
    ));
    drop(b);
    let p = Profiled {
        model,
        program,
        key,
        points,
        sm_share: Some(mechs),
        serial: false,
        lanes: config.gpu_lanes,
    };
    finish(opts, &config, p, say)
}

pub fn program_of(model: &ModelConfig, config: &Config) -> Program {
    Program {
        layers: model.num_layers,
        qkv_bias: model.qkv_bias,
        fusions: crate::config::Fusion::program_fusions(config.fusion_list()),
    }
}

/// Writes the cost file, searches each shape, writes the schedule file.
fn finish(
    opts: &Options,
    config: &Config,
    p: Profiled,
    say: &mut impl FnMut(&str),
) -> Result<PathBuf> {
    let dir = cache_dir(config)?;
    let cost_path = opts
        .cost_file
        .clone()
        .unwrap_or_else(|| dir.join(p.key.file_name().replace("schedule-", "cost-")));
    let file = CostFile {
        version: COST_FILE_VERSION,
        model: p.model.name.clone(),
        gpu: p.key.device.clone(),
        sm_share: p.sm_share,
        points: p.points,
    };
    write_cost_file(&cost_path, &file)?;
    say(&format!("wrote the cost file {}", cost_path.display()));
    let costs = CostModel::load(&cost_path)?;
    let how = Lanes {
        serial: p.serial,
        most: p.lanes,
    };
    let steps = search_shapes(&p.program, &costs, opts, how, say)?;
    let schedule = ScheduleFile {
        version: SCHEDULE_FILE_VERSION,
        model: p.model.name.clone(),
        key: p.key,
        cost_file: cost_path.display().to_string(),
        steps,
    };
    let path = dir.join(schedule.key.file_name());
    schedule.save(&path)?;
    say(&format!("wrote the schedule {}", path.display()));
    Ok(path)
}

fn write_cost_file(path: &Path, file: &CostFile) -> Result<()> {
    let text = toml::to_string(file).map_err(|e| Error::Config(e.to_string()))?;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// The search's choice for each shape, ascending by rows.
/// How the backend runs a schedule's lanes.
#[derive(Debug, Clone, Copy)]
pub struct Lanes {
    /// One after another (the CPU backend), else side by side (a GPU).
    pub serial: bool,
    /// The most lanes a schedule may have (`gpu_lanes` on a GPU).
    pub most: usize,
}

pub fn search_shapes(
    program: &Program,
    costs: &CostModel,
    opts: &Options,
    lanes: Lanes,
    say: &mut impl FnMut(&str),
) -> Result<Vec<TunedStep>> {
    let mut shapes = opts.shapes.clone();
    shapes.sort_by_key(|s| s.decodes + s.prefill);
    shapes.dedup_by_key(|s| s.decodes + s.prefill);
    let mut out = vec![];
    for shape in shapes {
        let meta = shape.meta(opts.context);
        let mut space = SearchSpace::for_step(&meta);
        space.share_step = opts.share_step;
        space.serial = lanes.serial;
        space.lane_maps.retain(|m| m.lanes() <= lanes.most);
        let t = Instant::now();
        let found = search::search(program, &meta, costs, &space)
            .map_err(|e| Error::Config(format!("search: {e}")))?;
        let mut step = TunedStep::from_spec(shape.describe(opts.context), &meta, &found.spec);
        step.shares = found.shares.clone();
        step.predicted_us = found.predicted_us;
        step.sequential_us = found.sequential_us;
        say(&format!(
            "searched {} in {:.1} s: {}",
            step.shape,
            t.elapsed().as_secs_f64(),
            step.describe()
        ));
        out.push(step);
    }
    Ok(out)
}

/// The schedule file `config.overlap` names for `key`: none with `off`, or
/// with `auto` when none is cached; an error with `on` when none is.
pub fn tuned_path(config: &Config, key: &ScheduleKey) -> Result<Option<PathBuf>> {
    let cached = || -> Result<PathBuf> { Ok(cache_dir(config)?.join(key.file_name())) };
    match &config.overlap {
        Overlap::Off => Ok(None),
        Overlap::On => {
            let path = cached()?;
            if !path.exists() {
                return Err(Error::Config(format!(
                    "--overlap on: no tuned schedule for this model, device and policy at {}; run `tacflowd tune` with the same flags, or start with --overlap off or auto",
                    path.display()
                )));
            }
            Ok(Some(path))
        }
        Overlap::Auto => Ok(Some(cached()?).filter(|p| p.exists())),
        Overlap::File(p) => Ok(Some(p.clone())),
    }
}

/// The plan the daemon starts with, as `config.overlap` says, logged.
/// A named file that is missing, corrupt or made for another model,
/// device or policy is an error; `auto` without a cached file runs the
/// sequential pass and says so.
pub fn at_start<B: Backend>(
    config: &Config,
    b: &B,
    model: &ModelConfig,
    program: &Program,
) -> Result<Plan> {
    let key = key(b, model, program, POLICY);
    let Some(path) = tuned_path(config, &key)? else {
        match config.overlap {
            Overlap::Off => info!("schedule: sequential (overlap off)"),
            _ => {
                let looked = cache_dir(config)?.join(key.file_name());
                info!(looked = %looked.display(), "schedule: sequential (no tuned schedule for this model, device and policy; run `tacflowd tune`)");
            }
        }
        return Ok(Plan::Sequential);
    };
    let file = ScheduleFile::load(&path, &key)?;
    // Every entry must lay out on its own representative step.
    let tuned = crate::schedule::tuned::Tuned::new(file);
    for step in &tuned.file.steps {
        let lanes = step.lane_map().lanes();
        if lanes > b.lanes() {
            return Err(Error::Config(format!(
                "schedule file {}: {} needs {lanes} lanes, the backend runs {} (gpu_lanes)",
                path.display(),
                step.shape,
                b.lanes()
            )));
        }
        let meta = Shape {
            decodes: step.rows,
            prefill: 0,
        }
        .meta(16);
        let spec = step.spec_for(&meta);
        build::nano_batched(program, &meta, &spec)
            .map_err(|e| Error::Config(format!("schedule file {}: {e}", path.display())))?;
    }
    let schedule = tuned.file.describe();
    if tuned.file.steps.iter().all(|s| s.is_sequential()) {
        // Kept as the sequential plan, so that what only it runs (CUDA
        // graphs) still runs.
        info!(file = %path.display(), %schedule, "schedule: tuned (overlap on): the sequential pass at every step");
        return Ok(Plan::Sequential);
    }
    info!(file = %path.display(), %schedule, "schedule: tuned (overlap on)");
    Ok(Plan::Tuned(Arc::new(tuned)))
}
