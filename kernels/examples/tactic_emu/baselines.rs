//! The baselines' kernels on the stand-in
//! (`kernels/emu/tactic_baselines.cpp`) against the CPU reference, as
//! `engine::sparse::select_layer` runs it: `oracle_top_p`
//! (`tactic/oracle.cuh`: per (sequence, KV head) the union over its query
//! heads of `oracle_top_p` on `exact_scores`) and `fixed_budget`
//! (`tactic/budget.cuh`: `PageBounds` over the full pages, `fixed_budget`
//! with the group's queries); after each, the sparse attention over the
//! stand-in's selection against the CPU's paged attention with it, and the
//! diagnostics kernel's true mass of it against `true_mass`. Random keys,
//! and adversarial ones: many equal scores (keys from three rows, so that
//! ties decide the order), a zero query (every score equal), contexts of 1
//! and at block boundaries, budgets below the new tokens and above the
//! context, sorts in shared and in global memory.

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;
use tacflow_kernels::cpu::{self, AttnSeq, KvLayer};
use tacflow_kernels::cuda::tactic::{JobDiag, diag_record_len, parse_diag};
use tacflow_kernels::rng;
use tacflow_kernels::tactic::{self, PageBounds, PagedKeys};

/// How the keys and queries are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Keys {
    Random,
    /// Keys from three distinct rows: scores tie in groups.
    Ties,
    /// A zero query for every head: all scores equal.
    ZeroQuery,
}

/// `(d, kv heads, group, contexts, seed, keys, p, budget)`.
type Spec = (usize, usize, usize, &'static str, u64, Keys, f32, usize);

pub const CASES: [Spec; 6] = [
    (64, 2, 3, "300,17,1", 1, Keys::Random, 0.9, 64),
    (128, 1, 4, "16,32,33,257", 2, Keys::Ties, 0.9, 40),
    (32, 4, 1, "1,2,100", 3, Keys::ZeroQuery, 0.5, 3),
    (256, 1, 8, "200", 4, Keys::Random, 0.99, 128),
    (64, 3, 2, "48,1", 5, Keys::Ties, 1.0, 1000),
    (64, 2, 4, "1100,31", 6, Keys::Random, 0.9, 300),
];

pub struct OracleCase {
    d: usize,
    kv_heads: usize,
    group: usize,
    lens: Vec<usize>,
    keys: Keys,
    p: f32,
    budget: usize,
    seed: u64,
    tables: Vec<Vec<u32>>,
    blocks: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
}

fn bf16_round(f: f32) -> u16 {
    let b = f.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

impl OracleCase {
    pub fn new(c: Spec) -> Result<OracleCase> {
        let (d, kv_heads, group, lens, seed, keys, p, budget) = c;
        let lens: Vec<usize> = lens
            .split(',')
            .map(|x| x.parse().context("contexts"))
            .collect::<Result<_>>()?;
        let blocks = lens.iter().map(|l| l.div_ceil(16)).sum::<usize>() + 1;
        let mut order: Vec<u32> = (0..blocks as u32).collect();
        order.sort_by_key(|&b| rng::bits(seed, 11, b as u64));
        let (mut tables, mut at) = (vec![], 0);
        for l in &lens {
            tables.push(order[at..at + l.div_ceil(16)].to_vec());
            at += l.div_ceil(16);
        }
        let n = blocks * kv_heads * 16 * d;
        let (mut k, mut v) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        // A normal draw times `scale`, rounded to bf16 (what the cache holds).
        let wx = |stream: u64, i: usize, scale: f32| {
            let x = scale * rng::random_weight(seed, stream, i as u64, 0.0, 1.0);
            f32::from_bits((bf16_round(x) as u32) << 16)
        };
        let w = |stream: u64, i: usize| wx(stream, i, 1.0);
        // Scores of spread 6 (random keys): a few keys hold most mass.
        let scale = if keys == Keys::Random { 6.0 } else { 2.0 };
        for (s, &len) in lens.iter().enumerate() {
            for h in 0..kv_heads {
                for i in 0..len {
                    let base = ((tables[s][i / 16] as usize * kv_heads + h) * 16 + i % 16) * d;
                    let row = if keys == Keys::Ties { i % 3 } else { i };
                    for j in 0..d {
                        let stream = (s * 64 + h) as u64;
                        k[base + j] = wx(100 + stream, row * d + j, scale);
                        v[base + j] = w(900 + stream, i * d + j);
                    }
                }
            }
        }
        let stride = kv_heads * group * d;
        let q = (0..lens.len() * stride)
            .map(|i| match keys {
                Keys::ZeroQuery => 0.0,
                _ => w(7, i),
            })
            .collect();
        Ok(OracleCase {
            d,
            kv_heads,
            group,
            lens,
            keys,
            p,
            budget,
            seed,
            tables,
            blocks,
            k,
            v,
            q,
        })
    }

    pub fn name(&self) -> String {
        format!(
            "baselines d {} kv {} group {} ctx {:?} seed {} {:?} P {} budget {}",
            self.d, self.kv_heads, self.group, self.lens, self.seed, self.keys, self.p, self.budget
        )
    }

    fn layer(&self) -> KvLayer<'_> {
        KvLayer {
            k: &self.k,
            v: &self.v,
            kv_heads: self.kv_heads,
            head_dim: self.d,
            block_size: 16,
        }
    }

    /// The driver's input (its layout: `tactic_oracle.cpp`'s `main`).
    fn input(&self) -> Vec<u8> {
        let mut w = vec![];
        let put = |w: &mut Vec<u8>, x: u32| w.extend(x.to_le_bytes());
        for x in [
            self.d,
            self.kv_heads,
            self.group,
            self.blocks,
            self.lens.len(),
        ] {
            put(&mut w, x as u32);
        }
        w.extend(self.p.to_le_bytes());
        put(&mut w, self.budget as u32);
        for (s, t) in self.tables.iter().enumerate() {
            put(&mut w, self.lens[s] as u32);
            put(&mut w, t.len() as u32);
            t.iter().for_each(|&b| put(&mut w, b));
        }
        for x in self.k.iter().chain(&self.v) {
            // NaN (unwritten slots) as the poisoned cache's 0x7fc0.
            let b = if x.is_nan() {
                0x7fc0
            } else {
                (x.to_bits() >> 16) as u16
            };
            w.extend(b.to_le_bytes());
        }
        self.q.iter().for_each(|x| w.extend(x.to_le_bytes()));
        w
    }

    /// `fixed_budget`'s selection of `(s, h)` on the CPU: bounds over the
    /// full pages, the group's unscaled queries.
    fn want_budget(&self, s: usize, h: usize) -> Vec<u32> {
        let (g, d) = (self.group, self.d);
        let covered = (self.lens[s] / 16) * 16;
        let bounds = PageBounds::build(&self.keys_of(s, h), covered, 16);
        let q = &self.q[s * self.kv_heads * g * d + h * g * d..][..g * d];
        let mut out = vec![];
        tactic::fixed_budget(&bounds, q, self.lens[s], self.budget, &mut out);
        out
    }

    /// The CPU's oracle selection of `(s, h)`: the union of the group's sets.
    fn want(&self, s: usize, h: usize) -> Vec<u32> {
        let (g, d) = (self.group, self.d);
        let keys = self.keys_of(s, h);
        let (mut scores, mut order, mut sel) = (vec![], vec![], vec![]);
        for k in 0..g {
            let qh = &self.q[s * self.kv_heads * g * d + (h * g + k) * d..][..d];
            tactic::exact_scores(&keys, qh, self.lens[s], &mut scores);
            tactic::oracle_top_p(&scores, self.p, &mut order, &mut sel);
        }
        sel.sort_unstable();
        sel.dedup();
        sel
    }

    fn keys_of(&self, s: usize, h: usize) -> PagedKeys<'_> {
        PagedKeys {
            kv: self.layer(),
            block_table: &self.tables[s],
            head: h,
        }
    }
}

/// Runs every case on the stand-in `exe`; a verdict per case.
pub fn run_all(exe: &Path, dir: &Path) -> Result<usize> {
    let mut failed = 0;
    for c in CASES {
        let case = OracleCase::new(c)?;
        let verdict = run(exe, dir, &case)?;
        println!("{}: {}", case.name(), verdict.join("; "));
        failed += usize::from(verdict.iter().any(|v| v.starts_with("FAIL")));
    }
    Ok(failed)
}

fn run(exe: &Path, dir: &Path, case: &OracleCase) -> Result<Vec<String>> {
    let (input, out) = (dir.join("oracle_in.bin"), dir.join("oracle_out.bin"));
    std::fs::write(&input, case.input())?;
    if !Command::new(exe).arg(&input).arg(&out).status()?.success() {
        bail!("{}: the stand-in failed", case.name());
    }
    let bytes = std::fs::read(&out)?;
    let mut at = 0;
    let oracle = read(&bytes, &mut at, case)?;
    let budget = read(&bytes, &mut at, case)?;
    let mut v = verdict(case, "oracle", &oracle, |s, h| case.want(s, h));
    v.extend(verdict(case, "budget", &budget, |s, h| {
        case.want_budget(s, h)
    }));
    Ok(v)
}

/// One baseline's verdicts: its sets against `want`, the attention over
/// them, their diagnostics' true masses.
fn verdict(
    case: &OracleCase,
    what: &str,
    (lists, att, diag): &Read,
    want: impl Fn(usize, usize) -> Vec<u32>,
) -> Vec<String> {
    let (kvh, g, d) = (case.kv_heads, case.group, case.d);
    let (mut equal, mut n, mut mass_gap) = (0, 0, 0f64);
    let mut scores = vec![];
    for s in 0..case.lens.len() {
        for h in 0..kvh {
            let i = s * kvh + h;
            n += 1;
            equal += usize::from(lists[i] == want(s, h));
            let keys = case.keys_of(s, h);
            for k in 0..g {
                let qh = &case.q[s * kvh * g * d + (h * g + k) * d..][..d];
                tactic::exact_scores(&keys, qh, case.lens[s], &mut scores);
                let want = tactic::true_mass(&scores, &lists[i]);
                mass_gap = mass_gap.max((diag[i].mass[k] - want).abs());
            }
            if diag[i].selected != lists[i].len() || diag[i].clusters != 0 {
                mass_gap = f64::INFINITY;
            }
        }
    }
    let err = attention_err(case, lists, att);
    let sets_ok = equal == n;
    let kept: usize = lists.iter().map(Vec::len).sum();
    let ctx: usize = case.lens.iter().sum::<usize>() * kvh;
    let fail = |ok: bool| if ok { "" } else { "FAIL " };
    vec![
        format!(
            "{}{what} sets {equal}/{n} equal ({kept} of {ctx} slots kept)",
            fail(sets_ok)
        ),
        format!("{}attention {err:.1e}", fail(err <= 1e-4)),
        format!(
            "{}diagnostics: true masses {mass_gap:.1e} apart",
            fail(mass_gap <= 1e-9)
        ),
    ]
}

type Read = (Vec<Vec<u32>>, Vec<f32>, Vec<JobDiag>);

fn read(bytes: &[u8], at: &mut usize, case: &OracleCase) -> Result<Read> {
    let mut take = |n: usize| -> Result<&[u8]> {
        let s = bytes.get(*at..*at + n).context("short output")?;
        *at += n;
        Ok(s)
    };
    let word = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let mut lists = vec![];
    for _ in 0..case.lens.len() * case.kv_heads {
        let n = word(take(4)?) as usize;
        lists.push(take(4 * n)?.chunks_exact(4).map(word).collect());
    }
    let rows = case.q.len();
    let att = take(4 * rows)?
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    let recs = case.lens.len() * case.kv_heads * diag_record_len(case.group);
    let raw: Vec<f64> = take(8 * recs)?
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    Ok((lists, att, parse_diag(&raw, case.group)))
}

/// Relative error of the stand-in's attention over its selection against
/// the CPU's paged attention with the same selection.
fn attention_err(case: &OracleCase, lists: &[Vec<u32>], got: &[f32]) -> f64 {
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
    let stride = heads * case.d;
    let mut want = vec![0f32; case.q.len()];
    cpu::paged_attention(&case.q, stride, heads, &case.layer(), &seqs, &mut want);
    let n: f64 = got
        .iter()
        .zip(&want)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let dn: f64 = want.iter().map(|y| (*y as f64).powi(2)).sum();
    (n / dn.max(1e-300)).sqrt()
}
