"""Collecting a daemon's logits the way a serving stack drives it, for
comparison with transformers: a batch of prompts stepped together, each
prefilled in chunks (several entries mix prefill chunks and decode tokens in
one step), then greedy decode steps, with the logits of every position written
into a shared-memory region. Used by the CPU tests and by the GPU check
(scripts/gpu/e2e.py), which has no pytest."""

from __future__ import annotations

import numpy as np

from tacflow import Client, StepEntry


def collect(c: Client, prompts: list[list[int]], decode_steps: int, chunk: int, seq_base: int = 100):
    """Returns ``(seqs, logits)``: each prompt followed by its greedy
    continuation of ``decode_steps`` tokens, and the daemon's logits for every
    fed position (``len(seq) - 1`` rows each: the last sampled token is
    never fed)."""
    vocab = c.info.model.vocab_size
    n = len(prompts)
    max_len = max(len(p) for p in prompts) + decode_steps
    region = c.create_region(4 * n * max_len * vocab)
    for i in range(n):
        c.open_sequence(seq_base + i)
    fed = [0] * n
    seqs = [list(p) for p in prompts]
    logits = np.full((n, max_len, vocab), np.nan, dtype=np.float64)
    target = [len(p) + decode_steps for p in prompts]
    while any(fed[i] < target[i] - 1 for i in range(n)):
        entries = []
        for i in range(n):
            if fed[i] >= target[i] - 1:
                continue
            if fed[i] < len(prompts[i]):
                toks = seqs[i][fed[i] : min(fed[i] + chunk, len(prompts[i]))]
            else:
                toks = seqs[i][fed[i] : fed[i] + 1]
            last_of_prompt = fed[i] + len(toks) >= len(prompts[i])
            ref = region.ref(4 * ((i * max_len + fed[i]) * vocab), "f32", (len(toks), vocab))
            entries.append((i, StepEntry(seq_base + i, toks, sample=last_of_prompt, logits=ref)))
        out = c.step([e for _, e in entries])
        for (i, e), r in zip(entries, out.results):
            logits[i, fed[i] : fed[i] + len(e.tokens)] = region.view(e.logits)
            fed[i] += len(e.tokens)
            if r.num_tokens != fed[i]:
                raise AssertionError(f"sequence {i}: daemon caches {r.num_tokens}, fed {fed[i]}")
            if e.sample:
                seqs[i].append(r.token)
    for i in range(n):
        c.close_sequence(seq_base + i)
    region.close()
    rows = [logits[i, : len(seqs[i]) - 1] for i in range(n)]
    for i, r in enumerate(rows):
        if np.isnan(r).any():
            raise AssertionError(f"sequence {i}: the daemon left logits unwritten")
    return seqs, rows


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Norm-wise relative error ``‖a − b‖ / ‖b‖``."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
