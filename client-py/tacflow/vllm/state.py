"""What the executor keeps per vLLM request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .mapping import RequestPlan


@dataclass
class Diag:
    """Attention diagnostics of one request, summed over its decode steps."""

    policy: str = ""
    steps: int = 0
    tokens_read_fraction: float = 0.0
    selected_fraction: float = 0.0
    true_mass: float = 0.0
    estimated_mass: float = 0.0
    success_rate: float = 0.0
    min_true_mass: float = 1.0

    def add(self, d: Any) -> None:
        self.policy = d.policy
        self.steps += 1
        self.tokens_read_fraction += d.tokens_read_fraction
        self.selected_fraction += d.selected_fraction
        self.true_mass += d.true_mass
        self.estimated_mass += d.estimated_mass
        self.success_rate += d.success_rate
        self.min_true_mass = min(self.min_true_mass, d.min_true_mass)

    def summary(self) -> dict[str, Any]:
        n = max(self.steps, 1)
        return {
            "policy": self.policy,
            "decode_steps": self.steps,
            "tokens_read_fraction": self.tokens_read_fraction / n,
            "selected_fraction": self.selected_fraction / n,
            "true_mass": self.true_mass / n,
            "estimated_mass": self.estimated_mass / n,
            "success_rate": self.success_rate / n,
            "min_true_mass": self.min_true_mass if self.steps else None,
        }


@dataclass
class ReqState:
    """What the executor keeps of one vLLM request."""

    req_id: str
    seq_id: int
    plan: RequestPlan
    prompt_len: int
    #: Prompt and every token sampled so far (vLLM appends each one it keeps;
    #: a request it stops is finished and never scheduled again).
    tokens: list[int]
    blocks: list[int]
    #: Tokens the daemon's sequence holds (vLLM's ``num_computed_tokens``).
    computed: int = 0
    open: bool = False
    #: Prompt logprob rows gathered over prefill chunks: per prompt position
    #: 1.. ((token logprob, [(token, logprob)] best first), the token's rank).
    prompt_rows: list[Any] = field(default_factory=list)
    diag: Diag | None = None
    #: The daemon sequence must be (re)opened holding this many tokens
    #: before the request's next step (None: it is open as it should be).
    open_at: int | None = None
    #: The prefix the sequence was (re)opened with in this step: blocks other
    #: requests of the same step may still be writing.
    fresh_prefix: int = 0
    #: ``blocks`` msgpack-encoded, kept until the table changes: a step
    #: names every request's whole table (PROTOCOL.md §4.8), and encoding
    #: them all anew each step costs milliseconds at long contexts.
    packed_blocks: bytes | None = None
