//! Sequences whose Tactic state the backend keeps (`Backend::device_tactic`):
//! the engine names each state and tells the backend when a sequence opens,
//! forks, truncates or closes; the backend grows and reads the states inside
//! the attention, and keeps or undoes a step's changes when the step ends.
//! A sequence opened with diagnostics gets them from the backend, which
//! measures its selections where it makes them (`Backend::tactic_diagnostics`).

use super::Engine;
use super::sparse::{DEFAULT_DIAGNOSTIC_P, DeviceTactic, PolicyState, tactic_params};
use crate::backend::{Backend, Baseline};
use tacflow_ipc::{AttentionPolicy, ErrorCode, ErrorReply};

impl<B: Backend> Engine<B> {
    /// The state of a new sequence with `policy`: the backend's own for
    /// Tactic when it keeps Tactic states, the backend's selection for
    /// the baselines when it selects them on its device, else the host's.
    pub(super) fn new_state(
        &mut self,
        policy: &AttentionPolicy,
    ) -> Result<PolicyState, ErrorReply> {
        let layers = self.model.config.num_layers;
        if self.backend.device_baselines()
            && let Some((baseline, p)) = device_baseline(policy)
        {
            return Ok(PolicyState::DeviceBaseline { baseline, p });
        }
        let Some(params) = tactic_params(policy).filter(|_| self.backend.device_tactic()) else {
            return Ok(PolicyState::new(policy, layers));
        };
        let id = self.next_state;
        self.next_state += 1;
        let dims = self.model.dims();
        self.backend
            .tactic_open(id, &params, dims, layers)
            .map_err(|e| ErrorReply::new(ErrorCode::Unsupported, e.to_string()))?;
        Ok(PolicyState::Device(DeviceTactic { id, params }))
    }

    /// The state of a fork of a sequence whose state the backend keeps.
    pub(super) fn fork_device(&mut self, d: DeviceTactic) -> Result<PolicyState, ErrorReply> {
        let id = self.next_state;
        self.next_state += 1;
        self.backend
            .tactic_fork(d.id, id)
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
        Ok(PolicyState::Device(DeviceTactic { id, ..d }))
    }

    /// Tells the backend that a sequence with `state` is gone.
    pub(super) fn drop_state(&self, state: &PolicyState) {
        if let Some(id) = state.device_id() {
            self.backend.tactic_close(id);
        }
    }
}

/// A baseline policy as the backend selects it on its device, with the
/// mass its success is counted against (`None` for other policies).
fn device_baseline(policy: &AttentionPolicy) -> Option<(Baseline, f32)> {
    match *policy {
        AttentionPolicy::OracleTopP { p } => Some((Baseline::Oracle { p }, p)),
        AttentionPolicy::FixedBudget { tokens, p } => Some((
            Baseline::Budget {
                tokens: tokens as usize,
            },
            p.unwrap_or(DEFAULT_DIAGNOSTIC_P),
        )),
        _ => None,
    }
}
