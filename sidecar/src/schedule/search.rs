//! A schedule from a cost model: simulate candidate nano-batch specs and
//! keep the fastest.
//!
//! Whether overlap pays depends on the GPU and the model: on a GPU where
//! decode attention is memory-bound it runs as fast on a fifth of the SMs
//! as on all of them, so running it beside the GEMMs of another nano-batch
//! hides it; where GEMMs dominate, splitting them only adds launches. So
//! the choice is measured, not guessed: a profile gives each op kind's time
//! at a few row counts and SM shares, a simulator predicts a schedule's
//! makespan from it, and the search tries the candidates.
//!
//! # The cost file (version 1)
//!
//! `tacflowd tune` writes it (docs/SCHEDULES.md).
//!
//! TOML (or JSON with the same fields, chosen by a `.json` extension):
//!
//! ```toml
//! version = 1                 # any other version is refused
//! model = "Llama-3.1-8B"      # what it was measured on, for the record
//! gpu = "NVIDIA H200"
//! sm_share = "grid+cublas"    # how the SM shares were given (GPU only), for the record
//!
//! [[points]]
//! op = "qkv"      # qkv | o_proj | gate_up | down | lm_head | attention | rowwise
//! rows = 256      # rows of the node
//! sm_share = 0.5  # fraction of the SMs its lane had, in (0, 1]
//! us = 41.2       # measured microseconds
//! ```
//!
//! Every op kind needs at least one point. Between profiled row counts the
//! time is interpolated linearly; below the smallest it is the smallest's
//! (a launch costs at least that), above the largest it grows in
//! proportion to the rows. Between profiled shares it is interpolated
//! linearly; below the smallest share it grows as the share shrinks, and
//! above the largest it stays the largest's.

use super::build::{self, LaneMap, NanoSpec};
use super::deps::ScheduleError;
use super::program::Program;
use super::{Op, Schedule, order};
use crate::backend::StepMeta;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The version of the cost file this code reads.
pub const COST_FILE_VERSION: u32 = 1;

/// What the cost model tells apart: each GEMM by its weight, attention,
/// and the row-wise rest (norms, RoPE, adds, the KV append...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Qkv,
    OProj,
    GateUp,
    Down,
    LmHead,
    Attention,
    Rowwise,
}

impl OpKind {
    pub const ALL: [OpKind; 7] = [
        OpKind::Qkv,
        OpKind::OProj,
        OpKind::GateUp,
        OpKind::Down,
        OpKind::LmHead,
        OpKind::Attention,
        OpKind::Rowwise,
    ];

    pub fn of(op: Op) -> OpKind {
        match op {
            Op::Qkv(_) => OpKind::Qkv,
            Op::OProj(_) => OpKind::OProj,
            Op::GateUp(_) => OpKind::GateUp,
            Op::Down(_) => OpKind::Down,
            Op::LmHead => OpKind::LmHead,
            Op::Attention(_) => OpKind::Attention,
            _ => OpKind::Rowwise,
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CostPoint {
    pub op: OpKind,
    pub rows: usize,
    pub sm_share: f64,
    pub us: f64,
}

/// The cost file as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostFile {
    pub version: u32,
    pub model: String,
    pub gpu: String,
    /// How the GPU's SM shares were given (`grid+cublas`, `green`...), for
    /// the record; absent on the CPU, and in files written before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_share: Option<String>,
    pub points: Vec<CostPoint>,
}

/// Per share level (ascending), the (rows, us) points, rows ascending.
type Levels = Vec<(f64, Vec<(usize, f64)>)>;

/// Microseconds per (op kind, rows, SM share), from profiled points.
#[derive(Debug, Clone, PartialEq)]
pub struct CostModel {
    pub model: String,
    pub gpu: String,
    table: BTreeMap<OpKind, Levels>,
}

impl CostModel {
    /// Reads a cost file: JSON if the name ends in `.json`, else TOML.
    pub fn load(path: &Path) -> Result<CostModel> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json = path.extension().is_some_and(|e| e == "json");
        let parsed = match json {
            true => serde_json::from_str(&text).map_err(|e| e.to_string()),
            false => toml::from_str(&text).map_err(|e| e.to_string()),
        };
        let file = parsed.map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        CostModel::from_file(file)
    }

    /// Checks a parsed file and indexes its points.
    pub fn from_file(file: CostFile) -> Result<CostModel> {
        if file.version != COST_FILE_VERSION {
            return Err(Error::Config(format!(
                "cost file version {} (this tacflowd reads version {COST_FILE_VERSION}); re-profile",
                file.version
            )));
        }
        let mut table: BTreeMap<OpKind, Levels> = BTreeMap::new();
        for p in &file.points {
            let good = p.sm_share > 0.0 && p.sm_share <= 1.0 && p.us >= 0.0 && p.rows > 0;
            if !good {
                return Err(Error::Config(format!("bad cost point {p:?}")));
            }
            let levels = table.entry(p.op).or_default();
            match levels.iter_mut().find(|(s, _)| *s == p.sm_share) {
                Some((_, pts)) => pts.push((p.rows, p.us)),
                None => levels.push((p.sm_share, vec![(p.rows, p.us)])),
            }
        }
        if let Some(kind) = OpKind::ALL.iter().find(|k| !table.contains_key(k)) {
            return Err(Error::Config(format!(
                "cost file has no point for {kind:?}"
            )));
        }
        for levels in table.values_mut() {
            levels.sort_by(|a, b| a.0.total_cmp(&b.0));
            levels
                .iter_mut()
                .for_each(|(_, pts)| pts.sort_by_key(|p| p.0));
        }
        let (model, gpu) = (file.model, file.gpu);
        Ok(CostModel { model, gpu, table })
    }

    /// Predicted microseconds of `rows` rows of `kind` on `share` of the SMs.
    pub fn cost(&self, kind: OpKind, rows: usize, share: f64) -> f64 {
        if rows == 0 {
            return 0.0;
        }
        let levels = &self.table[&kind];
        let at = |i: usize| over_rows(&levels[i].1, rows);
        let (lo, hi) = (levels[0].0, levels[levels.len() - 1].0);
        if share <= lo {
            return at(0) * lo / share;
        }
        if share >= hi {
            return at(levels.len() - 1);
        }
        let i = levels.iter().position(|l| l.0 >= share).unwrap();
        let (s0, s1) = (levels[i - 1].0, levels[i].0);
        lerp(at(i - 1), at(i), (share - s0) / (s1 - s0))
    }
}

fn lerp(a: f64, b: f64, t: f64) -> f64 {
    a + (b - a) * t
}

/// A share level's time at `rows` (see the module doc).
fn over_rows(points: &[(usize, f64)], rows: usize) -> f64 {
    let (first, last) = (points[0], points[points.len() - 1]);
    if rows <= first.0 {
        return first.1;
    }
    if rows >= last.0 {
        return last.1 * rows as f64 / last.0 as f64;
    }
    let i = points.iter().position(|p| p.0 >= rows).unwrap();
    let ((r0, u0), (r1, u1)) = (points[i - 1], points[i]);
    lerp(u0, u1, (rows - r0) as f64 / (r1 - r0) as f64)
}

/// The predicted makespan of `schedule`: lanes run concurrently, each node
/// on its lane's share of the SMs, starting once its lane is free and the
/// nodes it waits events of have finished.
pub fn makespan(
    schedule: &Schedule,
    model: &CostModel,
    shares: &[f64],
) -> Result<f64, ScheduleError> {
    let order = order::sequential(schedule)?;
    Ok(simulate(schedule, &order, model, shares, false))
}

/// [`makespan`] given an issue order; `serial`: see [`SearchSpace::serial`].
fn simulate(
    schedule: &Schedule,
    order: &[usize],
    model: &CostModel,
    shares: &[f64],
    serial: bool,
) -> f64 {
    let spans = spans(schedule, order, model, shares, serial);
    spans.into_iter().map(|(_, end)| end).fold(0.0, f64::max)
}

/// Each node's predicted (start, end) in microseconds, issued in `order`:
/// the timeline `bench-serve` draws. With `serial`, the lanes share one
/// timeline, as on a backend that runs each node as it is issued.
pub fn spans(
    schedule: &Schedule,
    order: &[usize],
    model: &CostModel,
    shares: &[f64],
    serial: bool,
) -> Vec<(f64, f64)> {
    let mut waits = vec![vec![]; schedule.nodes.len()];
    for e in &schedule.events {
        waits[e.after].push(e.before);
    }
    let mut span = vec![(0.0f64, 0.0f64); schedule.nodes.len()];
    let mut lane_free = vec![0.0f64; schedule.lanes.len()];
    for &v in order {
        let n = &schedule.nodes[v];
        let lane = if serial { 0 } else { n.lane };
        let ready = waits[v]
            .iter()
            .map(|&a| span[a].1)
            .fold(lane_free[lane], f64::max);
        let us = model.cost(OpKind::of(n.op), n.rows.len(), shares[n.lane]);
        span[v] = (ready, ready + us);
        lane_free[lane] = ready + us;
    }
    span
}

/// The candidates a search tries.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchSpace {
    pub dense_cuts: Vec<Vec<usize>>,
    pub attn_cuts: Vec<Vec<usize>>,
    pub lane_maps: Vec<LaneMap>,
    pub skews: Vec<usize>,
    /// SM shares are tried on this grid, each lane at least one step, their
    /// sum at most 1.
    pub share_step: f64,
    /// The backend runs lanes one after another (the CPU backend runs each
    /// node as it is issued): every lane gets the whole device and the
    /// makespan is the sum of the nodes, so cuts pay only where the cost
    /// table says smaller pieces are cheaper in sum.
    pub serial: bool,
}

impl SearchSpace {
    /// A space for one step: no cut; two nano-batches cut at every row
    /// (small steps) or at sixteenths; three and four equal ones;
    /// attention whole, or cut at the sequence boundary nearest each dense
    /// cut; NanoFlow's three lanes, two-batch overlap and one lane.
    pub fn for_step(meta: &StepMeta) -> SearchSpace {
        let rows = meta.tokens.len();
        let mut dense: Vec<Vec<usize>> = vec![vec![]];
        let step = rows.div_ceil(16).max(1);
        dense.extend((step..rows).step_by(step).map(|c| vec![c]));
        for k in [3, 4] {
            let cuts: Vec<usize> = (1..k).map(|i| i * rows / k).collect();
            if cuts.windows(2).all(|w| w[0] < w[1]) && cuts[0] > 0 {
                dense.push(cuts);
            }
        }
        let bounds = build::seq_boundaries(meta);
        let mut attn: Vec<Vec<usize>> = vec![vec![]];
        for cuts in &dense {
            let near = cuts
                .iter()
                .filter_map(|&c| bounds.iter().min_by_key(|&&b| b.abs_diff(c)));
            let mut near: Vec<usize> = near.copied().collect();
            near.dedup();
            if !attn.contains(&near) {
                attn.push(near);
            }
        }
        SearchSpace {
            dense_cuts: dense,
            attn_cuts: attn,
            lane_maps: vec![LaneMap::single(), LaneMap::nanoflow(), LaneMap::two_batch()],
            skews: vec![0, 2, 6],
            share_step: 0.1,
            serial: false,
        }
    }
}

/// Every vector of `lanes` shares on the grid of `step`, each at least one
/// step, summing to at most 1.
pub fn share_grid(lanes: usize, step: f64) -> Vec<Vec<f64>> {
    let units = (1.0 / step + 1e-9).floor() as usize;
    let mut out = vec![];
    let mut cur = vec![];
    fn rec(lanes: usize, left: usize, step: f64, cur: &mut Vec<f64>, out: &mut Vec<Vec<f64>>) {
        if cur.len() == lanes {
            out.push(cur.clone());
            return;
        }
        for u in 1..=left.saturating_sub(lanes - cur.len() - 1) {
            cur.push((u as f64 * step).min(1.0));
            rec(lanes, left - u, step, cur, out);
            cur.pop();
        }
    }
    rec(lanes, units, step, &mut cur, &mut out);
    out
}

/// The search's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchResult {
    pub spec: NanoSpec,
    /// SM share per lane.
    pub shares: Vec<f64>,
    pub predicted_us: f64,
    /// The sequential pass on all SMs, under the same model.
    pub sequential_us: f64,
}

/// The fastest candidate of `space` under `model`; on a tie the first
/// found, so the space's simplest candidates (listed first) win ties.
pub fn search(
    program: &Program,
    meta: &StepMeta,
    model: &CostModel,
    space: &SearchSpace,
) -> Result<SearchResult, ScheduleError> {
    let seq = build::sequential(program, meta.tokens.len(), meta.logit_rows.len());
    let sequential_us = makespan(&seq, model, &[1.0])?;
    let mut best: Option<SearchResult> = None;
    for spec in candidates(space) {
        let schedule = build::nano_batched(program, meta, &spec)?;
        let order = order::sequential(&schedule)?;
        let lanes = schedule.lanes.len();
        // One lane has nothing beside it: it gets the whole device.
        let grid = match space.serial || lanes == 1 {
            true => vec![vec![1.0; lanes]],
            false => share_grid(lanes, space.share_step),
        };
        for shares in grid {
            let us = simulate(&schedule, &order, model, &shares, space.serial);
            if best.as_ref().is_none_or(|b| us < b.predicted_us - 1e-9) {
                let spec = spec.clone();
                best = Some(SearchResult {
                    spec,
                    shares,
                    predicted_us: us,
                    sequential_us,
                });
            }
        }
    }
    Ok(best.expect("a search space with at least one candidate"))
}

/// Every spec of `space`, lane maps outermost in the order given.
fn candidates(space: &SearchSpace) -> impl Iterator<Item = NanoSpec> + '_ {
    space.lane_maps.iter().flat_map(move |lanes| {
        space.dense_cuts.iter().flat_map(move |dense| {
            space.attn_cuts.iter().flat_map(move |attn| {
                space.skews.iter().map(move |&skew| NanoSpec {
                    dense_cuts: dense.clone(),
                    attn_cuts: attn.clone(),
                    lanes: lanes.clone(),
                    skew,
                })
            })
        })
    })
}
