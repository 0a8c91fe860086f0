"""The measurements of the accuracy harness, each driving a running tacflowd.

Every comparison is on equal footing: a prompt is prefilled once with full
attention, then forked once per policy (``fork_sequence`` with an attention
policy: the children share the prompt's KV blocks), and all children decode
in the same steps. Prefill is always full attention (Tactic acts on decode).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from tacflow import Client, Full, StepEntry

PREFILL_CHUNK = 1024


@dataclass
class PolicyRun:
    """What one policy did over a decode pass."""

    label: str
    policy: object
    kl: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    agree: list[bool] = field(default_factory=list)
    tokens_read: list[float] = field(default_factory=list)
    selected: list[float] = field(default_factory=list)
    success: list[float] = field(default_factory=list)
    true_mass: list[float] = field(default_factory=list)
    est_mass: list[float] = field(default_factory=list)
    step_us: list[int] = field(default_factory=list)


class Session:
    """A client plus a logits region and fresh sequence ids."""

    def __init__(self, client: Client, max_rows: int):
        self.c = client
        self.vocab = client.info.model.vocab_size
        self.region = client.create_region(4 * self.vocab * max_rows)
        self.next_id = 1

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def logits_ref(self, row: int):
        return self.region.ref(4 * self.vocab * row, "f32", (1, self.vocab))

    def prefill(self, tokens: list[int], progress=None) -> int:
        sid = self.new_id()
        self.c.open_sequence(sid, attention=Full(), diagnostics=True)
        for i in range(0, len(tokens), PREFILL_CHUNK):
            self.c.step([StepEntry(sid, tokens[i : i + PREFILL_CHUNK], sample=False)])
            if progress:
                progress(min(i + PREFILL_CHUNK, len(tokens)), len(tokens))
        return sid


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def teacher_forced(s: Session, base: int, runs: list[PolicyRun], tokens: list[int], targets: list[int]):
    """Forks ``base`` once per run (the first run must be full attention: the
    reference), feeds ``tokens`` one per step to every child, and records per
    position the KL divergence from full attention, the NLL of ``targets``,
    top-1 agreement with full attention and the attention diagnostics."""
    kids = []
    for r in runs:
        kid = s.new_id()
        s.c.fork_sequence(base, kid, attention=r.policy)
        kids.append(kid)
    for t, (tok, target) in enumerate(zip(tokens, targets)):
        entries = [StepEntry(k, [tok], sample=False, logits=s.logits_ref(i)) for i, k in enumerate(kids)]
        out = s.c.step(entries)
        logp = log_softmax(np.array(s.region.array("f32", (len(kids), s.vocab))))
        ref = logp[0]
        p_ref = np.exp(ref)
        for i, (r, res) in enumerate(zip(runs, out.results)):
            r.kl.append(float((p_ref * (ref - logp[i])).sum()))
            r.nll.append(float(-logp[i][target]))
            r.agree.append(bool(np.argmax(logp[i]) == np.argmax(ref)))
            r.step_us.append(out.timing.run_us)
            d = res.attention
            if d is not None:
                r.tokens_read.append(d.tokens_read_fraction)
                r.selected.append(d.selected_fraction)
                r.success.append(d.success_rate)
                r.true_mass.append(d.true_mass)
                r.est_mass.append(d.estimated_mass)
    for k in kids:
        s.c.close_sequence(k)


def greedy(s: Session, base: int, first: int, n: int) -> list[int]:
    """Full attention's greedy continuation of ``n`` tokens after ``first``."""
    kid = s.new_id()
    s.c.fork_sequence(base, kid, attention=Full())
    out, tok = [], first
    for _ in range(n):
        tok = s.c.step([StepEntry(kid, [tok])]).results[0].token
        out.append(tok)
    s.c.close_sequence(kid)
    return out


def answer(s: Session, base: int, policy, question_last: int, n: int, decode) -> tuple[str, float]:
    """Greedy answer of ``n`` tokens under ``policy`` after a prefilled prompt
    whose last token ``question_last`` was held back (so the first sampled
    token already uses the policy); returns it with the mean fraction of
    tokens read (1 for full attention)."""
    kid = s.new_id()
    s.c.fork_sequence(base, kid, attention=policy)
    toks, tok, read = [], question_last, []
    for _ in range(n):
        r = s.c.step([StepEntry(kid, [tok])]).results[0]
        tok = r.token
        toks.append(tok)
        read.append(r.attention.tokens_read_fraction if r.attention else 1.0)
    s.c.close_sequence(kid)
    return decode(toks), float(np.mean(read))


def first_number(text: str) -> str | None:
    m = re.search(r"\d{5}", text)
    return m.group(0) if m else None
