"""vLLM's sampling semantics end to end on the CPU backend, each option
against a NumPy reference of what vLLM does: the logit bias, then the
repetition penalty (prompt and output tokens), then frequency and presence
(output tokens only); greedy on the result; temperature then min_p before the
draw. Random draws are checked as distributions (a chi-square test over many
unseeded forks); seeds are fixed wherever a draw must repeat."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tacflow import SamplingParams, StepEntry
from tacflow import errors as E

VOCAB = 512


def reference(raw, prompt, output, p: SamplingParams):
    """vLLM's processed logits (float32, in its order of operations)."""
    x = raw.astype(np.float32).copy()
    bias = p.logit_bias.items() if isinstance(p.logit_bias, dict) else p.logit_bias
    for t, b in bias:
        x[t] += np.float32(b)
    if p.repetition_penalty != 1.0:
        seen = np.zeros(len(x), bool)
        seen[list(prompt) + list(output)] = True
        r = np.float32(p.repetition_penalty)
        x = np.where(seen, np.where(x > 0, x / r, x * r), x).astype(np.float32)
    counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=len(x)).astype(np.float32)
    x = x - np.float32(p.frequency_penalty) * counts
    x = x - np.float32(p.presence_penalty) * (counts > 0)
    return x


def probabilities(x, p: SamplingParams):
    """The draw's distribution: temperature, min_p, top_k, top_p."""
    z = x.astype(np.float64) / p.temperature
    q = np.exp(z - z.max())
    keep = q >= p.min_p  # relative to the best token's probability
    order = np.argsort(-z, kind="stable")
    if p.top_k:
        keep[order[p.top_k:]] = False
    q = np.where(keep, q, 0.0)
    q /= q.sum()
    if p.top_p < 1.0:
        cum = np.cumsum(q[order])
        cut = np.searchsorted(cum, p.top_p) + 1
        q2 = np.zeros_like(q)
        q2[order[:cut]] = q[order[:cut]]
        q = q2 / q2.sum()
    return q


def prefill_logits(c, region, seq_id, tokens):
    """Appends ``tokens`` with sampling; returns (raw last-row logits, token)."""
    ref = region.ref(0, "f32", (len(tokens), VOCAB))
    out = c.step([StepEntry(seq_id, tokens, logits=ref)]).results[0]
    return np.array(region.view(ref)[-1], copy=True), out.token


def prompt_of(seed, n):
    rng = np.random.default_rng(seed)
    # Few distinct tokens, so that many repeat (the penalties bite).
    return [int(t) for t in rng.integers(1, 40, n)]


@pytest.fixture
def daemon(start_daemon):
    return start_daemon("--kv-blocks", "512", "--max-sequences", "256")


def test_penalties_and_bias_give_vllms_greedy_token(daemon):
    c = daemon.client()
    region = c.create_region(4 * VOCAB * 64)
    configs = [
        SamplingParams(repetition_penalty=8.0),
        SamplingParams(presence_penalty=2.0),
        SamplingParams(frequency_penalty=2.0),
        SamplingParams(repetition_penalty=0.2, presence_penalty=-2.0, frequency_penalty=0.5),
        SamplingParams(logit_bias={5: 10.0, 9: -100.0}),
    ]
    changed = 0
    for i, p in enumerate(configs):
        for trial in range(4):
            sid = 10 * i + trial
            toks = prompt_of(sid, 24)
            # The first 16 tokens are the prompt, the last 8 the output.
            c.open_sequence(sid, sampling=p, prompt_len=16)
            raw, token = prefill_logits(c, region, sid, toks)
            want = int(np.argmax(reference(raw, toks[:16], toks[16:], p)))
            assert token == want, f"config {i} trial {trial}"
            changed += want != int(np.argmax(raw))
            c.close_sequence(sid)
    assert changed >= 4, f"the options changed the greedy token {changed} times in 20"


def test_the_first_sampling_entry_ends_the_prompt(daemon):
    """Without prompt_len, the prompt is everything up to the first sample:
    presence and frequency penalties then see no output token at first, and
    see the tokens appended after it."""
    c = daemon.client()
    region = c.create_region(4 * VOCAB * 64)
    p = SamplingParams(presence_penalty=2.0, frequency_penalty=2.0)
    c.open_sequence(1, sampling=p)
    prompt = prompt_of(3, 20)
    raw, token = prefill_logits(c, region, 1, prompt)
    assert token == int(np.argmax(raw)), "no output yet: nothing penalised"
    out = [token, 7, token]
    raw, token = prefill_logits(c, region, 1, out)
    assert token == int(np.argmax(reference(raw, prompt, out, p)))
    assert c.sequence_state(1).prompt_len == 20


def chi_square_ok(counts, probs, n):
    """Pearson's test at p = 0.001, bins with expectation under 5 merged."""
    exp = probs * n
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(exp[big], exp[~big].sum())
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    z = 3.09  # Wilson-Hilferty approximation of the 0.999 quantile
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


def test_random_draws_follow_vllms_distribution(daemon):
    c = daemon.client()
    region = c.create_region(4 * VOCAB * 64)
    prompt = prompt_of(11, 30)
    p = SamplingParams(temperature=1.3, min_p=0.02, top_k=60, repetition_penalty=3.0,
                       logit_bias={prompt[-1]: 3.0, 200: 2.5})
    c.open_sequence(1, sampling=SamplingParams(seed=1))
    c.step([StepEntry(1, prompt[:-1], sample=False)])
    # One fork per draw, unseeded: each draws with its own fresh seed.
    n, batch = 1200, 100
    counts = np.zeros(VOCAB)
    raw = None
    for b in range(n // batch):
        kids = [1000 + b * batch + i for i in range(batch)]
        for k in kids:
            c.fork_sequence(1, k, sampling=p)
        ref = region.ref(0, "f32", (1, VOCAB))
        entries = [StepEntry(k, [prompt[-1]]) for k in kids]
        entries[0].logits = ref
        for r in c.step(entries).results:
            counts[r.token] += 1
        raw = np.array(region.view(ref)[0], copy=True)
        for k in kids:
            c.close_sequence(k)
    probs = probabilities(reference(raw, prompt, [], p), p)
    assert counts[probs == 0].sum() == 0, "a token outside min_p/top_k was drawn"
    stat, crit = chi_square_ok(counts, probs, n)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f}"
    # The same test rejects the unprocessed distribution.
    plain = probabilities(raw, SamplingParams(temperature=1.3, top_k=60))
    bad, crit2 = chi_square_ok(counts, np.maximum(plain, 1e-12), n)
    assert bad > crit2, "the reference must tell processing from none"


def test_unseeded_sequences_and_forks_differ_seeded_ones_repeat(daemon):
    c = daemon.client()
    prompt = prompt_of(5, 12)
    hot = SamplingParams(temperature=1.5)

    def draw(sid, n=12):
        toks = [c.step([StepEntry(sid, prompt)]).results[0].token]
        for _ in range(n - 1):
            toks.append(c.step([StepEntry(sid, [toks[-1]])]).results[0].token)
        return toks

    c.open_sequence(1, sampling=hot)
    c.open_sequence(2, sampling=hot)
    assert draw(1) != draw(2)
    s1, s2 = c.sequence_state(1).sampling["seed"], c.sequence_state(2).sampling["seed"]
    assert s1 != s2
    c.open_sequence(3, sampling=SamplingParams(temperature=1.5, seed=s1))
    assert draw(3) == draw_again(c, prompt, s1)
    # Forks of an unseeded parent draw afresh; of a seeded one, alike.
    c.open_sequence(4, sampling=hot)
    c.step([StepEntry(4, prompt, sample=False)])
    for k in (5, 6):
        c.fork_sequence(4, k)
    a = [c.step([StepEntry(k, [3])]).results[0].token for k in (5, 6)]
    seeds = {c.sequence_state(k).sampling["seed"] for k in (4, 5, 6)}
    assert len(seeds) == 3, a


def draw_again(c, prompt, seed, n=12):
    c.open_sequence(99, sampling=SamplingParams(temperature=1.5, seed=seed))
    toks = [c.step([StepEntry(99, prompt)]).results[0].token]
    for _ in range(n - 1):
        toks.append(c.step([StepEntry(99, [toks[-1]])]).results[0].token)
    c.close_sequence(99)
    return toks


def test_options_out_of_range_or_not_served_are_refused(daemon):
    c = daemon.client()
    for bad in (
        SamplingParams(min_p=1.5),
        SamplingParams(presence_penalty=3.0),
        SamplingParams(repetition_penalty=0.0),
        SamplingParams(logit_bias={VOCAB: 1.0}),
        SamplingParams(prompt_logprobs=65),
    ):
        with pytest.raises(E.BadRequest):
            c.open_sequence(1, sampling=bad)
    assert c.stats().sequences == 0


def log_softmax(x):
    z = x.astype(np.float64)
    m = z.max()
    return z - (m + np.log(np.exp(z - m).sum()))


def test_prompt_logprobs_in_chunks_match_the_full_logits(daemon):
    """vLLM's prompt logprobs: token j scored by the raw log-softmax of row
    j - 1 (not the processed logits), the first token None, a chunk's first
    token scored by the previous chunk's last row."""
    c = daemon.client()
    region = c.create_region(4 * VOCAB * 64)
    rng = np.random.default_rng(21)
    prompt = [int(t) for t in rng.integers(0, VOCAB, 37)]
    c.open_sequence(1)
    ref = region.ref(0, "f32", (len(prompt), VOCAB))
    c.step([StepEntry(1, prompt, sample=False, logits=ref)])
    full = np.array(region.view(ref), copy=True)
    k = 5
    # Processing options change the draw, never the scores.
    p = SamplingParams(prompt_logprobs=k, repetition_penalty=2.0, logit_bias={prompt[3]: 20.0})
    c.open_sequence(2, sampling=p)
    got, ranks, at = [], [], 0
    for n, sample in ((1, False), (15, False), (4, False), (17, True)):
        r = c.step([StepEntry(2, prompt[at:at + n], sample=sample)]).results[0]
        assert len(r.prompt_logprobs) == n and len(r.prompt_ranks) == n
        got.extend(r.prompt_logprobs)
        ranks.extend(r.prompt_ranks)
        at += n
    assert got[0] is None and ranks[0] is None
    for j in range(1, len(prompt)):
        lp = log_softmax(full[j - 1])
        order = np.argsort(-full[j - 1], kind="stable")[:k]
        value, top = got[j]
        assert isinstance(value, float) and all(isinstance(t, int) for t, _ in top)
        assert abs(value - lp[prompt[j]]) < 1e-5, j
        assert [t for t, _ in top] == [int(i) for i in order], j
        assert np.allclose([v for _, v in top], lp[order], atol=1e-5, rtol=0), j
        # vLLM's rank: tokens at least as likely, itself included, over the
        # whole vocabulary (random prompt tokens rank far below the top k).
        assert ranks[j] == int((full[j - 1] >= full[j - 1][prompt[j]]).sum()), j
    assert max(r for r in ranks if r is not None) > k, "some ranks lie beyond the top list"
    # The sampled token and later ones are output: not scored.
    nxt = c.step([StepEntry(2, [r.token])]).results[0]
    assert nxt.prompt_logprobs == ()


def test_sampled_tokens_report_vllms_rank_over_the_vocabulary(daemon):
    """(1.4) With logprobs, a sampled token's rank counts every token at
    least as likely, itself included, also when it lies beyond the top
    list; without logprobs no rank is sent."""
    c = daemon.client()
    region = c.create_region(4 * VOCAB * 8)
    rng = np.random.default_rng(5)
    prompt = [int(t) for t in rng.integers(0, VOCAB, 6)]
    beyond = 0
    for seed in range(24):
        sid = 100 + seed
        c.open_sequence(sid, sampling=SamplingParams(temperature=3.0, seed=seed, logprobs=1))
        ref = region.ref(0, "f32", (len(prompt), VOCAB))
        r = c.step([StepEntry(sid, prompt, sample=True, logits=ref)]).results[0]
        row = np.array(region.view(ref), copy=True)[-1]
        want = int((row >= row[r.token]).sum())
        assert r.rank == want, (seed, r.token, r.rank, want)
        beyond += want > 1
        c.close_sequence(sid)
    assert beyond > 0, "no draw below the best token: the test checks nothing beyond the top list"
    c.open_sequence(999, sampling=SamplingParams(temperature=1.0, seed=1))
    r = c.step([StepEntry(999, prompt, sample=True)]).results[0]
    assert r.rank is None and r.logprob is not None
