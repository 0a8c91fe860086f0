//! `tacflowd`'s command line: parse it, set up logging, run the
//! subcommand. The binaries (`main.rs`, and `bin/tacflowd-faults.rs` in
//! test builds) only call [`main`].

use crate::config::{BackendKind, Config, Fusion, GpuActivations, LogFormat, Overlap};
use crate::{Shutdown, run};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "tacflowd", version, about = "tacflow GPU inference daemon")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

// Parsed once at start-up: the size of the serve flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Serve clients (the default).
    Serve(ServeArgs),
    /// Write a model as a Hugging Face folder (config.json + f32
    /// model.safetensors), e.g. the built-in `tiny` for transformers.
    ExportModel {
        /// Model to export (`tiny`, `random:<preset>`, a folder).
        #[arg(long, default_value = "tiny")]
        model: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Folder to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check every GPU kernel and whole models against the CPU reference:
    /// prints a table last, exits non-zero on any failure or without a GPU.
    Selfcheck {
        /// Run one check group in this process (normally each group runs in
        /// a child process of its own).
        #[arg(long)]
        only: Option<String>,
        /// SmolLM2's GGUF file, for the real-model check.
        #[arg(long)]
        smollm2: Option<PathBuf>,
        /// Token ids of real text (whitespace-separated) for the SmolLM2 check.
        #[arg(long)]
        tokens: Option<PathBuf>,
        /// Seed of the random inputs (from the clock when absent).
        #[arg(long)]
        seed: Option<u64>,
        /// Run only these check groups (comma-separated; all by default).
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Prefill chunks on the tensor-core prefill kernel in every group
        /// (the model groups of head size 64 or 128 check it end to end).
        #[arg(long)]
        experimental_prefill_attention: bool,
    },
    /// The lab's benchmarks and captures (hidden; `--features lab`).
    #[cfg(feature = "lab")]
    #[command(flatten)]
    Lab(crate::bench::cli::LabCommand),
    /// Profile each op at several row counts and device shares, write the
    /// cost file, search a schedule for representative steps and cache it
    /// for this model, device and policy (`serve --overlap on|auto` loads
    /// it). Takes the serve flags, so that it tunes what `serve` runs.
    Tune {
        #[command(flatten)]
        serve: ServeArgs,
        /// Row counts to profile each op at.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16, 64])]
        rows: Vec<usize>,
        /// Cached tokens per decode sequence (attention's profile and the
        /// representative steps).
        #[arg(long, default_value_t = 256)]
        context: usize,
        /// Representative steps: `N` decodes, or `N+P` decodes and a
        /// P-row prefill chunk.
        #[arg(long, value_delimiter = ',', default_values = ["1", "8", "8+56"])]
        shapes: Vec<crate::tune::Shape>,
        /// Grid of the search's device shares.
        #[arg(long, default_value_t = 0.25)]
        share_step: f64,
        /// The attention policy to tune for (only `full` so far).
        #[arg(long, default_value = "full")]
        policy: String,
        /// Where to write the cost file (default: the schedule directory).
        #[arg(long)]
        cost_file: Option<PathBuf>,
    },
    /// Offline throughput of a synthetic workload on the daemon's engine:
    /// tokens/s, time per phase, TTFT and inter-token latency, a timeline
    /// of one step's lanes in the JSON (`bench/serve/timeline.py` draws
    /// it). Takes the serve flags (`--overlap on|off`, `--kv-blocks`...).
    BenchServe {
        #[command(flatten)]
        serve: ServeArgs,
        #[arg(long, default_value_t = 128)]
        input_len: usize,
        #[arg(long, default_value_t = 32)]
        output_len: usize,
        #[arg(long, default_value_t = 32)]
        requests: usize,
        /// Requests per second, arriving as a Poisson process (all at
        /// once when absent).
        #[arg(long)]
        rate: Option<f64>,
        /// Tokens per step: decodes first, then prompt chunks.
        #[arg(long, default_value_t = 256)]
        step_tokens: usize,
        /// Seed of the prompts and arrivals.
        #[arg(long, default_value_t = 0)]
        workload_seed: u64,
        #[arg(long)]
        json: Option<PathBuf>,
        /// The cost file the timeline is predicted from (default: the one
        /// `tune` wrote for this model and device).
        #[arg(long)]
        cost_file: Option<PathBuf>,
    },
    /// Write every tensor of a GGUF file, decoded to f32 under its GGUF name,
    /// to one safetensors file (checks the reader against other readers).
    #[command(hide = true)]
    DumpWeights {
        /// The `.gguf` file.
        #[arg(long)]
        model: PathBuf,
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Flags override the config file, which overrides the defaults.
#[derive(Args, Debug, Default, Clone)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "TACFLOW_CONFIG")]
    config: Option<PathBuf>,
    /// Unix socket path to bind.
    #[arg(long, env = "TACFLOW_SOCKET")]
    socket: Option<PathBuf>,
    /// Also listen on TCP (host:port). Unauthenticated.
    #[arg(long, env = "TACFLOW_TCP")]
    tcp: Option<String>,
    /// Group allowed to use the socket (mode 0660).
    #[arg(long, env = "TACFLOW_SOCKET_GROUP")]
    socket_group: Option<String>,
    /// `tiny`, `random:<preset|config.json>`, a Hugging Face model folder,
    /// or a `.gguf` file.
    #[arg(long, env = "TACFLOW_MODEL")]
    model: Option<String>,
    /// Seed of random weights.
    #[arg(long, env = "TACFLOW_SEED")]
    seed: Option<u64>,
    #[arg(long, env = "TACFLOW_BACKEND", value_enum)]
    backend: Option<BackendKind>,
    /// KV cache size in blocks of 16 tokens.
    #[arg(long, env = "TACFLOW_KV_BLOCKS")]
    kv_blocks: Option<usize>,
    /// Fraction of free GPU memory for the KV cache.
    #[arg(long, env = "TACFLOW_KV_MEMORY_FRACTION")]
    kv_memory_fraction: Option<f64>,
    /// CUDA lanes (streams with their own cuBLAS handle and workspaces)
    /// that nano-batches of a step run on side by side; 1 = one stream.
    #[arg(long, env = "TACFLOW_GPU_LANES")]
    gpu_lanes: Option<usize>,
    /// Longest sequence accepted.
    #[arg(long, env = "TACFLOW_MAX_CONTEXT")]
    max_context: Option<usize>,
    /// Session lease in milliseconds.
    #[arg(long, env = "TACFLOW_SESSION_LEASE_MS")]
    session_lease_ms: Option<u64>,
    /// Requests waiting for the executor before `busy`.
    #[arg(long, env = "TACFLOW_MAX_QUEUE")]
    max_queue: Option<usize>,
    /// CPU backend threads.
    #[arg(long, env = "TACFLOW_THREADS")]
    threads: Option<usize>,
    /// Round weights to bf16 on the CPU backend.
    #[arg(long, env = "TACFLOW_CPU_ROUND_BF16")]
    cpu_round_bf16: bool,
    /// GEMM inputs on the GPU: `bf16` (activations written in bf16; the
    /// CUDA default with one lane; on the CPU backend, GEMM inputs rounded
    /// to bf16) or `split` (f32 as two bf16 halves).
    #[arg(long, env = "TACFLOW_GPU_ACTIVATIONS", value_enum)]
    gpu_activations: Option<GpuActivations>,
    /// Fused ops to run (comma-separated): the forward pass runs each named
    /// pair of ops as one kernel. By default add-rmsnorm and rope-kv-append
    /// on the CUDA backend, none on the CPU.
    #[arg(long, env = "TACFLOW_FUSE", value_enum, value_delimiter = ',')]
    fuse: Vec<Fusion>,
    /// Run no fused op.
    #[arg(long, conflicts_with = "fuse")]
    no_fuse: bool,
    /// Replay pure decode steps (one token per sequence, at most 64) as
    /// CUDA graphs per batch-size bucket; one KV block goes to padding.
    #[arg(long, env = "TACFLOW_CUDA_GRAPHS")]
    cuda_graphs: bool,
    /// Run every step eagerly, without CUDA graphs.
    #[arg(long, conflicts_with = "cuda_graphs")]
    no_cuda_graphs: bool,
    /// Serve the sparse policies (tactic, fixed_budget, oracle_top_p) on
    /// the CUDA backend (kernels not yet verified on a GPU; without it the
    /// CUDA backend refuses them).
    #[arg(long, env = "TACFLOW_EXPERIMENTAL_GPU_TACTIC")]
    experimental_gpu_tactic: bool,
    /// Run prefill chunks through the tensor-core prefill attention kernel
    /// on the CUDA backend (not yet verified on a GPU).
    #[arg(long, env = "TACFLOW_EXPERIMENTAL_PREFILL_ATTENTION")]
    experimental_prefill_attention: bool,
    /// `journal` under systemd: no timestamps, no colours, syslog
    /// priorities.
    #[arg(long, env = "TACFLOW_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Allow --tcp to bind an address other than loopback (unauthenticated!).
    #[arg(long, env = "TACFLOW_TCP_ALLOW_REMOTE")]
    tcp_allow_remote: bool,
    /// Prometheus endpoint (`GET /metrics`) on this address or port, off
    /// when absent; loopback only unless --metrics-allow-remote.
    #[arg(long, env = "TACFLOW_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// Allow --metrics-addr to bind an address other than loopback.
    #[arg(long, env = "TACFLOW_METRICS_ALLOW_REMOTE")]
    metrics_allow_remote: bool,
    /// How long shutdown waits for the step in flight (milliseconds).
    #[arg(long, env = "TACFLOW_SHUTDOWN_TIMEOUT_MS")]
    shutdown_timeout_ms: Option<u64>,
    /// After a fatal fault, how long the daemon keeps answering requests
    /// with the fault before it exits non-zero (milliseconds).
    #[arg(long, env = "TACFLOW_FATAL_LINGER_MS")]
    fatal_linger_ms: Option<u64>,
    /// `health` reports the executor wedged after this long on one command
    /// (milliseconds).
    #[arg(long, env = "TACFLOW_WEDGED_AFTER_MS")]
    wedged_after_ms: Option<u64>,
    /// Memory the weights and KV cache may take, e.g. `8GiB`; a model that
    /// does not fit is refused before loading (default: what the host or its
    /// cgroup has available; on a GPU, its free memory).
    #[arg(long, env = "TACFLOW_MEMORY_LIMIT")]
    memory_limit: Option<String>,
    /// Load no model: serve attention-only sequences (attention_step) of
    /// any layout the client declares.
    #[arg(long, env = "TACFLOW_ATTENTION_ONLY")]
    attention_only: bool,
    /// The attention pool's budget in MiB (K and V of attention-only
    /// sequences, apart from the model's KV cache).
    #[arg(long, env = "TACFLOW_ATTENTION_POOL_MB")]
    attention_pool_mb: Option<usize>,
    /// Which schedule steps run: `off` (the sequential pass; the default),
    /// `on` (the schedule `tacflowd tune` cached for this model, device
    /// and policy), `auto` (that one if cached, else sequential), or a
    /// schedule file.
    #[arg(long, env = "TACFLOW_OVERLAP")]
    overlap: Option<Overlap>,
    /// Where `tune` caches schedules (default `$XDG_CACHE_HOME/tacflow`).
    #[arg(long, env = "TACFLOW_SCHEDULE_DIR")]
    schedule_dir: Option<PathBuf>,
    /// How the GPU holds a lane to its SM share (comma-separated): `grid`
    /// (our attention's CTA slots), `cublas` (cuBLAS's SM-count target),
    /// or `green` alone (a green context per lane).
    #[arg(long, env = "TACFLOW_SM_SHARE", value_enum, value_delimiter = ',')]
    sm_share: Vec<crate::config::SmShare>,
    /// Per-session limit: open sequences.
    #[arg(long, env = "TACFLOW_MAX_SEQUENCES")]
    max_sequences: Option<u64>,
    /// Per-session limit: registered regions.
    #[arg(long, env = "TACFLOW_MAX_REGIONS")]
    max_regions: Option<u64>,
    /// Per-session limit: bytes of client memory mapped.
    #[arg(long, env = "TACFLOW_MAX_MAPPED_BYTES")]
    max_mapped_bytes: Option<u64>,
    /// Per-session limit: requests waiting for the executor before `busy`.
    #[arg(long, env = "TACFLOW_MAX_QUEUED_REQUESTS")]
    max_queued_requests: Option<u64>,
    /// Per-session limit: new tokens in one step.
    #[arg(long, env = "TACFLOW_MAX_STEP_TOKENS")]
    max_step_tokens: Option<u64>,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_toml_file(p)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        macro_rules! set_opt {
            ($($f:ident),*) => { $( if self.$f.is_some() { c.$f = self.$f; } )* };
        }
        set!(
            model,
            seed,
            backend,
            kv_memory_fraction,
            gpu_lanes,
            session_lease_ms,
            max_queue,
            log_format,
            shutdown_timeout_ms,
            fatal_linger_ms,
            wedged_after_ms,
            attention_pool_mb,
            overlap
        );
        set_opt!(
            gpu_activations,
            socket,
            tcp,
            socket_group,
            kv_blocks,
            max_context,
            threads,
            metrics_addr,
            memory_limit,
            schedule_dir
        );
        if self.cpu_round_bf16 {
            c.cpu_round_bf16 = true;
        }
        if !self.sm_share.is_empty() {
            c.sm_share = self.sm_share.clone();
        }
        if self.no_fuse {
            c.fusions = Some(Vec::new());
        } else if !self.fuse.is_empty() {
            c.fusions = Some(self.fuse.clone());
        }
        if self.cuda_graphs {
            c.cuda_graphs = Some(true);
        } else if self.no_cuda_graphs {
            c.cuda_graphs = Some(false);
        }
        c.experimental_gpu_tactic |= self.experimental_gpu_tactic;
        c.experimental_prefill_attention |= self.experimental_prefill_attention;
        c.attention_only |= self.attention_only;
        c.tcp_allow_remote |= self.tcp_allow_remote;
        c.metrics_allow_remote |= self.metrics_allow_remote;
        let l = &mut c.limits;
        macro_rules! limit {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { l.$f = v; } )* };
        }
        limit!(
            max_sequences,
            max_regions,
            max_mapped_bytes,
            max_queued_requests,
            max_step_tokens
        );
        c.validate()?;
        Ok(c)
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TACFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Journal => {
            let plain = tracing_subscriber::fmt::format()
                .without_time()
                .with_ansi(false)
                .with_level(false);
            b.with_ansi(false)
                .event_format(crate::server::systemd::JournalFormat(plain))
                .init()
        }
        LogFormat::Json => b.json().init(),
    }
}

/// SIGINT and SIGTERM trigger `shutdown`, on a small tokio runtime of its own.
fn watch_signals(shutdown: Shutdown) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    tracing::error!("cannot install signal handlers");
                    return;
                };
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM"),
                    _ = int.recv() => tracing::info!("SIGINT"),
                }
                shutdown.trigger();
            })
        })?;
    Ok(())
}

/// Parses the command line and runs what it asks for.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::ExportModel { model, seed, out }) => {
            init_logging(LogFormat::Text);
            let spec = crate::model::ModelSpec::parse(&model, seed)?;
            let (config, src) = spec.open()?;
            crate::model::hf::export(&config, src.as_ref(), &out)?;
            println!(
                "wrote {} ({}) to {}",
                config.name,
                src.describe(),
                out.display()
            );
            Ok(())
        }
        Some(Command::DumpWeights { model, out }) => {
            let file = crate::model::gguf::GgufFile::open(&model)?;
            let n = file.dump_f32(&out)?;
            println!(
                "wrote {n} tensors of {} to {}",
                model.display(),
                out.display()
            );
            Ok(())
        }
        Some(Command::Selfcheck {
            only,
            smollm2,
            tokens,
            seed,
            groups,
            experimental_prefill_attention,
        }) => {
            init_logging(LogFormat::Text);
            let opts = crate::selfcheck::Options {
                only,
                smollm2,
                tokens,
                seed,
                groups,
                prefill_kernel: experimental_prefill_attention,
            };
            if !crate::selfcheck::run(&opts)? {
                std::process::exit(1);
            }
            Ok(())
        }
        #[cfg(feature = "lab")]
        Some(Command::Lab(cmd)) => {
            init_logging(LogFormat::Text);
            crate::bench::cli::run(cmd)
        }
        Some(Command::Tune {
            serve,
            rows,
            context,
            shapes,
            share_step,
            policy,
            cost_file,
        }) => {
            let config = serve.into_config()?;
            init_logging(config.log_format);
            init_threads(&config)?;
            let opts = crate::tune::Options {
                config,
                rows,
                context,
                shapes,
                share_step,
                policy,
                cost_file,
            };
            crate::tune::run(&opts, |line| eprintln!("{line}"))?;
            Ok(())
        }
        Some(Command::BenchServe {
            serve,
            input_len,
            output_len,
            requests,
            rate,
            step_tokens,
            workload_seed,
            json,
            cost_file,
        }) => {
            let config = serve.into_config()?;
            init_logging(config.log_format);
            init_threads(&config)?;
            let opts = crate::serve_bench::Options {
                config,
                input_len,
                output_len,
                requests,
                rate,
                step_tokens,
                seed: workload_seed,
                json,
                cost_file,
            };
            crate::serve_bench::run(&opts)?;
            Ok(())
        }
        Some(Command::Serve(args)) => serve(args),
        None => serve(cli.serve),
    }
}

/// The CPU backend's thread pool, as `threads` says.
fn init_threads(config: &Config) -> anyhow::Result<()> {
    if let Some(n) = config.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("thread pool")?;
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    init_logging(config.log_format);
    init_threads(&config)?;
    let shutdown = Shutdown::default();
    watch_signals(shutdown.clone())?;
    match run(config, shutdown, |_| {}) {
        Err(e @ crate::error::Error::Fatal(_)) => {
            // The replies are out and the socket files gone: leave at once.
            // Returning would run the CUDA driver's exit handlers, which
            // tear a faulted context down slowly (about 165 ms on an H200
            // after an illegal address), past the documented bound; the OS
            // reclaims the device memory either way.
            eprintln!("Error: {e}");
            // SAFETY: `_exit` ends the process without running anything
            // else; nothing after this point needs to run.
            unsafe { nix::libc::_exit(1) }
        }
        r => Ok(r?),
    }
}
