//! The sparse selector on a synthetic layer: what each policy selects, its
//! diagnostics, and the undo of what it grew.

use super::state_of;
use crate::backend::{HostLayerView, SeqMeta, StepMeta};
use crate::engine::sparse::{Outcome, PolicyState, Selector};
use tacflow_ipc::AttentionPolicy;
use tacflow_kernels::cpu::KvLayer;
use tacflow_kernels::rng::random_weight;
use tacflow_kernels::tactic::{self, DenseKeys, PageBounds, PagedKeys};

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const D: usize = 16;
const BS: usize = 16;
const BLOCKS: usize = 4;
const TABLE: [u32; 4] = [3, 0, 2, 1];

/// A one-layer cache of seeded keys (a few of them large, so that some
/// heads are peaked) and one decode query row.
struct Layer {
    k: Vec<f32>,
    v: Vec<f32>,
    qkv: Vec<f32>,
}

impl Layer {
    fn new(seed: u64) -> Layer {
        let n = BLOCKS * KV_HEADS * BS * D;
        let mut k: Vec<f32> = (0..n as u64)
            .map(|i| random_weight(seed, 1, i, 0.0, 1.0))
            .collect();
        for i in (0..n).step_by(7 * D + 3) {
            k[i] *= 30.0;
        }
        let v = (0..n as u64)
            .map(|i| random_weight(seed, 2, i, 0.0, 1.0))
            .collect();
        let row = (HEADS + 2 * KV_HEADS) * D;
        let qkv = (0..row as u64)
            .map(|i| random_weight(seed, 3, i, 0.0, 2.0))
            .collect();
        Layer { k, v, qkv }
    }

    fn kv(&self) -> KvLayer<'_> {
        KvLayer {
            k: &self.k,
            v: &self.v,
            kv_heads: KV_HEADS,
            head_dim: D,
            block_size: BS,
        }
    }

    fn view(&self) -> HostLayerView<'_> {
        HostLayerView {
            qkv: &self.qkv,
            row_len: self.qkv.len(),
            kv: self.kv(),
        }
    }

    /// Query head `qh`'s exact scores over `ctx` slots.
    fn scores(&self, qh: usize, ctx: usize) -> Vec<f32> {
        let keys = PagedKeys {
            kv: self.kv(),
            block_table: &TABLE,
            head: qh / (HEADS / KV_HEADS),
        };
        let mut s = Vec::new();
        tactic::exact_scores(&keys, &self.qkv[qh * D..(qh + 1) * D], ctx, &mut s);
        s
    }
}

fn meta(ctx_len: usize) -> StepMeta {
    StepMeta {
        seqs: vec![SeqMeta {
            q_start: 0,
            q_len: 1,
            ctx_len,
            block_table: TABLE.to_vec(),
        }],
        ..StepMeta::default()
    }
}

/// One layer's selection of one decode token at `ctx_len`.
fn select(layer: &Layer, state: &mut PolicyState, ctx_len: usize) -> (Vec<Vec<u32>>, Outcome) {
    let mut sel = Selector::new(vec![(0, state, true)], 1, 1, (HEADS, KV_HEADS, D));
    let chosen = sel
        .select(0, Some(layer.view()), &meta(ctx_len), &(0..1))
        .unwrap()[0]
        .clone()
        .expect("a sparse entry has a selection");
    (chosen, sel.finish())
}

fn policies() -> [AttentionPolicy; 3] {
    [
        AttentionPolicy::Tactic {
            p: 0.9,
            cluster_size: Some(4),
            recluster_limit: None,
        },
        AttentionPolicy::FixedBudget { tokens: 8, p: None },
        AttentionPolicy::OracleTopP { p: 0.8 },
    ]
}

#[test]
fn selections_are_sorted_in_range_and_cover_the_new_tokens() {
    let layer = Layer::new(1);
    for policy in policies() {
        let mut state = PolicyState::new(&policy, 1);
        for ctx in [50, 61] {
            let (sel, _) = select(&layer, &mut state, ctx);
            // Tactic clustered 49 slots at its first step, fixed_budget
            // bounds whole pages: what lies past them is always read. The
            // oracle reads by score alone.
            let tail = match policy {
                AttentionPolicy::Tactic { .. } => 49,
                AttentionPolicy::FixedBudget { .. } => ctx / BS * BS,
                _ => ctx,
            };
            for (h, s) in sel.iter().enumerate() {
                let name = policy.name();
                assert!(s.windows(2).all(|w| w[0] < w[1]), "{name} head {h}: {s:?}");
                assert!(s.iter().all(|&x| (x as usize) < ctx), "{name}: {s:?}");
                for t in tail..ctx {
                    assert!(
                        s.contains(&(t as u32)),
                        "{name} ctx {ctx}: {t} not in {s:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_oracle_selects_the_union_of_its_query_heads_sets() {
    let layer = Layer::new(2);
    let p = 0.8;
    let mut state = PolicyState::new(&AttentionPolicy::OracleTopP { p }, 1);
    let ctx = 57;
    let (sel, out) = select(&layer, &mut state, ctx);
    let group = HEADS / KV_HEADS;
    for (h, s) in sel.iter().enumerate() {
        let mut union = Vec::new();
        let mut order = Vec::new();
        for g in 0..group {
            let mut own = Vec::new();
            let scores = layer.scores(h * group + g, ctx);
            tactic::oracle_top_p(&scores, p, &mut order, &mut own);
            assert!(tactic::true_mass(&scores, &own) >= f64::from(p));
            union.extend(own);
        }
        union.sort_unstable();
        union.dedup();
        assert_eq!(s, &union, "kv head {h}");
    }
    let d = &out.diags[0].1.summary;
    assert!(d.min_true_mass >= f64::from(p), "{d:?}");
    assert_eq!(d.success_rate, 1.0);
    assert_eq!(d.estimated_mass, d.true_mass, "the oracle knows its mass");
}

#[test]
fn diagnostics_are_consistent_with_the_selection() {
    let layer = Layer::new(3);
    let ctx = 50;
    for policy in policies() {
        let mut state = PolicyState::new(&policy, 1);
        let (sel, out) = select(&layer, &mut state, ctx);
        let (seq, d) = &out.diags[0];
        let s = &d.summary;
        let name = policy.name();
        assert_eq!(*seq, 0);
        assert_eq!((d.mass.len(), d.mass[0].len()), (1, HEADS));
        assert_eq!((d.read.len(), d.read[0].len()), (1, KV_HEADS));
        let selected: usize = sel.iter().map(Vec::len).sum();
        let want = selected as f64 / (KV_HEADS * ctx) as f64;
        assert!((s.selected_fraction - want).abs() < 1e-12, "{name}: {s:?}");
        for qh in 0..HEADS {
            let mass = tactic::true_mass(&layer.scores(qh, ctx), &sel[qh / 2]);
            assert!((d.mass[0][qh] - mass).abs() < 1e-12, "{name} head {qh}");
        }
        let hits = d.mass[0]
            .iter()
            .filter(|&&m| m >= f64::from(d.target))
            .count();
        assert_eq!(s.success_rate, hits as f64 / HEADS as f64, "{name}");
        assert!(s.min_true_mass <= s.true_mass && s.true_mass <= 1.0 + 1e-12);
        assert!(s.tokens_read_fraction > 0.0 && s.selected_fraction <= 1.0);
    }
}

#[test]
fn a_budget_of_the_whole_context_reads_all_the_mass() {
    let layer = Layer::new(4);
    let policy = AttentionPolicy::FixedBudget {
        tokens: 64,
        p: Some(0.5),
    };
    let mut state = PolicyState::new(&policy, 1);
    let (sel, out) = select(&layer, &mut state, 50);
    assert!(sel.iter().all(|s| s.len() == 50));
    let s = &out.diags[0].1.summary;
    assert_eq!(s.selected_fraction, 1.0);
    assert!((s.min_true_mass - 1.0).abs() < 1e-9, "{s:?}");
}

#[test]
fn reverting_a_selection_restores_the_state() {
    let layer = Layer::new(5);
    let tactic = AttentionPolicy::Tactic {
        p: 0.9,
        cluster_size: Some(4),
        recluster_limit: Some(16),
    };
    let budget = AttentionPolicy::FixedBudget { tokens: 8, p: None };
    for policy in [tactic, budget] {
        let mut state = PolicyState::new(&policy, 1);
        let empty = state_of(&state);
        let (_, out) = select(&layer, &mut state, 30);
        assert_ne!(state_of(&state), empty, "the first selection builds");
        state.revert(out.undo.into_iter().next().unwrap().1);
        assert_eq!(state_of(&state), empty);
        // Built over 29 slots (one page of bounds); at 50 the clustering
        // passes its limit and the bounds gain a page.
        select(&layer, &mut state, 30);
        let built = state_of(&state);
        let (_, out) = select(&layer, &mut state, 50);
        assert_ne!(state_of(&state), built, "{}: grew", policy.name());
        state.revert(out.undo.into_iter().next().unwrap().1);
        assert_eq!(state_of(&state), built, "{}", policy.name());
    }
}

#[test]
fn reverting_bounds_restores_a_partial_page() {
    let keys: Vec<f32> = (0..64 * D as u64)
        .map(|i| random_weight(6, 0, i, 0.0, 1.0))
        .collect();
    let dense = DenseKeys { k: &keys, d: D };
    let bounds = vec![PageBounds::build(&dense, 20, BS)];
    let mut state = PolicyState::FixedBudget {
        tokens: 8,
        p: 0.9,
        bounds: vec![bounds],
    };
    let before = state_of(&state);
    let mut undo = crate::engine::undo::Undo::default();
    let PolicyState::FixedBudget { bounds, .. } = &mut state else {
        unreachable!()
    };
    undo.before_bounds(&bounds[0], 0, 40);
    bounds[0][0].extend(&dense, 40);
    bounds[0].push(PageBounds::build(&dense, 40, BS));
    assert_ne!(state_of(&state), before);
    state.revert(undo);
    assert_eq!(state_of(&state), before);
}

#[test]
fn an_unforeseen_change_is_reverted_by_forgetting_the_state() {
    let layer = Layer::new(7);
    let policy = AttentionPolicy::Tactic {
        p: 0.9,
        cluster_size: Some(4),
        recluster_limit: None,
    };
    let mut state = PolicyState::new(&policy, 1);
    let empty = state_of(&state);
    select(&layer, &mut state, 30);
    let PolicyState::Tactic(t) = &mut state else {
        unreachable!()
    };
    let mut undo = crate::engine::undo::Undo::default();
    undo.before_clusters(t, 0, 40);
    // Nothing is due for re-clustering at 40; extend one head anyway.
    let keys = PagedKeys {
        kv: layer.kv(),
        block_table: &TABLE,
        head: 1,
    };
    t.index[0][1].extend(&keys, 39, &t.params.kmeans);
    undo.after_clusters(t, 0);
    assert!(!undo.is_empty());
    state.revert(undo);
    assert_eq!(state_of(&state), empty, "forgotten, to be rebuilt");
}
