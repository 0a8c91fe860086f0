//! Fault injection for end-to-end tests (feature `fault-injection`, the
//! `tacflowd-faults` binary only): `TACFLOW_INJECT_FAULT=panic@step:2` wraps
//! the backend in `backend::faults::Faulty` and arms the plan once the
//! warm-up step is done. A release daemon has none of this code.
//!
//! The simulated faults run on either backend; `illegal_address` is a real
//! CUDA fault, so the CPU backend refuses it at start and the CUDA backend
//! loads the kernel that provokes it.

use crate::backend::Backend;
use crate::backend::cuda::CudaBackend;
use crate::backend::faults::{FaultPlan, Faulty};
use crate::config::Config;
use crate::error::{Error, Result};
use tracing::warn;

const VAR: &str = "TACFLOW_INJECT_FAULT";

/// The plan `TACFLOW_INJECT_FAULT` names, with its text; a bad plan refuses
/// to start.
pub fn plan_from_env() -> Result<Option<(String, FaultPlan)>> {
    let Ok(spec) = std::env::var(VAR) else {
        return Ok(None);
    };
    let plan = spec
        .parse::<FaultPlan>()
        .map_err(|e| Error::Config(format!("{VAR}: {e}")))?;
    Ok(Some((spec, plan)))
}

/// Refuses, before the model loads, a plan the CPU backend cannot run: a
/// fault that needs a real device would otherwise fail a step with an
/// ordinary error, and a test expecting a dead device would be misled.
pub fn check_cpu(spec: &str, plan: FaultPlan) -> Result<()> {
    if plan.fault.needs_device() {
        return Err(Error::Config(format!(
            "{VAR}={spec}: this fault is a real CUDA fault and needs the CUDA \
             backend (--backend cuda); the CPU backend has no device to fault"
        )));
    }
    Ok(())
}

/// The CUDA backend readied for `plan`: the kernel that faults on purpose
/// loaded when the plan launches it.
pub fn prepare_cuda(backend: CudaBackend, config: &Config, plan: FaultPlan) -> Result<CudaBackend> {
    if config.graphs() || !config.fusion_list().is_empty() {
        // `Faulty` counts the ops it sees, so it forwards neither the graph
        // path nor the fused ops: every step runs eagerly and unfused.
        warn!("fault injection runs every step eagerly, without graphs or fused ops");
    }
    if plan.fault.needs_device() {
        return backend.with_fault_kernel();
    }
    Ok(backend)
}

pub fn arm<B: Backend>(backend: &Faulty<B>, spec: &str, plan: FaultPlan) {
    backend.arm(plan);
    warn!(plan = spec, "fault injection armed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_refuses_a_real_fault_and_says_what_to_do() {
        let spec = "illegal_address@step:3";
        let e = check_cpu(spec, spec.parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains(VAR) && e.contains(spec), "{e}");
        assert!(e.contains("--backend cuda"), "{e}");
        for spec in ["error@op:1", "panic@step:2", "device_lost@step:3"] {
            assert!(check_cpu(spec, spec.parse().unwrap()).is_ok(), "{spec}");
        }
    }
}
