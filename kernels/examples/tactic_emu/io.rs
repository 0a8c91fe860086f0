//! One case's inputs (a paged bf16 cache of heavy-tailed keys, block tables
//! in shuffled order, decode queries, the states' layouts), their bytes for
//! `kernels/emu/tactic.cpp`, and its outputs read back.

use anyhow::{Context, Result, bail};
use tacflow_kernels::cpu::KvLayer;
use tacflow_kernels::cuda::tactic::{JobDiag, diag_record_len, parse_diag};
use tacflow_kernels::rng;
use tacflow_kernels::tactic::layout::{StateLayout, clusters_for, read_heads, write_heads};
use tacflow_kernels::tactic::synth::Synth;
use tacflow_kernels::tactic::{ClusterIndex, PagedKeys, TacticParams};

/// Tokens after the clustering: the tail every selection takes whole.
const TAIL: usize = 20;

pub struct Case {
    pub d: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub lens: Vec<usize>,
    pub seed: u64,
    pub random: bool,
    pub sort_smem: usize,
    pub tables: Vec<Vec<u32>>,
    blocks: usize,
    k_bf16: Vec<u16>,
    v_bf16: Vec<u16>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Decode rows, one per sequence: `[seqs, kv_heads * group * d]`.
    pub q: Vec<f32>,
}

fn f2bf(f: f32) -> u16 {
    let b = f.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn bf2f(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

impl Case {
    pub fn new(
        d: usize,
        kv_heads: usize,
        group: usize,
        lens: &str,
        seed: u64,
        random: bool,
        sort_smem: usize,
    ) -> Result<Case> {
        let lens: Vec<usize> = lens
            .split(',')
            .map(|x| x.parse().context("contexts: LEN[,LEN...]"))
            .collect::<Result<_>>()?;
        let blocks = lens.iter().map(|l| l.div_ceil(16)).sum::<usize>() + 2;
        let mut order: Vec<u32> = (0..blocks as u32).collect();
        order.sort_by_key(|&b| rng::bits(seed, 5, b as u64));
        let mut tables = vec![];
        let mut at = 0;
        for l in &lens {
            tables.push(order[at..at + l.div_ceil(16)].to_vec());
            at += l.div_ceil(16);
        }
        // Unwritten slots hold NaN, as a poisoned cache does.
        let n = blocks * kv_heads * 16 * d;
        let (mut kb, mut vb) = (vec![0x7fc0u16; n], vec![0x7fc0u16; n]);
        let stride = kv_heads * group * d;
        let mut q = vec![0f32; lens.len() * stride];
        for (s, &len) in lens.iter().enumerate() {
            for h in 0..kv_heads {
                let stream = (h * 64 + s) as u64;
                let mut sy = Synth::heavy(len, (len / 8).max(1), group, d, seed ^ stream);
                if random {
                    for (i, x) in sy.keys.iter_mut().enumerate() {
                        *x = rng::random_weight(seed, 900 + stream, i as u64, 0.0, 1.0);
                    }
                }
                for i in 0..len {
                    let base = ((tables[s][i / 16] as usize * kv_heads + h) * 16 + i % 16) * d;
                    for j in 0..d {
                        kb[base + j] = f2bf(sy.keys[i * d + j]);
                        let v = rng::random_weight(seed, 77 + stream, (i * d + j) as u64, 0.0, 1.0);
                        vb[base + j] = f2bf(v);
                    }
                }
                let turned = sy.turned(0.6, seed, s as u64);
                q[s * stride + h * group * d..][..group * d].copy_from_slice(&turned);
            }
        }
        Ok(Case {
            d,
            kv_heads,
            group,
            lens,
            seed,
            random,
            sort_smem,
            tables,
            blocks,
            k: kb.iter().map(|&x| bf2f(x)).collect(),
            v: vb.iter().map(|&x| bf2f(x)).collect(),
            k_bf16: kb,
            v_bf16: vb,
            q,
        })
    }

    /// `D,KV_HEADS,GROUP LEN[,LEN...] [SEED] [--random] [--sort-smem N]`.
    pub fn parse(args: &[String]) -> Result<Case> {
        let shape: Vec<usize> = args
            .first()
            .context("D,KV_HEADS,GROUP")?
            .split(',')
            .map(|x| x.parse().context("D,KV_HEADS,GROUP"))
            .collect::<Result<_>>()?;
        let [d, kvh, g] = shape[..] else {
            bail!("D,KV_HEADS,GROUP: three numbers");
        };
        let lens = args.get(1).context("LEN[,LEN...]")?;
        let seed = match args.get(2) {
            Some(s) if !s.starts_with("--") => s.parse()?,
            _ => 1,
        };
        let random = args.iter().any(|a| a == "--random");
        let sort = match args.iter().position(|a| a == "--sort-smem") {
            Some(i) => args.get(i + 1).context("--sort-smem N")?.parse()?,
            None => 4096,
        };
        Case::new(d, kvh, g, lens, seed, random, sort)
    }

    pub fn name(&self) -> String {
        let keys = if self.random { "uniform" } else { "heavy" };
        format!(
            "d {} kv {} group {} ctx {:?} seed {} {keys} sort<={}",
            self.d, self.kv_heads, self.group, self.lens, self.seed, self.sort_smem
        )
    }

    pub fn q_stride(&self) -> usize {
        self.kv_heads * self.group * self.d
    }

    pub fn layer(&self) -> KvLayer<'_> {
        KvLayer {
            k: &self.k,
            v: &self.v,
            kv_heads: self.kv_heads,
            head_dim: self.d,
            block_size: 16,
        }
    }

    pub fn keys(&self, s: usize, h: usize) -> PagedKeys<'_> {
        PagedKeys {
            kv: self.layer(),
            block_table: &self.tables[s],
            head: h,
        }
    }

    /// Slots clustered before the selection (the tail is `TAIL` long).
    pub fn clustered(&self, s: usize) -> usize {
        self.lens[s].saturating_sub(TAIL)
    }

    /// The k-means' first run; the rest of `clustered` is appended.
    pub fn first_run(&self, s: usize) -> usize {
        self.clustered(s) * 2 / 3
    }

    /// The CPU's clusters the selection runs on.
    pub fn cpu_clusters(&self, s: usize, prm: &TacticParams) -> Vec<ClusterIndex> {
        (0..self.kv_heads)
            .map(|h| ClusterIndex::build(&self.keys(s, h), self.clustered(s), &prm.kmeans))
            .collect()
    }

    /// The k-means states' layouts: the first run's, then grown.
    fn layouts(&self, s: usize, prm: &TacticParams) -> (StateLayout, usize, StateLayout, usize) {
        let (n1, n) = (self.first_run(s), self.clustered(s));
        let k1 = clusters_for(n1, prm.kmeans.cluster_size);
        let k2 = clusters_for(n - n1, prm.kmeans.cluster_size);
        let l1 = StateLayout::new(self.kv_heads, self.d, k1, n1);
        (l1, k1, l1.grown(k2, n - n1), k2)
    }

    /// The driver's input (its layout: `tactic.cpp`'s `main`).
    pub fn input(&self, prm: &TacticParams) -> Vec<u8> {
        let mut w = Vec::new();
        let blocks = self.blocks;
        for x in [self.d, self.kv_heads, self.group, blocks, self.lens.len()] {
            put(&mut w, x as u32);
        }
        put(&mut w, prm.kmeans.iterations as u32);
        w.extend(prm.kmeans.seed.to_le_bytes());
        w.extend(prm.p.to_le_bytes());
        w.extend(prm.margin.to_le_bytes());
        for (s, t) in self.tables.iter().enumerate() {
            put(&mut w, self.lens[s] as u32);
            put(&mut w, self.clustered(s) as u32);
            put(&mut w, t.len() as u32);
            t.iter().for_each(|&b| put(&mut w, b));
        }
        for x in self.k_bf16.iter().chain(&self.v_bf16) {
            w.extend(x.to_le_bytes());
        }
        for x in &self.q {
            w.extend(x.to_le_bytes());
        }
        for s in 0..self.lens.len() {
            let (l1, k1, l2, k2) = self.layouts(s, prm);
            layout(&mut w, &l1);
            put(&mut w, k1 as u32);
            put(&mut w, self.first_run(s) as u32);
            layout(&mut w, &l2);
            put(&mut w, k2 as u32);
            put(&mut w, self.first_run(s) as u32);
            let copies = l1.copies_into(&l2);
            put(&mut w, copies.len() as u32);
            for (a, b, n) in copies {
                [a, b, n].iter().for_each(|x| w.extend(x.to_le_bytes()));
            }
            let cpu = self.cpu_clusters(s, prm);
            let cap = cpu.iter().map(ClusterIndex::clusters).max().unwrap_or(0);
            let l = StateLayout::new(self.kv_heads, self.d, cap, self.clustered(s));
            let mut bytes = vec![0u8; l.bytes as usize];
            write_heads(&l, &cpu, &mut bytes);
            layout(&mut w, &l);
            w.extend(bytes);
        }
        w
    }
}

fn put(w: &mut Vec<u8>, x: u32) {
    w.extend(x.to_le_bytes());
}

fn layout(w: &mut Vec<u8>, l: &StateLayout) {
    for x in [l.kv_heads, l.head_dim, l.cap, l.len] {
        put(w, x);
    }
    let offs = [
        l.count,
        l.trace,
        l.centroids,
        l.log_size,
        l.spread,
        l.offsets,
        l.members,
        l.shape,
        l.bytes,
    ];
    offs.iter().for_each(|x| w.extend(x.to_le_bytes()));
}

/// What the driver wrote: the k-means states (per sequence, every head's
/// clusters), then per (sequence, KV head) its selection and estimates,
/// then the attention's output rows, then the diagnostics' records.
pub struct Outputs {
    pub states: Vec<Vec<ClusterIndex>>,
    pub lists: Vec<Vec<u32>>,
    pub est: Vec<Vec<f32>>,
    pub out: Vec<f32>,
    /// Per (sequence, KV head): `tactic/diag.cuh`'s record.
    pub diag: Vec<JobDiag>,
}

impl Outputs {
    pub fn read(bytes: &[u8], case: &Case) -> Result<Outputs> {
        let mut r = Reader { b: bytes, at: 0 };
        let prm = TacticParams::new(0.9);
        let mut states = vec![];
        for s in 0..case.lens.len() {
            let n = r.u64()? as usize;
            let (_, _, l2, _) = case.layouts(s, &prm);
            states.push(read_heads(&l2, r.take(n)?, case.clustered(s)));
        }
        let (mut lists, mut est) = (vec![], vec![]);
        for _ in 0..case.lens.len() * case.kv_heads {
            let n = r.u32()? as usize;
            lists.push((0..n).map(|_| r.u32()).collect::<Result<_>>()?);
            est.push((0..case.group).map(|_| r.f32()).collect::<Result<_>>()?);
        }
        let out = (0..case.q.len()).map(|_| r.f32()).collect::<Result<_>>()?;
        let n = case.lens.len() * case.kv_heads * diag_record_len(case.group);
        let raw: Vec<f64> = (0..n).map(|_| r.f64()).collect::<Result<_>>()?;
        Ok(Outputs {
            states,
            lists,
            est,
            out,
            diag: parse_diag(&raw, case.group),
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self.b.get(self.at..self.at + n).context("short output")?;
        self.at += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn f32(&mut self) -> Result<f32> {
        Ok(f32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.take(8)?.try_into()?))
    }
}

/// Each clustered slot's cluster.
pub fn assignment(ix: &ClusterIndex) -> Vec<u32> {
    let mut c = vec![u32::MAX; ix.len];
    for k in 0..ix.clusters() {
        for &s in ix.members_of(k) {
            c[s as usize] = k as u32;
        }
    }
    c
}
