//! The two baselines Tactic is judged against: `fixed_budget` (Quest-style
//! page bounds, a fixed token budget) and `oracle_top_p` (exact scores, the
//! exact smallest set reaching `P`).

use super::keys::{KeyRows, dot};

/// Per-page (cache block) minimum and maximum of every key dimension, for
/// the slots `0..len`: `[pages, d]` each. The last page may be partial.
#[derive(Debug, Clone, Default)]
pub struct PageBounds {
    pub d: usize,
    pub page: usize,
    pub len: usize,
    pub min: Vec<f32>,
    pub max: Vec<f32>,
}

impl PageBounds {
    pub fn build<K: KeyRows>(keys: &K, len: usize, page: usize) -> PageBounds {
        let mut b = PageBounds {
            d: keys.dim(),
            page,
            ..Default::default()
        };
        b.extend(keys, len);
        b
    }

    /// Covers slots up to `len` (the engine calls this as pages fill; the
    /// last, partial page is recomputed).
    pub fn extend<K: KeyRows>(&mut self, keys: &K, len: usize) {
        let d = self.d;
        let first = self.len / self.page;
        let pages = len.div_ceil(self.page);
        self.min.truncate(first * d);
        self.max.truncate(first * d);
        self.min.resize(pages * d, f32::INFINITY);
        self.max.resize(pages * d, f32::NEG_INFINITY);
        for slot in first * self.page..len {
            let p = slot / self.page;
            let k = keys.key(slot);
            let lo = &mut self.min[p * d..(p + 1) * d];
            for (m, &x) in lo.iter_mut().zip(k) {
                *m = m.min(x);
            }
            let hi = &mut self.max[p * d..(p + 1) * d];
            for (m, &x) in hi.iter_mut().zip(k) {
                *m = m.max(x);
            }
        }
        self.len = len;
    }

    pub fn pages(&self) -> usize {
        self.len.div_ceil(self.page)
    }

    /// Quest's upper bound of `q·k` over the page: `Σ_d max(q_d·min_d, q_d·max_d)`.
    #[inline]
    pub fn bound(&self, p: usize, q: &[f32]) -> f32 {
        let (lo, hi) = (
            &self.min[p * self.d..(p + 1) * self.d],
            &self.max[p * self.d..(p + 1) * self.d],
        );
        q.iter()
            .zip(lo.iter().zip(hi))
            .map(|(&x, (&a, &b))| (x * a).max(x * b))
            .sum()
    }
}

/// Quest-style selection with a budget of `budget` tokens per KV head:
/// the tail past `bounds.len` is always selected (and counts against the
/// budget); pages are then taken round-robin over the group's query heads,
/// each in its own order of page bound (ties by page index), until the
/// budget is spent. Returns the tokens read (selected + one per page for
/// its min and max).
pub fn fixed_budget(
    bounds: &PageBounds,
    q: &[f32],
    ctx_len: usize,
    budget: usize,
    out: &mut Vec<u32>,
) -> f64 {
    let d = bounds.d;
    let g_n = q.len() / d;
    let pages = bounds.pages();
    out.clear();
    out.extend(bounds.len as u32..ctx_len as u32);
    let mut orders: Vec<Vec<u32>> = (0..g_n)
        .map(|g| {
            let qg = &q[g * d..(g + 1) * d];
            let ub: Vec<f32> = (0..pages).map(|p| bounds.bound(p, qg)).collect();
            let mut o: Vec<u32> = (0..pages as u32).collect();
            o.sort_unstable_by(|&a, &b| ub[b as usize].total_cmp(&ub[a as usize]).then(a.cmp(&b)));
            o
        })
        .collect();
    let mut taken = vec![false; pages];
    let mut ptr = vec![0usize; g_n];
    let mut progress = true;
    while out.len() < budget && progress {
        progress = false;
        for g in 0..g_n {
            let o = &mut orders[g];
            while ptr[g] < o.len() && taken[o[ptr[g]] as usize] {
                ptr[g] += 1;
            }
            if ptr[g] == o.len() || out.len() >= budget {
                continue;
            }
            let p = o[ptr[g]] as usize;
            taken[p] = true;
            progress = true;
            let end = ((p + 1) * bounds.page).min(bounds.len);
            out.extend((p * bounds.page) as u32..end as u32);
        }
    }
    orders.clear();
    out.sort_unstable();
    out.len() as f64 + pages as f64
}

/// Exact scores `q·k/√d` of one query head over slots `0..ctx_len`.
pub fn exact_scores<K: KeyRows>(keys: &K, q: &[f32], ctx_len: usize, out: &mut Vec<f32>) {
    let scale = 1.0 / (keys.dim() as f32).sqrt();
    out.clear();
    out.extend((0..ctx_len).map(|s| dot(q, keys.key(s)) * scale));
}

/// The smallest set of slots whose softmax mass reaches `p` for one head,
/// given its exact scores (heaviest first, ties by slot). Appends to `out`
/// (unsorted); `order` is a reusable buffer.
pub fn oracle_top_p(scores: &[f32], p: f32, order: &mut Vec<u32>, out: &mut Vec<u32>) {
    let mx = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = scores.iter().map(|&s| ((s - mx) as f64).exp()).sum();
    order.clear();
    order.extend(0..scores.len() as u32);
    order.sort_unstable_by(|&a, &b| {
        scores[b as usize]
            .total_cmp(&scores[a as usize])
            .then(a.cmp(&b))
    });
    let mut acc = 0.0f64;
    for &i in order.iter() {
        if acc >= p as f64 * total {
            break;
        }
        acc += ((scores[i as usize] - mx) as f64).exp();
        out.push(i);
    }
}

/// The true mass `p(I)` of the sorted slot set `sel` for one head's exact
/// scores over the whole context.
pub fn true_mass(scores: &[f32], sel: &[u32]) -> f64 {
    let mx = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = scores.iter().map(|&s| ((s - mx) as f64).exp()).sum();
    let part: f64 = sel
        .iter()
        .map(|&i| ((scores[i as usize] - mx) as f64).exp())
        .sum();
    part / total
}
