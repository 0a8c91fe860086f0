//! Paged attention against the CPU reference: decode batches with contexts
//! around block (16) boundaries, long single sequences that the plan splits
//! (the fused merge) or must split (more pages than a CTA stages), prefill
//! chunks on top of a context, every GQA grouping shape the kernel
//! instantiates, and, in a build with the `lab` feature, every kernel
//! variant `tacflowd bench-attention` times (the loop shapes and the first
//! kernel, kept as the baseline). The cache is poisoned,
//! then filled through `kv_append` with tables in shuffled block order.

use super::report::{ATTN_TOL, Row, compare_row};
use super::{Ctx, case, round_bf16};
use crate::backend::{AttnDims, Backend, KvLayout, SeqMeta, StepMeta};
use crate::error::Result;
use tacflow_kernels::cpu::{self, AttnSeq, KvLayer};
use tacflow_kernels::cuda::attention::HEAD_MAJOR;
#[cfg(feature = "lab")]
use tacflow_kernels::cuda::lab::{AttnForce, AttnKernel};
use tacflow_kernels::cuda::{AttnOverride, AttnPlan};

/// Which kernel a case runs.
#[derive(Debug, Clone, Copy)]
enum CaseKernel {
    /// The daemon's choice.
    Daemon,
    /// The tensor-core prefill kernel on the step's chunks, the decode
    /// kernel on its other rows (`experimental_prefill_attention`).
    Prefill,
    /// A kernel of the lab.
    #[cfg(feature = "lab")]
    Lab(AttnKernel),
}

impl CaseKernel {
    fn tag(self) -> String {
        match self {
            CaseKernel::Daemon => String::new(),
            CaseKernel::Prefill => " prefill kernel".into(),
            #[cfg(feature = "lab")]
            CaseKernel::Lab(AttnKernel::Main(v)) => format!(" {}", v.tag()),
            #[cfg(feature = "lab")]
            CaseKernel::Lab(AttnKernel::First) => " first".into(),
        }
    }
}

/// The lab's kernels that compute (a read-only twin writes nothing).
#[cfg(feature = "lab")]
fn lab_kernels() -> impl Iterator<Item = CaseKernel> {
    tacflow_kernels::cuda::sources::ATTENTION_BENCH_VARIANTS
        .into_iter()
        .filter(|v| v.compute)
        .map(AttnKernel::Main)
        .chain([AttnKernel::First])
        .map(CaseKernel::Lab)
}

struct Case {
    heads: (usize, usize, usize),
    /// `(tokens cached after the step, new tokens in the step)` per sequence.
    seqs: Vec<(usize, usize)>,
    splits: Vec<Option<usize>>,
    q_std: f32,
    kernel: CaseKernel,
    head_major: Option<bool>,
    /// The cooperative merge of the splits forced on or off.
    coop: Option<bool>,
    /// Splits of unequal length forced on or off.
    uneven: Option<bool>,
}

fn cases() -> Vec<Case> {
    let c = |heads, seqs: &[(usize, usize)], splits: &[Option<usize>], q_std| Case {
        heads,
        seqs: seqs.to_vec(),
        splits: splits.to_vec(),
        q_std,
        kernel: CaseKernel::Daemon,
        head_major: None,
        coop: None,
        uneven: None,
    };
    let decode = |lens: &[usize]| lens.iter().map(|&l| (l, 1)).collect::<Vec<_>>();
    let llama = |kernel, head_major| Case {
        kernel,
        head_major,
        ..c(
            (32, 8, 128),
            &decode(&[1, 17, 1000, 3001]),
            &[None, Some(7)],
            1.0,
        )
    };
    let mut benched = vec![llama(CaseKernel::Daemon, Some(!HEAD_MAJOR))];
    #[cfg(feature = "lab")]
    benched.extend(lab_kernels().map(|k| llama(k, None)));
    // 1250 pages: more than one CTA stages, so even "1 split" is two.
    benched.push(c(
        (32, 8, 128),
        &decode(&[20_000, 5]),
        &[None, Some(1)],
        1.0,
    ));
    benched.extend(vec![
        c(
            (32, 8, 128),
            &decode(&[1, 15, 16, 17, 100, 1000, 3001]),
            &[None, Some(1), Some(3), Some(16)],
            1.0,
        ),
        c((9, 3, 64), &decode(&[8191]), &[None, Some(1)], 2.0),
        c(
            (4, 2, 16),
            &[(87, 37), (70, 70), (33, 1)],
            &[None, Some(2)],
            2.0,
        ),
        c(
            (32, 8, 128),
            &[(165, 65), (16, 16), (2049, 1)],
            &[None],
            4.0,
        ),
        c((8, 8, 64), &decode(&[200, 5]), &[None], 1.0),
        c(
            (16, 2, 128),
            &[(513, 1), (1, 1), (40, 20)],
            &[None, Some(4)],
            1.0,
        ),
        c((24, 2, 64), &[(300, 1), (50, 18)], &[None], 1.0),
        // 1, 2 and 3 heads per CTA at head size 128 (the tensor-core
        // loop's zero rows): partial pages, prefill rows, forced splits.
        c(
            (8, 8, 128),
            &[(1, 1), (17, 1), (1000, 1), (165, 65)],
            &[None, Some(5)],
            2.0,
        ),
        c(
            (8, 4, 128),
            &[(3001, 1), (31, 31), (16, 1)],
            &[None, Some(3)],
            2.0,
        ),
        c(
            (6, 2, 128),
            &[(8191, 1), (100, 40), (2, 1)],
            &[None, Some(9)],
            2.0,
        ),
        // 5, 6 and 7 heads per CTA at head size 128 (the wide tensor-core
        // loop's zero rows; 8 are the (16, 2, 128) cases).
        c(
            (28, 4, 128),
            &[(3001, 1), (17, 1), (100, 40)],
            &[None, Some(6)],
            2.0,
        ),
        c((10, 2, 128), &[(1000, 1), (31, 31)], &[None, Some(3)], 2.0),
        c((12, 2, 128), &[(2049, 1), (1, 1)], &[None], 2.0),
        c((4, 1, 256), &decode(&[129, 17]), &[None, Some(3)], 1.0),
        c((6, 2, 32), &[(31, 31), (64, 1)], &[None], 1.0),
    ]);
    benched.extend(prefill_cases());
    // The merge of many splits, some of them empty (the 1-token row).
    benched.push(c(
        (32, 8, 128),
        &decode(&[3001, 20_000, 1]),
        &[Some(40), Some(100)],
        1.0,
    ));
    // Both merges where either could run: the cooperative one (every CTA
    // resident: 24 CTAs x 20 splits fill less than a wave; 16 x 33 by the
    // plan; 128 splits of one CTA, head size 64 with 3 heads per CTA) and
    // the last CTA's.
    for coop in [true, false] {
        for (heads, seqs, splits) in [
            ((32, 8, 128), decode(&[3001, 20_000, 1]), Some(20)),
            ((32, 8, 128), decode(&[20_000, 5]), None),
            ((8, 1, 128), decode(&[8191]), None),
            ((9, 3, 64), decode(&[8191, 700]), None),
            ((4, 1, 256), decode(&[4000]), Some(40)),
            ((6, 2, 128), decode(&[20_000, 33]), None),
            ((28, 4, 128), decode(&[20_000, 9]), None),
            // More than 128 splits (up to 8 a lane in the cooperative merge).
            ((9, 3, 64), decode(&[20_000]), None),
            ((8, 1, 128), decode(&[20_000]), Some(256)),
        ] {
            benched.push(Case {
                coop: Some(coop),
                ..c(heads, &seqs, &[splits], 1.0)
            });
        }
    }
    // Splits of equal length (the last one shorter), both merges.
    for coop in [true, false] {
        benched.push(Case {
            coop: Some(coop),
            uneven: Some(false),
            ..c(
                (32, 8, 128),
                &decode(&[3001, 20_000, 1]),
                &[None, Some(7)],
                1.0,
            )
        });
    }
    benched
}

/// The prefill kernel's cases: causal chunks at several offsets (a whole
/// prompt, chunks on top of contexts, a chunk of exactly one tile and one
/// of 65), mixed with decode rows and chunks too short for a tile (the
/// decode kernel's), partial pages, both head sizes, GQA groups of 1 to 8,
/// many tiles over a long context, large magnitudes.
fn prefill_cases() -> Vec<Case> {
    let c = |heads, seqs: &[(usize, usize)], q_std| Case {
        heads,
        seqs: seqs.to_vec(),
        splits: vec![None],
        q_std,
        kernel: CaseKernel::Prefill,
        head_major: None,
        coop: None,
        uneven: None,
    };
    vec![
        c(
            (32, 8, 128),
            &[(165, 65), (16, 16), (2049, 1), (300, 70)],
            4.0,
        ),
        c((9, 3, 64), &[(130, 130), (8191, 1), (33, 16), (9, 5)], 2.0),
        c((8, 8, 128), &[(1000, 200), (17, 1), (64, 64)], 1.0),
        c((28, 4, 128), &[(100, 40), (3001, 1), (31, 31)], 2.0),
        c((16, 2, 64), &[(4096, 512), (5, 1)], 1.0),
        c((4, 1, 64), &[(20, 20), (129, 65)], 16.0),
    ]
}

pub fn attention(cx: &mut Ctx) -> Vec<Row> {
    let mut rows = vec![];
    for c in cases() {
        for &s in &c.splits {
            let (nh, kvh, d) = c.heads;
            let lens: Vec<String> = c.seqs.iter().map(|(l, q)| format!("{l}/{q}")).collect();
            let mut kernel = c.kernel.tag();
            if c.head_major == Some(!HEAD_MAJOR) {
                kernel += " (other CTA order)";
            }
            match c.coop {
                Some(true) => kernel += " coop merge",
                Some(false) => kernel += " last-CTA merge",
                None => {}
            }
            if c.uneven == Some(false) {
                kernel += " equal splits";
            }
            let name = format!(
                "{nh}/{kvh}x{d} ctx/new {} splits {}{kernel}",
                lens.join(","),
                s.map_or("auto".into(), |s| s.to_string())
            );
            case(&mut rows, "attention", name, || run_case(cx, &c, s));
        }
    }
    rows
}

/// Block tables over a shuffled set of blocks, one per sequence.
fn tables(cx: &mut Ctx, seqs: &[(usize, usize)]) -> (Vec<Vec<u32>>, usize) {
    let need: usize = seqs.iter().map(|(l, _)| l.div_ceil(16)).sum();
    let total = need + 3;
    let keys = cx.rand_u32(total, u32::MAX);
    let mut order: Vec<u32> = (0..total as u32).collect();
    order.sort_by_key(|&b| keys[b as usize]);
    let mut out = vec![];
    let mut next = 0;
    for (l, _) in seqs {
        let n = l.div_ceil(16);
        out.push(order[next..next + n].to_vec());
        next += n;
    }
    (out, total)
}

/// A step over `seqs` whose rows are, per sequence, its slots `from(l, q)..l`.
fn meta(
    seqs: &[(usize, usize)],
    tables: &[Vec<u32>],
    from: impl Fn(usize, usize) -> usize,
) -> StepMeta {
    let mut m = StepMeta::default();
    for (&(l, q), t) in seqs.iter().zip(tables) {
        let first = from(l, q);
        let q_start = m.tokens.len();
        for s in first..l {
            m.tokens.push(0);
            m.positions.push(s as u32);
            m.slots.push(t[s / 16] * 16 + (s % 16) as u32);
        }
        m.seqs.push(SeqMeta {
            q_start,
            q_len: l - first,
            ctx_len: l,
            block_table: t.clone(),
        });
    }
    m
}

fn run_case(cx: &mut Ctx, c: &Case, splits: Option<usize>) -> Result<Row> {
    let (nh, kvh, d) = c.heads;
    let dims = AttnDims {
        num_heads: nh,
        num_kv_heads: kvh,
        head_dim: d,
    };
    let w = dims.qkv_dim();
    let (tabs, blocks) = tables(cx, &c.seqs);
    let layout = KvLayout {
        num_layers: 1,
        num_blocks: blocks,
        block_size: 16,
        num_kv_heads: kvh,
        head_dim: d,
    };
    let mut kv = cx.b.kv_cache(&layout)?;
    cx.b.kv_poison(&mut kv)?;
    // Every cached token's k and v, written the way the model writes them.
    let fill = meta(&c.seqs, &tabs, |_, _| 0);
    let hist = cx.rand(fill.tokens.len() * w, 0.0, 1.0);
    let fill_step = cx.b.begin_step(&fill)?;
    cx.b.kv_append(
        &fill_step,
        &cx.b.act_from_host(fill.tokens.len(), w, &hist, false)?,
        &mut kv,
        0,
        dims,
        0..fill.tokens.len(),
    )?;
    // The step's queries.
    let step = meta(&c.seqs, &tabs, |l, q| l - q);
    let t = step.tokens.len();
    let q = cx.rand(t * w, 0.0, c.q_std);
    let qa = cx.b.act_from_host(t, w, &q, false)?;
    let mut out = cx.b.act_poisoned(t, dims.q_dim(), false)?;
    let ds = cx.b.begin_step(&step)?;
    let over = AttnOverride {
        splits,
        head_major: c.head_major,
        coop: c.coop,
        uneven: c.uneven,
    };
    let io = (&qa, &kv, 0);
    let note = match c.kernel {
        CaseKernel::Daemon => plan_note(&cx.b.attention_forced(&ds, io, dims, &mut out, over)?),
        CaseKernel::Prefill => {
            let split = cx.b.attention_prefill_rows(&ds, io, dims, &mut out, 0..t)?;
            let tiled: u32 = split.tiles.iter().map(|t| t[1]).sum();
            format!(
                "{tiled} rows in {} prefill tiles, {} rows on the decode kernel",
                split.tiles.len(),
                t - tiled as usize
            )
        }
        #[cfg(feature = "lab")]
        CaseKernel::Lab(k) => {
            let force = AttnForce {
                plan: over,
                kernel: Some(k),
                timeline: None,
            };
            plan_note(&cx.b.attention_lab(&ds, io, dims, &mut out, force)?)
        }
    };
    let got = cx.b.act_to_host(&out)?;
    // The merges leave their counters at rest (the cooperative one at a
    // multiple of 1024, the last-CTA one at zero), or the next launch merges
    // before its partials are in.
    let unsettled = cx.b.attention_workspace_unsettled()?;
    if unsettled > 0 {
        return Err(crate::error::Error::Backend(format!(
            "{unsettled} counters of the split workspace not at rest after the launch"
        )));
    }
    let want = cpu_attention(
        &step,
        &hist,
        &fill,
        (blocks, layout.block_elems()),
        dims,
        &q,
    );
    Ok(compare_row("attention", "", &got, &want, ATTN_TOL).with_note(note))
}

fn plan_note(plan: &AttnPlan) -> String {
    format!(
        "{} heads/CTA, {} splits of {} pages ({} long){}",
        plan.heads_per_cta,
        plan.splits,
        plan.pages_per_split,
        plan.long_splits,
        if plan.coop { ", cooperative merge" } else { "" }
    )
}

/// The CPU's attention of `step`'s rows (queries `q`) over the keys and
/// values `hist` that `fill` appended, rounded to bf16 as the cache holds
/// them; `(blocks, block_elems)` is the cache's size.
fn cpu_attention(
    step: &StepMeta,
    hist: &[f32],
    fill: &StepMeta,
    (blocks, block_elems): (usize, usize),
    dims: AttnDims,
    q: &[f32],
) -> Vec<f32> {
    let (nh, kvh, d) = (dims.num_heads, dims.num_kv_heads, dims.head_dim);
    let w = dims.qkv_dim();
    let t = step.tokens.len();
    let per_layer = blocks * block_elems;
    let (mut k, mut v) = (vec![f32::NAN; per_layer], vec![f32::NAN; per_layer]);
    cpu::kv_append(
        &mut k,
        &mut v,
        (kvh, 16, d),
        &round_bf16(hist),
        w,
        dims.q_dim(),
        &fill.slots,
    );
    let layer = KvLayer {
        k: &k,
        v: &v,
        kv_heads: kvh,
        head_dim: d,
        block_size: 16,
    };
    let seqs: Vec<AttnSeq<'_>> = step
        .seqs
        .iter()
        .map(|s| AttnSeq {
            q_start: s.q_start,
            q_len: s.q_len,
            ctx_len: s.ctx_len,
            block_table: &s.block_table,
            selection: None,
        })
        .collect();
    let mut want = vec![0.0; t * dims.q_dim()];
    cpu::paged_attention(q, w, nh, &layer, &seqs, &mut want);
    want
}
