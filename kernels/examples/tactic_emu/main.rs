//! The Tactic kernels (`tactic.cu`) run on the CPU, against the CPU
//! reference: the kernels' source compiled as C++ over the CUDA stand-in of
//! `kernels/emu/emu.h` and launched by `kernels/emu/tactic.cpp` as the
//! launch wrappers launch them. Before a GPU runs them, this shows their
//! indexing, their barriers' placement and their arithmetic: k-means (a
//! first decode step and a re-clustered tail) against
//! `ClusterIndex::build`/`extend`, the selection against `select_group`, the
//! sparse attention against the CPU's paged attention with that selection.
//! It cannot show what only a GPU has (its memory model, register and shared
//! memory limits): that is `tacflowd selfcheck --groups tactic`.
//!
//! Needs a C++20 compiler (`$CXX`, else `g++`):
//! `cargo run --release -p tacflow-kernels --example tactic_emu` runs the
//! default cases (the baselines' kernels first, `oracle_top_p` and
//! `fixed_budget`: [`baselines`]); `-- --baselines` only those; `-- D,KV_HEADS,GROUP LEN[,LEN...] [SEED]
//! [--random] [--sort-smem N]` one Tactic case (`--random`: uniform keys
//! instead of the heavy-tailed ones, so that k-means runs every round).

mod baselines;
mod io;
#[path = "../../emu/stand_in.rs"]
mod stand_in;

use anyhow::{Context, Result, bail};
use io::{Case, Outputs};
use std::path::{Path, PathBuf};
use std::process::Command;
use tacflow_kernels::cpu::{self, AttnSeq};
use tacflow_kernels::cuda::sources::MODULES;
use tacflow_kernels::tactic::union::chunked_tokens_read;
use tacflow_kernels::tactic::{self, ClusterIndex, Scratch, TacticParams, select_group};

/// The default cases: `(d, kv heads, group, contexts, seed, random keys,
/// longest shared-memory sort)`.
const CASES: [(usize, usize, usize, &str, u64, bool, usize); 7] = [
    (64, 3, 3, "1000,300,17", 2, false, 4096),
    (128, 2, 4, "700,33", 3, false, 8),
    (256, 1, 8, "400,2", 4, false, 4096),
    (32, 4, 1, "500,1", 5, false, 4096),
    (64, 1, 7, "2500", 6, false, 4096),
    (64, 3, 3, "1000,300", 2, true, 4096),
    (128, 8, 4, "300,40", 9, false, 4096),
];

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::env::temp_dir().join(format!("tacflow-tactic-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let only_baselines = args.first().is_some_and(|a| a == "--baselines");
    let mut failed = 0;
    let mut total = 0;
    if args.is_empty() || only_baselines {
        let driver = include_str!("../../emu/tactic_baselines.cpp");
        let exe = build(&dir, "tactic_baselines", driver)?;
        failed += baselines::run_all(&exe, &dir)?;
        total += baselines::CASES.len();
        args.retain(|a| a != "--baselines");
    }
    if only_baselines {
        let _ = std::fs::remove_dir_all(&dir);
        if failed > 0 {
            bail!("{failed} of {total} cases failed");
        }
        return Ok(());
    }
    let exe = build(&dir, "tactic", include_str!("../../emu/tactic.cpp"))?;
    let cases: Vec<Case> = if args.is_empty() {
        CASES
            .iter()
            .map(|&(d, kvh, g, lens, seed, random, sort)| {
                Case::new(d, kvh, g, lens, seed, random, sort)
            })
            .collect::<Result<_>>()?
    } else {
        vec![Case::parse(&args)?]
    };
    for case in &cases {
        let verdict = run(&exe, &dir, case)?;
        println!("{}: {}", case.name(), verdict.join("; "));
        failed += usize::from(verdict.iter().any(|v| v.starts_with("FAIL")));
    }
    total += cases.len();
    let _ = std::fs::remove_dir_all(&dir);
    if failed > 0 {
        bail!("{failed} of {total} cases failed");
    }
    Ok(())
}

/// Writes the stand-in, the driver `name` (its C++ `driver`) and the
/// kernels' source (shared memory rewritten for the stand-in) into `dir`
/// and compiles them.
fn build(dir: &Path, name: &str, driver: &str) -> Result<PathBuf> {
    let module = MODULES
        .iter()
        .find(|m| m.name == "tactic")
        .context("no tactic module")?;
    let source = stand_in::rewrite_shared(&module.full_source());
    let cpp = format!("{name}.cpp");
    let files = [
        ("tactic_all.inc", source.as_str()),
        ("emu.h", include_str!("../../emu/emu.h")),
        (cpp.as_str(), driver),
    ];
    stand_in::compile(dir, &files, &cpp, &format!("{name}_emu"))
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let n: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let d: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (n / d.max(1e-300)).sqrt()
}

/// One case: the stand-in's outputs against the CPU's, a verdict per part.
fn run(exe: &Path, dir: &Path, case: &Case) -> Result<Vec<String>> {
    let prm = TacticParams::new(0.9);
    let (input, out) = (dir.join("in.bin"), dir.join("out.bin"));
    std::fs::write(&input, case.input(&prm))?;
    let status = Command::new(exe)
        .arg(&input)
        .arg(&out)
        .arg(case.sort_smem.to_string())
        .status()?;
    if !status.success() {
        bail!("{}: the stand-in failed", case.name());
    }
    let got = Outputs::read(&std::fs::read(&out)?, case)?;
    let mut verdict = vec![kmeans_verdict(case, &got, &prm)];
    let (sel, lists, read) = select_verdict(case, &got, &prm);
    verdict.push(sel);
    verdict.push(attention_verdict(case, &got, &lists));
    verdict.push(diag_verdict(case, &got, &prm, &read));
    Ok(verdict)
}

fn kmeans_verdict(case: &Case, got: &Outputs, prm: &TacticParams) -> String {
    let (mut moved, mut keys, mut same, mut heads) = (0, 0, 0, 0);
    let (mut a, mut b) = (vec![], vec![]);
    for s in 0..case.lens.len() {
        let clustered = case.clustered(s);
        for (h, g) in got.states[s].iter().enumerate() {
            let keys_h = case.keys(s, h);
            let mut want = ClusterIndex::build(&keys_h, case.first_run(s), &prm.kmeans);
            want.extend(&keys_h, clustered, &prm.kmeans);
            let (x, y) = (io::assignment(g), io::assignment(&want));
            keys += y.len();
            moved += x.iter().zip(&y).filter(|(p, q)| p != q).count();
            heads += 1;
            if g.offsets == want.offsets && g.members == want.members {
                same += 1;
                for (p, q) in [
                    (&g.centroids, &want.centroids),
                    (&g.spread, &want.spread),
                    (&g.log_size, &want.log_size),
                    (&g.shape, &want.shape),
                ] {
                    a.extend(p);
                    b.extend(q);
                }
            }
        }
    }
    let err = rel(&a, &b);
    let ok = moved * 1000 <= keys && err <= 1e-5;
    format!(
        "{}k-means {moved}/{keys} keys moved, {same}/{heads} heads equal, their values {err:.1e} apart",
        if ok { "" } else { "FAIL " }
    )
}

/// The selection's verdict, its slot lists and, per (sequence, KV head),
/// the tokens the CPU's selection read.
fn select_verdict(
    case: &Case,
    got: &Outputs,
    prm: &TacticParams,
) -> (String, Vec<Vec<u32>>, Vec<f64>) {
    let (kvh, g, d) = (case.kv_heads, case.group, case.d);
    let mut scratch = Scratch::default();
    let mut read = vec![];
    let (mut equal, mut n, mut est_gap) = (0, 0, 0f32);
    for s in 0..case.lens.len() {
        for (h, clusters) in case.cpu_clusters(s, prm).iter().enumerate() {
            let i = s * kvh + h;
            let q = &case.q[s * case.q_stride() + h * g * d..][..g * d];
            let (mut want, mut est) = (vec![], vec![0f32; g]);
            let keys = case.keys(s, h);
            let st = select_group(
                clusters,
                &keys,
                q,
                case.lens[s],
                prm,
                &mut scratch,
                &mut want,
                &mut est,
            );
            read.push(st.tokens_read);
            n += 1;
            if want == got.lists[i] {
                equal += 1;
                for (x, y) in got.est[i].iter().zip(&est) {
                    est_gap = est_gap.max((x - y).abs());
                }
            }
        }
    }
    let ok = equal * 1000 >= n * 999 && est_gap <= 1e-5;
    let v = format!(
        "{}selection {equal}/{n} sets equal, estimates {est_gap:.1e} apart",
        if ok { "" } else { "FAIL " }
    );
    (v, got.lists.clone(), read)
}

/// The diagnostics kernel's records against the CPU's measure of the same
/// selections (`exact_scores`, `true_mass` over the stand-in's lists): the
/// true masses, the estimates passed through, and the tokens read that
/// the selected slots and kept clusters give against the CPU's count.
fn diag_verdict(case: &Case, got: &Outputs, prm: &TacticParams, read: &[f64]) -> String {
    let (kvh, g, d) = (case.kv_heads, case.group, case.d);
    let (mut mass_gap, mut est_gap, mut read_gap) = (0f64, 0f64, 0f64);
    let mut counts_ok = true;
    let mut scores = vec![];
    for s in 0..case.lens.len() {
        for (h, kept) in case.cpu_clusters(s, prm).iter().enumerate() {
            let i = s * kvh + h;
            let rec = &got.diag[i];
            let keys = case.keys(s, h);
            for k in 0..g {
                let q = &case.q[s * case.q_stride() + (h * g + k) * d..][..d];
                tactic::exact_scores(&keys, q, case.lens[s], &mut scores);
                let want = tactic::true_mass(&scores, &got.lists[i]);
                mass_gap = mass_gap.max((rec.mass[k] - want).abs());
                est_gap = est_gap.max((rec.est[k] - f64::from(got.est[i][k])).abs());
            }
            counts_ok &= rec.selected == got.lists[i].len() && rec.clusters == kept.clusters();
            if got.lists[i].len() == rec.selected {
                let r = chunked_tokens_read(rec.selected, rec.clusters, d, prm);
                read_gap = read_gap.max((r - read[i]).abs());
            }
        }
    }
    // Equal sets read equal tokens; a set that differs (a near-tie) reads
    // a cluster's worth more or less.
    let ok = mass_gap <= 1e-9 && est_gap == 0.0 && counts_ok;
    format!(
        "{}diagnostics: true masses {mass_gap:.1e} apart, estimates {est_gap:.1e}, counts {}, \
         tokens read {read_gap:.1e} apart",
        if ok { "" } else { "FAIL " },
        if counts_ok { "equal" } else { "DIFFER" }
    )
}

fn attention_verdict(case: &Case, got: &Outputs, lists: &[Vec<u32>]) -> String {
    let per_seq: Vec<Vec<Vec<u32>>> = lists.chunks(case.kv_heads).map(<[_]>::to_vec).collect();
    let seqs: Vec<AttnSeq<'_>> = (0..case.lens.len())
        .map(|s| AttnSeq {
            q_start: s,
            q_len: 1,
            ctx_len: case.lens[s],
            block_table: &case.tables[s],
            selection: Some(&per_seq[s]),
        })
        .collect();
    let heads = case.kv_heads * case.group;
    let mut want = vec![0f32; case.q.len()];
    cpu::paged_attention(
        &case.q,
        case.q_stride(),
        heads,
        &case.layer(),
        &seqs,
        &mut want,
    );
    let err = rel(&got.out, &want);
    format!(
        "{}attention {err:.1e}",
        if err <= 1e-4 { "" } else { "FAIL " }
    )
}
