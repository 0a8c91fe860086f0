//! Whole-model checks through the real engine: the same steps (chunked
//! prefills, a copy-on-write fork, teacher-forced decode steps) on the CUDA
//! backend and on the CPU backend running the same bf16-rounded weights,
//! logits of every position compared norm-wise and by top-1 agreement.

use super::report::{LOGITS_TOL, Row, Status};
use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::engine::step::{LogitsTarget, StepWork};
use crate::engine::{Engine, KvCapacity, SeqKey};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::weights::WeightSource;
use std::sync::Arc;
use tacflow_ipc::{
    AttentionPolicy, DType, HostRegion, SamplingParams, StepEntry, StepResult, TensorView,
};

/// What a model check feeds both engines.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Prompt of each sequence, prefilled in chunks of `chunks[i]`.
    pub prompts: Vec<Vec<u32>>,
    pub chunks: Vec<usize>,
    /// Teacher-forced decode tokens of each sequence (and of the fork of
    /// sequence 0, last, when `fork`).
    pub decode: Vec<Vec<u32>>,
    pub fork: bool,
    /// Top-1 agreement required, over positions whose CPU top-2 margin is
    /// at least 1e-2.
    pub min_agreement: f64,
    /// Every sequence's attention policy.
    pub policy: AttentionPolicy,
    /// Open every sequence with attention diagnostics, and compare each
    /// decode step's (the mean true mass of its selections) across the
    /// engines.
    pub diagnostics: bool,
}

/// A logits row's arg-max and the gap to the runner-up.
fn top2(row: &[f32]) -> (usize, f32) {
    let (mut best, mut b1, mut b2) = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if v > b1 {
            b2 = b1;
            b1 = v;
            best = i;
        } else if v > b2 {
            b2 = v;
        }
    }
    (best, b1 - b2)
}

fn region(bytes: usize) -> Result<Arc<HostRegion>> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(c"tacflow-selfcheck", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| Error::Backend(format!("memfd_create: {e}")))?;
    nix::unistd::ftruncate(&fd, bytes as i64)
        .map_err(|e| Error::Backend(format!("ftruncate: {e}")))?;
    Ok(Arc::new(HostRegion::from_fd(
        fd,
        bytes as u64,
        "selfcheck logits".into(),
    )?))
}

/// One step with every entry's logits written to a fresh region; returns
/// the results and the logits of all rows, entry after entry.
fn step<B: Backend>(
    e: &mut Engine<B>,
    entries: &[(u64, Vec<u32>, bool)],
) -> Result<(Vec<StepResult>, Vec<f32>)> {
    let vocab = e.config().vocab_size;
    let total: usize = entries.iter().map(|x| x.1.len()).sum();
    let reg = region(total * vocab * 4)?;
    let mut row = 0;
    let mut logits = vec![];
    for (_, tokens, _) in entries {
        logits.push(Some(LogitsTarget {
            region: reg.clone(),
            view: TensorView {
                offset: (row * vocab * 4) as u64,
                dtype: DType::F32,
                shape: vec![tokens.len() as u64, vocab as u64],
                strides: vec![vocab as u64, 1],
            },
        }));
        row += tokens.len();
    }
    let work = StepWork {
        session: 1,
        entries: entries
            .iter()
            .map(|(seq, tokens, sample)| StepEntry {
                seq_id: *seq,
                tokens: tokens.clone(),
                positions: None,
                sample: *sample,
                logits: None,
                blocks: None,
            })
            .collect(),
        logits,
    };
    let results = e.step(&work)?;
    let mut bytes = vec![0u8; total * vocab * 4];
    reg.read_bytes(0, &mut bytes)?;
    let vals = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((results, vals))
}

#[derive(Default)]
struct Tally {
    prefill_rel: f64,
    decode_rel: f64,
    prefill_steps: usize,
    decode_steps: usize,
    scored: usize,
    agreed: usize,
    excluded: usize,
    /// GPU greedy tokens that are not the arg-max of the GPU's own logits.
    sampler_wrong: usize,
    unwritten: usize,
    /// With diagnostics: the largest gap of a decode entry's mean true
    /// mass between the engines, and the entries one of them left without.
    diag_gap: f64,
    diag_missing: usize,
}

impl Tally {
    /// Each decode entry's diagnostics of the two engines (both present).
    fn check_diagnostics(&mut self, g: &[StepResult], c: &[StepResult]) {
        for (a, b) in g.iter().zip(c) {
            match (&a.attention, &b.attention) {
                (Some(x), Some(y)) => {
                    self.diag_gap = self.diag_gap.max((x.true_mass - y.true_mass).abs());
                }
                _ => self.diag_missing += 1,
            }
        }
    }

    fn add(&mut self, vocab: usize, g: &[f32], c: &[f32], decode: bool) {
        let d = super::report::diff(g, c);
        self.unwritten += d.unwritten + d.nan_mismatch;
        if decode {
            self.decode_rel = self.decode_rel.max(d.rel);
            self.decode_steps += 1;
        } else {
            self.prefill_rel = self.prefill_rel.max(d.rel);
            self.prefill_steps += 1;
        }
        for (gr, cr) in g.chunks_exact(vocab).zip(c.chunks_exact(vocab)) {
            let (ct, margin) = top2(cr);
            if margin < 1e-2 {
                self.excluded += 1;
                continue;
            }
            self.scored += 1;
            self.agreed += usize::from(top2(gr).0 == ct);
        }
    }

    /// Greedy tokens of the GPU against its own logits' arg-max (the last
    /// row of each sampling entry).
    fn check_sampler(
        &mut self,
        vocab: usize,
        res: &[StepResult],
        logits: &[f32],
        entries: &[(u64, Vec<u32>, bool)],
    ) {
        let mut row = 0;
        for (r, (_, tokens, sample)) in res.iter().zip(entries) {
            row += tokens.len();
            if *sample {
                let want = top2(&logits[(row - 1) * vocab..row * vocab]).0 as u32;
                self.sampler_wrong += usize::from(r.token != Some(want));
            }
        }
    }
}

/// One step on both engines, logits compared.
fn both<G: Backend, R: Backend>(
    g: &mut Engine<G>,
    c: &mut Engine<R>,
    entries: Vec<(u64, Vec<u32>, bool)>,
    (decode, diagnostics): (bool, bool),
    t: &mut Tally,
) -> Result<()> {
    let vocab = g.config().vocab_size;
    let (gr, gl) = step(g, &entries)?;
    let (cr, cl) = step(c, &entries)?;
    t.add(vocab, &gl, &cl, decode);
    t.check_sampler(vocab, &gr, &gl, &entries);
    if decode && diagnostics {
        t.check_diagnostics(&gr, &cr);
    }
    Ok(())
}

fn engine<B: Backend>(
    b: B,
    config: &ModelConfig,
    src: &dyn WeightSource,
    blocks: usize,
) -> Result<Engine<B>> {
    Engine::new(b, config, src, KvCapacity::Blocks(blocks), None, |_, _| {})
}

/// Runs `sc` on `gpu` (the CUDA backend; any backend in tests) and on the
/// CPU backend with bf16-rounded weights, and reports under `check`.
pub fn compare<G: Backend>(
    check: &str,
    gpu: G,
    config: &ModelConfig,
    src: &dyn WeightSource,
    sc: &Scenario,
    blocks: usize,
) -> Vec<Row> {
    let cpu = CpuBackend {
        round_to_bf16: true,
        round_activations: false,
        device_tactic: None,
    };
    compare_with(check, (gpu, cpu), config, src, sc, blocks, LOGITS_TOL)
}

/// [`compare`] against any reference backend, logits held to `tol`.
pub fn compare_with<G: Backend, R: Backend>(
    check: &str,
    (gpu, reference): (G, R),
    config: &ModelConfig,
    src: &dyn WeightSource,
    sc: &Scenario,
    blocks: usize,
    tol: f64,
) -> Vec<Row> {
    match run(gpu, reference, config, src, sc, blocks) {
        Ok(t) => rows(check, sc, &t, tol),
        Err(e) => vec![Row::fail(check, "run", e.to_string())],
    }
}

fn run<G: Backend, R: Backend>(
    gpu: G,
    reference: R,
    config: &ModelConfig,
    src: &dyn WeightSource,
    sc: &Scenario,
    blocks: usize,
) -> Result<Tally> {
    let t0 = std::time::Instant::now();
    let mut g = engine(gpu, config, src, blocks)?;
    let mut c = engine(reference, config, src, blocks)?;
    eprintln!(
        "  both engines loaded in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let key = |seq| SeqKey { session: 1, seq };
    let greedy = SamplingParams {
        logprobs: 5,
        ..Default::default()
    };
    for i in 0..sc.prompts.len() as u64 {
        g.open_sequence(key(i), sc.policy.clone(), greedy.clone(), sc.diagnostics)?;
        c.open_sequence(key(i), sc.policy.clone(), greedy.clone(), sc.diagnostics)?;
    }
    let mut t = Tally::default();
    let mut done = vec![0; sc.prompts.len()];
    while done.iter().zip(&sc.prompts).any(|(d, p)| *d < p.len()) {
        let mut entries = vec![];
        for (i, p) in sc.prompts.iter().enumerate() {
            if done[i] < p.len() {
                let n = sc.chunks[i].min(p.len() - done[i]);
                entries.push((
                    i as u64,
                    p[done[i]..done[i] + n].to_vec(),
                    done[i] + n == p.len(),
                ));
                done[i] += n;
            }
        }
        both(&mut g, &mut c, entries, (false, sc.diagnostics), &mut t)?;
    }
    let mut seqs: Vec<u64> = (0..sc.prompts.len() as u64).collect();
    if sc.fork {
        let child = sc.prompts.len() as u64;
        g.fork_sequence(key(0), key(child), None, None, None)?;
        c.fork_sequence(key(0), key(child), None, None, None)?;
        seqs.push(child);
    }
    let steps = sc
        .decode
        .iter()
        .take(seqs.len())
        .map(Vec::len)
        .min()
        .unwrap_or(0);
    for s in 0..steps {
        let entries = seqs
            .iter()
            .map(|&q| (q, vec![sc.decode[q as usize][s]], true))
            .collect();
        both(&mut g, &mut c, entries, (true, sc.diagnostics), &mut t)?;
    }
    eprintln!("  scenario ran in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(t)
}

fn rows(check: &str, sc: &Scenario, t: &Tally, tol: f64) -> Vec<Row> {
    let mut out = vec![
        Row::at_most(
            check,
            format!("prefill logits, {} chunked steps", t.prefill_steps),
            "rel_err",
            t.prefill_rel,
            tol,
        ),
        Row::at_most(
            check,
            format!("decode logits, {} teacher-forced steps", t.decode_steps),
            "rel_err",
            t.decode_rel,
            tol,
        ),
        Row::at_least(
            check,
            format!("top-1 agreement, {} positions", t.scored),
            "agreement",
            t.agreed as f64 / t.scored.max(1) as f64,
            sc.min_agreement,
        )
        .with_note(format!(
            "{} positions left out (CPU top-2 margin < 1e-2)",
            t.excluded
        )),
        Row::at_most(
            check,
            "greedy token = arg-max of its logits",
            "mismatches",
            t.sampler_wrong as f64,
            0.0,
        ),
    ];
    if t.unwritten > 0 {
        out[0] = out[0]
            .clone()
            .failing(format!("{} NaN/unwritten logits", t.unwritten));
    }
    if t.decode_steps == 0 {
        out[1].status = Status::Fail;
    }
    if sc.diagnostics {
        // The engines' selections may differ where the logits' rounding
        // moves a near-tie; their masses stay close.
        let mut r = Row::at_most(
            check,
            "decode diagnostics: mean true mass, GPU vs CPU",
            "max_abs",
            t.diag_gap,
            0.02,
        );
        if t.diag_missing > 0 {
            r = r.failing(format!("{} entries without diagnostics", t.diag_missing));
        }
        out.push(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::RandomSource;

    fn scenario(vocab: usize) -> Scenario {
        let t = |s: u64, n: usize| -> Vec<u32> {
            (0..n as u64)
                .map(|i| (tacflow_kernels::rng::bits(3, s, i) % vocab as u64) as u32)
                .collect()
        };
        Scenario {
            prompts: vec![t(1, 21), t(2, 5)],
            chunks: vec![8, 5],
            decode: vec![t(3, 4), t(4, 4), t(5, 4)],
            fork: true,
            min_agreement: 0.99,
            policy: AttentionPolicy::Full,
            diagnostics: false,
        }
    }

    #[test]
    fn identical_backends_agree_exactly_through_the_engine() {
        let config = ModelConfig::tiny();
        let src = RandomSource {
            config: config.clone(),
            seed: 5,
        };
        let rows = compare(
            "t",
            CpuBackend {
                round_to_bf16: true,
                round_activations: false,
                device_tactic: None,
            },
            &config,
            &src,
            &scenario(config.vocab_size),
            64,
        );
        assert_eq!(rows.len(), 4, "{rows:?}");
        for r in &rows {
            assert_eq!(r.status, Status::Pass, "{r:?}");
        }
        assert_eq!(rows[0].value, 0.0);
        assert!(rows[0].case.contains("3 chunked steps"), "{:?}", rows[0]);
        assert!(rows[1].case.contains("4 teacher-forced"), "{:?}", rows[1]);
    }

    /// The tactic group's model case on two CPU backends: the device path
    /// (its diagnostics measured by the backend) against the host path.
    #[test]
    fn diagnostics_are_compared_across_the_engines() {
        let config = ModelConfig::tiny();
        let src = RandomSource {
            config: config.clone(),
            seed: 5,
        };
        let mut sc = scenario(config.vocab_size);
        sc.policy = AttentionPolicy::Tactic {
            p: 0.9,
            cluster_size: Some(4),
            recluster_limit: Some(16),
        };
        sc.diagnostics = true;
        let cpu = || CpuBackend {
            round_to_bf16: true,
            round_activations: false,
            device_tactic: None,
        };
        let pair = (cpu().with_device_tactic(), cpu());
        let rows = compare_with("t", pair, &config, &src, &sc, 64, LOGITS_TOL);
        assert_eq!(rows.len(), 5, "{rows:?}");
        assert!(rows[4].case.contains("diagnostics"), "{:?}", rows[4]);
        for r in &rows {
            assert_eq!(r.status, Status::Pass, "{r:?}");
        }
        assert_eq!(rows[4].value, 0.0, "the same selections, the same masses");
    }

    #[test]
    fn f32_weights_differ_from_bf16_ones_a_little() {
        let config = ModelConfig::tiny();
        let src = RandomSource {
            config: config.clone(),
            seed: 5,
        };
        let rows = compare(
            "t",
            CpuBackend {
                round_to_bf16: false,
                round_activations: false,
                device_tactic: None,
            },
            &config,
            &src,
            &scenario(config.vocab_size),
            64,
        );
        assert!(
            rows[0].value > 0.0 && rows[0].value < LOGITS_TOL,
            "{rows:?}"
        );
        assert!(
            rows[1].value > 0.0 && rows[1].value < LOGITS_TOL,
            "{rows:?}"
        );
    }
}
