//! Two lanes against one: a tiny-model step of decode rows and a prefill
//! chunk run as two nano-batches on two lanes, compared with the sequential
//! pass on the same device and with the CPU reference; and (in [`ranges`])
//! every row-wise op over a middle range of rows.
//!
//! The two-lane schedules are built here by hand: each op cut at one row
//! (and the logit ops at one logit row), nano-batch i on lane i, and an
//! event wherever two nodes on different lanes touch a common row of a
//! buffer (`schedule::program::accesses`): the attention of a sequence
//! after the KV appends of all its rows, the gather after the residual adds
//! of the rows it reads.

use super::report::{LOGITS_TOL, Row, compare_row};
use super::{Ctx, case, ranges};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, KvLayout, SeqMeta, StepMeta};
use crate::error::Result;
use crate::model::Model;
use crate::model::config::ModelConfig;
use crate::model::weights::RandomSource;
use crate::schedule::program::Program;
use crate::schedule::{Node, Schedule};
use std::ops::Range;
use tacflow_kernels::rng::bits;

/// Two lanes against one on the same device: the nano-batches' GEMMs have
/// fewer rows and their attention other splits, so sums run in another
/// order; a missing event shows as garbage or NaN, far above this.
pub const LANES_TOL: f64 = 1e-3;

/// The self-check group `lanes` (a backend of two lanes).
pub fn lanes(cx: &mut Ctx) -> Vec<Row> {
    let mut rows = vec![];
    for (name, cut) in CUTS {
        case(&mut rows, "lanes", name, || model_case(cx, cut));
    }
    rows.extend(ranges::ranges(cx));
    rows
}

/// Where a two-lane schedule cuts the mixed step: token rows `..rows` on
/// lane 0, and logit rows `..logits` (all of them when `None`: the logit
/// ops then wait for lane 1's rows).
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    pub rows: usize,
    pub logits: Option<usize>,
}

pub(super) const CUTS: [(&str, Cut); 2] = [
    (
        "tiny: decode | prefill chunk, logits on lane 0",
        Cut {
            rows: 2,
            logits: None,
        },
    ),
    (
        "tiny: cut inside the prefill chunk",
        Cut {
            rows: 10,
            logits: Some(3),
        },
    ),
];

/// `range` cut at `at`, each non-empty part on its lane.
fn parts(range: Range<usize>, at: usize) -> Vec<(Range<usize>, usize)> {
    let at = at.clamp(range.start, range.end);
    [(range.start..at, 0), (at..range.end, 1)]
        .into_iter()
        .filter(|(r, _)| !r.is_empty())
        .collect()
}

/// The program cut as `cut` says, on two lanes, with the fewest events that
/// order every dependency (`schedule::build::laid_out`), validated. Nodes
/// are in program order, so the node order is an issue order.
pub fn two_lanes(program: &Program, meta: &StepMeta, cut: Cut) -> Schedule {
    let (t, r) = (meta.tokens.len(), meta.logit_rows.len());
    let mut nodes = vec![];
    for op in program.ops() {
        let ps = match (op.rowwise(), cut.logits) {
            (true, _) => parts(0..t, cut.rows),
            (false, Some(at)) => parts(0..r, at),
            (false, None) => parts(0..r, r),
        };
        nodes.extend(ps.into_iter().map(|(rows, lane)| Node { op, rows, lane }));
    }
    let order: Vec<usize> = (0..nodes.len()).collect();
    let probe = Schedule {
        nodes: nodes.clone(),
        ..Schedule::default()
    };
    let required = crate::schedule::deps::required(&probe, meta);
    let s = crate::schedule::build::laid_out(nodes, 2, &order, &required);
    debug_assert!(crate::schedule::deps::validate(&s, program, meta).is_ok());
    s
}

/// Tokens `0..n` of sequence `seq` at positions `from..from + n`.
fn tokens(seed: u64, seq: u64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| (bits(seed, 7000 + seq, i) % vocab as u64) as u32)
        .collect()
}

/// One step over sequences `(tokens, first position, block table)`, their
/// rows one after another; `logits` are the rows whose logits are wanted.
pub(super) fn step_meta(seqs: &[(Vec<u32>, usize, Vec<u32>)], logits: Vec<u32>) -> StepMeta {
    let mut m = StepMeta {
        logit_rows: logits,
        ..StepMeta::default()
    };
    for (toks, from, table) in seqs {
        let q_start = m.tokens.len();
        for (i, &tok) in toks.iter().enumerate() {
            let p = from + i;
            m.tokens.push(tok);
            m.positions.push(p as u32);
            m.slots.push(table[p / 16] * 16 + (p % 16) as u32);
        }
        m.seqs.push(SeqMeta {
            q_start,
            q_len: toks.len(),
            ctx_len: from + toks.len(),
            block_table: table.clone(),
        });
    }
    m
}

/// The prefix step (three prompts: 37, 20 and 32 tokens) and the mixed
/// step (a decode row of the first two, a 16-token chunk of the third):
/// rows `[a, b, c0..c15]`, logits of both decode rows, of a row inside the
/// chunk and of its last.
pub fn mixed_steps(seed: u64, vocab: usize) -> (StepMeta, StepMeta) {
    let tables = [vec![0, 1, 2], vec![3, 4], vec![5, 6, 7]];
    let lens = [37, 20, 32];
    let all: Vec<Vec<u32>> = (0..3usize)
        .map(|s| tokens(seed, s as u64, lens[s] + 16, vocab))
        .collect();
    let prefix: Vec<_> = (0..3)
        .map(|s| (all[s][..lens[s]].to_vec(), 0, tables[s].clone()))
        .collect();
    let ends = [36, 36 + 20, 36 + 20 + 32];
    let mixed = vec![
        (all[0][37..38].to_vec(), 37, tables[0].clone()),
        (all[1][20..21].to_vec(), 20, tables[1].clone()),
        (all[2][32..48].to_vec(), 32, tables[2].clone()),
    ];
    (
        step_meta(&prefix, ends.map(|e| e as u32).to_vec()),
        step_meta(&mixed, vec![0, 1, 9, 17]),
    )
}

/// The logits of the mixed step on `b`: sequentially, then as `schedule`.
pub fn run_mixed<B: Backend>(b: &B, seed: u64, schedule: Option<&Schedule>) -> Result<Vec<f32>> {
    let config = ModelConfig::tiny();
    let src = RandomSource {
        config: config.clone(),
        seed,
    };
    let model = Model::load(b, &config, &src, |_, _| {})?;
    let mut kv = b.kv_cache(&KvLayout {
        num_layers: config.num_layers,
        num_blocks: 8,
        block_size: 16,
        num_kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
    })?;
    let (prefix, mixed) = mixed_steps(seed, config.vocab_size);
    model.forward(b, &mut kv, &prefix)?;
    let logits = match schedule {
        None => model.forward(b, &mut kv, &mixed)?,
        // Program order: every event goes forward (`two_lanes`).
        Some(s) => {
            let order: Vec<usize> = (0..s.nodes.len()).collect();
            model.forward_scheduled(b, &mut kv, &mixed, None, s, &order)?
        }
    };
    let none = vec![None; mixed.logit_rows.len()];
    Ok(b.sample(&logits, &none, true)?.logits.unwrap_or_default())
}

/// The mixed step cut by `cut` on the GPU's two lanes, against the same
/// step run sequentially on the GPU and on the CPU.
pub(super) fn model_case(cx: &mut Ctx, cut: Cut) -> Result<Row> {
    let (b, seed) = (&cx.b, cx.seed);
    let config = ModelConfig::tiny();
    let (_, mixed) = mixed_steps(seed, config.vocab_size);
    let program = Program {
        layers: config.num_layers,
        qkv_bias: config.qkv_bias,
        fusions: Default::default(),
    };
    let s = two_lanes(&program, &mixed, cut);
    let lanes = run_mixed(b, seed, Some(&s))?;
    let seq = run_mixed(b, seed, None)?;
    let cpu = run_mixed(
        &CpuBackend {
            round_to_bf16: true,
            round_activations: false,
            device_tactic: None,
        },
        seed,
        None,
    )?;
    let vs_one = compare_row("lanes", "", &lanes, &seq, LANES_TOL);
    let vs_cpu = compare_row("lanes", "", &lanes, &cpu, LOGITS_TOL);
    let note = format!(
        "{} events; vs one lane {:.1e}, vs CPU {:.1e}",
        s.events.len(),
        vs_one.value,
        vs_cpu.value
    );
    Ok(match (vs_one.status, vs_cpu.status) {
        (super::report::Status::Fail, _) => vs_one.failing(note),
        (_, super::report::Status::Fail) => vs_cpu.failing(note),
        _ => vs_cpu.with_note(note),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Op;

    fn program() -> Program {
        crate::schedule::tests::program(false)
    }

    #[test]
    fn a_cut_at_a_sequence_boundary_needs_events_only_for_the_logits() {
        let (_, mixed) = mixed_steps(1, 512);
        let s = two_lanes(&program(), &mixed, CUTS[0].1);
        assert!(!s.events.is_empty());
        for e in &s.events {
            let (a, b) = (&s.nodes[e.before], &s.nodes[e.after]);
            assert_eq!((a.lane, b.lane), (1, 0), "{a:?} -> {b:?}");
            assert!(!b.op.rowwise(), "only the logit ops wait: {b:?}");
        }
        assert!(
            s.events.iter().any(|e| s.nodes[e.before].op == Op::AddMlp(1)
                && s.nodes[e.after].op == Op::Gather),
            "the gather waits for lane 1's last residual add"
        );
    }

    #[test]
    fn a_cut_inside_a_chunk_orders_appends_before_attention_both_ways() {
        let (_, mixed) = mixed_steps(1, 512);
        let s = two_lanes(&program(), &mixed, CUTS[1].1);
        for l in 0..2 {
            for (from, to) in [(0, 1), (1, 0)] {
                let has = s.events.iter().any(|e| {
                    let (a, b) = (&s.nodes[e.before], &s.nodes[e.after]);
                    a.op == Op::KvAppend(l)
                        && b.op == Op::Attention(l)
                        && (a.lane, b.lane) == (from, to)
                });
                assert!(has, "layer {l}: append on {from} before attention on {to}");
            }
        }
        for e in &s.events {
            assert!(e.before < e.after, "events go forward");
        }
    }

    #[test]
    fn two_lanes_on_the_cpu_give_the_sequential_logits() {
        let cpu = CpuBackend {
            round_to_bf16: true,
            round_activations: false,
            device_tactic: None,
        };
        let (_, mixed) = mixed_steps(5, 512);
        let seq = run_mixed(&cpu, 5, None).unwrap();
        assert_eq!(seq.len(), 4 * 512);
        for (_, cut) in CUTS {
            let tiny = ModelConfig::tiny();
            let p = Program {
                layers: tiny.num_layers,
                qkv_bias: tiny.qkv_bias,
                fusions: Default::default(),
            };
            let s = two_lanes(&p, &mixed, cut);
            let lanes = run_mixed(&cpu, 5, Some(&s)).unwrap();
            let d = super::super::report::diff(&lanes, &seq);
            assert!(d.rel <= 1e-6 && d.unwritten == 0, "{cut:?}: {d:?}");
        }
    }
}
