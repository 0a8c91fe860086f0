//! Tactic's kernels against the CPU reference (kernels/TACTIC.md, "On the
//! GPU"), on seeded heavy-tailed keys (`tactic::synth`) written into a
//! poisoned paged cache through `kv_append`, with shuffled block tables:
//!
//! - k-means: the device's clustering of a first decode step and of a
//!   re-clustered tail against `ClusterIndex::build` / `extend` on the same
//!   bf16 keys, the parts the kernels write poisoned first;
//! - the selection on the CPU's clusters against `select_group`, and the
//!   sparse attention over the device's selection against the CPU's paged
//!   attention with that selection, and the diagnostics of that selection
//!   against the CPU's measure of it ([`super::tactic_diag`]);
//! - the baselines' kernels (`oracle_top_p`, `fixed_budget`) against the
//!   CPU's selections, the attention over them and their diagnostics
//!   ([`super::tactic_baselines`]);
//! - decoding: the device's states grown step by step and its selections
//!   against `TacticSeq` per (layer, KV head, step): at least 99.9% equal,
//!   every difference a near-tie (each query head's true mass within 1e-3);
//! - a model through the engine with `tactic` on the CUDA backend against
//!   the CPU backend's device path ([`model`]).

use super::report::{ATTN_TOL, F32_TOL, LOGITS_TOL, Row, compare_row};
use super::{Ctx, round_bf16};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::tactic::driver::{Planned, cluster_jobs};
use crate::backend::tactic::{DeviceMemory, LayerPlan, TacticStates};
use crate::backend::{AttnDims, Backend, KvLayout, SeqMeta, StepMeta, TacticEntry};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::weights::RandomSource;
use std::time::Instant;
use tacflow_ipc::AttentionPolicy;
use tacflow_kernels::cpu::{self, AttnSeq, KvLayer};
use tacflow_kernels::cuda::{DeviceStep, Gpu, KvCache, SelectJob, TacticShape, TacticWorkspace};
use tacflow_kernels::tactic::layout::{StateLayout, read_heads, write_heads};
use tacflow_kernels::tactic::synth::Synth;
use tacflow_kernels::tactic::{
    ClusterIndex, DecodeStep, HeadDiag, PagedKeys, Scratch, TacticParams, TacticSeq, exact_scores,
    select_group, true_mass,
};

pub(super) const CHECK: &str = "tactic";

/// Query heads, KV heads, head size.
type Heads = (usize, usize, usize);

pub fn tactic(cx: &mut Ctx) -> Vec<Row> {
    let mut rows = vec![];
    let shapes: [Heads; 5] = [
        (9, 3, 64),
        (32, 8, 128),
        (8, 1, 256),
        (4, 4, 32),
        (28, 4, 128),
    ];
    // k-means: first decode steps over 2 to 20000 cached keys, and a
    // re-clustered tail (limit 64).
    for (i, &h) in shapes.iter().enumerate() {
        let lens: &[usize] = match i {
            0 => &[2, 17, 1000, 8191],
            1 => &[5000, 20_000],
            _ => &[700, 33],
        };
        run(&mut rows, format!("kmeans {} ctx {lens:?}", tag(h)), || {
            kmeans(cx, h, lens, None)
        });
    }
    run(&mut rows, "kmeans re-clustered 9/3x64".into(), || {
        kmeans(cx, (9, 3, 64), &[3000, 1200], Some(500))
    });
    for &h in &shapes {
        run(&mut rows, format!("select+attend {}", tag(h)), || {
            select(cx, h, &[1, 16, 300, 4097])
        });
    }
    for &h in &shapes {
        run(&mut rows, format!("baselines {}", tag(h)), || {
            super::tactic_baselines::baselines(cx, h, &[1, 16, 300, 4097])
        });
    }
    for &(h, layers) in &[((9, 3, 64), 4), ((32, 8, 128), 2)] {
        run(
            &mut rows,
            format!("decode {} x{layers} layers", tag(h)),
            || decode(cx, h, layers),
        );
    }
    rows
}

fn tag((nh, kvh, d): Heads) -> String {
    format!("{nh}/{kvh}x{d}")
}

/// Runs one case, its rows or one failed row.
fn run(rows: &mut Vec<Row>, name: String, f: impl FnOnce() -> Result<Vec<Row>>) {
    let t0 = Instant::now();
    match f() {
        Ok(r) => rows.extend(r.into_iter().map(|mut row| {
            row.case = format!("{name}: {}", row.case);
            row
        })),
        Err(e) => rows.push(Row::fail(CHECK, name, e.to_string())),
    }
    eprintln!("  {:.2} s", t0.elapsed().as_secs_f64());
}

/// A paged cache of `layers` layers holding `lens` tokens per sequence:
/// each (layer, KV head, sequence) its own heavy-tailed keys, random
/// values, written through `kv_append` over shuffled blocks, and the same
/// bf16 values on the host.
pub(super) struct Fixture {
    pub dims: AttnDims,
    pub kv: KvCache,
    /// Per layer, K and V in the CPU's layout.
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub tables: Vec<Vec<u32>>,
    /// Per (layer, KV head, sequence): the keys' generator, for queries.
    pub synth: Vec<Synth>,
    seqs: usize,
}

impl Fixture {
    pub fn new(
        cx: &mut Ctx,
        (nh, kvh, d): Heads,
        layers: usize,
        lens: &[usize],
    ) -> Result<Fixture> {
        let dims = AttnDims {
            num_heads: nh,
            num_kv_heads: kvh,
            head_dim: d,
        };
        let need: usize = lens.iter().map(|l| l.div_ceil(16)).sum();
        let blocks = need + 2;
        let shuffle = cx.rand_u32(blocks, u32::MAX);
        let mut order: Vec<u32> = (0..blocks as u32).collect();
        order.sort_by_key(|&b| shuffle[b as usize]);
        let mut tables = vec![];
        let mut next = 0;
        for l in lens {
            tables.push(order[next..next + l.div_ceil(16)].to_vec());
            next += l.div_ceil(16);
        }
        let layout = KvLayout {
            num_layers: layers,
            num_blocks: blocks,
            block_size: 16,
            num_kv_heads: kvh,
            head_dim: d,
        };
        let mut kv = cx.b.kv_cache(&layout)?;
        cx.b.kv_poison(&mut kv)?;
        let fill = meta_over(lens, &tables, |_| 0);
        let w = dims.qkv_dim();
        let (g, t) = (nh / kvh, fill.tokens.len());
        let (mut k, mut v, mut synth) = (vec![], vec![], vec![]);
        for layer in 0..layers {
            let mut hist = cx.rand(t * w, 0.0, 1.0);
            for (s, &n) in lens.iter().enumerate() {
                for h in 0..kvh {
                    let seed = cx.seed ^ ((layer * 64 + h) * 64 + s) as u64;
                    let sy = Synth::heavy(n, (n / 8).max(1), g, d, seed);
                    let first = fill.seqs[s].q_start;
                    for i in 0..n {
                        let at = (first + i) * w + dims.q_dim() + h * d;
                        hist[at..at + d].copy_from_slice(&sy.keys[i * d..(i + 1) * d]);
                    }
                    synth.push(sy);
                }
            }
            let step = cx.b.begin_step(&fill)?;
            let act = cx.b.act_from_host(t, w, &hist, false)?;
            cx.b.kv_append(&step, &act, &mut kv, layer, dims, 0..t)?;
            let n = blocks * kvh * 16 * d;
            let (mut kl, mut vl) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            let shape = (kvh, 16, d);
            cpu::kv_append(
                &mut kl,
                &mut vl,
                shape,
                &round_bf16(&hist),
                w,
                dims.q_dim(),
                &fill.slots,
            );
            k.push(kl);
            v.push(vl);
        }
        Ok(Fixture {
            dims,
            kv,
            k,
            v,
            tables,
            synth,
            seqs: lens.len(),
        })
    }

    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        KvLayer {
            k: &self.k[layer],
            v: &self.v[layer],
            kv_heads: self.dims.num_kv_heads,
            head_dim: self.dims.head_dim,
            block_size: 16,
        }
    }

    pub fn keys(&self, layer: usize, seq: usize, head: usize) -> PagedKeys<'_> {
        PagedKeys {
            kv: self.layer(layer),
            block_table: &self.tables[seq],
            head,
        }
    }

    fn synth(&self, layer: usize, head: usize, seq: usize) -> &Synth {
        &self.synth[(layer * self.dims.num_kv_heads + head) * self.seqs + seq]
    }

    /// Decode rows (one per sequence, at `ctx[s]`) whose query heads are
    /// each KV head's construction directions turned by noise (`step`).
    pub fn queries(&self, layer: usize, step: u64, seed: u64) -> Vec<f32> {
        let (w, d) = (self.dims.qkv_dim(), self.dims.head_dim);
        let g = self.dims.num_heads / self.dims.num_kv_heads;
        let mut q = vec![0.0f32; self.seqs * w];
        for s in 0..self.seqs {
            for h in 0..self.dims.num_kv_heads {
                let turned = self.synth(layer, h, s).turned(0.6, seed, step);
                q[s * w + h * g * d..s * w + (h + 1) * g * d].copy_from_slice(&turned);
            }
        }
        q
    }

    pub fn shape(&self) -> TacticShape {
        TacticShape {
            kv_heads: self.dims.num_kv_heads,
            head_dim: self.dims.head_dim,
            group: self.dims.num_heads / self.dims.num_kv_heads,
        }
    }
}

/// A step whose rows are, per sequence `s`, its slots `from(s)..lens[s]`.
fn meta_over(lens: &[usize], tables: &[Vec<u32>], from: impl Fn(usize) -> usize) -> StepMeta {
    let mut m = StepMeta::default();
    for (s, (&l, t)) in lens.iter().zip(tables).enumerate() {
        let q_start = m.tokens.len();
        for p in from(s)..l {
            m.tokens.push(0);
            m.positions.push(p as u32);
            m.slots.push(t[p / 16] * 16 + (p % 16) as u32);
        }
        m.seqs.push(SeqMeta {
            q_start,
            q_len: l - from(s),
            ctx_len: l,
            block_table: t.clone(),
        });
    }
    m
}

/// A decode step: one row per sequence at context `ctx[s]`.
pub(super) fn decode_meta(ctx: &[usize], tables: &[Vec<u32>]) -> StepMeta {
    meta_over(ctx, tables, |s| ctx[s] - 1)
}

/// Sets a state's bytes `[off, off + bytes)` to 0xff (NaN, ~0) so that what
/// the kernels leave unwritten shows.
fn poison(gpu: &Gpu, addr: u64, off: u64, bytes: u64) -> Result<()> {
    if bytes > 0 {
        // SAFETY: callers pass ranges inside the state's allocation.
        unsafe { gpu.memset_bytes(addr + off, bytes as usize, 0xff)? };
    }
    Ok(())
}

/// Poisons what a run appended after `old` clusters per head will write.
fn poison_run(gpu: &Gpu, p: &LayerPlan, old: &[usize], start: usize) -> Result<()> {
    let l = &p.layout;
    let (cap, d, len) = (l.cap as u64, l.head_dim as u64, l.len as u64);
    for (h, &c) in old.iter().enumerate() {
        let (h, c) = (h as u64, c as u64);
        poison(
            gpu,
            p.addr,
            l.centroids + 4 * (h * cap + c) * d,
            4 * (cap - c) * d,
        )?;
        poison(gpu, p.addr, l.log_size + 4 * (h * cap + c), 4 * (cap - c))?;
        poison(gpu, p.addr, l.spread + 4 * (h * cap + c), 4 * (cap - c))?;
        poison(
            gpu,
            p.addr,
            l.offsets + 4 * (h * (cap + 1) + c + 1),
            4 * (cap - c),
        )?;
        let s = start as u64;
        poison(gpu, p.addr, l.members + 4 * (h * len + s), 4 * (len - s))?;
    }
    Ok(())
}

/// The device's clustering of `lens` (first decode steps), then with
/// `regrow`, of a later step at `lens[1]` past a limit, for sequence 0.
fn kmeans(cx: &mut Ctx, heads: Heads, lens: &[usize], regrow: Option<usize>) -> Result<Vec<Row>> {
    let ctxs: Vec<usize> = match regrow {
        Some(_) => vec![lens[0]],
        None => lens.to_vec(),
    };
    let fx = Fixture::new(cx, heads, 1, &ctxs)?;
    let gpu = cx.b.gpu();
    let mut prm = TacticParams::new(0.9);
    if let Some(limit) = regrow {
        prm.recluster_limit = limit;
    }
    let kvh = fx.dims.num_kv_heads;
    let mut states = TacticStates::<Gpu>::new(kvh, fx.dims.head_dim);
    let mut ws = TacticWorkspace::default();
    let mut cpu: Vec<Vec<ClusterIndex>> = vec![vec![]; ctxs.len()];
    let steps: Vec<Vec<usize>> = match regrow {
        Some(_) => vec![vec![lens[1]], vec![lens[0]]],
        None => vec![ctxs.clone()],
    };
    for s in 0..ctxs.len() {
        states.open(s as u64, prm, 1)?;
    }
    for ctx in &steps {
        let ds = cx.b.begin_step(&decode_meta(ctx, &fx.tables))?;
        let mut planned = vec![];
        for (s, &c) in ctx.iter().enumerate() {
            let plan = states.prepare(gpu, s as u64, 0, c, false)?;
            let old: Vec<usize> = (0..kvh)
                .map(|h| cpu[s].get(h).map_or(0, ClusterIndex::clusters))
                .collect();
            if let Some(run) = plan.run {
                poison_run(gpu, &plan, &old, run.start)?;
            }
            let entry = TacticEntry {
                seq: s,
                state: s as u64,
                row: s,
                ctx_len: c,
                prompt_end: false,
                diagnostics: false,
                baseline: None,
            };
            planned.push(Planned { entry, plan });
            // The CPU's clustering of the same keys.
            for h in 0..kvh {
                let keys = fx.keys(0, s, h);
                match cpu[s].get_mut(h) {
                    None => cpu[s].push(ClusterIndex::build(&keys, c - 1, &prm.kmeans)),
                    Some(ix) => ix.extend(&keys, c - 1, &prm.kmeans),
                }
            }
        }
        for (km, jobs) in cluster_jobs(&planned, kvh) {
            gpu.tactic_cluster(&mut ws, &ds, &fx.kv, 0, &fx.shape(), &jobs, &km)?;
        }
        states.commit();
    }
    let mut t = Tally::default();
    for (s, want) in cpu.iter().enumerate() {
        let st = states
            .layer(s as u64, 0)
            .ok_or_else(|| Error::Backend("no state".into()))?;
        let bytes = gpu.download(&st.buf, st.layout.bytes as usize)?;
        let got = read_heads(&st.layout, &bytes, st.layout.len as usize);
        for (g, w) in got.iter().zip(want) {
            t.add(g, w)?;
        }
    }
    Ok(t.rows())
}

/// Clusterings compared head by head.
#[derive(Debug, Default)]
struct Tally {
    keys: usize,
    moved: usize,
    heads: usize,
    equal_heads: usize,
    /// Over the heads whose clusters have the same members.
    cent: (Vec<f32>, Vec<f32>),
    stats: (Vec<f32>, Vec<f32>),
    shape: (Vec<f32>, Vec<f32>),
}

impl Tally {
    fn add(&mut self, g: &ClusterIndex, w: &ClusterIndex) -> Result<()> {
        // The device's members partition the clustered slots (no poison
        // left): a permutation of 0..len, offsets ascending to len.
        let mut sorted = g.members.clone();
        sorted.sort_unstable();
        let whole = sorted.iter().copied().eq(0..w.len as u32)
            && g.offsets.windows(2).all(|p| p[0] < p[1])
            && g.offsets.last().copied() == Some(w.len as u32);
        if !whole {
            return Err(Error::Backend(format!(
                "the device's clusters do not partition slots 0..{} ({} clusters)",
                w.len,
                g.clusters()
            )));
        }
        let of = |ix: &ClusterIndex| {
            let mut c = vec![u32::MAX; ix.len];
            for k in 0..ix.clusters() {
                for &s in ix.members_of(k) {
                    c[s as usize] = k as u32;
                }
            }
            c
        };
        let (a, b) = (of(g), of(w));
        self.keys += w.len;
        self.moved += a.iter().zip(&b).filter(|(x, y)| x != y).count();
        self.heads += 1;
        if g.offsets == w.offsets && g.members == w.members {
            self.equal_heads += 1;
            self.cent.0.extend(&g.centroids);
            self.cent.1.extend(&w.centroids);
            for (x, y) in [(&g.spread, &w.spread), (&g.log_size, &w.log_size)] {
                self.stats.0.extend(x);
                self.stats.1.extend(y);
            }
            self.shape.0.extend(&g.shape);
            self.shape.1.extend(&w.shape);
        }
        Ok(())
    }

    fn rows(&self) -> Vec<Row> {
        let frac = self.moved as f64 / self.keys.max(1) as f64;
        let note = format!(
            "{} of {} keys in another cluster; {} of {} heads with the same clusters",
            self.moved, self.keys, self.equal_heads, self.heads
        );
        let mut out =
            vec![Row::at_most(CHECK, "assignment", "keys_moved", frac, 1e-3).with_note(note)];
        for (what, (g, w)) in [
            ("centroids", &self.cent),
            ("sizes and spreads", &self.stats),
            ("pooled shape", &self.shape),
        ] {
            out.push(compare_row(CHECK, what, g, w, F32_TOL));
        }
        out
    }
}

/// The selection on the CPU's clusters against `select_group`, then the
/// sparse attention over the device's selection.
fn select(cx: &mut Ctx, heads: Heads, lens: &[usize]) -> Result<Vec<Row>> {
    let fx = Fixture::new(cx, heads, 1, lens)?;
    let gpu = cx.b.gpu();
    let (kvh, d, g) = (fx.dims.num_kv_heads, fx.dims.head_dim, fx.shape().group);
    let prm = TacticParams::new(0.9);
    // The CPU's clusters: everything before the last 20 tokens, so that
    // the tail holds several.
    let mut bufs = vec![];
    let mut idx = vec![];
    let mut jobs = vec![];
    for (s, &n) in lens.iter().enumerate() {
        let clustered = n.saturating_sub(20);
        let heads: Vec<ClusterIndex> = (0..kvh)
            .map(|h| ClusterIndex::build(&fx.keys(0, s, h), clustered, &prm.kmeans))
            .collect();
        let cap = heads.iter().map(ClusterIndex::clusters).max().unwrap_or(0);
        let layout = StateLayout::new(kvh, d, cap, clustered);
        let mut bytes = vec![0u8; layout.bytes as usize];
        write_heads(&layout, &heads, &mut bytes);
        let buf = gpu.upload(&bytes)?;
        for h in 0..kvh {
            jobs.push(SelectJob {
                state: gpu.addr(&buf),
                layout,
                head: h,
                row: s,
                ctx_len: n,
                p: prm.p,
                margin: prm.margin,
            });
        }
        bufs.push(buf);
        idx.push(heads);
    }
    let q = fx.queries(0, 0, cx.seed);
    let w = fx.dims.qkv_dim();
    let ds: DeviceStep = cx.b.begin_step(&decode_meta(lens, &fx.tables))?;
    let q_dev = gpu.upload(&q)?;
    let mut ws = TacticWorkspace::default();
    gpu.tactic_select(&mut ws, &ds, &q_dev, w, &fx.kv, 0, &fx.shape(), &jobs)?;
    let got = gpu.tactic_selection_to_host(&ws, &jobs, g)?;
    let mut sets = SetTally::default();
    let (mut est_g, mut est_w) = (vec![], vec![]);
    let mut scratch = Scratch::default();
    for (i, job) in jobs.iter().enumerate() {
        let (s, h) = (job.row, job.head);
        let keys = fx.keys(0, s, h);
        let qg = &q[s * w + h * g * d..s * w + (h + 1) * g * d];
        let (mut want, mut est) = (vec![], vec![0.0f32; g]);
        select_group(
            &idx[s][h],
            &keys,
            qg,
            job.ctx_len,
            &prm,
            &mut scratch,
            &mut want,
            &mut est,
        );
        if sets.add(&got.slots[i], &want, &keys, qg, job.ctx_len) {
            est_g.extend(&got.est_mass[i]);
            est_w.extend(&est);
        }
    }
    let mut rows = sets.rows("selection on the CPU's clusters");
    rows.push(compare_row(
        CHECK,
        "estimated mass",
        &est_g,
        &est_w,
        F32_TOL,
    ));
    let sel = super::tactic_diag::Selected {
        ds: &ds,
        q: &q,
        q_dev: &q_dev,
        jobs: &jobs,
        got: &got,
        clusters: &idx,
    };
    rows.extend(super::tactic_diag::measure(gpu, &mut ws, &fx, &sel, &prm)?);
    rows.push(attend(cx, &fx, &ds, &q, &jobs, &mut ws, &got.slots)?);
    drop(bufs);
    Ok(rows)
}

/// The sparse attention over the device's selection `slots` (per job)
/// into poisoned rows, against the CPU's paged attention with it.
pub(super) fn attend(
    cx: &Ctx,
    fx: &Fixture,
    ds: &DeviceStep,
    q: &[f32],
    jobs: &[SelectJob],
    ws: &mut TacticWorkspace,
    slots: &[Vec<u32>],
) -> Result<Row> {
    let gpu = cx.b.gpu();
    let (w, qd) = (fx.dims.qkv_dim(), fx.dims.q_dim());
    let q_dev = gpu.upload(q)?;
    let mut out = gpu.alloc_poisoned::<f32>(fx.seqs * qd)?;
    let mut view = out.slice_mut(..);
    gpu.tactic_attend(
        ws,
        ds,
        &q_dev,
        w,
        &fx.kv,
        0,
        &fx.shape(),
        jobs,
        &mut view,
        0,
        qd,
    )?;
    let got = gpu.download(&out, fx.seqs * qd)?;
    let kvh = fx.dims.num_kv_heads;
    let per_seq: Vec<Vec<Vec<u32>>> = slots.chunks(kvh).map(<[Vec<u32>]>::to_vec).collect();
    let seqs: Vec<AttnSeq<'_>> = (0..fx.seqs)
        .map(|s| AttnSeq {
            q_start: s,
            q_len: 1,
            ctx_len: jobs[s * kvh].ctx_len,
            block_table: &fx.tables[s],
            selection: Some(&per_seq[s]),
        })
        .collect();
    let mut want = vec![0.0; fx.seqs * qd];
    cpu::paged_attention(q, w, fx.dims.num_heads, &fx.layer(0), &seqs, &mut want);
    Ok(compare_row(
        CHECK,
        "sparse attention",
        &got,
        &want,
        ATTN_TOL,
    ))
}

/// Selections compared (layer, KV head, step) by (layer, KV head, step).
#[derive(Debug, Default)]
pub(super) struct SetTally {
    sets: usize,
    equal: usize,
    ties: usize,
    /// Differences that are not near-ties, described.
    bad: Vec<String>,
    worst: f64,
}

impl SetTally {
    /// Adds one comparison; whether the sets are equal.
    pub fn add(
        &mut self,
        got: &[u32],
        want: &[u32],
        keys: &PagedKeys<'_>,
        q: &[f32],
        ctx: usize,
    ) -> bool {
        self.sets += 1;
        if got == want {
            self.equal += 1;
            return true;
        }
        let d = keys.kv.head_dim;
        let mut sc = vec![];
        let mut gap = 0.0f64;
        for qh in q.chunks(d) {
            exact_scores(keys, qh, ctx, &mut sc);
            gap = gap.max((true_mass(&sc, got) - true_mass(&sc, want)).abs());
        }
        self.worst = self.worst.max(gap);
        if gap <= 1e-3 {
            self.ties += 1;
        } else if self.bad.len() < 3 {
            self.bad.push(format!(
                "{} vs {} slots, true mass {gap:.2e} apart",
                got.len(),
                want.len()
            ));
        }
        false
    }

    pub fn rows(&self, what: &str) -> Vec<Row> {
        let frac = self.equal as f64 / self.sets.max(1) as f64;
        let mut r = Row::at_least(CHECK, what, "equal_sets", frac, 0.999).with_note(format!(
            "{} of {} equal, {} near-ties (true mass within 1e-3), worst {:.1e}",
            self.equal, self.sets, self.ties, self.worst
        ));
        if !self.bad.is_empty() {
            r = Row::fail(
                CHECK,
                what,
                format!("not near-ties: {}", self.bad.join("; ")),
            );
        }
        vec![r]
    }
}

/// Decode steps on `layers` layers of two sequences (one re-clustering
/// every 17 steps, one at the default limit): the device's states grown
/// step by step, its selections against `TacticSeq`'s on the same keys
/// and queries.
fn decode(cx: &mut Ctx, heads: Heads, layers: usize) -> Result<Vec<Row>> {
    const STEPS: usize = 40;
    let (first, lens) = ([1500usize, 700], [1500 + STEPS, 700 + STEPS]);
    let fx = Fixture::new(cx, heads, layers, &lens)?;
    let gpu = cx.b.gpu();
    let kvh = fx.dims.num_kv_heads;
    let (g, d, w) = (fx.shape().group, fx.dims.head_dim, fx.dims.qkv_dim());
    let mut prm = [TacticParams::new(0.9), TacticParams::new(0.95)];
    prm[0].recluster_limit = 16;
    let mut states = TacticStates::<Gpu>::new(kvh, d);
    let mut cpu: Vec<TacticSeq> = prm.iter().map(|p| TacticSeq::new(*p, layers)).collect();
    for (s, p) in prm.iter().enumerate() {
        states.open(s as u64, *p, layers)?;
    }
    let mut ws = TacticWorkspace::default();
    let mut sets = SetTally::default();
    for t in 0..STEPS {
        let ctx: Vec<usize> = first.iter().map(|f| f + t + 1).collect();
        let ds = cx.b.begin_step(&decode_meta(&ctx, &fx.tables))?;
        for layer in 0..layers {
            let q = fx.queries(layer, t as u64, cx.seed);
            let q_dev = gpu.upload(&q)?;
            let mut planned = vec![];
            for (s, &c) in ctx.iter().enumerate() {
                let plan = states.prepare(gpu, s as u64, layer, c, false)?;
                let entry = TacticEntry {
                    seq: s,
                    state: s as u64,
                    row: s,
                    ctx_len: c,
                    prompt_end: false,
                    diagnostics: false,
                    baseline: None,
                };
                planned.push(Planned { entry, plan });
            }
            for (km, jobs) in cluster_jobs(&planned, kvh) {
                gpu.tactic_cluster(&mut ws, &ds, &fx.kv, layer, &fx.shape(), &jobs, &km)?;
            }
            let jobs = crate::backend::tactic::driver::select_jobs(&planned, kvh);
            gpu.tactic_select(&mut ws, &ds, &q_dev, w, &fx.kv, layer, &fx.shape(), &jobs)?;
            let got = gpu.tactic_selection_to_host(&ws, &jobs, g)?;
            for (s, seq) in cpu.iter_mut().enumerate() {
                let step = DecodeStep {
                    q: &q[s * w..s * w + fx.dims.q_dim()],
                    kv: fx.layer(layer),
                    block_table: &fx.tables[s],
                    ctx_len: ctx[s],
                };
                let mut want = vec![vec![]; kvh];
                let mut diag = vec![HeadDiag::default(); kvh];
                seq.select_layer(layer, &step, &mut want, &mut diag);
                for h in 0..kvh {
                    let qg = &q[s * w + h * g * d..s * w + (h + 1) * g * d];
                    let keys = fx.keys(layer, s, h);
                    sets.add(&got.slots[s * kvh + h], &want[h], &keys, qg, ctx[s]);
                }
            }
        }
        states.commit();
    }
    let clustered = states.layer(0, 0).map_or(0, |l| l.layout.len);
    let mut rows = sets.rows("selections per (layer, KV head, step)");
    rows[0].note += &format!("; seq 0 re-clustered up to slot {clustered}");
    rows.push(Row::at_most(
        CHECK,
        "state memory",
        "bytes",
        states.live_bytes() as f64,
        f64::INFINITY,
    ));
    Ok(rows)
}

/// SmolLM2's shape cut to two layers (random weights), every sequence on
/// `tactic` with a re-clustering limit of 24, then on each baseline
/// (`oracle_top_p`, `fixed_budget`), through the engine: the CUDA backend
/// with `experimental_gpu_tactic` against the CPU backend's device path on
/// the same bf16 weights (prompts of 300 and 77 tokens, the first in
/// chunks so that its state is built at its last chunk, a fork, 40
/// teacher-forced decode steps), with attention diagnostics.
pub fn model(b: CudaBackend, seed: u64) -> Vec<Row> {
    let mut rows = model_policy(
        b,
        seed,
        AttentionPolicy::Tactic {
            p: 0.9,
            cluster_size: None,
            recluster_limit: Some(24),
        },
    );
    let baselines = [
        AttentionPolicy::OracleTopP { p: 0.9 },
        AttentionPolicy::FixedBudget {
            tokens: 64,
            p: Some(0.9),
        },
    ];
    for policy in baselines {
        match CudaBackend::with_lanes(0, 1) {
            Ok(mut b) => {
                b.gpu_mut().set_sync_launches(true);
                rows.extend(model_policy(b, seed, policy));
            }
            Err(e) => rows.push(Row::fail(CHECK, "model: open the GPU", e.to_string())),
        }
    }
    rows
}

fn model_policy(b: CudaBackend, seed: u64, policy: AttentionPolicy) -> Vec<Row> {
    let name = policy.name().to_owned();
    let b = match b.with_gpu_tactic(true) {
        Ok(b) => b,
        Err(e) => return vec![Row::fail(CHECK, "model: the option", e.to_string())],
    };
    let Some(mut config) = ModelConfig::preset("smollm2-135m") else {
        return vec![Row::fail(CHECK, "model", "no smollm2-135m preset")];
    };
    config.num_layers = 2;
    let src = RandomSource {
        config: config.clone(),
        seed,
    };
    let mut sc =
        super::models::random_scenario(seed, config.vocab_size, &[300, 77], &[128, 77], 40);
    sc.policy = policy;
    // The device's diagnostics against the CPU device path's.
    sc.diagnostics = true;
    let cpu = CpuBackend {
        round_to_bf16: true,
        round_activations: false,
        device_tactic: None,
    }
    .with_device_tactic();
    let rows = super::model::compare_with(CHECK, (b, cpu), &config, &src, &sc, 256, LOGITS_TOL);
    rows.into_iter()
        .map(|mut r| {
            r.case = format!("model 2-layer SmolLM2 shape, {name}: {}", r.case);
            r
        })
        .collect()
}
