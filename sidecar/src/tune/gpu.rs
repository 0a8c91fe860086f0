//! Profiling on the GPU: each op kind of the cost model at every row count
//! and SM share, on lane 0 held to that share by the configured mechanism
//! (`sm_share`: the bounded attention grid, cuBLAS's SM-count target, or a
//! green context), timed by CUDA events on the lane's stream: a warm-up,
//! then [`REPS`] calls each between its own pair of events, the median.
//!
//! The shares are the SMs the mechanism gave (a green context rounds the
//! request up to the driver's partition size), as fractions of the
//! device's. A mechanism bounds only what it reaches: with `grid` alone
//! the GEMMs run on every SM whatever the share, with `cublas` alone the
//! attention does, and the points say so (their time does not fall with
//! the share); the search then prices them as measured.

use super::profile::{Grid, decode_step, gemms, kv_layout};
use crate::backend::cuda::CudaBackend;
use crate::backend::{AttnDims, Backend, HostData};
use crate::config::{Config, SmShare};
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::model::config::ModelConfig;
use crate::schedule::search::{CostPoint, OpKind};
use crate::schedule::tuned::ScheduleFile;
use tracing::info;

/// Warm-up calls before a point is timed.
const WARMUP: usize = 3;
/// Calls timed per point, each between its own events; the median counts.
pub const REPS: usize = 15;
/// The shares asked for, as fractions of the SMs.
const LEVELS: [f64; 4] = [0.25, 0.5, 0.75, 1.0];

/// Seeded random values for a weight or an input.
fn rnd(stream: u64) -> HostData<'static> {
    HostData::Random {
        seed: 0x7e5e,
        stream,
        mean: 0.0,
        std: 0.02,
    }
}

/// Holds lane 0 to `sms` SMs (all with `None`) by every mechanism of
/// `mechs`; returns the SMs it was given (the fewest any mechanism gave).
pub fn hold_lane(
    b: &mut CudaBackend,
    lane: usize,
    mechs: &[SmShare],
    sms: Option<usize>,
) -> Result<usize> {
    let mut given = b.gpu().info().sm_count;
    if mechs.contains(&SmShare::Green) {
        // The lane is rebuilt in another context: nothing allocated on
        // its stream may outlive it.
        b.release_pooled();
    }
    for m in mechs {
        let n = b
            .gpu_mut()
            .limit_lane(lane, m.mechanism(), sms)
            .map_err(|e| Error::Backend(format!("sm_share {}: {e}", m.mechanism().name())))?;
        given = given.min(n);
    }
    Ok(given)
}

/// The median microseconds of `f` on the current lane, timed by events.
fn time(b: &CudaBackend, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let gpu = b.gpu();
    for _ in 0..WARMUP {
        f()?;
    }
    let spans = (0..REPS)
        .map(|_| gpu.span())
        .collect::<Result<Vec<_>, _>>()?;
    for s in &spans {
        s.start(gpu)?;
        f()?;
        s.stop(gpu)?;
    }
    let mut us = spans
        .iter()
        .map(|s| Ok(s.ms()? * 1e3))
        .collect::<Result<Vec<f64>>>()?;
    us.sort_by(|a, b| a.total_cmp(b));
    Ok(us[us.len() / 2])
}

/// Every op kind at every row count and share (lane 0, held by `mechs`):
/// the cost file's points. `progress` gets a line per share.
pub fn profile(
    b: &mut CudaBackend,
    c: &ModelConfig,
    grid: &Grid,
    mechs: &[SmShare],
    mut progress: impl FnMut(&str),
) -> Result<Vec<CostPoint>> {
    if mechs.is_empty() {
        return Err(Error::Config(
            "tune on the GPU profiles SM shares through a mechanism: give --sm-share grid,cublas (or green, or one of them)".into(),
        ));
    }
    let sm_count = b.gpu().info().sm_count;
    let mut points = vec![];
    for level in LEVELS {
        let ask = sms_of(level, sm_count);
        let given = hold_lane(b, 0, mechs, ask)?;
        let share = given as f64 / sm_count as f64;
        let at = points.len();
        at_share(b, c, grid, share, &mut points)?;
        progress(&format!(
            "profiled {} points at {given} of {sm_count} SMs ({})",
            points.len() - at,
            SmShare::describe(mechs)
        ));
    }
    hold_lane(b, 0, mechs, None)?;
    Ok(points)
}

/// The points of one share: each GEMM, an RMSNorm, decode attention.
fn at_share(
    b: &CudaBackend,
    c: &ModelConfig,
    grid: &Grid,
    share: f64,
    points: &mut Vec<CostPoint>,
) -> Result<()> {
    let max_rows = grid.rows.iter().copied().max().unwrap_or(1);
    let bf16 = b.bf16_activations();
    let mut add = |op, rows, us| {
        points.push(CostPoint {
            op,
            rows,
            sm_share: share,
            us,
        })
    };
    for (i, (kind, out, inp)) in gemms(c).into_iter().enumerate() {
        let w = b.matrix(out, inp, rnd(i as u64))?;
        let x = b.act_from_host(max_rows, inp, &host(max_rows * inp, i), bf16)?;
        let mut y = b.act(max_rows, out)?;
        for &rows in &grid.rows {
            add(
                kind,
                rows,
                time(b, &mut || b.linear(&x, &w, &mut y, 0..rows))?,
            );
        }
    }
    let hidden = c.hidden_size;
    let norm = b.vector(hidden, rnd(9))?;
    let x = b.act_from_host(max_rows, hidden, &host(max_rows * hidden, 9), false)?;
    let mut h = b.act(max_rows, hidden)?;
    for &rows in &grid.rows {
        let mut f = || b.rmsnorm(&x, &norm, c.rms_norm_eps, &mut h, 0..rows);
        add(OpKind::Rowwise, rows, time(b, &mut f)?);
    }
    for &rows in &grid.rows {
        add(
            OpKind::Attention,
            rows,
            attention(b, c, rows, grid.context)?,
        );
    }
    Ok(())
}

/// Seeded host values in [-0.5, 0.5) (the inputs' values do not change an
/// op's time; a seed keeps runs alike).
pub fn host(n: usize, seed: usize) -> Vec<f32> {
    let mut rng = crate::schedule::build::Rng::new(0x9e37 + seed as u64);
    (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect()
}

/// Decode attention of `rows` sequences at `context` cached tokens.
fn attention(b: &CudaBackend, c: &ModelConfig, rows: usize, context: usize) -> Result<f64> {
    let meta = decode_step(rows, context);
    let kv = b.kv_cache(&kv_layout(c, rows, context))?;
    let step = b.begin_step(&meta)?;
    let dims = AttnDims {
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    };
    let qkv = b.act_from_host(rows, c.qkv_dim(), &host(rows * c.qkv_dim(), 11), false)?;
    let mut out = b.act(rows, c.q_dim())?;
    time(b, &mut || {
        b.attention(&step, &qkv, &kv, 0, dims, &mut out, 0..rows)
    })
}

/// Holds each lane to its share of the tuned schedule `config.overlap`
/// names, by `config.sm_share`, before the daemon loads the model: the
/// shares of its entry for the largest representative step (a lane keeps
/// its share for the whole run; the shares of smaller entries are not
/// applied per step). Nothing without `sm_share` or without a schedule:
/// the lanes are then those of a build without SM shares. Returns the SMs
/// each lane got, when it held any.
pub fn hold_tuned_lanes(b: &mut CudaBackend, config: &Config) -> Result<Option<Vec<usize>>> {
    if config.sm_share.is_empty() {
        return Ok(None);
    }
    let (model, _) = ModelSpec::parse(&config.model, config.seed)?.open()?;
    let program = super::program_of(&model, config);
    let key = super::key(&*b, &model, &program, super::POLICY);
    let Some(path) = super::tuned_path(config, &key)? else {
        return Ok(None);
    };
    let file = ScheduleFile::load(&path, &key)?;
    // A schedule that is the sequential pass at every step runs as it
    // (`tune::at_start`): its one lane keeps the whole device.
    if file.steps.iter().all(|s| s.is_sequential()) {
        return Ok(None);
    }
    let shares = file
        .steps
        .last()
        .map(|s| s.shares.clone())
        .unwrap_or_default();
    let given = hold_lanes(b, &config.sm_share, &shares)?;
    info!(
        sm_share = %SmShare::describe(&config.sm_share),
        ?shares,
        sms = ?given,
        "lanes held to the tuned schedule's SM shares"
    );
    Ok(Some(given))
}

/// Lane `i` held to `shares[i]` of the SMs (lanes past the list: all);
/// green contexts carved disjoint.
pub fn hold_lanes(b: &mut CudaBackend, mechs: &[SmShare], shares: &[f64]) -> Result<Vec<usize>> {
    let all = b.gpu().info().sm_count;
    let lanes = b.gpu().lanes();
    if shares.len() > lanes {
        return Err(Error::Config(format!(
            "the schedule gives {} lanes SM shares; the backend runs {lanes} (gpu_lanes)",
            shares.len()
        )));
    }
    let sms = lane_sms(shares, lanes, all);
    if mechs.contains(&SmShare::Green) {
        b.release_pooled();
        let given = b.gpu_mut().green_lanes(&sms);
        return given.map_err(|e| Error::Backend(format!("sm_share green: {e}")));
    }
    (0..lanes).map(|l| hold_lane(b, l, mechs, sms[l])).collect()
}

/// The SMs a share asks for, at least one; `None` for the whole device.
fn sms_of(share: f64, all: usize) -> Option<usize> {
    let n = (share * all as f64).round().max(1.0) as usize;
    (n < all).then_some(n)
}

/// Per lane, the SMs of its share (lanes past `shares`: the whole device).
fn lane_sms(shares: &[f64], lanes: usize, all: usize) -> Vec<Option<usize>> {
    (0..lanes)
        .map(|l| sms_of(shares.get(l).copied().unwrap_or(1.0), all))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_become_sm_counts_and_the_whole_device_is_no_limit() {
        assert_eq!(sms_of(1.0, 132), None);
        assert_eq!(sms_of(0.25, 132), Some(33));
        assert_eq!(sms_of(0.5, 132), Some(66));
        assert_eq!(sms_of(0.001, 132), Some(1), "at least one SM");
        assert_eq!(sms_of(0.999, 132), None, "rounds to every SM");
        let l = lane_sms(&[0.5, 0.25, 0.25], 4, 132);
        assert_eq!(l, vec![Some(66), Some(33), Some(33), None]);
        assert_eq!(lane_sms(&[], 2, 132), vec![None, None]);
    }

    #[test]
    fn the_inputs_are_seeded_and_bounded() {
        let a = host(1000, 3);
        assert_eq!(a, host(1000, 3));
        assert_ne!(a, host(1000, 4));
        assert!(a.iter().all(|x| (-0.5..0.5).contains(x)));
    }
}
