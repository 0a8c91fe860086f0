//! Fault injection for end-to-end tests (feature `fault-injection`, the
//! `tacflowd-faults` binary only): `TACFLOW_INJECT_FAULT=panic@step:2` wraps
//! the CPU backend in `backend::faults::Faulty` and arms the plan once the
//! warm-up step is done. A release daemon has none of this code.

use crate::backend::Backend;
use crate::backend::faults::{FaultPlan, Faulty};
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

pub fn arm<B: Backend>(backend: &Faulty<B>, spec: &str, plan: FaultPlan) {
    backend.arm(plan);
    warn!(plan = spec, "fault injection armed");
}
