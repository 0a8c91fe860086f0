//! `tacflowd bench-attention`: paged decode attention in the Llama-3.1-8B
//! attention shape (32 query heads over 8 KV heads of 128, bf16 cache,
//! pages of 16 tokens in random order; `--shape` takes another) at the
//! (batch, context) cases of the decode-attention figures, against the
//! device-to-device copy bandwidth measured in the same run. With
//! `--variants`, every kernel variant that the lab instantiates for the
//! shape is timed, and the first attention kernel as the baseline; the
//! daemon's choice is timed first and again last (the spread of the
//! measurement).
//!
//! Timing: CUDA events around each launch, a warm-up, the median of many
//! launches; the caches rotate over several sets of pages (at least 1 GiB
//! of K and V in all), so that L2 (50 MB) cannot serve a launch the bytes
//! the previous one read. Bytes are the K and V rows read, once each.

use super::{
    copy_bandwidth, device_line, quantiles, read_bandwidth, shuffled, time_each, write_json,
};
use crate::error::Result;
use serde_json::json;
use std::path::PathBuf;
use tacflow_kernels::cuda::attention::HEAD_MAJOR;
use tacflow_kernels::cuda::lab::{AttnForce, AttnKernel};
use tacflow_kernels::cuda::sources::ATTENTION_BENCH_VARIANTS;
use tacflow_kernels::cuda::{
    AttnIo, AttnLoad, AttnOverride, AttnShape, AttnVariant, DeviceStep, Gpu, KvCache, StepArrays,
};
use tacflow_kernels::rng::random_weight;

/// The (batch, context) cases of the decode-attention figures
/// (kernels/ATTENTION.md).
pub const CASES: [(usize, usize); 7] = [
    (1, 32_768),
    (8, 32_768),
    (32, 32_768),
    (1, 131_072),
    (4, 131_072),
    (64, 4096),
    (256, 2048),
];

/// Query heads, KV heads and head size of the attention benchmarked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Llama-3.1-8B's attention, the benchmarks' shape: the kernel variants and the
/// timeline variant are compiled for it alone.
pub const LLAMA3: BenchShape = BenchShape {
    heads: 32,
    kv_heads: 8,
    head_dim: 128,
};

impl BenchShape {
    pub(crate) fn attn(&self) -> AttnShape {
        AttnShape {
            num_heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            qkv_stride: (self.heads + 2 * self.kv_heads) * self.head_dim,
        }
    }

    /// Bytes of K and V per token (all KV heads).
    fn token_bytes(&self) -> usize {
        2 * self.kv_heads * self.head_dim * 2
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub shape: BenchShape,
    pub cases: Vec<(usize, usize)>,
    /// Time the alternative kernels too (else only the daemon's).
    pub variants: bool,
    pub json: Option<PathBuf>,
    pub seed: u64,
    /// Timed launches per kernel and case (0: enough for ~0.15 s).
    pub iters: usize,
    /// Only the kernels whose name contains one of these.
    pub only: Vec<String>,
    /// The daemon's kernel again with each of these split counts forced.
    pub splits: Vec<usize>,
    /// Print a timeline of one launch per case (`timeline_of`).
    pub timeline: bool,
    /// Also write each timeline, a line per CTA, as CSV into this folder.
    pub timeline_csv: Option<PathBuf>,
    /// Each sequence's pages in allocation order (consecutive blocks, as a
    /// fresh cache hands them out) instead of a random order.
    pub pages_in_order: bool,
}

/// One timed kernel on one case.
#[derive(Debug, Clone)]
struct Timing {
    kernel: String,
    splits: usize,
    pages_per_split: usize,
    median_us: f64,
    p10_us: f64,
    p90_us: f64,
}

/// Everything one case needs on the device: the cache and one step per
/// rotation set.
struct CaseData {
    shape: AttnShape,
    kv: KvCache,
    steps: Vec<DeviceStep>,
    qkv: tacflow_kernels::cuda::CudaSlice<f32>,
    out: tacflow_kernels::cuda::CudaSlice<f32>,
}

fn prepare(
    gpu: &Gpu,
    s: BenchShape,
    (batch, ctx): (usize, usize),
    seed: u64,
    in_order: bool,
) -> Result<CaseData> {
    let bytes = batch * ctx * s.token_bytes();
    let sets = (1usize << 30).div_ceil(bytes).clamp(1, 8);
    let pages = ctx.div_ceil(16);
    let blocks = sets * batch * pages;
    let mut kv = gpu.kv_cache(1, blocks, s.kv_heads, s.head_dim)?;
    let n = kv.layer_elems();
    gpu.random_bf16(&mut kv.k, n, seed, 11, 0.0, 1.0)?;
    gpu.random_bf16(&mut kv.v, n, seed, 12, 0.0, 1.0)?;
    let order = if in_order {
        (0..blocks as u32).collect()
    } else {
        shuffled(blocks, seed)
    };
    let mut steps = vec![];
    for set in order.chunks(batch * pages) {
        let a = StepArrays {
            tokens: vec![0; batch],
            positions: vec![ctx as u32 - 1; batch],
            slots: vec![0; batch],
            kv_len: vec![ctx as u32; batch],
            table_off: (0..batch).map(|b| (b * pages) as u32).collect(),
            tables: set.to_vec(),
            logit_rows: vec![],
        };
        steps.push(DeviceStep::upload(gpu, &a)?);
    }
    let w = s.attn().qkv_stride;
    let q: Vec<f32> = (0..(batch * w) as u64)
        .map(|i| random_weight(seed, 13, i, 0.0, 1.0))
        .collect();
    Ok(CaseData {
        shape: s.attn(),
        kv,
        steps,
        qkv: gpu.upload(&q)?,
        out: gpu.alloc(batch * s.heads * s.head_dim)?,
    })
}

fn kernel_name(f: &AttnForce) -> String {
    let order = match f.plan.head_major {
        Some(false) => "/rows",
        _ => "",
    };
    let name = match f.kernel {
        None => "daemon".into(),
        Some(AttnKernel::Main(v)) => v.tag(),
        Some(AttnKernel::First) => "first".into(),
    };
    let splits = f.plan.splits.map_or(String::new(), |n| format!("/s{n}"));
    let coop = match f.plan.coop {
        Some(true) => "/coop",
        Some(false) => "/last",
        None => "",
    };
    let even = if f.plan.uneven == Some(false) {
        "/even"
    } else {
        ""
    };
    format!("{name}{order}{splits}{coop}{even}")
}

/// Times one kernel over the rotation sets.
fn time_kernel(
    gpu: &Gpu,
    d: &mut CaseData,
    force: AttnForce,
    (est_s, iters): (f64, usize),
) -> Result<Timing> {
    let launch = |i: usize, d: &mut CaseData| {
        let io = AttnIo {
            qkv: d.qkv.as_view(),
            kv: &d.kv,
            layer: 0,
            out: d.out.as_view_mut(),
        };
        gpu.attention_forced(&d.steps[i % d.steps.len()], io, d.shape, force)
    };
    let mut plan = None;
    for i in 0..5 {
        plan = Some(launch(i, d)?);
    }
    let plan = plan.expect("warmed up");
    let iters = if iters > 0 {
        iters
    } else {
        (0.15 / est_s).clamp(30.0, 400.0) as usize
    };
    let mut us = time_each(gpu, iters, |i| launch(i, d).map(|_| ()))?;
    let read_only = matches!(force.kernel, Some(AttnKernel::Main(v)) if !v.compute);
    let out = gpu.download(&d.out, d.out.len())?;
    if let Some(bad) = out.iter().position(|x| !x.is_finite())
        && !read_only
    {
        return Err(crate::error::Error::Backend(format!(
            "{}: output {bad} is {}",
            kernel_name(&force),
            out[bad]
        )));
    }
    let (median_us, p10_us, p90_us) = quantiles(&mut us);
    Ok(Timing {
        kernel: kernel_name(&force),
        splits: plan.splits,
        pages_per_split: plan.pages_per_split,
        median_us,
        p10_us,
        p90_us,
    })
}

pub fn run(opts: &Options) -> Result<()> {
    let s = opts.shape;
    let shape = s.attn();
    shape.check()?;
    if s != LLAMA3 && (opts.variants || opts.timeline) {
        return Err(crate::error::Error::Backend(format!(
            "--variants and --timeline are for the shape {}/{}/{} alone (their kernels are \
             compiled for it), not {}/{}/{}",
            LLAMA3.heads, LLAMA3.kv_heads, LLAMA3.head_dim, s.heads, s.kv_heads, s.head_dim
        )));
    }
    let mut gpu = Gpu::new(0)?;
    gpu.load_lab()?;
    println!(
        "bench-attention on {}: {} query heads over {} KV heads of {}",
        device_line(&gpu),
        s.heads,
        s.kv_heads,
        s.head_dim
    );
    let g = shape.heads_per_cta();
    let daemon = AttnVariant::default_for(s.head_dim, g);
    let slots = gpu.attention_slots(s.head_dim, g, daemon);
    println!(
        "daemon kernel: {} ({g} heads a CTA), {slots} CTAs co-reside (one wave)",
        daemon.tag()
    );
    let (copy, samples) = copy_bandwidth(&gpu, 2 << 30, 20)?;
    println!(
        "copy bandwidth: {:.0} GB/s (read + write, 2 GiB copy, median of {})",
        copy / 1e9,
        samples.len()
    );
    let plan = AttnOverride::default();
    let force = |kernel, head_major| AttnForce {
        plan: AttnOverride { head_major, ..plan },
        kernel,
        timeline: None,
    };
    let forced_splits = opts.splits.iter().map(|&n| AttnForce {
        plan: AttnOverride {
            splits: Some(n),
            ..plan
        },
        ..force(None, None)
    });
    let (read, _) = read_bandwidth(&gpu, 2 << 30, 20)?;
    println!(
        "read bandwidth: {:.0} GB/s ({:.1}% of the copy; 2 GiB read, median of 20)",
        read / 1e9,
        100.0 * read / copy
    );
    let mut kernels = vec![force(None, None)];
    kernels.extend(forced_splits);
    if opts.variants {
        // The other merge of the splits (the plan's choice is the first row).
        for coop in [true, false] {
            kernels.push(AttnForce {
                plan: AttnOverride {
                    coop: Some(coop),
                    ..plan
                },
                ..force(None, None)
            });
        }
        // Splits of equal length (the plan's choice is unequal).
        kernels.push(AttnForce {
            plan: AttnOverride {
                uneven: Some(false),
                ..plan
            },
            ..force(None, None)
        });
        kernels.push(force(None, Some(!HEAD_MAJOR)));
        for v in ATTENTION_BENCH_VARIANTS {
            kernels.push(force(Some(AttnKernel::Main(v)), None));
        }
        let direct = AttnVariant::registers(AttnLoad::Direct, 4);
        kernels.push(force(Some(AttnKernel::Main(direct)), Some(!HEAD_MAJOR)));
        kernels.push(force(Some(AttnKernel::First), None));
        kernels.push(force(None, None));
    }
    let mut rows = vec![];
    let mut table = vec![];
    for &(batch, ctx) in &opts.cases {
        let bytes = (batch * ctx * s.token_bytes()) as f64;
        let mut d = prepare(&gpu, s, (batch, ctx), opts.seed, opts.pages_in_order)?;
        for &k in &kernels {
            let name = kernel_name(&k);
            if !opts.only.is_empty() && !opts.only.iter().any(|o| name.contains(o.as_str())) {
                continue;
            }
            let t = time_kernel(&gpu, &mut d, k, (bytes / 2.5e12 + 10e-6, opts.iters))?;
            let gbps = bytes / (t.median_us * 1e-6) / 1e9;
            let frac = gbps * 1e9 / copy;
            table.push(format!(
                "{batch:>5} {ctx:>7} {:>8} {:>4}x{:<5} {:>10.1} {:>10.1} {:>10.1} {:>8.0} {:>7.1}%",
                t.kernel,
                t.splits,
                t.pages_per_split,
                t.median_us,
                t.p10_us,
                t.p90_us,
                gbps,
                100.0 * frac
            ));
            rows.push(json!({
                "batch": batch, "context": ctx, "kv_bytes": bytes, "kernel": t.kernel,
                "splits": t.splits, "pages_per_split": t.pages_per_split,
                "median_us": t.median_us, "p10_us": t.p10_us, "p90_us": t.p90_us,
                "gbps": gbps, "fraction_of_copy": frac, "rotation_sets": d.steps.len(),
            }));
        }
        if opts.timeline {
            timeline_of(&gpu, &mut d, (batch, ctx), opts.timeline_csv.as_deref())?;
        }
    }
    println!(
        "\n{:>5} {:>7} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "batch", "context", "kernel", "splits", "median_us", "p10_us", "p90_us", "GB/s", "of copy"
    );
    for l in &table {
        println!("{l}");
    }
    if let Some(path) = &opts.json {
        write_json(
            path,
            &json!({
                "device": device_line(&gpu),
                "copy_gbps": copy / 1e9,
                "copy_samples_gbps": samples.iter().map(|x| x / 1e9).collect::<Vec<_>>(),
                "read_gbps": read / 1e9,
                "shape": {"heads": s.heads, "kv_heads": s.kv_heads, "head_dim": s.head_dim},
                "daemon_kernel": daemon.tag(),
                "slots": slots,
                "pages_in_order": opts.pages_in_order,
                "results": rows,
            }),
        )?;
    }
    Ok(())
}

/// Where the time of one launch goes: the default kernel's timeline
/// variant, after a warm-up, records the global timer (ns) at six points of
/// every CTA (`TL_*` in attention/common.cuh); printed as quantiles over the CTAs,
/// in microseconds after the first CTA started.
fn timeline_of(
    gpu: &Gpu,
    d: &mut CaseData,
    (batch, ctx): (usize, usize),
    csv: Option<&std::path::Path>,
) -> Result<()> {
    const POINTS: [(usize, &str); 7] = [
        (0, "entry"),
        (1, "loop"),
        (2, "loop end"),
        (6, "all loops"),
        (3, "published"),
        (4, "merge"),
        (5, "exit"),
    ];
    let v = AttnVariant::default_for(LLAMA3.head_dim, 4).with_timeline();
    let mut force = AttnForce {
        kernel: Some(AttnKernel::Main(v)),
        ..AttnForce::default()
    };
    time_kernel(gpu, d, force, (0.0, 5))?;
    let plan = gpu.attention_plan_forced(&d.shape, batch, ctx, force);
    let ctas = batch * d.shape.kv_heads * plan.chunks * plan.splits;
    let buf = gpu.alloc_zeroed::<u64>(8 * ctas)?;
    force.timeline = Some(gpu.ptr(&buf));
    let io = AttnIo {
        qkv: d.qkv.as_view(),
        kv: &d.kv,
        layer: 0,
        out: d.out.as_view_mut(),
    };
    gpu.attention_forced(&d.steps[0], io, d.shape, force)?;
    let t = gpu.download(&buf, 8 * ctas)?;
    let t0 = t.chunks(8).map(|c| c[0]).min().unwrap_or(0);
    if let Some(dir) = csv {
        let mut text = String::from("cta,entry,loop,loop_end,published,merge,exit,all_loops,sm\n");
        for (i, c) in t.chunks(8).enumerate() {
            let ns = |x: u64| {
                if x == 0 {
                    -1
                } else {
                    x.saturating_sub(t0) as i64
                }
            };
            let cols: Vec<String> = c[..7].iter().map(|&x| ns(x).to_string()).collect();
            text += &format!("{i},{},{}\n", cols.join(","), c[7]);
        }
        let path = dir.join(format!("timeline-{batch}x{ctx}.csv"));
        std::fs::write(&path, text).map_err(|source| crate::error::Error::Io { path, source })?;
    }
    let sms = {
        let mut s: Vec<u64> = t.chunks(8).map(|c| c[7]).collect();
        s.sort_unstable();
        s.dedup();
        s.len()
    };
    println!(
        "\ntimeline of {batch} x {ctx}: {ctas} CTAs on {sms} SMs, {} splits, {} merge; \
         us after the first CTA started (over the CTAs that reach the point)",
        plan.splits,
        if plan.splits == 1 {
            "no"
        } else if plan.coop {
            "cooperative"
        } else {
            "last-CTA"
        }
    );
    println!(
        "{:>10} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "point", "CTAs", "min", "p10", "p50", "p90", "max"
    );
    for &(i, name) in &POINTS {
        let mut us: Vec<f64> = t
            .chunks(8)
            .filter(|c| c[i] != 0)
            .map(|c| c[i].saturating_sub(t0) as f64 / 1e3)
            .collect();
        if us.is_empty() {
            continue;
        }
        let n = us.len();
        let (p50, p10, p90) = quantiles(&mut us);
        println!(
            "{name:>10} {n:>6} {:>8.2} {p10:>8.2} {p50:>8.2} {p90:>8.2} {:>8.2}",
            us[0],
            us[n - 1]
        );
    }
    // Who ends the key loop late: by the CTAs sharing its SM, and by launch
    // order (the buffer is in launch order).
    let loop_end = |c: &[u64]| c[2].saturating_sub(t0) as f64 / 1e3;
    let mut per_sm = std::collections::HashMap::new();
    for c in t.chunks(8) {
        *per_sm.entry(c[7]).or_insert(0usize) += 1;
    }
    let mut by_share = std::collections::BTreeMap::new();
    for c in t.chunks(8) {
        let e = by_share.entry(per_sm[&c[7]]).or_insert((0.0, 0usize));
        e.0 += loop_end(c);
        e.1 += 1;
    }
    let shares: Vec<String> = by_share
        .iter()
        .map(|(k, (sum, n))| format!("{k} per SM: {:.2} ({n} CTAs)", sum / *n as f64))
        .collect();
    println!("mean loop end, by CTAs on the SM: {}", shares.join(", "));
    let quarters: Vec<String> = t
        .chunks(8)
        .collect::<Vec<_>>()
        .chunks(ctas.div_ceil(4))
        .map(|q| {
            format!(
                "{:.2}",
                q.iter().map(|c| loop_end(c)).sum::<f64>() / q.len() as f64
            )
        })
        .collect();
    println!(
        "mean loop end, by quarter of launch order: {}",
        quarters.join(", ")
    );
    // The launch floor: an almost empty kernel of a full grid, timed alike.
    let tiny = gpu.alloc_zeroed::<u8>(16)?;
    let mut sink = gpu.alloc_zeroed::<f32>(1)?;
    let mut us = time_each(gpu, 200, |_| gpu.read_all(&tiny, &mut sink))?;
    let (p50, ..) = quantiles(&mut us);
    println!(
        "an empty launch of {} CTAs, event to event: {p50:.2} us (median of 200)",
        gpu.info().sm_count * 8
    );
    Ok(())
}
