//! The tensor-core prefill kernels (`prefill.cu`) run on the CPU, against
//! the CPU reference: the kernels' source compiled as C++ over the CUDA
//! stand-in of `kernels/emu/emu.h` and its warp-level matrix instructions
//! (`kernels/emu/warp.h`: mma.sync and ldmatrix, from the PTX ISA's
//! fragment layouts), launched by `kernels/emu/prefill.cpp` over the tiles
//! `prefill::split_rows` cuts. It shows the kernels' indexing (fragments,
//! the swizzled shared memory, pages, the causal mask, partial tiles), the
//! barriers' placement and the arithmetic; what only a GPU shows (its
//! memory model, the asynchronous copies, the tensor cores' own summation
//! order) is `tacflowd selfcheck --groups attention` with
//! `--experimental-prefill-attention`.
//!
//! Needs a C++20 compiler (`$CXX`, else `g++`):
//! `cargo run --release -p tacflow-kernels --example prefill_emu`.

#[path = "../../emu/stand_in.rs"]
mod stand_in;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use tacflow_kernels::cpu::{self, AttnSeq, KvLayer};
use tacflow_kernels::cuda::prefill::{PREFILL_MIN_ROWS, split_rows};
use tacflow_kernels::cuda::sources::{LAB_MODULES, MODULES};
use tacflow_kernels::rng;

/// The attention tolerance of the self-check (norm-wise relative error).
const TOL: f64 = 1e-4;
/// The lab's variant (q and p rounded to bf16 once): the self-check's bf16
/// tolerance, on the cases whose scores stay within a few units (with q's
/// deviation at 16 the scores' own bf16 rounding moves the output more).
const BF16_TOL: f64 = 1e-2;

/// A case: `(head size, query heads, KV heads, (tokens cached after the
/// step, new tokens) per sequence, q's standard deviation, seed)`.
type CaseSpec = (usize, usize, usize, &'static [(usize, usize)], f32, u64);

const CASES: [CaseSpec; 6] = [
    // A whole prompt, block-aligned and not; several tiles; GQA 3.
    (64, 9, 3, &[(130, 130), (16, 16)], 1.0, 1),
    // Chunks on top of a context (offsets 231 and 17), decode rows around
    // them, a run too short for a tile; peaked scores.
    (128, 4, 2, &[(300, 70), (40, 1), (33, 16), (9, 5)], 4.0, 2),
    // Llama's grouping (8 query heads a KV head here), a partial last page.
    (128, 8, 1, &[(97, 97)], 2.0, 3),
    // Head size 64, one KV head per query head, a chunk of exactly 64.
    (64, 2, 2, &[(200, 64), (5, 1)], 1.0, 4),
    // Large magnitudes: q's scores spread over hundreds (log2 domain).
    (64, 3, 1, &[(150, 40)], 16.0, 5),
    // Chunks of 17 and 65 tokens (a tile of 1 after 64) at block bounds.
    (128, 2, 1, &[(48, 17), (129, 65)], 1.0, 6),
];

fn main() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("tacflow-prefill-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let exe = build(&dir)?;
    let mut failed = 0;
    let mut n = 0;
    for spec in CASES {
        let case = Case::new(spec);
        for bf16 in [false, true] {
            if bf16 && spec.4 > 4.0 {
                continue;
            }
            let (verdict, ok) = run(&exe, &dir, &case, bf16)?;
            let tag = if bf16 { " [lab: bf16 q and p]" } else { "" };
            println!("{}{tag}: {verdict}", case.name());
            failed += usize::from(!ok);
            n += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if failed > 0 {
        bail!("{failed} of {n} runs failed");
    }
    Ok(())
}

/// Writes the stand-in, the driver and the kernels' source (dynamic shared
/// memory rewritten for the stand-in) into `dir` and compiles them.
fn build(dir: &Path) -> Result<PathBuf> {
    let module = MODULES
        .iter()
        .find(|m| m.name == "prefill")
        .context("no prefill module")?;
    // The lab's variant shares the module's header: only its kernels follow.
    let lab = LAB_MODULES
        .iter()
        .find(|m| m.name == "prefill_variants")
        .context("no prefill_variants module")?;
    let source = stand_in::rewrite_shared(&(module.full_source() + "\n" + lab.source));
    let files = [
        ("prefill_all.inc", source.as_str()),
        ("emu.h", include_str!("../../emu/emu.h")),
        ("warp.h", include_str!("../../emu/warp.h")),
        ("prefill.cpp", include_str!("../../emu/prefill.cpp")),
    ];
    stand_in::compile(dir, &files, "prefill.cpp", "prefill_emu")
}

fn f2bf(f: f32) -> u16 {
    let b = f.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// One step over a paged cache: every sequence's new tokens as rows, their
/// keys and values already in the cache (blocks in shuffled order, the
/// unused slots NaN as in a poisoned cache).
struct Case {
    spec: CaseSpec,
    blocks: usize,
    tables: Vec<Vec<u32>>,
    k: Vec<u16>,
    v: Vec<u16>,
    q: Vec<f32>,
    kv_len: Vec<u32>,
    table_off: Vec<u32>,
}

impl Case {
    fn new(spec: CaseSpec) -> Case {
        let (d, heads, kvh, seqs, q_std, seed) = spec;
        let blocks = seqs.iter().map(|s| s.0.div_ceil(16)).sum::<usize>() + 3;
        let mut order: Vec<u32> = (0..blocks as u32).collect();
        order.sort_by_key(|&b| rng::bits(seed, 5, b as u64));
        let n = blocks * kvh * 16 * d;
        let (mut k, mut v) = (vec![0x7fc0u16; n], vec![0x7fc0u16; n]);
        let (mut tables, mut kv_len, mut table_off) = (vec![], vec![], vec![]);
        let mut at = 0;
        for (s, &(ctx, new)) in seqs.iter().enumerate() {
            let table = order[at..at + ctx.div_ceil(16)].to_vec();
            at += table.len();
            for i in 0..ctx {
                for h in 0..kvh {
                    let base = ((table[i / 16] as usize * kvh + h) * 16 + i % 16) * d;
                    for j in 0..d {
                        let idx = (((s * 4096 + i) * kvh + h) * d + j) as u64;
                        k[base + j] = f2bf(rng::random_weight(seed, 11, idx, 0.0, 1.0));
                        v[base + j] = f2bf(rng::random_weight(seed, 12, idx, 0.0, 1.0));
                    }
                }
            }
            let off: u32 = tables.iter().map(|t: &Vec<u32>| t.len() as u32).sum();
            for i in 0..new {
                kv_len.push((ctx - new + i + 1) as u32);
                table_off.push(off);
            }
            tables.push(table);
        }
        let rows = kv_len.len();
        let stride = (heads + 2 * kvh) * d;
        let q = (0..rows * stride)
            .map(|i| rng::random_weight(seed, 13, i as u64, 0.0, q_std))
            .collect();
        Case {
            spec,
            blocks,
            tables,
            k,
            v,
            q,
            kv_len,
            table_off,
        }
    }

    fn name(&self) -> String {
        let (d, heads, kvh, seqs, q_std, _) = self.spec;
        format!("d {d} heads {heads}/{kvh} (ctx, new) {seqs:?} q_std {q_std}")
    }

    fn input(&self, tiles: &[[u32; 4]]) -> Vec<u8> {
        let (d, heads, kvh, ..) = self.spec;
        let flat: Vec<u32> = self.tables.concat();
        let hdr = [
            d,
            heads,
            kvh,
            self.blocks,
            self.kv_len.len(),
            (heads + 2 * kvh) * d,
            tiles.len(),
            flat.len(),
        ];
        let mut b = vec![];
        let u32s = hdr
            .iter()
            .map(|&x| x as u32)
            .chain(self.kv_len.iter().copied());
        let u32s = u32s
            .chain(self.table_off.iter().copied())
            .chain(flat)
            .chain(tiles.iter().flatten().copied());
        u32s.for_each(|x| b.extend(x.to_le_bytes()));
        self.k
            .iter()
            .chain(&self.v)
            .for_each(|x| b.extend(x.to_le_bytes()));
        self.q.iter().for_each(|x| b.extend(x.to_le_bytes()));
        b
    }

    /// The CPU reference's output of every row.
    fn reference(&self) -> Vec<f32> {
        let (d, heads, kvh, seqs, ..) = self.spec;
        let widen = |x: &[u16]| -> Vec<f32> {
            x.iter()
                .map(|&b| f32::from_bits((b as u32) << 16))
                .collect()
        };
        let (k, v) = (widen(&self.k), widen(&self.v));
        let layer = KvLayer {
            k: &k,
            v: &v,
            kv_heads: kvh,
            head_dim: d,
            block_size: 16,
        };
        let mut q_start = 0;
        let attn: Vec<AttnSeq> = seqs
            .iter()
            .zip(&self.tables)
            .map(|(&(ctx, new), table)| {
                let s = AttnSeq {
                    q_start,
                    q_len: new,
                    ctx_len: ctx,
                    block_table: table,
                    selection: None,
                };
                q_start += new;
                s
            })
            .collect();
        let mut out = vec![0f32; self.kv_len.len() * heads * d];
        cpu::paged_attention(
            &self.q,
            (heads + 2 * kvh) * d,
            heads,
            &layer,
            &attn,
            &mut out,
        );
        out
    }
}

/// The stand-in's output of the tile rows against the CPU's.
fn run(exe: &Path, dir: &Path, case: &Case, bf16: bool) -> Result<(String, bool)> {
    let split = split_rows(&case.kv_len, &case.table_off, PREFILL_MIN_ROWS);
    let (input, output) = (dir.join("in.bin"), dir.join("out.bin"));
    std::fs::write(&input, case.input(&split.tiles))?;
    let mut cmd = Command::new(exe);
    cmd.arg(&input).arg(&output);
    if bf16 {
        cmd.arg("bf16");
    }
    if !cmd.status()?.success() {
        bail!("{}: the stand-in failed", case.name());
    }
    let got: Vec<f32> = std::fs::read(&output)?
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let want = case.reference();
    let w = case.spec.1 * case.spec.0;
    let (mut num, mut den, mut rows) = (0f64, 0f64, 0);
    for t in &split.tiles {
        for r in t[0] as usize..(t[0] + t[1]) as usize {
            rows += 1;
            for (a, b) in got[r * w..(r + 1) * w]
                .iter()
                .zip(&want[r * w..(r + 1) * w])
            {
                num += ((a - b) as f64).powi(2);
                den += (*b as f64).powi(2);
            }
        }
    }
    let err = if num.is_nan() {
        f64::INFINITY
    } else {
        (num / den.max(1e-300)).sqrt()
    };
    let tol = if bf16 { BF16_TOL } else { TOL };
    let ok = rows > 0 && err <= tol;
    let verdict = format!(
        "{}{rows} rows in {} tiles ({} rows left to the decode kernel), rel. error {err:.1e} (at most {tol:.0e})",
        if ok { "" } else { "FAIL " },
        split.tiles.len(),
        case.kv_len.len() - rows,
    );
    Ok((verdict, ok))
}
