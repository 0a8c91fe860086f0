//! The selectors the evaluator compares, each with the knob it sweeps.

use std::collections::BTreeMap;
use tacflow_kernels::tactic::{
    ClusterIndex, DenseKeys, FitParams, FitScratch, Init, KMeansParams, PageBounds, Scratch,
    Spread, TacticParams, fixed_budget, keys::dot, select_group, select_group_fit,
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
                let read = rank_oracle(idx, keys, q, ctx_len, p, prm, scores, sel);
                emit("", sel, Outcome { read, est: vec![] });
            }
        }
    }
}

/// Walks each head's cluster order (as `prm` ranks: centroid score, plus
/// the spread term when `rank_by_estimate`) until the exact mass reaches
/// `p`; with `token_level`, keeps only the heaviest scored tokens. The
/// best any estimator can do with this ranking.
#[allow(clippy::too_many_arguments)]
fn rank_oracle(
    idx: &ClusterIndex,
    keys: &DenseKeys<'_>,
    q: &[f32],
    ctx_len: usize,
    p: f32,
    prm: &TacticParams,
    scores: &[Vec<f32>],
    sel: &mut Vec<u32>,
) -> f64 {
    let d = keys.d;
    let c_n = idx.clusters();
    let scale = 1.0 / (d as f32).sqrt();
    let mut taken = vec![false; c_n];
    let mut scored: Vec<u32> = Vec::new();
    let ws: Vec<(Vec<f64>, f64)> = scores
        .iter()
        .map(|sc| {
            let mx = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f64> = sc.iter().map(|&s| ((s - mx) as f64).exp()).collect();
            let t = w.iter().sum();
            (w, t)
        })
        .collect();
    let tail: Vec<u32> = (idx.len as u32..ctx_len as u32).collect();
    for (w, total) in &ws {
        let g = ws.iter().position(|x| std::ptr::eq(&x.0, w)).unwrap();
        let qg: Vec<f32> = q[g * d..(g + 1) * d].iter().map(|x| x * scale).collect();
        let var = match prm.spread {
            Spread::None => 0.0,
            Spread::Iso => dot(&qg, &qg) / d as f32,
            Spread::Pooled => (0..d)
                .map(|i| qg[i] * dot(&idx.shape[i * d..(i + 1) * d], &qg))
                .sum(),
        };
        let key: Vec<f32> = (0..c_n)
            .map(|c| {
                let m = dot(&qg, idx.centroid(c));
                if prm.rank_by_estimate {
                    m + 0.5 * var * idx.spread[c]
                } else {
                    m
                }
            })
            .collect();
        let mut order: Vec<usize> = (0..c_n).collect();
        order.sort_unstable_by(|&a, &b| key[b].total_cmp(&key[a]).then(a.cmp(&b)));
        let mut have: f64 = tail.iter().chain(&scored).map(|&i| w[i as usize]).sum();
        for &c in &order {
            if have >= p as f64 * total {
                break;
            }
            if taken[c] {
                continue;
            }
            taken[c] = true;
            for &s in idx.members_of(c) {
                scored.push(s);
                have += w[s as usize];
            }
        }
    }
    sel.clear();
    sel.extend_from_slice(&tail);
    let overhead = 0.5 * c_n as f64 * (1.0 + 1.0 / d as f64);
    if !prm.token_level {
        sel.extend_from_slice(&scored);
        sel.sort_unstable();
        return sel.len() as f64 + overhead;
    }
    let mut keep = vec![false; scored.len()];
    for (w, total) in &ws {
        let mut have: f64 = tail.iter().map(|&i| w[i as usize]).sum();
        let mut o: Vec<usize> = (0..scored.len()).collect();
        o.sort_unstable_by(|&a, &b| w[scored[b] as usize].total_cmp(&w[scored[a] as usize]));
        for i in o {
            if have >= p as f64 * total {
                break;
            }
            have += w[scored[i] as usize];
            keep[i] = true;
        }
    }
    let kept = keep.iter().filter(|&&k| k).count();
    sel.extend(scored.iter().zip(&keep).filter(|x| *x.1).map(|x| *x.0));
    sel.sort_unstable();
    tail.len() as f64 + kept as f64 + 0.5 * (scored.len() - kept) as f64 + overhead
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
    let margins = vec![0.5, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0, 3.0];
    let tac = |name: &str, mem, prm: TacticParams, margins: &[f32]| Variant::Tactic {
        name: name.into(),
        mem,
        prm,
        margins: margins.to_vec(),
    };
    let ro = |name: &str, mem, prm: TacticParams| Variant::RankOracle {
        name: name.into(),
        mem,
        prm,
    };
    let mean = TacticParams {
        rank_by_estimate: false,
        ..base
    };
    let mut v = vec![Variant::Oracle];
    if name == "candidates" {
        return candidates(base, &margins, v);
    }
    if name == "ranking" {
        v.push(ro("ro-mean", Membership::Post, mean));
        v.push(ro("ro-est", Membership::Post, base));
        v.push(ro(
            "ro-est-iso",
            Membership::Post,
            TacticParams {
                spread: Spread::Iso,
                ..base
            },
        ));
        v.push(ro(
            "ro-mean-token",
            Membership::Post,
            TacticParams {
                token_level: true,
                ..mean
            },
        ));
        v.push(ro(
            "ro-est-token",
            Membership::Post,
            TacticParams {
                token_level: true,
                ..base
            },
        ));
        v.push(ro("ro-pre-rope", Membership::Pre, base));
        v.push(ro(
            "ro-random",
            Membership::Post,
            TacticParams {
                kmeans: km(16, 10, Init::Random),
                ..base
            },
        ));
        v.push(ro(
            "ro-iters3",
            Membership::Post,
            TacticParams {
                kmeans: km(16, 3, Init::PlusPlus),
                ..base
            },
        ));
        v.push(ro(
            "ro-iters20",
            Membership::Post,
            TacticParams {
                kmeans: km(16, 20, Init::PlusPlus),
                ..base
            },
        ));
        for cs in [8, 32, 64] {
            v.push(ro(
                &format!("ro-size{cs}"),
                Membership::Post,
                TacticParams {
                    kmeans: km(cs, 10, Init::PlusPlus),
                    ..base
                },
            ));
            v.push(ro(
                &format!("ro-size{cs}-token"),
                Membership::Post,
                TacticParams {
                    kmeans: km(cs, 10, Init::PlusPlus),
                    token_level: true,
                    ..base
                },
            ));
        }
    }
    if name == "ranking" || name == "strided" {
        let st = |cs, it| TacticParams {
            kmeans: km(cs, it, Init::Strided),
            ..base
        };
        v.push(ro("ro-strided", Membership::Post, st(16, 10)));
        v.push(ro(
            "ro-strided-mean",
            Membership::Post,
            TacticParams {
                rank_by_estimate: false,
                ..st(16, 10)
            },
        ));
        v.push(ro(
            "ro-strided-token",
            Membership::Post,
            TacticParams {
                token_level: true,
                ..st(16, 10)
            },
        ));
        v.push(ro("ro-strided-it0", Membership::Post, st(16, 0)));
        v.push(ro("ro-strided-it3", Membership::Post, st(16, 3)));
        v.push(ro("ro-strided-it20", Membership::Post, st(16, 20)));
        v.push(ro("ro-strided-pre", Membership::Pre, st(16, 10)));
        for cs in [8, 12, 24, 32] {
            v.push(ro(
                &format!("ro-strided-size{cs}"),
                Membership::Post,
                st(cs, 10),
            ));
            v.push(ro(
                &format!("ro-strided-size{cs}-token"),
                Membership::Post,
                TacticParams {
                    token_level: true,
                    ..st(cs, 10)
                },
            ));
        }
        return v;
    }
    v.push(Variant::Quest {
        budgets: vec![0.05, 0.1, 0.15, 0.2, 0.3],
    });
    v.push(Variant::Fit {
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
    });
    v.push(ro("rank-oracle", Membership::Post, base));
    v.push(tac("tactic", Membership::Post, base, &margins));
    let tok32 = TacticParams {
        token_level: true,
        kmeans: km(32, 10, Init::Strided),
        ..base
    };
    v.push(tac("size-32-token", Membership::Post, tok32, &margins));
    {
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
    }
    if name == "explore" || name == "all" {
        v.push(tac("rank-by-mean", Membership::Post, mean, &margins));
        v.push(tac(
            "token-level",
            Membership::Post,
            TacticParams {
                token_level: true,
                ..base
            },
            &margins,
        ));
    }
    if name == "explore" || name == "all" {
        let pp = TacticParams {
            kmeans: km(16, 10, Init::PlusPlus),
            ..base
        };
        v.push(tac("init-plusplus", Membership::Post, pp, &margins));
    }
    if name == "decide" || name == "all" {
        let kmv = |cs, it, init| TacticParams {
            kmeans: km(cs, it, init),
            ..base
        };
        v.push(tac(
            "init-random",
            Membership::Post,
            kmv(16, 10, Init::Random),
            &margins,
        ));
        v.push(tac(
            "iters-3",
            Membership::Post,
            kmv(16, 3, Init::Strided),
            &margins,
        ));
        v.push(tac(
            "size-8",
            Membership::Post,
            kmv(8, 10, Init::Strided),
            &margins,
        ));
        v.push(tac(
            "size-24",
            Membership::Post,
            kmv(24, 10, Init::Strided),
            &margins,
        ));
        v.push(tac(
            "size-32",
            Membership::Post,
            kmv(32, 10, Init::Strided),
            &margins,
        ));
        let tok32 = TacticParams {
            token_level: true,
            ..kmv(32, 10, Init::Strided)
        };
        v.push(tac("size-32-token", Membership::Post, tok32, &margins));
        for sc in [0.5f32, 0.75, 1.5] {
            let prm = TacticParams {
                spread_scale: sc,
                ..base
            };
            v.push(tac(
                &format!("spread-scale{sc}"),
                Membership::Post,
                prm,
                &margins,
            ));
        }
        for (of, seg, len) in [(0.01f32, 2, 16), (0.02, 4, 16), (0.05, 4, 16), (0.02, 8, 8)] {
            v.push(Variant::Fit {
                name: format!("paper-fit-o{of}-s{seg}x{len}"),
                km: base.kmeans,
                fp: FitParams {
                    p: 0.9,
                    outlier_frac: of,
                    segments: seg,
                    seg_len: len,
                    margin: 1.0,
                },
                margins: vec![0.5, 1.0, 1.5, 2.0, 3.0],
            });
        }
    }
    v
}

/// The default's rivals, for the final choice.
fn candidates(base: TacticParams, margins: &[f32], mut v: Vec<Variant>) -> Vec<Variant> {
    let tac = |name: &str, prm: TacticParams| Variant::Tactic {
        name: name.into(),
        mem: Membership::Post,
        prm,
        margins: margins.to_vec(),
    };
    let kmv = |cs| TacticParams {
        kmeans: km(cs, 10, Init::Strided),
        ..base
    };
    let tok = |cs| TacticParams {
        token_level: true,
        ..kmv(cs)
    };
    v.push(tac("tactic", base));
    v.push(tac(
        "init-stratified",
        TacticParams {
            kmeans: km(16, 10, Init::Stratified),
            ..base
        },
    ));
    for (name, init) in [
        ("init-plusplus", Init::PlusPlus),
        ("init-random", Init::Random),
    ] {
        v.push(tac(
            name,
            TacticParams {
                kmeans: km(16, 10, init),
                ..base
            },
        ));
    }
    v.push(tac("size-24", kmv(24)));
    v.push(tac("size-32", kmv(32)));
    v.push(tac("token-level", tok(16)));
    v.push(tac("size-32-token", tok(32)));
    v
}
