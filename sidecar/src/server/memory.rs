//! Refuses, before any weight is loaded, a model and KV cache that cannot
//! fit: loading 32 GB of f32 weights on a 24 GiB host ran for seconds and
//! then died without a word about sizes. The figures are the backend's
//! own: weights at its weight dtype (f32 on the CPU, bf16 on the GPU), KV
//! blocks at `Backend::kv_block_bytes`, against the memory there is — on the
//! CPU what the host has available (`MemAvailable`, lowered by any cgroup
//! v2 `memory.max`), on the GPU the device's free memory less the reserve —
//! or at most the operator's `memory_limit`.

use crate::backend::{Backend, KvLayout};
use crate::config::Config;
use crate::engine::{BLOCK_SIZE, KvCapacity};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// What a model needs, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Need {
    pub weights: u64,
    /// `None`: the KV cache takes a fraction of what is left (GPU).
    pub kv: Option<u64>,
}

/// The bytes the weights and an explicitly sized KV cache take on `backend`.
pub fn need<B: Backend>(backend: &B, model: &ModelConfig, capacity: &KvCapacity) -> Need {
    let per_param = backend.weight_bytes() as u64;
    let layout = KvLayout {
        num_layers: model.num_layers,
        num_blocks: 0,
        block_size: BLOCK_SIZE,
        num_kv_heads: model.num_kv_heads,
        head_dim: model.head_dim,
    };
    let kv = match capacity {
        KvCapacity::Blocks(n) => {
            Some((*n as u64).saturating_mul(backend.kv_block_bytes(&layout) as u64))
        }
        KvCapacity::MemoryFraction(_) => None,
    };
    Need {
        weights: per_param * model.num_params() as u64,
        kv,
    }
}

/// Checks `need` against what `backend` has (and `config.memory_limit`).
pub fn check_fits<B: Backend>(backend: &B, config: &Config, need: Need) -> Result<()> {
    let limit = config.memory_limit_bytes()?;
    let (have, source) = match (backend.free_memory(), limit) {
        (Some(free), Some(l)) if l < free as u64 => (l, "memory_limit"),
        (Some(free), _) => (free as u64, "free device memory less the reserve"),
        (None, Some(l)) => (l, "memory_limit"),
        (None, None) => match host_available() {
            Some(a) => (a, "host memory available"),
            None => {
                warn!("cannot tell how much host memory is available: not checking the model fits");
                return Ok(());
            }
        },
    };
    let total = need.weights.saturating_add(need.kv.unwrap_or(0));
    info!(
        weights = %gib(need.weights),
        kv = %need.kv.map_or("a fraction of what is left".into(), gib),
        available = %gib(have),
        "memory needed"
    );
    if total <= have {
        return Ok(());
    }
    let kv = need
        .kv
        .map_or(String::new(), |k| format!(" + KV cache {}", gib(k)));
    Err(Error::Memory(format!(
        "the model needs {} ({} bytes): weights {} ({} bytes as {}){kv}; {source} is {} ({have} bytes). \
         Use a smaller model or KV cache (--kv-blocks), or raise --memory-limit",
        gib(total),
        total,
        gib(need.weights),
        need.weights,
        backend.weight_dtype(),
        gib(have),
    )))
}

/// Bytes for a reader: GiB from 1 GiB up, MiB below.
fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// Host memory this process may still take: `MemAvailable`, lowered by the
/// room left under each cgroup v2 `memory.max` from this process's cgroup
/// up to the root.
pub fn host_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut avail = mem_available(&meminfo)?;
    if let Some(dir) = own_cgroup() {
        for d in dir.ancestors() {
            if let Some(room) = cgroup_room(d) {
                avail = avail.min(room);
            }
        }
    }
    Some(avail)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// This process's cgroup v2 folder (`0::/path` in `/proc/self/cgroup`).
fn own_cgroup() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let root = Path::new("/sys/fs/cgroup");
    Some(root.join(rel.trim_start_matches('/'))).filter(|p| p.starts_with(root))
}

/// `memory.max - memory.current` of one cgroup folder, when it has a limit.
fn cgroup_room(dir: &Path) -> Option<u64> {
    let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
    let max: u64 = max.trim().parse().ok()?; // "max": no limit
    let current: u64 = std::fs::read_to_string(dir.join("memory.current"))
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(0);
    Some(max.saturating_sub(current))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    fn llama_8b() -> ModelConfig {
        crate::model::ModelSpec::parse("random:llama-3-8b", 0)
            .unwrap()
            .open()
            .unwrap()
            .0
    }

    #[test]
    fn reads_mem_available() {
        let m = "MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(mem_available(m), Some(1_024_000));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn the_cpu_holds_weights_as_f32() {
        let cpu = CpuBackend {
            round_to_bf16: true,
            round_activations: false,
            device_tactic: None,
        };
        let m = llama_8b();
        let n = need(&cpu, &m, &KvCapacity::Blocks(10));
        assert_eq!(n.weights, 4 * m.num_params() as u64);
        // 32 layers x 8 KV heads x 16 tokens x 128 dims x K and V x 4 bytes.
        assert_eq!(n.kv, Some(10 * 32 * 8 * 16 * 128 * 2 * 4));
    }

    #[test]
    fn too_large_is_refused_with_the_figures() {
        let cpu = CpuBackend {
            round_to_bf16: false,
            round_activations: false,
            device_tactic: None,
        };
        let config = Config {
            memory_limit: Some("1GiB".into()),
            ..Config::default()
        };
        let fits = Need {
            weights: 1 << 29,
            kv: Some(1 << 29),
        };
        assert!(
            check_fits(&cpu, &config, fits).is_ok(),
            "exactly the limit fits"
        );
        let over = Need {
            weights: 1 << 29,
            kv: Some((1 << 29) + 1),
        };
        let msg = check_fits(&cpu, &config, over).unwrap_err().to_string();
        assert!(
            msg.contains("weights 512.00 MiB (536870912 bytes as f32)"),
            "{msg}"
        );
        assert!(msg.contains("KV cache 512.00 MiB"), "{msg}");
        assert!(
            msg.contains("memory_limit is 1.00 GiB (1073741824 bytes)"),
            "{msg}"
        );
    }
}
