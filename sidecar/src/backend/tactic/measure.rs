//! What a device-side selection kept, measured for the sequences opened
//! with `diagnostics: true`: the numbers the engine's host path measures
//! in `engine::sparse::select_layer` (true mass and estimate per query
//! head, slots selected and tokens read per KV head), one record per
//! (entry, layer, KV head). A backend gathers them during the step's
//! attention nodes and hands them over once, after the forward pass
//! (`Backend::tactic_diagnostics`).

use crate::backend::Baseline;
use tacflow_kernels::tactic::{KeyRows, TacticParams, exact_scores, true_mass};

/// One KV head's selection of one decode entry at one layer, measured.
#[derive(Debug, Clone, PartialEq)]
pub struct TacticMeasure {
    /// Index into the step's sequences.
    pub seq: usize,
    pub layer: usize,
    /// KV head.
    pub head: usize,
    /// Tokens cached, this step's included (what fractions divide by).
    pub ctx_len: usize,
    /// Per query head of the KV head's group: the true mass `p(I)` of the
    /// selection over every cached key, and the selector's estimate.
    pub mass: Vec<f64>,
    pub est: Vec<f64>,
    /// Slots selected (the union over the group).
    pub selected: usize,
    /// Token-equivalents read (kernels/TACTIC.md counts them).
    pub tokens_read: f64,
}

/// What made a device's selection (how its estimate and tokens read are
/// counted).
#[derive(Debug, Clone, Copy)]
pub enum Selector {
    Tactic(TacticParams),
    Baseline(Baseline),
}

/// Where a measure belongs: the entry, layer and KV head it measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeasureAt {
    pub seq: usize,
    pub layer: usize,
    pub head: usize,
    pub ctx_len: usize,
}

impl TacticMeasure {
    /// The host's measure of a selection `sel` (sorted slots) of the
    /// group's queries `q` (`[G, d]`, unscaled) over `keys`.
    pub fn on_host<K: KeyRows>(
        at: MeasureAt,
        keys: &K,
        q: &[f32],
        sel: &[u32],
        est: &[f32],
        tokens_read: f64,
    ) -> TacticMeasure {
        let d = keys.dim();
        let mut scores = Vec::new();
        let mass = q
            .chunks_exact(d)
            .map(|qh| {
                exact_scores(keys, qh, at.ctx_len, &mut scores);
                true_mass(&scores, sel)
            })
            .collect();
        TacticMeasure {
            seq: at.seq,
            layer: at.layer,
            head: at.head,
            ctx_len: at.ctx_len,
            mass,
            est: est.iter().map(|&e| f64::from(e)).collect(),
            selected: sel.len(),
            tokens_read,
        }
    }

    /// A device's record of a selection (`tacflow_kernels::cuda::JobDiag`
    /// carries the same numbers), its tokens read counted from the slots
    /// and clusters it kept as the CPU counts them.
    pub fn from_device(
        at: MeasureAt,
        rec: &tacflow_kernels::cuda::JobDiag,
        d: usize,
        how: &Selector,
    ) -> TacticMeasure {
        use tacflow_kernels::tactic::union::chunked_tokens_read;
        let (est, tokens_read) = match how {
            Selector::Tactic(params) => (
                rec.est.clone(),
                chunked_tokens_read(rec.selected, rec.clusters, d, params),
            ),
            // The oracle knows its mass and reads its set.
            Selector::Baseline(Baseline::Oracle { .. }) => (rec.mass.clone(), rec.selected as f64),
            // A fixed budget estimates no mass; it reads its set and each
            // full page's minimum and maximum.
            Selector::Baseline(Baseline::Budget { .. }) => {
                let pages = at.ctx_len / tacflow_kernels::cuda::kv::BLOCK_TOKENS;
                (
                    vec![f64::NAN; rec.mass.len()],
                    (rec.selected + pages) as f64,
                )
            }
        };
        TacticMeasure {
            seq: at.seq,
            layer: at.layer,
            head: at.head,
            ctx_len: at.ctx_len,
            mass: rec.mass.clone(),
            est,
            selected: rec.selected,
            tokens_read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tacflow_kernels::tactic::DenseKeys;

    #[test]
    fn a_host_measure_is_the_true_mass_of_the_selection() {
        // Two keys along the query and two against it: the first two hold
        // nearly all the mass.
        let d = 8;
        let mut k = vec![0.0f32; 4 * d];
        k[0] = 4.0;
        k[d] = 4.0;
        k[2 * d] = -4.0;
        k[3 * d] = -4.0;
        let keys = DenseKeys { k: &k, d };
        let q = [vec![1.0f32; 1], vec![0.0; d - 1]].concat();
        let at = MeasureAt {
            seq: 3,
            layer: 1,
            head: 0,
            ctx_len: 4,
        };
        let m = TacticMeasure::on_host(at, &keys, &q, &[0, 1], &[0.99], 6.5);
        let s = 4.0 / (d as f64).sqrt();
        let want = 2.0 * s.exp() / (2.0 * s.exp() + 2.0 * (-s).exp());
        assert!((m.mass[0] - want).abs() < 1e-6, "{} vs {want}", m.mass[0]);
        assert_eq!((m.seq, m.layer, m.selected), (3, 1, 2));
        assert_eq!(m.est, [f64::from(0.99f32)]);
        assert_eq!(m.tokens_read, 6.5);
    }
}
