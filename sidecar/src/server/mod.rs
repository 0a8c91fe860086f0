//! The daemon's two threads and how they start and stop.
//!
//! ```text
//! clients ──ZMQ──► ROUTER ─ I/O thread (io.rs) ──mpsc──► executor (executor.rs) ─► engine
//!                       ◄──────── inproc PAIR (encoded replies) ◄───┘
//! ```
//!
//! Beside them: the companion socket's thread (`fdpass.rs`, memfds), the
//! metrics endpoint (`metrics.rs`), and systemd notifications
//! (`systemd.rs`). `listen.rs` makes or adopts the sockets.
//!
//! The executor thread is started first, loads the model and runs one
//! warm-up step; the socket is bound only then, so a client that can connect
//! can use the daemon, and only then is systemd told READY. What can be
//! refused without the model is refused before it loads (a socket another
//! daemon serves, a model or KV cache too large for the memory there is).
//!
//! A fatal fault (a panic, a failed device; `fatal.rs`) is answered to
//! every waiting client and ends `run` with an error after a short linger.

pub mod cuda_regions;
mod dispatch;
pub mod executor;
pub mod fatal;
pub mod fdpass;
mod health;
#[cfg(feature = "fault-injection")]
mod inject;
pub mod io;
pub mod listen;
pub mod memory;
pub mod metrics;
mod offload_start;
mod queue;
pub mod replay;
mod requests;
pub mod session;
pub mod systemd;

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::config::{BackendKind, Config};
use crate::engine::gauges::Gauges;
use crate::engine::step::StepWork;
use crate::engine::{BLOCK_SIZE, Engine, KvCapacity, SeqKey, SessionId};
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::model::config::ModelConfig;
use dispatch::Served;
use executor::{Command, Outbox, Outgoing, Shared, Tuning};
use fatal::PanicHook;
use fdpass::{Companion, FdBroker};
use listen::Listeners;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use systemd::{Heartbeat, Notifier};
use tacflow_ipc::{AttentionPolicy, BackendInfo, ModelInfo, SamplingParams, StepEntry};
use tracing::{info, warn};

/// One turn of a wait loop: yields the core, so that waiting for the other
/// thread costs about a system call on an idle machine and steals nothing
/// from other threads on a busy one (a pure spin measured far worse with
/// the cores oversubscribed).
pub(crate) fn backoff() {
    std::thread::yield_now();
}

/// Asks a running server to stop (signals, tests).
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    pub fn trigger(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the I/O thread tells clients about the engine.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub instance_id: String,
    pub model: ModelInfo,
    pub backend: BackendInfo,
    pub block_size: u32,
    pub policies: Vec<String>,
    pub gauges: Arc<Gauges>,
    /// The companion socket's path (told in `hello`).
    pub fd_socket: String,
    /// Opens CUDA regions in the daemon's context (none on the CPU).
    pub cuda_ipc: Arc<dyn cuda_regions::IpcOpener>,
}

const WAKE_ADDR: &str = "inproc://tacflow-wake";

/// The executor thread's name: its panics are its own to catch (the panic
/// hook leaves them alone).
pub const EXECUTOR_THREAD: &str = "executor";

fn model_info(c: &ModelConfig, dtype: &str, max_context: usize) -> ModelInfo {
    ModelInfo {
        name: c.name.clone(),
        architecture: c.architecture.clone(),
        vocab_size: c.vocab_size as u32,
        hidden_size: c.hidden_size as u32,
        num_layers: c.num_layers as u32,
        num_heads: c.num_heads as u32,
        num_kv_heads: c.num_kv_heads as u32,
        head_dim: c.head_dim as u32,
        max_context: max_context as u32,
        dtype: dtype.into(),
        bos_token_id: c.bos_token_id,
        eos_token_ids: c.eos_token_ids.clone(),
    }
}

fn instance_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source is available");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What the executor thread needs to reply and to beat.
struct ExecutorLinks {
    tx: mpsc::Sender<Outgoing>,
    wake: zmq::Socket,
    shared: Arc<Shared>,
    notifier: Notifier,
}

/// Sizes the KV cache the configuration asks for.
pub(crate) fn kv_capacity<B: Backend>(
    backend: &B,
    config: &Config,
    model: &ModelConfig,
) -> KvCapacity {
    match config.kv_blocks {
        Some(n) => KvCapacity::Blocks(n),
        None if backend.free_memory().is_some() => {
            KvCapacity::MemoryFraction(config.kv_memory_fraction)
        }
        None => {
            let layout = crate::backend::KvLayout {
                num_layers: model.num_layers,
                num_blocks: 0,
                block_size: BLOCK_SIZE,
                num_kv_heads: model.num_kv_heads,
                head_dim: model.head_dim,
            };
            KvCapacity::Blocks((config.cpu_kv_memory_mb << 20) / backend.kv_block_bytes(&layout))
        }
    }
}

/// One tiny step through the whole engine before READY: the first step
/// pays for lazy initialisation (kernels, pools, pages), and a daemon that
/// cannot run one should fail at start, not at its first client.
fn warm_up<B: Backend>(engine: &mut Engine<B>) -> Result<()> {
    const WARM_UP_SESSION: SessionId = 0; // client sessions start at 1
    let key = SeqKey {
        session: WARM_UP_SESSION,
        seq: 0,
    };
    let token = engine.config().bos_token_id.unwrap_or(0);
    engine.open_sequence(key, AttentionPolicy::Full, SamplingParams::default(), false)?;
    let work = StepWork {
        session: WARM_UP_SESSION,
        entries: vec![StepEntry {
            seq_id: 0,
            tokens: vec![token],
            positions: None,
            sample: true,
            logits: None,
            blocks: None,
        }],
        logits: vec![None],
    };
    let t0 = Instant::now();
    let ran = engine.step(&work);
    engine.drop_session(WARM_UP_SESSION);
    ran?;
    engine.gauges().reset_work_counters();
    info!(ms = t0.elapsed().as_secs_f64() * 1e3, "warm-up step done");
    Ok(())
}

/// Loads the engine on the executor thread, warms it up, and serves its
/// queue.
/// `armed` runs once the warm-up step is done (fault injection arms its
/// fault there, so that the warm-up itself never fails).
#[allow(clippy::too_many_arguments)]
fn start_executor<B: Backend + 'static>(
    backend: B,
    ipc: Arc<dyn cuda_regions::IpcOpener>,
    config: &Config,
    links: ExecutorLinks,
    rx: mpsc::Receiver<Command>,
    ready: mpsc::Sender<Result<ServerInfo>>,
    armed: impl FnOnce(&B),
) -> Result<()> {
    let spec = ModelSpec::parse(&config.model, config.seed)?;
    let (model_config, src) = spec.open()?;
    let capacity = kv_capacity(&backend, config, &model_config);
    memory::check_fits(
        &backend,
        config,
        memory::need(&backend, &model_config, &capacity),
    )?;
    info!(model = %model_config.name, source = %src.describe(), params = model_config.num_params(), "loading model");
    let t0 = Instant::now();
    let mut last = Instant::now();
    let mut engine = Engine::new(
        backend,
        &model_config,
        src.as_ref(),
        capacity,
        config.max_context,
        |done, total| {
            if last.elapsed() > Duration::from_secs(2) || done == total {
                info!(done, total, "loading weights");
                last = Instant::now();
            }
        },
    )?;
    links.notifier.status("warming up");
    engine.set_fusions(crate::config::Fusion::program_fusions(config.fusion_list()));
    let program = engine.model_program();
    let plan = crate::tune::at_start(config, engine.backend(), &model_config, &program)?;
    engine.set_plan(plan);
    warm_up(&mut engine)?;
    armed(engine.backend());
    let (kind, device) = engine.backend().describe();
    info!(
        backend = %kind,
        device = %device,
        kv_blocks = engine.kv_total_blocks(),
        secs = t0.elapsed().as_secs_f64(),
        "model ready"
    );
    let gauges = engine.gauges();
    let info = ServerInfo {
        instance_id: instance_id(),
        model: model_info(
            engine.config(),
            engine.backend().weight_dtype(),
            engine.max_context(),
        ),
        backend: BackendInfo { kind, device },
        block_size: BLOCK_SIZE as u32,
        policies: crate::engine::policies(crate::engine::Serves::of(engine.backend())),
        gauges: gauges.clone(),
        fd_socket: String::new(),
        cuda_ipc: ipc,
    };
    let served = Served {
        offload: offload_start::offload(config, gauges.clone()),
        engine: Some(engine),
        gauges,
    };
    serve_queue(served, info, config, links, rx, ready);
    Ok(())
}

/// Tells the waiting start-up what the daemon serves, then runs the
/// executor's loop until it stops.
fn serve_queue<B: Backend>(
    served: Served<B>,
    info: ServerInfo,
    config: &Config,
    links: ExecutorLinks,
    rx: mpsc::Receiver<Command>,
    ready: mpsc::Sender<Result<ServerInfo>>,
) {
    let gauges = served.gauges.clone();
    let _ = ready.send(Ok(info));
    let beat = Heartbeat::new(links.notifier, systemd::watchdog_period(), gauges.clone());
    let out = Outbox {
        tx: links.tx,
        wake: links.wake,
        shared: links.shared,
        gauges,
    };
    let tuning = Tuning {
        max_sequences: config.limits.max_sequences,
        spin: Duration::from_micros(config.spin_us),
    };
    executor::run(served, rx, out, tuning, beat);
}

fn no_gpu() -> Arc<dyn cuda_regions::IpcOpener> {
    Arc::new(cuda_regions::NoDevice)
}

/// The CPU backend; under fault injection (test builds only, with
/// `TACFLOW_INJECT_FAULT` set) wrapped in `backend::faults::Faulty`.
fn start_cpu(
    config: &Config,
    links: ExecutorLinks,
    rx: mpsc::Receiver<Command>,
    ready: mpsc::Sender<Result<ServerInfo>>,
) -> Result<()> {
    if config.graphs() {
        warn!("cuda_graphs is for the CUDA backend: the CPU backend runs every step eagerly");
    }
    if config.experimental_gpu_tactic {
        warn!(
            "experimental_gpu_tactic is for the CUDA backend: the CPU backend selects on host views"
        );
    }
    if config.experimental_prefill_attention {
        warn!(
            "experimental_prefill_attention is for the CUDA backend: the CPU backend has one attention for every row"
        );
    }
    let cpu = CpuBackend {
        round_to_bf16: config.cpu_round_bf16,
        round_activations: config.activations() == crate::config::GpuActivations::Bf16,
        device_tactic: None,
    };
    #[cfg(feature = "fault-injection")]
    if let Some((spec, plan)) = inject::plan_from_env()? {
        inject::check_cpu(&spec, plan)?;
        let faulty = crate::backend::faults::Faulty::new(cpu);
        return start_executor(faulty, no_gpu(), config, links, rx, ready, |b| {
            inject::arm(b, &spec, plan)
        });
    }
    start_executor(cpu, no_gpu(), config, links, rx, ready, |_| {})
}

/// The CUDA backend; under fault injection (test builds only, with
/// `TACFLOW_INJECT_FAULT` set) wrapped in `backend::faults::Faulty`, with
/// the kernel that faults on purpose loaded when the plan needs it.
fn start_cuda(
    cuda: CudaBackend,
    config: &Config,
    links: ExecutorLinks,
    rx: mpsc::Receiver<Command>,
    ready: mpsc::Sender<Result<ServerInfo>>,
) -> Result<()> {
    if cuda.prefill_kernel() {
        let (model, _) = ModelSpec::parse(&config.model, config.seed)?.open()?;
        let dims = tacflow_kernels::cuda::prefill::PREFILL_HEAD_DIMS;
        if !dims.contains(&model.head_dim) {
            return Err(Error::Config(format!(
                "experimental_prefill_attention: the prefill kernel serves head sizes {dims:?}, and {} has {}",
                model.name, model.head_dim
            )));
        }
    }
    let ipc: Arc<dyn cuda_regions::IpcOpener> = Arc::new(cuda_regions::DriverOpener(
        tacflow_kernels::cuda::ipc::DriverIpc::new(cuda.gpu().context()),
    ));
    #[cfg(feature = "fault-injection")]
    if let Some((spec, plan)) = inject::plan_from_env()? {
        let cuda = inject::prepare_cuda(cuda, config, plan)?;
        let faulty = crate::backend::faults::Faulty::new(cuda);
        return start_executor(faulty, ipc, config, links, rx, ready, |b| {
            inject::arm(b, &spec, plan)
        });
    }
    start_executor(cuda, ipc, config, links, rx, ready, |_| {})
}

/// Picks the backend the configuration asks for.
fn choose_backend(config: &Config) -> Result<BackendKind> {
    match config.backend {
        BackendKind::Cpu => Ok(BackendKind::Cpu),
        BackendKind::Cuda => {
            crate::backend::cuda::probe().map_err(Error::Backend)?;
            Ok(BackendKind::Cuda)
        }
        BackendKind::Auto => match crate::backend::cuda::probe() {
            Ok(dev) => {
                info!(device = %dev, "GPU found: using the CUDA backend");
                Ok(BackendKind::Cuda)
            }
            Err(why) => {
                info!(reason = %why, "no usable GPU: using the CPU backend");
                Ok(BackendKind::Cpu)
            }
        },
    }
}

/// Starts the executor thread, which loads the model.
fn spawn_executor(
    kind: BackendKind,
    config: &Config,
    links: ExecutorLinks,
    rx: mpsc::Receiver<Command>,
    ready: mpsc::Sender<Result<ServerInfo>>,
) -> Result<std::thread::JoinHandle<()>> {
    // The options left absent take the backend's defaults.
    let config = config.resolved(kind);
    std::thread::Builder::new()
        .name(EXECUTOR_THREAD.into())
        .spawn(move || {
            let fail = ready.clone();
            let r = match kind {
                _ if config.attention_only => offload_start::start(&config, links, rx, ready),
                BackendKind::Cuda => CudaBackend::with_lanes(0, config.gpu_lanes)
                    .and_then(|mut b| {
                        crate::tune::gpu::hold_tuned_lanes(&mut b, &config)?;
                        Ok(b)
                    })
                    .and_then(|b| b.with_activations(config.activations()))
                    .and_then(|b| b.with_graphs(config.graphs()))
                    .and_then(|b| b.with_gpu_tactic(config.experimental_gpu_tactic))
                    .map(|b| b.with_prefill_kernel(config.experimental_prefill_attention))
                    .and_then(|b| start_cuda(b, &config, links, rx, ready)),
                _ => start_cpu(&config, links, rx, ready),
            };
            if let Err(e) = r {
                let _ = fail.send(Err(e));
            }
        })
        .map_err(|e| Error::Backend(format!("cannot start the executor thread: {e}")))
}

/// Waits for the executor to load the model (or fail).
fn wait_ready(
    ready: mpsc::Receiver<Result<ServerInfo>>,
    exec: std::thread::JoinHandle<()>,
) -> Result<(ServerInfo, std::thread::JoinHandle<()>)> {
    match ready.recv() {
        Ok(Ok(info)) => Ok((info, exec)),
        Ok(Err(e)) => {
            let _ = exec.join();
            Err(e)
        }
        Err(_) => {
            let _ = exec.join();
            Err(Error::Backend(
                "the executor thread died while loading".into(),
            ))
        }
    }
}

/// The ROUTER, bound where clients reach it.
fn open_router(
    ctx: &zmq::Context,
    listeners: &mut Listeners,
    config: &Config,
) -> Result<zmq::Socket> {
    let mut router = ctx.socket(zmq::ROUTER)?;
    router.set_linger(0)?;
    router.set_maxmsgsize((tacflow_ipc::codec::MAX_HEADER_BYTES + 4096) as i64)?;
    router.set_rcvhwm(100_000)?;
    router.set_sndhwm(100_000)?;
    listeners.bind_router(&mut router, config)?;
    Ok(router)
}

/// The threads beside the I/O thread and the executor: the companion
/// socket, and the metrics endpoint when configured.
struct Helpers {
    stop: Shutdown,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Helpers {
    fn start(
        listeners: &mut Listeners,
        info: &ServerInfo,
        shared: &Arc<Shared>,
        broker: &Arc<FdBroker>,
        config: &Config,
    ) -> Result<Helpers> {
        let stop = Shutdown::default();
        let mut threads = Vec::new();
        if let Some(addr) = config.metrics_socket_addr()? {
            threads.push(metrics::spawn(
                addr,
                info.clone(),
                shared.clone(),
                stop.clone(),
            )?);
        }
        if let Some(listener) = listeners.fd_listener.take() {
            let companion = Companion {
                listener,
                broker: broker.clone(),
                gauges: info.gauges.clone(),
                max_pending: config.limits.max_regions,
            };
            let stop = stop.clone();
            let t = std::thread::Builder::new()
                .name("fdpass".into())
                .spawn(move || companion.serve(&stop))
                .map_err(|e| Error::Backend(format!("cannot start the companion thread: {e}")))?;
            threads.push(t);
        }
        Ok(Helpers { stop, threads })
    }

    fn stop(self) {
        self.stop.trigger();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Runs the daemon until `shutdown` is triggered and every request is
/// answered. `on_ready` is called once the socket accepts clients.
///
/// Returns an error when start-up is refused, when shutdown timed out, and
/// after a fatal fault (`Error::Fatal`), so that the process exits non-zero.
pub fn run(config: Config, shutdown: Shutdown, on_ready: impl FnOnce(&Path)) -> Result<()> {
    config.validate()?;
    listen::check_not_served(&config)?;
    let notifier = Notifier::from_env();
    notifier.status(&format!("loading model {}", config.model));
    let ctx = zmq::Context::new();
    let wake_rx = ctx.socket(zmq::PAIR)?;
    wake_rx.bind(WAKE_ADDR)?;
    let wake_tx = ctx.socket(zmq::PAIR)?;
    wake_tx.connect(WAKE_ADDR)?;
    let (cmd_tx, cmd_rx) = mpsc::channel::<Command>();
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<ServerInfo>>();
    let shared = Arc::new(Shared::default());
    let _hook = PanicHook::install(shared.clone(), std::thread::current().id());
    let links = ExecutorLinks {
        tx: out_tx,
        wake: wake_tx,
        shared: shared.clone(),
        notifier: notifier.clone(),
    };
    let exec = spawn_executor(choose_backend(&config)?, &config, links, cmd_rx, ready_tx)?;
    let (mut info, exec) = wait_ready(ready_rx, exec)?;
    let mut listeners = Listeners::prepare(&config)?;
    info.fd_socket = listeners.fd_path.display().to_string();
    let broker = Arc::new(FdBroker::default());
    let started = open_router(&ctx, &mut listeners, &config).and_then(|router| {
        Helpers::start(&mut listeners, &info, &shared, &broker, &config).map(|h| (router, h))
    });
    let (router, helpers) = match started {
        Ok(x) => x,
        Err(e) => {
            listeners.remove_files();
            return Err(e);
        }
    };
    info!(socket = %listeners.path.display(), companion = %listeners.fd_path.display(), instance = %info.instance_id, "listening");
    on_ready(&listeners.path);
    notifier.ready(&systemd::serving_status(&info.gauges));
    let mut io = io::Io {
        router,
        inbox: out_rx,
        wake: wake_rx,
        cmd_tx,
        sessions: session::Sessions::new(
            Duration::from_millis(config.session_lease_ms),
            info.instance_id.clone(),
        ),
        shared,
        info,
        spin: Duration::from_micros(config.spin_us),
        config,
        fds: broker,
        notifier,
        uid: nix::unistd::getuid().as_raw(),
        stopping: false,
        stop_deadline: None,
        executor_done: false,
        last_exchange: Instant::now(),
        identity: zmq::Message::new(),
        first: zmq::Message::new(),
        warned_no_credentials: false,
        failing: None,
    };
    let served = io.run(&shutdown);
    if served.is_err() {
        // Give the last replies (the fault's) a moment to leave.
        let _ = io.router.set_linger(100);
    }
    let notifier = io.notifier.clone();
    drop(io);
    helpers.stop();
    listeners.remove_files();
    match &served {
        Ok(()) => {
            let _ = exec.join();
            info!("stopped");
        }
        Err(e) => {
            // The executor may be stuck on a dead device: not joined.
            notifier.exiting(&e.to_string());
            tracing::error!(cause = %e, "exiting");
        }
    }
    served
}
