"""The daemon against Hugging Face transformers, the oracle for the model's
logits (≤ 1e-4 norm-wise): the built-in ``tiny`` model is exported as a safetensors
folder, loaded by ``LlamaForCausalLM`` in f32, and compared with the daemon
on the CPU backend.

- logits of a chunked prefill plus 32 decode steps, for a batch of sequences
  of different lengths stepped together (mixed prefill and decode entries),
  must match within 1e-4 norm-wise;
- greedy generation of 32 tokens must give identical ids, with every step's
  top-2 margin well above f32 rounding (so equality is not luck).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from tacflow import StepEntry

from teacher import collect, rel_err

# Lengths that cross the 16-token block boundary, and length 1.
PROMPT_LENGTHS = [1, 5, 16, 17, 33, 50]
DECODE_STEPS = 32
CHUNK = 7  # prefill chunk: not a divisor of the block size


def _hf_model(path):
    torch.manual_seed(0)
    m = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1234)
    return [rng.integers(3, vocab, size=n).tolist() for n in PROMPT_LENGTHS]


def _hf_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([tokens]))
    return out.logits[0].double().numpy()


def test_logits_match_transformers_over_chunked_prefill_and_decode(start_daemon, tiny_hf):
    d = start_daemon("--kv-blocks", "512")
    c = d.client()
    prompts = _prompts(c.info.model.vocab_size)
    seqs, rows = collect(c, prompts, DECODE_STEPS, CHUNK)
    model = _hf_model(tiny_hf)
    worst = 0.0
    for i, (seq, got) in enumerate(zip(seqs, rows)):
        assert len(seq) == len(prompts[i]) + DECODE_STEPS
        want = _hf_logits(model, seq[:-1])
        err = rel_err(got, want)
        worst = max(worst, err)
        assert err <= 1e-4, f"sequence {i} (prompt {PROMPT_LENGTHS[i]}): rel err {err:.2e}"
    print(f"worst norm-wise relative error: {worst:.2e}")


def test_greedy_generation_matches_transformers(start_daemon, tiny_hf):
    d = start_daemon("--kv-blocks", "256")
    c = d.client()
    prompts = _prompts(c.info.model.vocab_size)[1:4]
    model = _hf_model(tiny_hf)
    for sid, p in enumerate(prompts):
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([p]),
                max_new_tokens=DECODE_STEPS,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        want = gen.sequences[0, len(p) :].tolist()
        # Margins: the greedy choice must not be decided by rounding.
        for s in gen.scores:
            top2 = torch.topk(s[0].double(), 2).values
            assert float(top2[0] - top2[1]) > 1e-3, "tiny's logits are too flat for an exact test"
        c.open_sequence(sid)
        out = c.step([StepEntry(sid, p)])
        got = [out.results[0].token]
        for _ in range(DECODE_STEPS - 1):
            out = c.step([StepEntry(sid, [got[-1]])])
            got.append(out.results[0].token)
        assert got == want, f"prompt {sid}: daemon {got} vs transformers {want}"
        c.close_sequence(sid)


@pytest.mark.parametrize("seed", [0, 7])
def test_seeded_sampling_is_reproducible(start_daemon, seed):
    from tacflow import SamplingParams

    d = start_daemon("--kv-blocks", "256")
    c = d.client()
    runs = []
    for sid in (1, 2):
        c.open_sequence(sid, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=seed, logprobs=2))
        out = c.step([StepEntry(sid, [1, 2, 3, 4, 5])])
        toks = [out.results[0].token]
        assert len(out.results[0].top_logprobs) == 2
        for _ in range(10):
            toks.append(c.step([StepEntry(sid, [toks[-1]])]).results[0].token)
        runs.append(toks)
    assert runs[0] == runs[1]
