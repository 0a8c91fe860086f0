//! vLLM's prompt logprobs: a prompt scored chunk by chunk gives what the
//! log-softmax of its full logits gives, the row kept between chunks
//! included; tokens past the prompt are not scored.

use super::*;

const K: u32 = 4;

fn open_scored(e: &mut TestEngine, seq: u64, prompt_len: Option<u64>) {
    let sampling = SamplingParams {
        seed: Some(7),
        prompt_logprobs: Some(K),
        ..SamplingParams::default()
    };
    let o = crate::engine::SeqOptions {
        sampling,
        prompt_len,
        ..Default::default()
    };
    e.open_with(key(seq), o).unwrap();
}

/// `(logprob of tokens[j], top K)` for `j >= 1`, from the full logits of
/// the prompt run in one pass (row `j - 1` scores token `j`).
fn reference(e: &mut TestEngine, prompt: &[u32]) -> Vec<(f64, Vec<(u32, f64)>)> {
    open(e, 99, AttentionPolicy::Full, false);
    let mut w = work(vec![entry(99, prompt.to_vec(), false)]);
    w.logits[0] = Some(logits_target(prompt.len()));
    e.step(&w).unwrap();
    let all = read_logits(w.logits[0].as_ref().unwrap());
    e.close_sequence(key(99)).unwrap();
    (1..prompt.len())
        .map(|j| {
            let row: Vec<f64> = all[(j - 1) * VOCAB..j * VOCAB]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let m = row.iter().copied().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            let mut ids: Vec<u32> = (0..VOCAB as u32).collect();
            ids.sort_by(|a, b| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b)));
            let top = ids[..K as usize]
                .iter()
                .map(|&i| (i, row[i as usize] - lse))
                .collect();
            (row[prompt[j] as usize] - lse, top)
        })
        .collect()
}

fn check(got: &[Option<tacflow_ipc::PromptLogprob>], want: &[(f64, Vec<(u32, f64)>)]) {
    assert_eq!(got.len(), want.len());
    for (j, (g, (lp, top))) in got.iter().zip(want).enumerate() {
        let (glp, gtop) = g.as_ref().unwrap_or_else(|| panic!("token {j}: None"));
        assert!((*glp as f64 - lp).abs() < 1e-5, "token {j}: {glp} vs {lp}");
        let ids: Vec<u32> = gtop.iter().map(|t| t.0).collect();
        let want_ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, want_ids, "token {j}");
        for ((_, g), (_, w)) in gtop.iter().zip(top) {
            assert!((*g as f64 - w).abs() < 1e-5, "token {j}: {g} vs {w}");
        }
    }
}

#[test]
fn a_prompt_in_chunks_scores_like_its_full_logits() {
    let mut e = engine(32);
    let prompt = tokens(3, 33);
    let want = reference(&mut e, &prompt);
    open_scored(&mut e, 1, None);
    let mut got = vec![];
    // Ragged chunks across a block boundary, a chunk of one, the last
    // samples (and fixes the prompt).
    let mut at = 0;
    for (n, sample) in [(5, false), (12, false), (1, false), (15, true)] {
        let r = e
            .step(&work(vec![entry(1, prompt[at..at + n].to_vec(), sample)]))
            .unwrap()
            .remove(0);
        assert_eq!(r.prompt_logprobs.len(), n, "one per prompt token");
        got.extend(r.prompt_logprobs);
        at += n;
    }
    assert!(got[0].is_none(), "the first token has none");
    check(&got[1..], &want);
    assert!(e.seqs[&key(1)].prompt_row.is_none(), "the prompt is over");
    let r = feed(&mut e, 1, tokens(4, 1));
    assert!(r.prompt_logprobs.is_empty(), "output tokens are not scored");
}

#[test]
fn only_the_prompt_is_scored_and_a_truncation_forgets_the_row() {
    let mut e = engine(32);
    let prompt = tokens(5, 20);
    let want = reference(&mut e, &prompt);
    open_scored(&mut e, 1, Some(12));
    let r = e
        .step(&work(vec![entry(1, prompt[..8].to_vec(), false)]))
        .unwrap()
        .remove(0);
    check(&r.prompt_logprobs[1..], &want[..7]);
    // Tokens 8..12 are the prompt's rest, 12..20 output.
    let r = feed(&mut e, 1, prompt[8..].to_vec());
    assert_eq!(r.prompt_logprobs.len(), 4);
    check(&r.prompt_logprobs, &want[7..11]);
    assert!(e.seqs[&key(1)].prompt_row.is_none());
    // Cut back into the prompt: the token after the cut has no row.
    e.truncate_sequence(key(1), 14).unwrap();
    let r = feed(&mut e, 1, prompt[6..9].to_vec());
    assert!(r.prompt_logprobs[0].is_none());
    check(&r.prompt_logprobs[1..], &want[6..8]);
}
