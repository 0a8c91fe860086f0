//! The paper's estimator, kept as a measured variant: per query head, score
//! the top `outlier_frac` of the ranked tokens exactly, sample `segments`
//! runs of `seg_len` consecutive ranked tokens further down (geometrically
//! spaced ranks), fit `y = a/x + b` to `e^s` against the rank `x`, estimate
//! the total and every prefix from the fit, and keep the shortest prefix of
//! ranked clusters reaching `P`.

use super::index::ClusterIndex;
use super::keys::{KeyRows, dot};
use super::select::SelectStats;

/// Knobs of the curve fit.
#[derive(Debug, Clone, Copy)]
pub struct FitParams {
    pub p: f32,
    /// Fraction of the clustered tokens scored exactly at the top.
    pub outlier_frac: f32,
    pub segments: usize,
    pub seg_len: usize,
    /// Multiplies the fitted tail (≥ 1: read more).
    pub margin: f32,
}

/// Buffers for [`select_group_fit`].
#[derive(Debug, Default)]
pub struct FitScratch {
    order: Vec<u32>,
    starts: Vec<u32>,
    m: Vec<f32>,
    xs: Vec<f64>,
    ys: Vec<f64>,
    stamp: Vec<u32>,
    epoch: u32,
}

/// `Σ_{x=a+1}^{b} 1/x`.
fn harmonic(a: f64, b: f64) -> f64 {
    let h = |x: f64| {
        if x < 1.0 {
            0.0
        } else {
            x.ln() + 0.577_215_664_9 + 0.5 / x - 1.0 / (12.0 * x * x)
        }
    };
    h(b) - h(a)
}

/// One KV head's group, as [`super::select_group`] but with the curve fit.
#[allow(clippy::too_many_arguments)]
pub fn select_group_fit<K: KeyRows>(
    idx: &ClusterIndex,
    keys: &K,
    q: &[f32],
    ctx_len: usize,
    fp: &FitParams,
    s: &mut FitScratch,
    out: &mut Vec<u32>,
    est_mass: &mut [f32],
) -> SelectStats {
    let d = idx.d;
    let g_n = q.len() / d;
    let c_n = idx.clusters();
    let n = idx.len;
    let scale = 1.0 / (d as f32).sqrt();
    if s.stamp.len() < ctx_len {
        s.stamp.resize(ctx_len, 0);
    }
    s.epoch = s.epoch.wrapping_add(2);
    if s.epoch < 2 {
        s.stamp.iter_mut().for_each(|x| *x = 0);
        s.epoch = 2;
    }
    let (read, sel) = (s.epoch, s.epoch + 1);
    out.clear();
    out.extend(n as u32..ctx_len as u32);
    if c_n == 0 {
        est_mass.iter_mut().for_each(|e| *e = 1.0);
        return SelectStats {
            tokens_read: out.len() as f64,
            selected: out.len(),
        };
    }
    assert!(d <= 256, "head_dim above 256");
    let mut qs = [0.0f32; 256];
    for g in 0..g_n {
        let qg = &mut qs[..d];
        for (o, &x) in qg.iter_mut().zip(&q[g * d..(g + 1) * d]) {
            *o = x * scale;
        }
        // Rank clusters by centroid score.
        s.m.clear();
        s.m.extend((0..c_n).map(|c| dot(qg, idx.centroid(c))));
        s.order.clear();
        s.order.extend(0..c_n as u32);
        let m = &s.m;
        s.order
            .sort_unstable_by(|&a, &b| m[b as usize].total_cmp(&m[a as usize]).then(a.cmp(&b)));
        s.starts.clear();
        let mut acc = 0u32;
        for &c in &s.order {
            s.starts.push(acc);
            acc += idx.members_of(c as usize).len() as u32;
        }
        let rf = m[s.order[0] as usize];
        let score = |slot: u32| ((dot(qg, keys.key(slot as usize)) - rf) as f64).exp();
        // Exact top: whole clusters until outlier_frac of the tokens.
        let k0 = ((fp.outlier_frac as f64 * n as f64).ceil() as usize).max(1);
        let mut z_out = Vec::new();
        let mut x0 = 0usize;
        for &c in &s.order {
            if x0 >= k0 {
                break;
            }
            let mut zc = 0.0;
            for &slot in idx.members_of(c as usize) {
                zc += score(slot);
                s.stamp[slot as usize] = s.stamp[slot as usize].max(read);
            }
            z_out.push(zc);
            x0 += idx.members_of(c as usize).len();
        }
        let z_tail: f64 = (n..ctx_len).map(|t| score(t as u32)).sum();
        // Sampled segments below the outliers, geometrically spaced in rank.
        s.xs.clear();
        s.ys.clear();
        for j in 0..fp.segments {
            let f = (j + 1) as f64 / (fp.segments + 1) as f64;
            let start = (x0 as f64 * (n as f64 / x0.max(1) as f64).powf(f)) as usize;
            for x in start..(start + fp.seg_len).min(n) {
                let ci = s.starts.partition_point(|&st| st as usize <= x) - 1;
                let c = s.order[ci] as usize;
                let slot = idx.members_of(c)[x - s.starts[ci] as usize];
                s.stamp[slot as usize] = s.stamp[slot as usize].max(read);
                s.xs.push((x + 1) as f64);
                s.ys.push(score(slot));
            }
        }
        let (a, b) = fit_inverse(&s.xs, &s.ys);
        let tail_sum = |lo: usize, hi: usize| {
            (a * harmonic(lo as f64, hi as f64) + b * (hi - lo) as f64).max(0.0)
        };
        let zo: f64 = z_out.iter().sum();
        let total = zo + z_tail + fp.margin as f64 * tail_sum(x0, n);
        // Shortest prefix of ranked clusters whose estimate reaches P.
        let mut have = z_tail;
        let mut x = 0usize;
        for (ci, &c) in s.order.iter().enumerate() {
            if have >= fp.p as f64 * total {
                break;
            }
            let len = idx.members_of(c as usize).len();
            have += if ci < z_out.len() {
                z_out[ci]
            } else {
                tail_sum(x.max(x0), x + len)
            };
            x += len;
            for &slot in idx.members_of(c as usize) {
                s.stamp[slot as usize] = sel;
            }
        }
        est_mass[g] = (have / total).min(1.0) as f32;
    }
    let mut read_only = 0usize;
    for slot in 0..n {
        if s.stamp[slot] == sel {
            out.push(slot as u32);
        } else if s.stamp[slot] == read {
            read_only += 1;
        }
    }
    out.sort_unstable();
    SelectStats {
        tokens_read: out.len() as f64
            + 0.5 * read_only as f64
            + 0.5 * c_n as f64 * (1.0 + 1.0 / d as f64),
        selected: out.len(),
    }
}

/// Least squares of `y ≈ a/x + b`.
fn fit_inverse(xs: &[f64], ys: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.len() < 2 {
        return (0.0, ys.iter().sum::<f64>() / n.max(1.0));
    }
    let (mut su, mut suu, mut sy, mut suy) = (0.0, 0.0, 0.0, 0.0);
    for (&x, &y) in xs.iter().zip(ys) {
        let u = 1.0 / x;
        su += u;
        suu += u * u;
        sy += y;
        suy += u * y;
    }
    let det = n * suu - su * su;
    if det.abs() < 1e-300 {
        return (0.0, sy / n);
    }
    let a = (n * suy - su * sy) / det;
    let b = (sy - a * su) / n;
    (a, b)
}
