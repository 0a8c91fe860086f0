//! Sparse decode attention in the engine: each sequence's policy state, the
//! per-layer selection of the step's decode tokens, and the diagnostics that
//! measure what a selection kept (kernels/TACTIC.md).
//!
//! Prefill is always full attention; a policy acts on decode entries (one new
//! token). The selection math lives in `tacflow_kernels::tactic`; this module
//! owns the state across steps and runs it on the host views the backend
//! exposes (the CPU backend).

use super::undo::Undo;
use crate::backend::tactic::{StateId, TacticMeasure};
use crate::backend::{Baseline, HostLayerView, RowRange, StepMeta, TacticEntry};
use crate::error::{Error, Result};
use rayon::prelude::*;
use tacflow_ipc::{AttentionDiagnostics, AttentionPolicy};

use super::diag::Sums;
pub use super::diag::{PolicyTotals, StepDiag, publish};
use tacflow_kernels::cpu::KvLayer;
use tacflow_kernels::tactic::{
    self, DecodeStep, HeadDiag, PageBounds, PagedKeys, TacticParams, TacticSeq,
};

/// Target mass the diagnostics of a `fixed_budget` sequence measure success
/// against when it names none.
pub const DEFAULT_DIAGNOSTIC_P: f32 = 0.9;

/// A sequence's sparse-attention state across steps.
#[derive(Debug)]
pub enum PolicyState {
    Full,
    Tactic(Box<TacticSeq>),
    /// Quest page bounds per `[layer][kv_head]`, grown as pages fill.
    FixedBudget {
        tokens: usize,
        p: f32,
        bounds: Vec<Vec<PageBounds>>,
    },
    Oracle {
        p: f32,
    },
    /// Tactic whose state the backend keeps (`Backend::device_tactic`): the
    /// engine holds its name, the backend selects inside the attention.
    Device(DeviceTactic),
    /// A baseline selected by the backend inside the attention
    /// (`Backend::device_baselines`); nothing carries across steps. `p` is
    /// the mass success is counted against.
    DeviceBaseline {
        baseline: Baseline,
        p: f32,
    },
}

/// A sequence's Tactic state kept by the backend.
#[derive(Debug, Clone, Copy)]
pub struct DeviceTactic {
    pub id: StateId,
    pub params: TacticParams,
}

/// Tactic's parameters as a policy sets them (`None` for other policies).
pub fn tactic_params(policy: &AttentionPolicy) -> Option<TacticParams> {
    let AttentionPolicy::Tactic {
        p,
        cluster_size,
        recluster_limit,
    } = *policy
    else {
        return None;
    };
    let mut params = TacticParams::new(p);
    if let Some(c) = cluster_size {
        params.kmeans.cluster_size = c as usize;
    }
    if let Some(r) = recluster_limit {
        params.recluster_limit = r as usize;
    }
    Some(params)
}

impl PolicyState {
    /// The state of a sequence the host selects for (the backend's own
    /// Tactic states are made by the engine: `Engine::new_state`).
    pub fn new(policy: &AttentionPolicy, layers: usize) -> PolicyState {
        match *policy {
            AttentionPolicy::Full => PolicyState::Full,
            AttentionPolicy::Tactic { .. } => {
                let params = tactic_params(policy).expect("a Tactic policy");
                PolicyState::Tactic(Box::new(TacticSeq::new(params, layers)))
            }
            AttentionPolicy::FixedBudget { tokens, p } => PolicyState::FixedBudget {
                tokens: tokens as usize,
                p: p.unwrap_or(DEFAULT_DIAGNOSTIC_P),
                bounds: vec![Vec::new(); layers],
            },
            AttentionPolicy::OracleTopP { p } => PolicyState::Oracle { p },
        }
    }

    pub fn is_full(&self) -> bool {
        matches!(self, PolicyState::Full)
    }

    /// The state for a copy of the sequence (a fork): clusterings and bounds
    /// cover the shared prefix, so they carry over. A backend's state is
    /// forked by the backend (`Engine::fork_state`), not here.
    pub fn fork(&self) -> PolicyState {
        match self {
            PolicyState::Full => PolicyState::Full,
            PolicyState::Device(_) => unreachable!("the backend forks its own states"),
            PolicyState::Tactic(t) => {
                let mut copy = TacticSeq::new(t.params, t.index.len());
                copy.index = t.index.clone();
                PolicyState::Tactic(Box::new(copy))
            }
            PolicyState::FixedBudget { tokens, p, bounds } => PolicyState::FixedBudget {
                tokens: *tokens,
                p: *p,
                bounds: bounds.clone(),
            },
            PolicyState::Oracle { p } => PolicyState::Oracle { p: *p },
            PolicyState::DeviceBaseline { baseline, p } => PolicyState::DeviceBaseline {
                baseline: *baseline,
                p: *p,
            },
        }
    }

    /// Forgets what covers tokens that were dropped (a truncation): the state
    /// is rebuilt over the remaining cache at the next decode step.
    /// A backend's state is reset by the backend (`Backend::tactic_reset`).
    pub fn reset(&mut self) {
        match self {
            PolicyState::Tactic(t) => **t = TacticSeq::new(t.params, t.index.len()),
            PolicyState::FixedBudget { bounds, .. } => bounds.iter_mut().for_each(Vec::clear),
            PolicyState::Full
            | PolicyState::Oracle { .. }
            | PolicyState::Device(_)
            | PolicyState::DeviceBaseline { .. } => {}
        }
    }

    /// The backend's name for the state, when the backend keeps it.
    pub fn device_id(&self) -> Option<StateId> {
        match self {
            PolicyState::Device(d) => Some(d.id),
            _ => None,
        }
    }

    /// Whether the backend selects for this state (inside its attention).
    pub fn on_device(&self) -> bool {
        matches!(
            self,
            PolicyState::Device(_) | PolicyState::DeviceBaseline { .. }
        )
    }

    /// The mass the policy aims for (success is counted against it).
    pub fn target(&self) -> f32 {
        match self {
            PolicyState::Full => 1.0,
            PolicyState::Tactic(t) => t.params.p,
            PolicyState::Device(d) => d.params.p,
            PolicyState::FixedBudget { p, .. }
            | PolicyState::Oracle { p }
            | PolicyState::DeviceBaseline { p, .. } => *p,
        }
    }
}

/// One decode entry of the step that runs a sparse policy.
struct Slot<'a> {
    /// Index into the step's sequences.
    seq: usize,
    state: &'a mut PolicyState,
    diagnostics: bool,
    sums: Sums,
    /// What this step changed in `state`, to revert if the step fails.
    undo: Undo,
}

/// The selections of a step's sparse decode entries, layer by layer.
pub struct Selector<'a> {
    slots: Vec<Slot<'a>>,
    /// The step's sequences (by index) whose prompt ends in it and whose
    /// Tactic state the backend keeps, with that state: the backend
    /// clusters their keys at their last row, so that their first decode
    /// step only selects.
    prompt_ends: Vec<(usize, StateId)>,
    /// Per sequence of the step: the slots each KV head attends (`None`:
    /// full attention).
    current: Vec<Option<Vec<Vec<u32>>>>,
    dims: (usize, usize, usize),
}

impl<'a> Selector<'a> {
    /// `entries` pairs each sequence of the step (by index into
    /// `meta.seqs`) with its state and diagnostics flag; prefill entries
    /// and full-attention sequences are left out by the caller.
    pub fn new(
        entries: Vec<(usize, &'a mut PolicyState, bool)>,
        num_seqs: usize,
        layers: usize,
        (heads, kv_heads, head_dim): (usize, usize, usize),
    ) -> Selector<'a> {
        let slots = entries
            .into_iter()
            .map(|(seq, state, diagnostics)| Slot {
                seq,
                state,
                diagnostics,
                sums: Sums {
                    mass: vec![vec![0.0; heads]; layers],
                    est: vec![vec![0.0; heads]; layers],
                    read: vec![vec![0.0; kv_heads]; layers],
                    selected: vec![vec![0.0; kv_heads]; layers],
                },
                undo: Undo::default(),
            })
            .collect();
        Selector {
            slots,
            prompt_ends: vec![],
            current: vec![None; num_seqs],
            dims: (heads, kv_heads, head_dim),
        }
    }

    /// The selector with the backend's states of `ends` (step sequence,
    /// state) built at their prompt's last row (see
    /// `TacticEntry::prompt_end`).
    pub fn with_prompt_ends(mut self, ends: Vec<(usize, StateId)>) -> Selector<'a> {
        self.prompt_ends = ends;
        self
    }

    pub fn is_active(&self) -> bool {
        !self.slots.is_empty() || !self.prompt_ends.is_empty()
    }

    /// Whether the backend selects (its entries' states are its own): then
    /// the attention gets [`Selector::device_entries`] instead of host
    /// selections. A backend that keeps Tactic states serves no host
    /// policy (`engine::validate_policy`), so a step is one or the other.
    pub fn on_device(&self) -> bool {
        !self.prompt_ends.is_empty() || self.slots.iter().any(|s| s.state.on_device())
    }

    /// The decode entries and the prompts' ends whose row lies in `rows`,
    /// for the backend.
    pub fn device_entries(&self, meta: &StepMeta, rows: &RowRange) -> Vec<TacticEntry> {
        let ends = self.prompt_ends.iter().filter_map(|&(seq, state)| {
            let s = &meta.seqs[seq];
            let row = s.q_start + s.q_len - 1;
            rows.contains(&row).then_some(TacticEntry {
                seq,
                state,
                row,
                ctx_len: s.ctx_len,
                prompt_end: true,
                diagnostics: false,
                baseline: None,
            })
        });
        self.slots
            .iter()
            .filter_map(|slot| {
                let (state, baseline) = match *slot.state {
                    PolicyState::Device(d) => (d.id, None),
                    PolicyState::DeviceBaseline { baseline, .. } => (0, Some(baseline)),
                    _ => return None,
                };
                let s = &meta.seqs[slot.seq];
                rows.contains(&s.q_start).then_some(TacticEntry {
                    seq: slot.seq,
                    state,
                    row: s.q_start,
                    ctx_len: s.ctx_len,
                    prompt_end: false,
                    diagnostics: slot.diagnostics,
                    baseline,
                })
            })
            .chain(ends)
            .collect()
    }

    /// Whether an entry whose state the backend keeps asked for
    /// diagnostics: then the backend measured them during the pass
    /// (`Backend::tactic_diagnostics`) and [`Selector::absorb`] takes them.
    pub fn wants_device_diagnostics(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.diagnostics && s.state.on_device())
    }

    /// Takes the backend's measures of its selections into the sums
    /// (what [`select_layer`] measures on the host, the same fields).
    pub fn absorb(&mut self, measures: &[TacticMeasure]) -> Result<()> {
        let group = self.dims.0 / self.dims.1;
        for m in measures {
            let slot = self
                .slots
                .iter_mut()
                .find(|s| s.seq == m.seq && s.diagnostics)
                .ok_or_else(|| Error::Backend(format!("a measure of entry {}", m.seq)))?;
            let sums = &mut slot.sums;
            let (l, h, ctx) = (m.layer, m.head, m.ctx_len as f64);
            if l >= sums.read.len() || h >= sums.read[l].len() || m.mass.len() != group {
                return Err(Error::Backend("a measure out of the model's shape".into()));
            }
            sums.read[l][h] = m.tokens_read / ctx;
            sums.selected[l][h] = m.selected as f64 / ctx;
            sums.mass[l][h * group..(h + 1) * group].copy_from_slice(&m.mass);
            sums.est[l][h * group..(h + 1) * group].copy_from_slice(&m.est);
        }
        Ok(())
    }

    /// Computes this layer's selections of the decode entries whose row
    /// lies in `rows` (an attention node of the schedule); returns them per
    /// step sequence (entries outside `rows` keep an earlier selection,
    /// which the attention of `rows` does not read).
    pub fn select(
        &mut self,
        layer: usize,
        view: Option<HostLayerView<'_>>,
        meta: &StepMeta,
        rows: &RowRange,
    ) -> Result<&[Option<Vec<Vec<u32>>>]> {
        let view = view.ok_or_else(|| {
            Error::Backend("sparse attention policies need the CPU backend".into())
        })?;
        let dims = self.dims;
        let picks: Vec<(usize, Vec<Vec<u32>>)> = self
            .slots
            .par_iter_mut()
            .filter(|slot| rows.contains(&meta.seqs[slot.seq].q_start))
            .map(|slot| {
                let s = &meta.seqs[slot.seq];
                let row = s.q_start;
                let q = &view.qkv[row * view.row_len..row * view.row_len + dims.0 * dims.2];
                let sel = select_one(slot, layer, q, view.kv, &s.block_table, s.ctx_len, dims);
                (slot.seq, sel)
            })
            .collect();
        for (seq, sel) in picks {
            self.current[seq] = Some(sel);
        }
        Ok(&self.current)
    }

    /// Ends the pass: the diagnostics of every sparse decode entry that
    /// asked for them and what the pass changed in each state.
    pub fn finish(self) -> Outcome {
        let mut out = Outcome::default();
        for slot in self.slots {
            if slot.diagnostics {
                let d = StepDiag::from_sums(&slot.sums, slot.state.target());
                out.diags.push((slot.seq, d));
            }
            if !slot.undo.is_empty() {
                out.undo.push((slot.seq, slot.undo));
            }
        }
        out
    }
}

/// What a step's selections leave for its end, by index into the step's
/// sequences: diagnostics to count if it commits, changes to revert if it
/// fails.
#[derive(Debug, Default)]
pub struct Outcome {
    pub diags: Vec<(usize, StepDiag)>,
    pub undo: Vec<(usize, Undo)>,
}

/// One sequence's selection at one layer, with its diagnostics.
fn select_one(
    slot: &mut Slot<'_>,
    layer: usize,
    q: &[f32],
    kv: KvLayer<'_>,
    table: &[u32],
    ctx_len: usize,
    dims: (usize, usize, usize),
) -> Vec<Vec<u32>> {
    let at = LayerQuery {
        layer,
        q,
        kv,
        table,
        ctx_len,
        dims,
    };
    let (out, diag) = select_layer(slot.state, &mut slot.undo, slot.diagnostics, &at);
    if let Some(d) = diag {
        let sums = &mut slot.sums;
        sums.read[layer] = d.read;
        sums.selected[layer] = d.selected;
        sums.mass[layer] = d.mass;
        sums.est[layer] = d.est;
    }
    out
}

/// One decode query of one sequence at one layer: its query heads (scaled
/// so that `q·k/√head_dim` are the model's scores) over its paged cache.
#[derive(Debug, Clone, Copy)]
pub struct LayerQuery<'a> {
    pub layer: usize,
    /// `num_heads * head_dim` values.
    pub q: &'a [f32],
    pub kv: KvLayer<'a>,
    pub table: &'a [u32],
    pub ctx_len: usize,
    /// `(num_heads, num_kv_heads, head_dim)`.
    pub dims: (usize, usize, usize),
}

/// What one layer's selection read and kept, per head.
#[derive(Debug, Clone, Default)]
pub struct LayerDiag {
    /// Per query head: the true and the estimated mass of the selection.
    pub mass: Vec<f64>,
    pub est: Vec<f64>,
    /// Per KV head: token-equivalents read and tokens selected, over the
    /// context length.
    pub read: Vec<f64>,
    pub selected: Vec<f64>,
}

impl LayerDiag {
    /// Averages over the layer's heads, success counted against `target`.
    pub fn summary(&self, policy: &str, target: f32) -> AttentionDiagnostics {
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len().max(1) as f64;
        let ok = self
            .mass
            .iter()
            .filter(|&&m| m >= f64::from(target))
            .count();
        AttentionDiagnostics {
            policy: policy.to_owned(),
            tokens_read_fraction: mean(&self.read),
            selected_fraction: mean(&self.selected),
            true_mass: mean(&self.mass),
            estimated_mass: mean(&self.est),
            min_true_mass: self.mass.iter().copied().fold(f64::INFINITY, f64::min),
            success_rate: ok as f64 / self.mass.len().max(1) as f64,
        }
    }
}

/// The slots each KV head of one decode query attends under `state`'s
/// policy at one layer, growing the state (noted in `undo`), and with
/// `diagnostics` what the selection read and kept. Shared by the model's
/// forward pass and attention offload.
pub fn select_layer(
    state: &mut PolicyState,
    undo: &mut Undo,
    diagnostics: bool,
    at: &LayerQuery<'_>,
) -> (Vec<Vec<u32>>, Option<LayerDiag>) {
    let LayerQuery {
        layer,
        q,
        kv,
        table,
        ctx_len,
        dims: (heads, kv_heads, d),
    } = *at;
    let group = heads / kv_heads;
    let mut out = vec![Vec::new(); kv_heads];
    let mut diags = vec![HeadDiag::default(); kv_heads];
    let keys = |h: usize| PagedKeys {
        kv,
        block_table: table,
        head: h,
    };
    let mut scores = Vec::new();
    match state {
        PolicyState::Full => unreachable!("full attention selects nothing"),
        PolicyState::Device(_) | PolicyState::DeviceBaseline { .. } => {
            unreachable!("the backend selects for its own states")
        }
        PolicyState::Tactic(t) => {
            let step = DecodeStep {
                q,
                kv,
                block_table: table,
                ctx_len,
            };
            undo.before_clusters(t, layer, ctx_len);
            t.select_layer(layer, &step, &mut out, &mut diags);
            undo.after_clusters(t, layer);
        }
        PolicyState::FixedBudget { tokens, bounds, .. } => {
            let page = kv.block_size;
            // Bounds cover the full pages; the partial last page is new
            // tokens, always attended.
            let covered = (ctx_len / page) * page;
            undo.before_bounds(&bounds[layer], layer, covered);
            for h in 0..kv_heads {
                let b = &mut bounds[layer];
                if b.len() <= h {
                    b.push(PageBounds::build(&keys(h), covered, page));
                } else if b[h].len < covered {
                    b[h].extend(&keys(h), covered);
                }
                let qg = &q[h * group * d..(h + 1) * group * d];
                diags[h].tokens_read =
                    tactic::fixed_budget(&b[h], qg, ctx_len, *tokens, &mut out[h]);
                diags[h].selected = out[h].len();
            }
        }
        PolicyState::Oracle { p } => {
            let mut order = Vec::new();
            for (h, sel) in out.iter_mut().enumerate() {
                for g in 0..group {
                    let qh = &q[(h * group + g) * d..(h * group + g + 1) * d];
                    tactic::exact_scores(&keys(h), qh, ctx_len, &mut scores);
                    tactic::oracle_top_p(&scores, *p, &mut order, sel);
                }
                sel.sort_unstable();
                sel.dedup();
                // The oracle scores every key for free: it reads its set.
                diags[h].tokens_read = sel.len() as f64;
                diags[h].selected = sel.len();
            }
        }
    }
    if !diagnostics {
        return (out, None);
    }
    let mut ld = LayerDiag {
        mass: vec![0.0; heads],
        est: vec![0.0; heads],
        read: vec![0.0; kv_heads],
        selected: vec![0.0; kv_heads],
    };
    for h in 0..kv_heads {
        ld.read[h] = diags[h].tokens_read / ctx_len as f64;
        ld.selected[h] = diags[h].selected as f64 / ctx_len as f64;
        for g in 0..group {
            let qh = &q[(h * group + g) * d..(h * group + g + 1) * d];
            tactic::exact_scores(&keys(h), qh, ctx_len, &mut scores);
            let mass = tactic::true_mass(&scores, &out[h]);
            ld.mass[h * group + g] = mass;
            ld.est[h * group + g] = match state {
                PolicyState::Tactic(_) => f64::from(diags[h].est_mass[g]),
                // The oracle knows its mass; a fixed budget estimates none.
                PolicyState::Oracle { .. } => mass,
                _ => f64::NAN,
            };
        }
    }
    (out, Some(ld))
}
