//! The selectors the evaluator compares, each with the knob it sweeps.

use std::collections::BTreeMap;
use tacflow_kernels::tactic::{
    ClusterIndex, DenseKeys, FitParams, FitScratch, Init, KMeansParams, PageBounds, Scratch,
    Spread, TacticParams, fixed_budget, select_group, select_group_fit,
};

/// Which keys k-means groups (centroids always come from the keys as cached).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Membership {
    Post,
    Pre,
}

pub type Indexes = BTreeMap<(Membership, usize, String), ClusterIndex>;

/// What one selection cost and estimated.
pub struct Outcome {
    pub read: f64,
    pub est: Vec<f32>,
}

/// Per-task reusable state.
#[derive(Default)]
pub struct Ctx {
    scratch: Scratch,
    fit: FitScratch,
    bounds: Option<PageBounds>,
    order: Vec<u32>,
}

pub enum Variant {
    Oracle,
    Quest {
        budgets: Vec<f32>,
    },
    Fit {
        name: String,
        km: KMeansParams,
        fp: FitParams,
        margins: Vec<f32>,
    },
    Tactic {
        name: String,
        mem: Membership,
        prm: TacticParams,
        margins: Vec<f32>,
    },
    /// Cluster order by centroid score, stopped with the exact mass: what a
    /// perfect estimator would read with this ranking.
    RankOracle {
        name: String,
        mem: Membership,
        prm: TacticParams,
    },
}

fn key(mem: Membership, km: &KMeansParams) -> (Membership, usize, String) {
    (
        mem,
        km.cluster_size,
        format!("{:?}{}", km.init, km.iterations),
    )
}

impl Variant {
    pub fn name(&self) -> String {
        match self {
            Variant::Oracle => "oracle".into(),
            Variant::Quest { .. } => "quest".into(),
            Variant::Fit { name, .. }
            | Variant::Tactic { name, .. }
            | Variant::RankOracle { name, .. } => name.clone(),
        }
    }

    pub fn clustering(&self) -> Option<(Membership, KMeansParams)> {
        match self {
            Variant::Fit { km, .. } => Some((Membership::Post, *km)),
            Variant::Tactic { mem, prm, .. } | Variant::RankOracle { mem, prm, .. } => {
                Some((*mem, prm.kmeans))
            }
            _ => None,
        }
    }

    /// Runs every knob value; `emit(knob, selection, outcome)` for each.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        idxs: &Indexes,
        keys: &DenseKeys<'_>,
        q: &[f32],
        ctx_len: usize,
        p: f32,
        scores: &[Vec<f32>],
        ctx: &mut Ctx,
        sel: &mut Vec<u32>,
        emit: &mut dyn FnMut(&str, &[u32], Outcome),
    ) {
        let d = keys.d;
        let g_n = q.len() / d;
        let mut est = vec![0.0f32; g_n];
        match self {
            Variant::Oracle => {
                sel.clear();
                for sc in scores {
                    tacflow_kernels::tactic::oracle_top_p(sc, p, &mut ctx.order, sel);
                }
                sel.sort_unstable();
                sel.dedup();
                emit(
                    "",
                    sel,
                    Outcome {
                        read: sel.len() as f64,
                        est: vec![],
                    },
                );
            }
            Variant::Quest { budgets } => {
                let n0 = idxs.values().next().map_or(ctx_len - 1, |i| i.len);
                let b = ctx
                    .bounds
                    .get_or_insert_with(|| PageBounds::build(keys, n0, 16));
                let scale = 1.0 / (d as f32).sqrt();
                let qs: Vec<f32> = q.iter().map(|x| x * scale).collect();
                for &f in budgets {
                    let budget = (f * ctx_len as f32).round() as usize;
                    let read = fixed_budget(b, &qs, ctx_len, budget, sel);
                    emit(&format!("@{f}"), sel, Outcome { read, est: vec![] });
                }
            }
            Variant::Fit {
                km, fp, margins, ..
            } => {
                let idx = &idxs[&key(Membership::Post, km)];
                for &m in margins {
                    let f = FitParams {
                        p,
                        margin: m,
                        ..*fp
                    };
                    let st =
                        select_group_fit(idx, keys, q, ctx_len, &f, &mut ctx.fit, sel, &mut est);
                    emit(
                        &format!("@{m}"),
                        sel,
                        Outcome {
                            read: st.tokens_read,
                            est: est.clone(),
                        },
                    );
                }
            }
            Variant::Tactic {
                mem, prm, margins, ..
            } => {
                let idx = &idxs[&key(*mem, &prm.kmeans)];
                for &m in margins {
                    let t = TacticParams {
                        p,
                        margin: m,
                        ..*prm
                    };
                    let st =
                        select_group(idx, keys, q, ctx_len, &t, &mut ctx.scratch, sel, &mut est);
                    emit(
                        &format!("@{m}"),
                        sel,
                        Outcome {
                            read: st.tokens_read,
                            est: est.clone(),
                        },
                    );
                }
            }
            Variant::RankOracle { mem, prm, .. } => {
                let idx = &idxs[&key(*mem, &prm.kmeans)];
                let read = rank_oracle(idx, keys, q, ctx_len, p, scores, sel);
                emit("", sel, Outcome { read, est: vec![] });
            }
        }
    }
}

fn rank_oracle(
    idx: &ClusterIndex,
    keys: &DenseKeys<'_>,
    q: &[f32],
    ctx_len: usize,
    p: f32,
    scores: &[Vec<f32>],
    sel: &mut Vec<u32>,
) -> f64 {
    let d = keys.d;
    let c_n = idx.clusters();
    let mut taken = vec![false; c_n];
    sel.clear();
    sel.extend(idx.len as u32..ctx_len as u32);
    for (g, sc) in scores.iter().enumerate() {
        let qg = &q[g * d..(g + 1) * d];
        let m: Vec<f32> = (0..c_n)
            .map(|c| tacflow_kernels::tactic::keys::dot(qg, idx.centroid(c)))
            .collect();
        let mut order: Vec<usize> = (0..c_n).collect();
        order.sort_unstable_by(|&a, &b| m[b].total_cmp(&m[a]).then(a.cmp(&b)));
        let mx = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f64 = sc.iter().map(|&s| ((s - mx) as f64).exp()).sum();
        let e = |i: u32| ((sc[i as usize] - mx) as f64).exp();
        let mut have: f64 = sel.iter().map(|&i| e(i)).sum();
        for &c in &order {
            if have >= p as f64 * total {
                break;
            }
            if taken[c] {
                continue;
            }
            taken[c] = true;
            for &s in idx.members_of(c) {
                sel.push(s);
            }
            // Mass for this head and the others' later check.
            have = sel.iter().map(|&i| e(i)).sum();
        }
    }
    sel.sort_unstable();
    sel.len() as f64 + 0.5 * c_n as f64 * (1.0 + 1.0 / d as f64)
}

fn km(cluster_size: usize, iterations: usize, init: Init) -> KMeansParams {
    KMeansParams {
        cluster_size,
        iterations,
        init,
        seed: 0x7ac7_1c00,
    }
}

/// The variant lists: `main` for the recorded tables, `explore` for the
/// decisions in TACTIC.md.
pub fn suite(name: &str) -> Vec<Variant> {
    let base = TacticParams::new(0.9);
    let margins = vec![1.0, 1.5, 2.0, 3.0, 5.0];
    let tac = |name: &str, mem, prm: TacticParams, margins: &[f32]| Variant::Tactic {
        name: name.into(),
        mem,
        prm,
        margins: margins.to_vec(),
    };
    let mut v = vec![
        Variant::Oracle,
        Variant::Quest {
            budgets: vec![0.05, 0.1, 0.15, 0.2, 0.3],
        },
        Variant::Fit {
            name: "paper-fit".into(),
            km: base.kmeans,
            fp: FitParams {
                p: 0.9,
                outlier_frac: 0.015,
                segments: 2,
                seg_len: 16,
                margin: 1.0,
            },
            margins: margins.clone(),
        },
        Variant::RankOracle {
            name: "rank-oracle".into(),
            mem: Membership::Post,
            prm: base,
        },
        tac("tactic", Membership::Post, base, &margins),
    ];
    if name == "explore" || name == "all" {
        let none = TacticParams {
            spread: Spread::None,
            rank_by_estimate: false,
            ..base
        };
        let iso = TacticParams {
            spread: Spread::Iso,
            ..base
        };
        v.push(tac("spread-none", Membership::Post, none, &margins));
        v.push(tac("spread-iso", Membership::Post, iso, &margins));
        v.push(tac(
            "rank-by-mean",
            Membership::Post,
            TacticParams {
                rank_by_estimate: false,
                ..base
            },
            &margins,
        ));
        v.push(tac(
            "token-level",
            Membership::Post,
            TacticParams {
                token_level: true,
                ..base
            },
            &margins,
        ));
        v.push(tac("pre-rope", Membership::Pre, base, &margins));
        v.push(tac(
            "init-strided",
            Membership::Post,
            TacticParams {
                kmeans: km(16, 10, Init::Strided),
                ..base
            },
            &margins,
        ));
        v.push(tac(
            "init-random",
            Membership::Post,
            TacticParams {
                kmeans: km(16, 10, Init::Random),
                ..base
            },
            &margins,
        ));
        v.push(tac(
            "iters-3",
            Membership::Post,
            TacticParams {
                kmeans: km(16, 3, Init::PlusPlus),
                ..base
            },
            &margins,
        ));
        v.push(tac(
            "iters-20",
            Membership::Post,
            TacticParams {
                kmeans: km(16, 20, Init::PlusPlus),
                ..base
            },
            &margins,
        ));
        v.push(tac(
            "size-8",
            Membership::Post,
            TacticParams {
                kmeans: km(8, 10, Init::PlusPlus),
                ..base
            },
            &margins,
        ));
        v.push(tac(
            "size-32",
            Membership::Post,
            TacticParams {
                kmeans: km(32, 10, Init::PlusPlus),
                ..base
            },
            &margins,
        ));
    }
    v
}
