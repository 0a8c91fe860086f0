//! The schedule `tacflowd tune` chose, as a file the daemon loads at start
//! (`--overlap auto` or `--overlap <file>`), and its application to steps of
//! any shape.
//!
//! A search picks a [`NanoSpec`] for one representative step; real steps
//! have other row counts and sequence boundaries. So the file keeps each
//! choice in relative terms: cut points as fractions of the step's rows,
//! attention cuts snapped to the sequence boundary nearest their fraction.
//! Each step uses the entry of the smallest representative step at least
//! as large as it (the largest for larger steps). The file format is
//! documented in `docs/SCHEDULES.md`.

use super::build::{self, LaneMap, NanoSpec};
use super::deps::{self, ScheduleError};
use super::program::Program;
use super::{Plan, Schedule, order};
use crate::backend::StepMeta;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The version of the schedule file this code reads and writes.
pub const SCHEDULE_FILE_VERSION: u32 = 1;

/// What a schedule was tuned for: a daemon runs a file only when all three
/// are its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleKey {
    /// A hash of the model's shapes and its forward pass's ops (not of
    /// its weight values, which do not change an op's time).
    pub fingerprint: String,
    /// The backend and device in words (`cpu (2 threads)`).
    pub device: String,
    /// The attention policy the attention op was profiled under.
    pub policy: String,
}

impl ScheduleKey {
    /// The cache file's name for this key.
    pub fn file_name(&self) -> String {
        let slug: String = format!("{}-{}-{}", self.fingerprint, self.device, self.policy)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("schedule-{slug}.toml")
    }
}

/// One representative step's choice, relative to the step's rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunedStep {
    /// The representative step, in words (`8 decodes at 256 + a 56-row prefill`).
    pub shape: String,
    /// Its token rows: steps of at most this many rows use this entry.
    pub rows: usize,
    /// Dense cuts as fractions of the step's rows, ascending in (0, 1).
    pub dense_cuts: Vec<f64>,
    /// Attention cuts as fractions, each snapped to the nearest sequence
    /// boundary.
    pub attn_cuts: Vec<f64>,
    /// Lanes of each piece's GEMMs, other dense ops, attention
    /// ([`LaneMap`]).
    pub gemm_lanes: Vec<usize>,
    pub other_lanes: Vec<usize>,
    pub attention_lanes: Vec<usize>,
    pub skew: usize,
    /// SM (CPU: thread) share per lane, as the search chose it.
    pub shares: Vec<f64>,
    /// The cost model's prediction for the representative step, and the
    /// sequential pass's under the same model.
    pub predicted_us: f64,
    pub sequential_us: f64,
}

/// The file `tune` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleFile {
    pub version: u32,
    /// The model's name, for the record.
    pub model: String,
    #[serde(flatten)]
    pub key: ScheduleKey,
    /// The cost file the search read, for the record.
    pub cost_file: String,
    /// Ascending by `rows`.
    pub steps: Vec<TunedStep>,
}

impl ScheduleFile {
    /// Reads and checks a schedule file; `expect` is the running daemon's
    /// key, and a file made for another key is refused.
    pub fn load(path: &Path, expect: &ScheduleKey) -> Result<ScheduleFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |why: String| Error::Config(format!("schedule file {}: {why}", path.display()));
        #[derive(Deserialize)]
        struct Version {
            version: Option<u32>,
        }
        let v: Version = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        match v.version {
            Some(SCHEDULE_FILE_VERSION) => {}
            Some(other) => {
                return Err(bad(format!(
                    "version {other} (this tacflowd reads version {SCHEDULE_FILE_VERSION}); re-run `tacflowd tune`"
                )));
            }
            None => return Err(bad("no version field".into())),
        }
        let file: ScheduleFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        file.check().map_err(bad)?;
        if file.key != *expect {
            return Err(bad(format!(
                "tuned for {:?}, this daemon is {:?}; re-run `tacflowd tune` or start with --overlap off",
                file.key, expect
            )));
        }
        Ok(file)
    }

    /// Writes the file as TOML.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string(self).map_err(|e| Error::Config(e.to_string()))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.steps.is_empty() {
            return Err("no steps".into());
        }
        for s in &self.steps {
            let fractions = s.dense_cuts.iter().chain(&s.attn_cuts);
            if fractions.clone().any(|&f| !(f > 0.0 && f < 1.0)) {
                return Err(format!("{}: a cut outside (0, 1)", s.shape));
            }
            let lanes = s.lane_map().lanes();
            let shares_ok =
                s.shares.len() == lanes && s.shares.iter().all(|&x| x > 0.0 && x <= 1.0);
            let lists = [&s.gemm_lanes, &s.other_lanes, &s.attention_lanes];
            if lists.iter().any(|l| l.is_empty()) || !shares_ok || lanes > 8 {
                return Err(format!("{}: bad lanes or shares", s.shape));
            }
        }
        if self.steps.windows(2).any(|w| w[0].rows >= w[1].rows) {
            return Err("steps not ascending by rows".into());
        }
        Ok(())
    }

    /// The entry a step of `rows` token rows runs.
    pub fn entry(&self, rows: usize) -> &TunedStep {
        let found = self.steps.iter().find(|s| rows <= s.rows);
        found.unwrap_or_else(|| self.steps.last().expect("checked non-empty"))
    }

    /// A line for the log: what runs.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self.steps.iter().map(|s| s.describe()).collect();
        parts.join("; ")
    }
}

impl TunedStep {
    /// The relative form of `spec`, found for `meta`.
    pub fn from_spec(shape: String, meta: &StepMeta, spec: &NanoSpec) -> TunedStep {
        let rows = meta.tokens.len();
        let frac = |c: &Vec<usize>| c.iter().map(|&c| c as f64 / rows as f64).collect();
        TunedStep {
            shape,
            rows,
            dense_cuts: frac(&spec.dense_cuts),
            attn_cuts: frac(&spec.attn_cuts),
            gemm_lanes: spec.lanes.gemm.clone(),
            other_lanes: spec.lanes.other.clone(),
            attention_lanes: spec.lanes.attention.clone(),
            skew: spec.skew,
            shares: vec![],
            predicted_us: 0.0,
            sequential_us: 0.0,
        }
    }

    /// Whether this entry runs the sequential pass on every step.
    pub fn is_sequential(&self) -> bool {
        let (d, a) = (&self.dense_cuts, &self.attn_cuts);
        d.is_empty() && a.is_empty() && self.lane_map().lanes() == 1
    }

    pub fn lane_map(&self) -> LaneMap {
        LaneMap {
            gemm: self.gemm_lanes.clone(),
            other: self.other_lanes.clone(),
            attention: self.attention_lanes.clone(),
        }
    }

    /// The spec for a step: cuts scaled to its rows, attention cuts moved
    /// to its nearest sequence boundaries; cuts that fall outside the step
    /// or onto another are dropped (a one-row step runs uncut).
    pub fn spec_for(&self, meta: &StepMeta) -> NanoSpec {
        let rows = meta.tokens.len();
        let scaled = |f: &f64| (f * rows as f64).round() as usize;
        let mut dense: Vec<usize> = self.dense_cuts.iter().map(scaled).collect();
        dense.retain(|&c| c > 0 && c < rows);
        dense.dedup();
        let bounds = build::seq_boundaries(meta);
        let near = |c: usize| bounds.iter().copied().min_by_key(|b| b.abs_diff(c));
        let mut attn: Vec<usize> = self
            .attn_cuts
            .iter()
            .filter_map(|f| near(scaled(f)))
            .collect();
        attn.dedup();
        NanoSpec {
            dense_cuts: dense,
            attn_cuts: attn,
            lanes: self.lane_map(),
            skew: self.skew,
        }
    }

    pub fn describe(&self) -> String {
        let lanes = self.lane_map().lanes();
        format!(
            "<= {} rows ({}): {} dense and {} attention pieces on {lanes} lane(s), skew {}, predicted {:.1} us vs {:.1} sequential",
            self.rows,
            self.shape,
            self.dense_cuts.len() + 1,
            self.attn_cuts.len() + 1,
            self.skew,
            self.predicted_us,
            self.sequential_us
        )
    }
}

/// A loaded schedule file as the engine's plan, with the schedules it laid
/// out for recent step shapes: building and validating a schedule costs
/// about as much as a small step (a 30-layer model's is hundreds of nodes),
/// and decode steps repeat their shape.
#[derive(Debug)]
pub struct Tuned {
    pub file: ScheduleFile,
    laid: Mutex<HashMap<StepShape, Laid>>,
}

/// What a schedule depends on: the rows, each sequence's rows, the logit
/// rows (`program::accesses` reads nothing else of a step).
type StepShape = (usize, Vec<(usize, usize)>, Vec<u32>);
type Laid = Arc<(Schedule, Vec<usize>)>;

/// Step shapes kept before the cache starts over.
const KEEP: usize = 256;

impl PartialEq for Tuned {
    fn eq(&self, other: &Tuned) -> bool {
        self.file == other.file
    }
}

// The file's floats are checked on load; equality only tells plans apart.
impl Eq for Tuned {}

impl Tuned {
    pub fn new(file: ScheduleFile) -> Tuned {
        Tuned {
            file,
            laid: Mutex::new(HashMap::new()),
        }
    }

    /// The step's schedule and issue order, validated.
    pub fn lay_out(
        &self,
        program: &Program,
        meta: &StepMeta,
    ) -> std::result::Result<(Schedule, Vec<usize>), ScheduleError> {
        let shape: StepShape = (
            meta.tokens.len(),
            meta.seqs.iter().map(|s| (s.q_start, s.q_len)).collect(),
            meta.logit_rows.clone(),
        );
        let mut laid = self.laid.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = laid.get(&shape) {
            return Ok((hit.0.clone(), hit.1.clone()));
        }
        let spec = self.file.entry(meta.tokens.len()).spec_for(meta);
        if spec.is_sequential() {
            // Nothing to cut: the sequential pass, which needs no check.
            return Plan::Sequential.lay_out(program, meta);
        }
        let s = build::nano_batched(program, meta, &spec)?;
        deps::validate(&s, program, meta)?;
        let order = order::sequential(&s)?;
        if laid.len() >= KEEP {
            laid.clear();
        }
        laid.insert(shape, Arc::new((s.clone(), order.clone())));
        Ok((s, order))
    }
}
