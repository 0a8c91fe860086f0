//! The daemon's two threads and how they start and stop.
//!
//! ```text
//! clients ──ZMQ──► ROUTER ─ I/O thread (io.rs) ──mpsc──► executor (executor.rs) ─► engine
//!                       ◄──────── inproc PAIR (encoded replies) ◄───┘
//! ```
//!
//! The executor thread is started first and loads the model; the socket is
//! bound only once the model is ready, so a client that can connect can use
//! the daemon.

pub mod executor;
pub mod io;
pub mod session;

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::config::{BackendKind, Config};
use crate::engine::gauges::Gauges;
use crate::engine::{BLOCK_SIZE, Engine, KvCapacity};
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::model::config::ModelConfig;
use executor::{Command, Outbox, Outgoing, Shared};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tacflow_ipc::{BackendInfo, ModelInfo};
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
}

const WAKE_ADDR: &str = "inproc://tacflow-wake";

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

/// Loads the engine on the executor thread and serves its queue.
fn start_executor<B: Backend + 'static>(
    backend: B,
    config: &Config,
    out: Outbox,
    rx: mpsc::Receiver<Command>,
    ready: mpsc::Sender<Result<ServerInfo>>,
) -> Result<()> {
    let spec = ModelSpec::parse(&config.model, config.seed)?;
    let (model_config, src) = spec.open()?;
    info!(model = %model_config.name, source = %src.describe(), params = model_config.num_params(), "loading model");
    let capacity = match config.kv_blocks {
        Some(n) => KvCapacity::Blocks(n),
        None if backend.free_memory().is_some() => {
            KvCapacity::MemoryFraction(config.kv_memory_fraction)
        }
        None => {
            let layout = crate::backend::KvLayout {
                num_layers: model_config.num_layers,
                num_blocks: 0,
                block_size: BLOCK_SIZE,
                num_kv_heads: model_config.num_kv_heads,
                head_dim: model_config.head_dim,
            };
            KvCapacity::Blocks((config.cpu_kv_memory_mb << 20) / backend.kv_block_bytes(&layout))
        }
    };
    let t0 = Instant::now();
    let mut last = Instant::now();
    let engine = Engine::new(
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
    let (kind, device) = engine.backend().describe();
    info!(
        backend = %kind,
        device = %device,
        kv_blocks = engine.kv_total_blocks(),
        secs = t0.elapsed().as_secs_f64(),
        "model ready"
    );
    let info = ServerInfo {
        instance_id: instance_id(),
        model: model_info(
            engine.config(),
            engine.backend().weight_dtype(),
            engine.max_context(),
        ),
        backend: BackendInfo { kind, device },
        block_size: BLOCK_SIZE as u32,
        policies: vec!["full".into()],
        gauges: engine.gauges(),
    };
    let _ = ready.send(Ok(info));
    executor::run(
        engine,
        rx,
        out,
        config.limits.max_sequences,
        Duration::from_micros(config.spin_us),
    );
    Ok(())
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

/// Creates the socket's folder (private when the daemon makes it) and clears
/// a stale socket file; refuses to steal the path of a live daemon.
fn prepare_socket_path(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(dir, e))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::Config(format!(
                "{}: another daemon is listening there",
                path.display()
            )));
        }
        warn!(path = %path.display(), "removing a stale socket file");
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

fn set_socket_mode(path: &Path, group: Option<&str>) -> Result<()> {
    let mode = match group {
        None => 0o600,
        Some(g) => {
            let grp = nix::unistd::Group::from_name(g)
                .map_err(|e| Error::Config(format!("group {g}: {e}")))?
                .ok_or_else(|| Error::Config(format!("group {g} does not exist")))?;
            nix::unistd::chown(path, None, Some(grp.gid)).map_err(|e| Error::io(path, e.into()))?;
            0o660
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(path, e))
}

/// Runs the daemon until `shutdown` is triggered and every request is
/// answered. `on_ready` is called once the socket accepts clients.
pub fn run(config: Config, shutdown: Shutdown, on_ready: impl FnOnce(&Path)) -> Result<()> {
    config.validate()?;
    let ctx = zmq::Context::new();
    let wake_rx = ctx.socket(zmq::PAIR)?;
    wake_rx.bind(WAKE_ADDR)?;
    let wake_tx = ctx.socket(zmq::PAIR)?;
    wake_tx.connect(WAKE_ADDR)?;
    let (cmd_tx, cmd_rx) = mpsc::channel::<Command>();
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<ServerInfo>>();
    let shared = Arc::new(Shared::default());
    let kind = choose_backend(&config)?;
    let exec = {
        let config = config.clone();
        let out = Outbox {
            tx: out_tx,
            wake: wake_tx,
            shared: shared.clone(),
        };
        std::thread::Builder::new()
            .name("executor".into())
            .spawn(move || {
                let fail = ready_tx.clone();
                let r = match kind {
                    BackendKind::Cuda => CudaBackend::new(0)
                        .and_then(|b| start_executor(b, &config, out, cmd_rx, ready_tx)),
                    _ => start_executor(
                        CpuBackend {
                            round_to_bf16: config.cpu_round_bf16,
                        },
                        &config,
                        out,
                        cmd_rx,
                        ready_tx,
                    ),
                };
                if let Err(e) = r {
                    let _ = fail.send(Err(e));
                }
            })
            .map_err(|e| Error::Backend(format!("cannot start the executor thread: {e}")))?
    };
    let info = match ready_rx.recv() {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => {
            let _ = exec.join();
            return Err(e);
        }
        Err(_) => {
            let _ = exec.join();
            return Err(Error::Backend(
                "the executor thread died while loading".into(),
            ));
        }
    };
    let path: PathBuf = config.socket_path();
    prepare_socket_path(&path)?;
    let router = ctx.socket(zmq::ROUTER)?;
    router.set_linger(0)?;
    router.set_maxmsgsize((tacflow_ipc::codec::MAX_HEADER_BYTES + 4096) as i64)?;
    router.set_rcvhwm(100_000)?;
    router.set_sndhwm(100_000)?;
    router.bind(&format!("ipc://{}", path.display()))?;
    set_socket_mode(&path, config.socket_group.as_deref())?;
    if let Some(tcp) = &config.tcp {
        router.bind(&format!("tcp://{tcp}"))?;
        warn!(address = %tcp, "TCP listener is unauthenticated: anyone who reaches it can use the daemon");
    }
    info!(socket = %path.display(), instance = %info.instance_id, "listening");
    on_ready(&path);
    let spin = Duration::from_micros(config.spin_us);
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
        config,
        errors: Default::default(),
        uid: nix::unistd::getuid().as_raw(),
        stopping: false,
        executor_done: false,
        spin,
        last_exchange: Instant::now(),
    };
    let served = io.run(&shutdown);
    drop(io);
    let _ = std::fs::remove_file(&path);
    let _ = exec.join();
    info!("stopped");
    served
}
