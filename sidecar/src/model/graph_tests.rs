//! The model's side of the graph path on the CPU: a decode step padded to
//! a bucket, run through [`DecodeGraph`] over a workspace kept from step to
//! step, gives the eager pass's logits on its real rows (the CPU never
//! takes the graph path itself).

use super::*;
use crate::backend::cpu::CpuBackend;
use crate::backend::{KvLayout, SeqMeta};

const PAD_BLOCK: u32 = 15;

/// Decode rows of sequences `(token, context after the step, table)`.
fn decode(seqs: &[(u32, usize, Vec<u32>)]) -> StepMeta {
    let mut m = StepMeta::default();
    for (i, (tok, ctx, table)) in seqs.iter().enumerate() {
        let p = ctx - 1;
        m.tokens.push(*tok);
        m.positions.push(p as u32);
        m.slots.push(table[p / 16] * 16 + (p % 16) as u32);
        m.seqs.push(SeqMeta {
            q_start: i,
            q_len: 1,
            ctx_len: *ctx,
            block_table: table.clone(),
        });
        m.logit_rows.push(i as u32);
    }
    m
}

/// `m` padded to `rows` rows as `graph::pad_step` pads the device step:
/// token 0 at position 0, one key, in the padding block; logit rows
/// padded with the last row.
fn pad(m: &StepMeta, rows: usize) -> StepMeta {
    let mut p = m.clone();
    for r in m.tokens.len()..rows {
        p.tokens.push(0);
        p.positions.push(0);
        p.slots.push(PAD_BLOCK * 16);
        p.seqs.push(SeqMeta {
            q_start: r,
            q_len: 1,
            ctx_len: 1,
            block_table: vec![PAD_BLOCK],
        });
    }
    p.logit_rows.resize(rows, rows as u32 - 1);
    p
}

fn logits(b: &CpuBackend, a: &<CpuBackend as Backend>::Act, rows: usize) -> Vec<f32> {
    b.sample(a, &vec![None; rows], true)
        .unwrap()
        .logits
        .unwrap()
}

#[test]
fn a_padded_decode_step_on_a_kept_workspace_gives_the_eager_logits() {
    let b = CpuBackend::default();
    let config = ModelConfig::tiny();
    let src = RandomSource {
        config: config.clone(),
        seed: 11,
    };
    let model = Model::load(&b, &config, &src, |_, _| {}).unwrap();
    let mut kv = b
        .kv_cache(&KvLayout {
            num_layers: config.num_layers,
            num_blocks: 16,
            block_size: 16,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
        })
        .unwrap();
    let tables = [vec![0, 1, 2], vec![3, 4], vec![5]];
    let lens = [33usize, 17, 4];
    for (t, &n) in tables.iter().zip(&lens) {
        let toks: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % 500).collect();
        let mut m = crate::selfcheck::one_seq_meta(&toks);
        m.slots = (0..n).map(|p| t[p / 16] * 16 + (p % 16) as u32).collect();
        m.seqs[0].block_table = t.clone();
        model.forward(&b, &mut kv, &m).unwrap();
    }
    assert!(!b.graph_step(&decode(&[(1, 34, tables[0].clone())])));
    let (rows, vocab) = (4, config.vocab_size);
    let mut ws = None;
    for step in 0..3usize {
        let m = decode(&[
            (7 + step as u32, lens[0] + 1 + step, tables[0].clone()),
            (90 * step as u32, lens[1] + 1 + step, tables[1].clone()),
            (3, lens[2] + 1 + step, tables[2].clone()),
        ]);
        let eager = model.forward(&b, &mut kv, &m).unwrap();
        let want = logits(&b, &eager, 3);
        let mut pass = DecodeGraph {
            model: &model,
            meta: &m,
        };
        let ws = match &mut ws {
            Some(w) => w,
            None => ws.insert(pass.workspace(&b, rows).unwrap()),
        };
        let padded = pad(&m, rows);
        let dev = b.begin_step(&padded).unwrap();
        pass.issue(&b, &dev, rows, &mut kv, ws).unwrap();
        let got = logits(&b, ws.logits(), rows);
        assert_eq!(got.len(), rows * vocab);
        let real = &got[..3 * vocab];
        let d = crate::selfcheck::report::diff(real, &want);
        assert!(d.rel <= 1e-6 && d.unwritten == 0, "step {step}: {d:?}");
    }
}

/// A step that samples nothing (a prefill chunk before the prompt's end)
/// runs no op over no rows: the final norm would read a gather output
/// that nothing wrote, which a backend allocating its outputs lazily (the
/// CUDA backend) refuses. Counted through the fault backend's op counter:
/// with no logit rows, exactly the gather, the final norm and the LM head
/// drop out.
#[test]
fn a_step_that_samples_nothing_skips_its_empty_nodes() {
    use crate::backend::faults::Faulty;
    let b = Faulty::new(CpuBackend::default());
    let config = ModelConfig::tiny();
    let src = RandomSource {
        config: config.clone(),
        seed: 3,
    };
    let model = Model::load(&b, &config, &src, |_, _| {}).unwrap();
    let layout = KvLayout {
        num_layers: config.num_layers,
        num_blocks: 4,
        block_size: 16,
        num_kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
    };
    let toks: Vec<u32> = (0..20u32).map(|i| (i * 13 + 1) % 500).collect();
    let ops_of = |m: &StepMeta| {
        let mut kv = b.kv_cache(&layout).unwrap();
        let before = b.ops();
        model.forward(&b, &mut kv, m).unwrap();
        b.ops() - before
    };
    let silent = crate::selfcheck::one_seq_meta(&toks);
    let mut sampling = silent.clone();
    sampling.logit_rows = vec![toks.len() as u32 - 1];
    assert_eq!(ops_of(&sampling) - ops_of(&silent), 3);
}
