//! Every tunable of the daemon has its home here: a TOML file
//! (`--config`), overridden by command-line flags and `TACFLOW_*`
//! environment variables (see `main.rs`).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Unix socket path; the default depends on the environment
    /// (`PROTOCOL.md` §1).
    pub socket: Option<PathBuf>,
    /// Optional TCP address (`127.0.0.1:5555`); unauthenticated.
    pub tcp: Option<String>,
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
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: None,
            tcp: None,
            socket_group: None,
            model: "tiny".into(),
            seed: 0,
            backend: BackendKind::Auto,
            kv_blocks: None,
            kv_memory_fraction: 0.9,
            cpu_kv_memory_mb: 2048,
            max_context: None,
            session_lease_ms: 30_000,
            max_queue: 4096,
            limits: SessionLimits::default(),
            spin_us: 200,
            threads: None,
            cpu_round_bf16: false,
            log_format: LogFormat::Text,
        }
    }
}

impl Config {
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
        if self.session_lease_ms < 100 {
            return Err(Error::Config(
                "session_lease_ms must be at least 100".into(),
            ));
        }
        if self.max_queue == 0 {
            return Err(Error::Config("max_queue must be at least 1".into()));
        }
        Ok(())
    }

    /// The socket path: configured, else by environment (`PROTOCOL.md` §1).
    pub fn socket_path(&self) -> PathBuf {
        if let Some(p) = &self.socket {
            return p.clone();
        }
        default_socket_path()
    }
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
}
