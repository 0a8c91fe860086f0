//! The executor's side of attention offload at start-up: the pool that
//! attention-only sequences draw on, beside a model or (`--attention-only`)
//! instead of one.

use super::dispatch::Served;
use super::executor::Command;
use super::{ExecutorLinks, ServerInfo, instance_id, serve_queue};
use crate::backend::cpu::CpuBackend;
use crate::config::Config;
use crate::engine::BLOCK_SIZE;
use crate::engine::gauges::Gauges;
use crate::error::Result;
use crate::offload::Offload;
use std::sync::Arc;
use std::sync::mpsc;
use tacflow_ipc::{BackendInfo, ModelInfo};
use tracing::info;

/// Longest attention-only sequence when `max_context` is not configured.
const DEFAULT_MAX_CONTEXT: usize = 1 << 20;

/// The attention pool the configuration asks for. Offload computes on the
/// CPU kernels over host memory, so it takes every policy on any backend.
pub(super) fn offload(config: &Config, gauges: Arc<Gauges>) -> Offload {
    let max_context = config.max_context.unwrap_or(DEFAULT_MAX_CONTEXT);
    Offload::new(
        (config.attention_pool_mb as u64) << 20,
        max_context,
        true,
        gauges,
    )
}

/// A daemon without a model: it serves attention-only sequences of any
/// declared layout and nothing else. `hello` describes no model (zero
/// sizes, architecture `none`), so that older clients still read it.
pub(super) fn start(
    config: &Config,
    links: ExecutorLinks,
    rx: mpsc::Receiver<Command>,
    ready: mpsc::Sender<Result<ServerInfo>>,
) -> Result<()> {
    let gauges = Arc::new(Gauges::default());
    let offload = offload(config, gauges.clone());
    let max_context = config.max_context.unwrap_or(DEFAULT_MAX_CONTEXT);
    let (kind, device) = crate::backend::Backend::describe(&CpuBackend::default());
    info!(
        pool_mb = config.attention_pool_mb,
        "attention only: no model, serving attention_step"
    );
    let info = ServerInfo {
        instance_id: instance_id(),
        model: ModelInfo {
            name: "none".into(),
            architecture: "none".into(),
            vocab_size: 0,
            hidden_size: 0,
            num_layers: 0,
            num_heads: 0,
            num_kv_heads: 0,
            head_dim: 0,
            max_context: max_context as u32,
            dtype: "f32".into(),
            bos_token_id: None,
            eos_token_ids: vec![],
        },
        backend: BackendInfo { kind, device },
        block_size: BLOCK_SIZE as u32,
        policies: crate::engine::policies(crate::engine::Serves::host(true)),
        gauges: gauges.clone(),
        fd_socket: String::new(),
        cuda_ipc: Arc::new(super::cuda_regions::NoDevice),
    };
    let served: Served<CpuBackend> = Served {
        engine: None,
        offload,
        gauges,
    };
    serve_queue(served, info, config, links, rx, ready);
    Ok(())
}
