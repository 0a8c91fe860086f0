//! Offline evaluation of Tactic and its baselines on queries and keys dumped
//! from a real model by `bench/tactic/dump_qk.py`.
//!
//! For every (layer, KV head, window) the keys before the window are
//! clustered; each query of the window is a decode query over the keys up to
//! and including its own position. Every selector runs on every (layer, KV
//! head, step); a query head succeeds when the true mass of its group's
//! (unioned) selection reaches `P`. Tokens read are counted as TACTIC.md
//! defines them and divided by the context.
//!
//! `cargo run --release -p tacflow-kernels --example tactic_eval -- DIR [DIR...]
//!   [--suite main|explore|all|timing|union] [--json OUT] [--p LIST]`

mod npy;
mod timing;
mod union;
mod variants;

use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tacflow_kernels::tactic::{ClusterIndex, DenseKeys, exact_scores, kmeans::kmeans};
use variants::{Membership, Outcome, Variant};

/// One dump: keys `[L, KVH, n, d]` after and before RoPE, queries
/// `[L, W*steps, H, d]`.
struct Dump {
    name: String,
    k_post: npy::Array,
    k_pre: npy::Array,
    q: npy::Array,
    ends: Vec<usize>,
    steps: usize,
}

impl Dump {
    fn load(dir: &std::path::Path) -> anyhow::Result<Dump> {
        let meta = std::fs::read_to_string(dir.join("meta.json"))?;
        Ok(Dump {
            name: dir.file_name().unwrap().to_string_lossy().into_owned(),
            k_post: npy::read_f32(&dir.join("k_post.npy"))?,
            k_pre: npy::read_f32(&dir.join("k_pre.npy"))?,
            q: npy::read_f32(&dir.join("q.npy"))?,
            ends: npy::json_ints(&meta, "window_ends")?,
            steps: npy::json_ints(&meta, "steps")?[0],
        })
    }
    fn dims(&self) -> (usize, usize, usize, usize, usize) {
        let s = &self.k_post.shape;
        (s[0], s[1], s[2], s[3], self.q.shape[2])
    }
    fn keys(&self, pre: bool, l: usize, h: usize) -> &[f32] {
        let (_, kvh, n, d, _) = self.dims();
        let a = if pre { &self.k_pre } else { &self.k_post };
        &a.data[(l * kvh + h) * n * d..(l * kvh + h + 1) * n * d]
    }
    /// The `G` query rows of KV head `h`'s group at decode step `i`.
    fn queries(&self, l: usize, i: usize, h: usize, group: usize) -> &[f32] {
        let (_, _, _, d, heads) = self.dims();
        let rows = self.q.shape[1];
        let base = ((l * rows + i) * heads + h * group) * d;
        &self.q.data[base..base + group * d]
    }
}

/// One head's exact softmax weights at one step, normalised, and the slots
/// sorted heaviest first (ties by slot): the oracle's order.
#[derive(Default)]
struct Weights {
    w: Vec<f64>,
    order: Vec<u32>,
}

impl Weights {
    fn set(&mut self, scores: &[f32]) {
        let mx = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.w.clear();
        self.w
            .extend(scores.iter().map(|&s| ((s - mx) as f64).exp()));
        let z: f64 = self.w.iter().sum();
        self.w.iter_mut().for_each(|x| *x /= z);
        self.order.clear();
        self.order.extend(0..scores.len() as u32);
        let w = &self.w;
        self.order
            .sort_unstable_by(|&a, &b| w[b as usize].total_cmp(&w[a as usize]).then(a.cmp(&b)));
    }
    /// The true mass p(I) of a slot set.
    fn mass(&self, sel: &[u32]) -> f64 {
        sel.iter().map(|&i| self.w[i as usize]).sum()
    }
    /// Appends the oracle's smallest set reaching `p`.
    fn oracle(&self, p: f32, out: &mut Vec<u32>) {
        let mut acc = 0.0;
        for &i in &self.order {
            if acc >= p as f64 {
                break;
            }
            acc += self.w[i as usize];
            out.push(i);
        }
    }
}

/// Sums over (layer, KV head, step) of one (variant, P) cell.
#[derive(Default, Clone)]
struct Acc {
    heads: f64,
    hits: f64,
    groups: f64,
    read: f64,
    oracle: f64,
    est_err: f64,
}

impl Acc {
    fn add(&mut self, o: &Acc) {
        self.heads += o.heads;
        self.hits += o.hits;
        self.groups += o.groups;
        self.read += o.read;
        self.oracle += o.oracle;
        self.est_err += o.est_err;
    }
}

type Cells = BTreeMap<(String, u32), Acc>;

/// Clusters the keys before the window for every clustering a variant needs.
fn clusterings(
    dump: &Dump,
    l: usize,
    h: usize,
    n0: usize,
    vs: &[Variant],
) -> BTreeMap<(Membership, usize, String), ClusterIndex> {
    let (_, _, _, d, _) = dump.dims();
    let mut out = BTreeMap::new();
    for v in vs {
        let Some((mem, km)) = v.clustering() else {
            continue;
        };
        let key = (
            mem,
            km.cluster_size,
            format!("{:?}{}", km.init, km.iterations),
        );
        if out.contains_key(&key) {
            continue;
        }
        let post = DenseKeys {
            k: dump.keys(false, l, h),
            d,
        };
        let idx = match mem {
            Membership::Post => ClusterIndex::build(&post, n0, &km),
            Membership::Pre => {
                let pre = &dump.keys(true, l, h)[..n0 * d];
                let r = kmeans(pre, n0, d, &km);
                ClusterIndex::from_assignment(&post, &r.assign, r.k)
            }
        };
        out.insert(key, idx);
    }
    out
}

fn run_task(
    dump: &Dump,
    l: usize,
    h: usize,
    w: usize,
    vs: &[Variant],
    ps: &[f32],
    stride: usize,
) -> Cells {
    let (_, kvh, _, d, heads) = dump.dims();
    let group = heads / kvh;
    let end = dump.ends[w];
    let n0 = end - dump.steps;
    let idxs = clusterings(dump, l, h, n0, vs);
    let keys = DenseKeys {
        k: dump.keys(false, l, h),
        d,
    };
    let mut cells = Cells::new();
    let mut ctx = variants::Ctx::default();
    let mut scores: Vec<Vec<f32>> = vec![Vec::new(); group];
    let mut heads: Vec<Weights> = (0..group).map(|_| Weights::default()).collect();
    let (mut sel, mut uni) = (Vec::new(), Vec::new());
    for j in (0..dump.steps).step_by(stride) {
        let ctx_len = n0 + j + 1;
        let q = dump.queries(l, w * dump.steps + j, h, group);
        for (g, sc) in scores.iter_mut().enumerate() {
            exact_scores(&keys, &q[g * d..(g + 1) * d], ctx_len, sc);
            heads[g].set(sc);
        }
        for &p in ps {
            uni.clear();
            for hw in &heads {
                hw.oracle(p, &mut uni);
            }
            uni.sort_unstable();
            uni.dedup();
            let oracle = uni.len() as f64 / ctx_len as f64;
            for v in vs {
                let name = v.name();
                let mut emit = |knob: &str, sel: &[u32], o: Outcome| {
                    let acc = cells
                        .entry((format!("{name}{knob}"), p.to_bits()))
                        .or_default();
                    for (g, hw) in heads.iter().enumerate() {
                        let tm = hw.mass(sel);
                        acc.heads += 1.0;
                        acc.hits += f64::from(tm >= p as f64);
                        acc.est_err += o.est.get(g).map_or(0.0, |&e| e as f64 - tm);
                    }
                    acc.groups += 1.0;
                    acc.read += o.read / ctx_len as f64;
                    acc.oracle += oracle;
                };
                v.run(
                    &idxs, &keys, q, ctx_len, p, &scores, &mut ctx, &mut sel, &mut emit,
                );
            }
        }
    }
    cells
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut dirs = Vec::new();
    let mut suite = "main".to_string();
    let mut json = None;
    let mut stride = 1usize;
    let mut ps: Vec<f32> = vec![0.8, 0.9, 0.95, 0.99];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--suite" => suite = it.next().cloned().unwrap_or_default(),
            "--json" => json = it.next().cloned(),
            "--stride" => stride = it.next().and_then(|x| x.parse().ok()).unwrap_or(1),
            "--p" => {
                ps = it
                    .next()
                    .map(|x| x.split(',').filter_map(|y| y.parse().ok()).collect())
                    .unwrap_or_default()
            }
            _ => dirs.push(PathBuf::from(a)),
        }
    }
    if suite == "union" {
        println!("| dump | P | sets | differ | near-ties | largest true-mass gap |");
        println!("| --- | --- | ---: | ---: | ---: | ---: |");
        let mut ok = true;
        for dir in &dirs {
            ok &= union::run(&Dump::load(dir)?, &ps);
        }
        anyhow::ensure!(
            ok,
            "a chunked union differs from the sequential one by more than a near-tie"
        );
        return Ok(());
    }
    let vs = variants::suite(&suite);
    let mut all = Vec::new();
    for dir in &dirs {
        let t0 = std::time::Instant::now();
        let dump = Dump::load(dir)?;
        let (layers, kvh, n, d, heads) = dump.dims();
        if suite == "timing" {
            println!(
                "\n### {} (clustering: mean per (layer, KV head) over every 3rd layer)\n",
                dump.name
            );
            println!(
                "| init | k-means time | largest cluster | tokens in clusters > 4x the mean size |"
            );
            println!("| --- | --- | --- | --- |");
            timing::run(&dump);
            continue;
        }
        eprintln!(
            "{}: {layers} layers, {kvh} KV heads, {heads} heads, d {d}, {n} tokens, windows {:?}",
            dump.name, dump.ends
        );
        let windows = dump.ends.len();
        let tasks: Vec<(usize, usize, usize)> = (0..layers)
            .flat_map(|l| (0..kvh).flat_map(move |h| (0..windows).map(move |w| (l, h, w))))
            .collect();
        let cells = tasks
            .par_iter()
            .map(|&(l, h, w)| run_task(&dump, l, h, w, &vs, &ps, stride))
            .reduce(Cells::new, |mut a, b| {
                for (k, v) in b {
                    a.entry(k).or_default().add(&v);
                }
                a
            });
        eprintln!("{}: {:.0} s", dump.name, t0.elapsed().as_secs_f64());
        print_table(&dump.name, &cells, &ps);
        all.push((dump.name.clone(), cells));
    }
    if let Some(path) = json {
        write_json(&path, &all)?;
    }
    Ok(())
}

fn print_table(name: &str, cells: &Cells, ps: &[f32]) {
    println!("\n### {name}\n");
    println!("| variant | P | success | read/ctx | oracle/ctx | read/oracle | est−true |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for &p in ps {
        for ((v, pb), a) in cells {
            if *pb != p.to_bits() {
                continue;
            }
            println!(
                "| {v} | {p} | {:.1}% | {:.2}% | {:.2}% | {:.2}x | {:+.3} |",
                100.0 * a.hits / a.heads,
                100.0 * a.read / a.groups,
                100.0 * a.oracle / a.groups,
                a.read / a.oracle,
                a.est_err / a.heads
            );
        }
    }
}

fn write_json(path: &str, all: &[(String, Cells)]) -> anyhow::Result<()> {
    let mut s = String::from("[\n");
    let mut first = true;
    for (name, cells) in all {
        for ((v, pb), a) in cells {
            if !first {
                s.push_str(",\n");
            }
            first = false;
            s.push_str(&format!(
                "{{\"text\": \"{name}\", \"variant\": \"{v}\", \"p\": {}, \"success\": {}, \"read\": {}, \"oracle\": {}}}",
                f32::from_bits(*pb),
                a.hits / a.heads,
                a.read / a.groups,
                a.oracle / a.groups
            ));
        }
    }
    s.push_str("\n]\n");
    std::fs::write(path, s)?;
    Ok(())
}
