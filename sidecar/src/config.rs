//! Every tunable of the daemon has its home here: a TOML file
//! (`--config`), overridden by command-line flags and `TACFLOW_*`
//! environment variables (see `main.rs`).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines with timestamps.
    Text,
    /// No timestamps (journald adds its own).
    Journal,
    Json,
}

/// The dtype of the activations the CUDA backend's GEMMs read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GpuActivations {
    /// Every activation in f32; a GEMM reads its input as two bf16 halves
    /// (seen to ~2^-17), at twice the GEMM FLOPs and two extra launches.
    #[default]
    Split,
    /// RMSNorm, the attention output and SwiGLU are written in bf16 and
    /// GEMMs read them as they are, as serving engines run (the residual
    /// stream stays f32). On the CPU backend: GEMM inputs rounded to bf16,
    /// the GPU mode's twin.
    Bf16,
}

/// A fused op the schedule may use in place of its two unfused ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fusion {
    /// The residual add and the next RMSNorm (`Backend::add_rmsnorm`).
    AddRmsnorm,
    /// RoPE and the KV append (`Backend::rope_kv_append`).
    RopeKvAppend,
    /// SwiGLU written in the down projection's input dtype
    /// (`Backend::silu_mul_gemm_input`).
    SiluGemmInput,
}

impl Fusion {
    /// The fusions a list names, as the schedule's program takes them.
    pub fn program_fusions(list: &[Fusion]) -> crate::schedule::program::Fusions {
        crate::schedule::program::Fusions {
            add_norm: list.contains(&Fusion::AddRmsnorm),
            rope_append: list.contains(&Fusion::RopeKvAppend),
            silu_gemm_input: list.contains(&Fusion::SiluGemmInput),
        }
    }
}

/// A way the CUDA backend holds a lane to its share of the SMs
/// (`tacflow_kernels::cuda::share`; docs/SCHEDULES.md says which measured
/// best).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum SmShare {
    /// Our decode attention fills the CTA slots of the lane's SMs only.
    Grid,
    /// cuBLAS's SM-count target on the lane's handle (the GEMMs).
    Cublas,
    /// The lane's stream in a CUDA green context of the lane's SMs
    /// (everything on it); not combined with the others.
    Green,
}

impl SmShare {
    pub fn mechanism(self) -> tacflow_kernels::cuda::SmMechanism {
        use tacflow_kernels::cuda::SmMechanism;
        match self {
            SmShare::Grid => SmMechanism::Grid,
            SmShare::Cublas => SmMechanism::Cublas,
            SmShare::Green => SmMechanism::Green,
        }
    }

    /// A list's name, as the cost file and the logs give it:
    /// `grid+cublas`, or `none`.
    pub fn describe(list: &[SmShare]) -> String {
        match list {
            [] => "none".into(),
            l => l
                .iter()
                .map(|m| m.mechanism().name())
                .collect::<Vec<_>>()
                .join("+"),
        }
    }

    /// A list the CUDA backend can apply: no repeats, green alone.
    pub fn check(list: &[SmShare]) -> Result<()> {
        let mut seen = list.to_vec();
        seen.sort();
        seen.dedup();
        if seen.len() != list.len() {
            return Err(Error::Config(format!(
                "sm_share names a mechanism twice: {list:?}"
            )));
        }
        if list.contains(&SmShare::Green) && list.len() > 1 {
            return Err(Error::Config(
                "sm_share: green bounds every kernel of a lane; it is not combined with grid or cublas".into(),
            ));
        }
        Ok(())
    }
}

/// Per-session limits; a request beyond one is answered `limit_exceeded`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionLimits {
    pub max_sequences: u64,
    pub max_regions: u64,
    pub max_mapped_bytes: u64,
    /// Requests of one session waiting for the executor.
    pub max_queued_requests: u64,
    /// New tokens in one step.
    pub max_step_tokens: u64,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_sequences: 4096,
            max_regions: 256,
            max_mapped_bytes: 64 << 30,
            max_queued_requests: 1024,
            max_step_tokens: 1 << 17,
        }
    }
}

/// Most CUDA lanes: NanoFlow overlaps three kinds of op; a few more leave
/// room to experiment, and each lane holds its own workspaces.
pub const MAX_GPU_LANES: usize = 8;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Unix socket path; the default depends on the environment
    /// (`PROTOCOL.md` §1).
    pub socket: Option<PathBuf>,
    /// Optional TCP address: `host:port`, or a bare port for loopback
    /// (`5555` is `127.0.0.1:5555`). Unauthenticated: an address that is not
    /// loopback is refused unless `tcp_allow_remote` is set.
    pub tcp: Option<String>,
    /// Allow `tcp` to bind an address other than loopback.
    pub tcp_allow_remote: bool,
    /// Group that may use the socket (mode 0660 instead of 0600).
    pub socket_group: Option<String>,
    /// `tiny`, `random:<preset|config.json>`, or a model folder.
    pub model: String,
    /// Seed of random weights.
    pub seed: u64,
    pub backend: BackendKind,
    /// KV cache size in blocks of 16 tokens; by default a fraction of free
    /// GPU memory, or `cpu_kv_memory_mb` on the CPU.
    pub kv_blocks: Option<usize>,
    /// Fraction of the GPU memory free after loading the weights that the KV
    /// cache takes.
    pub kv_memory_fraction: f64,
    /// Lanes of the CUDA backend: CUDA streams, each with its own cuBLAS
    /// handle and workspaces, that a schedule's nano-batches run on side by
    /// side (a GEMM of one beside the attention of another). 1 runs every
    /// op on one stream; a schedule with more lanes than this is refused.
    pub gpu_lanes: usize,
    /// KV cache size on the CPU backend when `kv_blocks` is not given.
    pub cpu_kv_memory_mb: usize,
    /// Longest sequence accepted (the model's own limit when absent).
    pub max_context: Option<usize>,
    /// A session ends this long after its last request.
    pub session_lease_ms: u64,
    /// Requests of all sessions waiting for the executor; more are `busy`.
    pub max_queue: usize,
    pub limits: SessionLimits,
    /// Microseconds the executor and the I/O thread busy-wait for each other
    /// before sleeping (0: always sleep). Trades a little idle CPU for
    /// request latency.
    pub spin_us: u64,
    /// CPU threads for the CPU backend (all cores when absent).
    pub threads: Option<usize>,
    /// Round weights to bf16 on the CPU backend (to compare with the GPU).
    pub cpu_round_bf16: bool,
    /// The GEMM inputs' dtype on the GPU (`"split"` or `"bf16"`); on the
    /// CPU backend `"bf16"` rounds GEMM inputs to bf16 (its twin). When
    /// absent, the backend's default ([`Config::resolved`]): bf16 on the
    /// CUDA backend with one lane, split with several; unrounded on the
    /// CPU.
    pub gpu_activations: Option<GpuActivations>,
    /// Fused ops to run: the forward pass's program runs each named pair
    /// of ops as one (`schedule::program::Fusions`); the results are those
    /// of the pair (the CPU's are equal bit for bit). When absent, the
    /// backend's default: [`CUDA_FUSIONS`] on the CUDA backend, none on
    /// the CPU; `[]` runs none.
    pub fusions: Option<Vec<Fusion>>,
    /// Capture and replay decode steps as CUDA graphs per batch-size
    /// bucket (CUDA backend only). A step qualifies when every sequence in
    /// it decodes one token with full attention, in the sequential
    /// schedule, and it has at most 64 rows: it runs padded to its bucket
    /// (1, 2, 4, 8, 16, ..., 64), eagerly for its key's first two steps,
    /// then captured once and replayed. Prefill and mixed steps run
    /// eagerly. One KV block is reserved for the padding rows. Refused at
    /// start with `gpu_lanes` > 1. When absent, [`CUDA_GRAPHS`] on the
    /// CUDA backend with one lane, off otherwise.
    pub cuda_graphs: Option<bool>,
    /// Serve the sparse policies (`tactic`, `fixed_budget`, `oracle_top_p`)
    /// on the CUDA backend: clustering, selection, a sparse attention and
    /// the diagnostics in its kernels (kernels/TACTIC.md, "On the GPU").
    /// Experimental, off by default, until a GPU run has verified those
    /// kernels; without it the CUDA backend refuses sparse policies. One
    /// lane, f32 (`split`) activations (its default when `gpu_activations`
    /// is absent).
    pub experimental_gpu_tactic: bool,
    /// Run prefill chunks (16 or more consecutive tokens of a sequence in
    /// a step) through the tensor-core prefill attention kernel on the
    /// CUDA backend, the other rows through the decode kernel
    /// (kernels/ATTENTION.md, "Prefill chunks"). Experimental, off by
    /// default, until a GPU run has verified the kernel; head sizes 64 and
    /// 128 (others are refused at start).
    pub experimental_prefill_attention: bool,
    pub log_format: LogFormat,
    /// Prometheus text endpoint (`GET /metrics`), off when absent:
    /// `host:port` or a bare port for loopback. An address that is not
    /// loopback is refused unless `metrics_allow_remote` is set.
    pub metrics_addr: Option<String>,
    pub metrics_allow_remote: bool,
    /// How long shutdown waits for the step in flight before giving up on
    /// it (the daemon then exits non-zero; systemd's `TimeoutStopSec` should
    /// be longer).
    pub shutdown_timeout_ms: u64,
    /// After a fatal fault (a panic, a failed device) the daemon answers
    /// every request `internal` for this long, so that ZeroMQ delivers
    /// those replies, then exits non-zero: it exits within this plus 100 ms
    /// (the I/O thread's longest poll) of the fault.
    pub fatal_linger_ms: u64,
    /// `health` reports the executor `wedged` once it has been on one
    /// command longer than this (well above a long CPU prefill).
    pub wedged_after_ms: u64,
    /// Memory the weights and the KV cache may take, e.g. `"8GiB"`
    /// (`B`, `KB`/`KiB`, `MB`/`MiB`, `GB`/`GiB`, `TB`/`TiB`): on the CPU
    /// backend instead of what the host (and its cgroup) has available; on
    /// the GPU at most this of the device's free memory. A model that does
    /// not fit is refused before it is loaded.
    pub memory_limit: Option<String>,
    /// Load no model: serve attention-only sequences (`attention_step`,
    /// `PROTOCOL.md` §4.7) of any declared layout, from the attention pool.
    pub attention_only: bool,
    /// The attention pool's budget in MiB: the f32 K and V of every
    /// attention-only sequence, apart from the model's KV cache. It grows
    /// with its use up to this.
    pub attention_pool_mb: usize,
    /// Which schedule each step runs: `off` (the sequential pass, the
    /// baseline of every overlap figure), `on` (the one `tacflowd tune`
    /// cached for this model, device and policy; an error without it),
    /// `auto` (that one when there is one, else the sequential pass), or a
    /// schedule file's path. Off until the GPU run has measured overlap.
    pub overlap: Overlap,
    /// Where `tune` caches schedules and `--overlap auto` looks for them
    /// (default `$XDG_CACHE_HOME/tacflow`, else `~/.cache/tacflow`).
    pub schedule_dir: Option<PathBuf>,
    /// How the CUDA backend holds each lane to its SM share, when `tune`
    /// profiles shares and when a tuned schedule's lanes run: any of
    /// `grid` (our attention's CTA slots), `cublas` (cuBLAS's SM-count
    /// target for the GEMMs), or `green` alone (a green context per
    /// lane). Empty (the default): no lane is limited, and `tune` on the
    /// GPU refuses to profile shares it could not give. A mechanism the
    /// driver lacks is an error, never replaced by another.
    pub sm_share: Vec<SmShare>,
}

/// `overlap`: see [`Config::overlap`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Overlap {
    #[default]
    Off,
    On,
    Auto,
    File(PathBuf),
}

impl std::str::FromStr for Overlap {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Overlap, String> {
        match s {
            "off" => Ok(Overlap::Off),
            "on" => Ok(Overlap::On),
            "auto" => Ok(Overlap::Auto),
            "" => Err("overlap: `off`, `auto`, or a schedule file".into()),
            path => Ok(Overlap::File(PathBuf::from(path))),
        }
    }
}

impl TryFrom<String> for Overlap {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Overlap, String> {
        s.parse()
    }
}

impl From<Overlap> for String {
    fn from(o: Overlap) -> String {
        match o {
            Overlap::Off => "off".into(),
            Overlap::On => "on".into(),
            Overlap::Auto => "auto".into(),
            Overlap::File(p) => p.display().to_string(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: None,
            tcp: None,
            tcp_allow_remote: false,
            socket_group: None,
            model: "tiny".into(),
            seed: 0,
            backend: BackendKind::Auto,
            kv_blocks: None,
            kv_memory_fraction: 0.9,
            gpu_lanes: 1,
            cpu_kv_memory_mb: 2048,
            max_context: None,
            session_lease_ms: 30_000,
            max_queue: 4096,
            limits: SessionLimits::default(),
            spin_us: 200,
            threads: None,
            cpu_round_bf16: false,
            gpu_activations: None,
            fusions: None,
            cuda_graphs: None,
            experimental_gpu_tactic: false,
            experimental_prefill_attention: false,
            log_format: LogFormat::Text,
            metrics_addr: None,
            metrics_allow_remote: false,
            shutdown_timeout_ms: 30_000,
            fatal_linger_ms: 500,
            wedged_after_ms: 120_000,
            memory_limit: None,
            attention_only: false,
            attention_pool_mb: 1024,
            overlap: Overlap::Off,
            schedule_dir: None,
            sm_share: Vec::new(),
        }
    }
}

/// The fused ops the CUDA backend runs unless configured: the two that
/// measured faster on the H200 (bench/RESULTS.md). SwiGLU in the GEMM's
/// dtype is what bf16 activations run anyway.
pub const CUDA_FUSIONS: [Fusion; 2] = [Fusion::AddRmsnorm, Fusion::RopeKvAppend];

/// Whether the CUDA backend replays decode steps as graphs unless
/// configured.
pub const CUDA_GRAPHS: bool = false;

impl Config {
    /// This configuration with the options left absent set to `kind`'s
    /// defaults (a resolved backend: CPU or CUDA).
    pub fn resolved(&self, kind: BackendKind) -> Config {
        let cuda = kind == BackendKind::Cuda;
        let one_lane = self.gpu_lanes == 1;
        let mut c = self.clone();
        c.gpu_activations
            .get_or_insert(if cuda && one_lane && !self.experimental_gpu_tactic {
                GpuActivations::Bf16
            } else {
                GpuActivations::Split
            });
        c.fusions.get_or_insert_with(|| {
            if cuda {
                CUDA_FUSIONS.to_vec()
            } else {
                Vec::new()
            }
        });
        c.cuda_graphs.get_or_insert(cuda && one_lane && CUDA_GRAPHS);
        c
    }

    /// The GEMM inputs' dtype (split when absent: see [`Config::resolved`]).
    pub fn activations(&self) -> GpuActivations {
        self.gpu_activations.unwrap_or_default()
    }

    /// The fused ops to run (none when absent).
    pub fn fusion_list(&self) -> &[Fusion] {
        self.fusions.as_deref().unwrap_or(&[])
    }

    /// Whether decode steps run as CUDA graphs (off when absent).
    pub fn graphs(&self) -> bool {
        self.cuda_graphs.unwrap_or(false)
    }

    pub fn from_toml_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.kv_memory_fraction > 0.0 && self.kv_memory_fraction <= 1.0) {
            return Err(Error::Config(format!(
                "kv_memory_fraction {} is not in (0, 1]",
                self.kv_memory_fraction
            )));
        }
        if !(1..=MAX_GPU_LANES).contains(&self.gpu_lanes) {
            return Err(Error::Config(format!(
                "gpu_lanes {} is not in 1..={MAX_GPU_LANES}",
                self.gpu_lanes
            )));
        }
        if self.session_lease_ms < 100 {
            return Err(Error::Config(
                "session_lease_ms must be at least 100".into(),
            ));
        }
        if self.max_queue == 0 {
            return Err(Error::Config("max_queue must be at least 1".into()));
        }
        if let Some(a) = &self.tcp {
            listen_addr("tcp", a, self.tcp_allow_remote)?;
        }
        if let Some(a) = &self.metrics_addr {
            listen_addr("metrics_addr", a, self.metrics_allow_remote)?;
        }
        SmShare::check(&self.sm_share)?;
        if self.wedged_after_ms == 0 {
            return Err(Error::Config("wedged_after_ms must be at least 1".into()));
        }
        self.memory_limit_bytes()?;
        Ok(())
    }

    /// `memory_limit` in bytes, checked.
    pub fn memory_limit_bytes(&self) -> Result<Option<u64>> {
        self.memory_limit
            .as_deref()
            .map(|t| {
                parse_bytes(t).ok_or_else(|| {
                    Error::Config(format!(
                        "memory_limit = {t:?}: expected a size such as 8GiB, 512MiB or 4000000000"
                    ))
                })
            })
            .transpose()
    }

    /// The TCP address to bind, checked (`tcp`).
    pub fn tcp_addr(&self) -> Result<Option<SocketAddr>> {
        self.tcp
            .as_deref()
            .map(|a| listen_addr("tcp", a, self.tcp_allow_remote))
            .transpose()
    }

    /// The metrics endpoint's address, checked (`metrics_addr`).
    pub fn metrics_socket_addr(&self) -> Result<Option<SocketAddr>> {
        self.metrics_addr
            .as_deref()
            .map(|a| listen_addr("metrics_addr", a, self.metrics_allow_remote))
            .transpose()
    }

    /// The socket path: configured, else by environment (`PROTOCOL.md` §1).
    pub fn socket_path(&self) -> PathBuf {
        if let Some(p) = &self.socket {
            return p.clone();
        }
        default_socket_path()
    }
}

/// A size with an optional unit: `8GiB`, `1.5 GB`, `512MiB`, `4096`
/// (bytes). `K`/`M`/`G`/`T` alone are binary, like `KiB`…; `KB`… decimal.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().ok()?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return None,
    };
    let bytes = num * scale;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Parses a listening address: `ip:port`, `[ipv6]:port`, or a bare port
/// (loopback). Unauthenticated listeners stay on loopback unless the
/// operator allowed more with `allow_remote`.
pub fn listen_addr(what: &str, text: &str, allow_remote: bool) -> Result<SocketAddr> {
    let t = text.trim();
    let addr = match t.trim_start_matches(':').parse::<u16>() {
        Ok(port) => SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Err(_) => {
            let t = t
                .strip_prefix("localhost:")
                .map_or(t.to_owned(), |p| format!("127.0.0.1:{p}"));
            t.parse::<SocketAddr>().map_err(|e| {
                Error::Config(format!(
                    "{what} = {text:?}: expected ip:port or a port ({e})"
                ))
            })?
        }
    };
    if !addr.ip().is_loopback() && !allow_remote {
        let key = what.trim_end_matches("_addr");
        return Err(Error::Config(format!(
            "{what} = {addr} is not a loopback address and the listener is unauthenticated; \
             set {key}_allow_remote (or --{}-allow-remote) to allow it",
            key.replace('_', "-")
        )));
    }
    Ok(addr)
}

/// `/run/tacflow` under systemd (`RuntimeDirectory=tacflow` sets
/// `RUNTIME_DIRECTORY`), else `$XDG_RUNTIME_DIR/tacflow`, else a private
/// `tacflow-<uid>` folder in the temporary directory.
pub fn default_socket_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        // systemd may list several directories separated by ':'.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_owned();
        if !first.is_empty() {
            return PathBuf::from(first).join("tacflowd.sock");
        }
    }
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(x).join("tacflow").join("tacflowd.sock");
    }
    std::env::temp_dir()
        .join(format!("tacflow-{}", nix::unistd::getuid()))
        .join("tacflowd.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sm_share_names_mechanisms_green_alone() {
        assert!(
            Config::default().sm_share.is_empty(),
            "no lane held by default"
        );
        let c: Config = toml::from_str("sm_share = [\"grid\", \"cublas\"]\n").unwrap();
        assert_eq!(c.sm_share, vec![SmShare::Grid, SmShare::Cublas]);
        assert!(c.validate().is_ok());
        assert_eq!(SmShare::describe(&c.sm_share), "grid+cublas");
        assert_eq!(SmShare::describe(&[]), "none");
        for bad in [
            vec![SmShare::Green, SmShare::Grid],
            vec![SmShare::Cublas, SmShare::Cublas],
        ] {
            let c = Config {
                sm_share: bad.clone(),
                ..Config::default()
            };
            assert!(c.validate().is_err(), "{bad:?}");
        }
        assert!(toml::from_str::<Config>("sm_share = [\"mps\"]\n").is_err());
    }

    #[test]
    fn gpu_lanes_default_to_one_and_stay_in_range() {
        assert_eq!(Config::default().gpu_lanes, 1);
        let c: Config = toml::from_str("gpu_lanes = 2\n").unwrap();
        assert_eq!(c.gpu_lanes, 2);
        c.validate().unwrap();
        for bad in [0, MAX_GPU_LANES + 1] {
            let c = Config {
                gpu_lanes: bad,
                ..Config::default()
            };
            assert!(c.validate().is_err(), "gpu_lanes = {bad}");
        }
    }

    #[test]
    fn toml_overrides_defaults_and_rejects_typos() {
        let c: Config = toml::from_str(
            "model = \"random:smollm2-135m\"\nkv_blocks = 64\n[limits]\nmax_regions = 3\n",
        )
        .unwrap();
        assert_eq!(c.model, "random:smollm2-135m");
        assert_eq!(c.kv_blocks, Some(64));
        assert_eq!(c.limits.max_regions, 3);
        assert_eq!(
            c.limits.max_sequences,
            SessionLimits::default().max_sequences
        );
        assert!(toml::from_str::<Config>("kv_blokcs = 1").is_err());
    }

    #[test]
    fn activations_fusions_and_graphs_default_by_backend() {
        let d = Config::default();
        assert_eq!(
            (d.gpu_activations, &d.fusions, d.cuda_graphs),
            (None, &None, None)
        );
        let cuda = d.resolved(BackendKind::Cuda);
        assert_eq!(cuda.activations(), GpuActivations::Bf16);
        assert_eq!(cuda.fusion_list(), &CUDA_FUSIONS[..]);
        assert_eq!(cuda.graphs(), CUDA_GRAPHS);
        let cpu = d.resolved(BackendKind::Cpu);
        assert_eq!(cpu.activations(), GpuActivations::Split);
        assert!(cpu.fusion_list().is_empty() && !cpu.graphs());
        // Several lanes: split activations and no graphs (neither runs there).
        let lanes = Config {
            gpu_lanes: 2,
            ..Config::default()
        }
        .resolved(BackendKind::Cuda);
        assert_eq!(lanes.activations(), GpuActivations::Split);
        assert!(!lanes.graphs());
        // What the configuration says wins, an empty list too.
        let c: Config =
            toml::from_str("gpu_activations = \"split\"\nfusions = []\ncuda_graphs = false")
                .unwrap();
        let c = c.resolved(BackendKind::Cuda);
        assert_eq!(c.activations(), GpuActivations::Split);
        assert!(c.fusion_list().is_empty() && !c.graphs());
        let c: Config = toml::from_str(
            "gpu_activations = \"bf16\"\nfusions = [\"add-rmsnorm\", \"rope-kv-append\", \"silu-gemm-input\"]\ncuda_graphs = true",
        )
        .unwrap();
        assert_eq!(
            c.resolved(BackendKind::Cpu).activations(),
            GpuActivations::Bf16
        );
        assert_eq!(c.fusion_list().len(), 3);
        assert!(c.graphs());
        assert!(toml::from_str::<Config>("gpu_activations = \"fp8\"").is_err());
        assert!(toml::from_str::<Config>("fusions = [\"rope\"]").is_err());
    }

    #[test]
    fn gpu_tactic_is_off_unless_asked_for() {
        assert!(!Config::default().experimental_gpu_tactic);
        let c: Config = toml::from_str("experimental_gpu_tactic = true").unwrap();
        assert!(c.experimental_gpu_tactic);
        assert!(!Config::default().experimental_prefill_attention);
        let c: Config = toml::from_str("experimental_prefill_attention = true").unwrap();
        assert!(c.experimental_prefill_attention);
    }

    #[test]
    fn sizes_read_with_their_units() {
        assert_eq!(parse_bytes("8GiB"), Some(8 << 30));
        assert_eq!(parse_bytes(" 512 MiB "), Some(512 << 20));
        assert_eq!(parse_bytes("2G"), Some(2 << 30));
        assert_eq!(parse_bytes("1.5GB"), Some(1_500_000_000));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("1kb"), Some(1000));
        assert_eq!(parse_bytes("8 gigs"), None);
        assert_eq!(parse_bytes("GiB"), None);
        assert_eq!(parse_bytes("-1GiB"), None);
        let c = Config {
            memory_limit: Some("lots".into()),
            ..Config::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("memory_limit")
        );
    }

    #[test]
    fn listeners_stay_on_loopback_unless_allowed() {
        let lo = listen_addr("tcp", "5555", false).unwrap();
        assert_eq!(lo.to_string(), "127.0.0.1:5555");
        assert_eq!(listen_addr("tcp", ":7", false).unwrap().port(), 7);
        assert!(
            listen_addr("tcp", "[::1]:9", false)
                .unwrap()
                .ip()
                .is_loopback()
        );
        assert!(listen_addr("tcp", "localhost:9", false).is_ok());
        let err = listen_addr("metrics_addr", "0.0.0.0:9464", false).unwrap_err();
        assert!(err.to_string().contains("metrics_allow_remote"), "{err}");
        assert!(listen_addr("metrics_addr", "0.0.0.0:9464", true).is_ok());
        assert!(listen_addr("tcp", "example.com:1", true).is_err());
        let c = Config {
            tcp: Some("10.1.2.3:5555".into()),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            tcp_allow_remote: true,
            ..c
        };
        assert_eq!(c.tcp_addr().unwrap().unwrap().port(), 5555);
    }
}
