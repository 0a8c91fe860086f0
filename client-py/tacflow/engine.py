"""A small reference scheduler: continuous batching over a :class:`Client`.

The daemon executes steps; deciding what runs in each step is the client's
job. This engine is the simplest scheduler that exercises the
protocol the way a real server does, and a reference for integrating one:

- every step gives one decode token to each running sequence, then fills the
  rest of the token budget with prompt chunks (of running sequences first,
  then of newly admitted ones), so prefill and decode share steps;
- a prompt's last chunk samples (``sample=True``), earlier chunks do not; a
  sampled token is not cached by the daemon until it is fed back in the next
  step (PROTOCOL.md §4.5);
- when a step fails with :class:`OutOfKvBlocks` — which changes nothing on the
  daemon — the most recently admitted sequence is preempted: closed, put back
  at the head of the queue with its prompt and the tokens generated so far,
  to be recomputed later (vLLM's recompute preemption). Admissions stop until
  a sequence finishes, so the victim is not readmitted into the same shortage.
  A sequence that does not fit even alone is an :class:`EngineError`.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

from .errors import OutOfKvBlocks, TacflowError
from .protocol import AttentionPolicy, Full, SamplingParams, StepEntry
from .results import HelloInfo, StepOutput, StepResult


class EngineClient(Protocol):
    """What the engine needs of a client (a fake one in tests)."""

    @property
    def info(self) -> HelloInfo: ...

    def open_sequence(
        self, seq_id: int, attention: AttentionPolicy, sampling: SamplingParams | None, diagnostics: bool
    ) -> int: ...

    def close_sequence(self, seq_id: int) -> None: ...

    def step(self, entries: Sequence[StepEntry]) -> StepOutput: ...


class EngineError(RuntimeError):
    """The engine cannot go on (a sequence that cannot fit, a reply that makes no sense)."""


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step of a ``generate`` call, as the client saw it."""

    index: int
    wall_s: float  # round trip, client side
    queued_us: int  # daemon side: waiting for the executor
    run_us: int  # daemon side: running
    num_sequences: int
    num_tokens: int
    preemptions: int  # preemptions it took to make this step fit


@dataclass
class Generation:
    """The outcome of one prompt."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token) or "length"
    logprobs: list[float | None] | None = None  # per generated token, if asked
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None
    timings: list[StepRecord] = field(default_factory=list)  # steps it took part in
    preemptions: int = 0


@dataclass(frozen=True, slots=True)
class Progress:
    """Passed to the progress callback after every step."""

    step: StepRecord
    running: int
    waiting: int
    finished: int
    total: int
    preemptions: int


@dataclass(eq=False)
class _Seq:
    gen: Generation
    tokens: list[int]  # prompt + generated: what the daemon must have seen
    seq_id: int = -1
    cached: int = 0  # tokens the daemon holds for it
    admitted: int = -1  # admission order, for choosing the preemption victim

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.cached


class Engine:
    """Continuous batching over one client session (see the module doc)."""

    def __init__(
        self,
        client: EngineClient,
        max_batch_tokens: int = 2048,
        max_running: int = 64,
        prefill_chunk: int = 512,
        progress: Callable[[Progress], None] | None = None,
        seq_id_start: int = 1,
    ) -> None:
        if min(max_batch_tokens, max_running, prefill_chunk) < 1:
            raise ValueError("max_batch_tokens, max_running and prefill_chunk must be >= 1")
        info = client.info
        self.client = client
        self.max_batch_tokens = min(max_batch_tokens, info.limits.max_step_tokens)
        # Every running sequence must get its decode token in every step.
        self.max_running = min(max_running, info.limits.max_sequences, self.max_batch_tokens)
        self.prefill_chunk = prefill_chunk
        self.max_context = info.model.max_context
        self.progress = progress
        self._next_seq_id = seq_id_start
        self._admissions = 0

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        attention: AttentionPolicy | None = None,
        stop_token_ids: Iterable[int] = (),
    ) -> list[Generation]:
        """Generates up to ``max_new_tokens`` for every prompt; results in prompt order."""
        run = _Run(self, sampling, attention or Full(), frozenset(stop_token_ids), max_new_tokens)
        return run.generate(prompts)


class _Run:
    """The state of one ``generate`` call: queues, the step loop, preemption."""

    def __init__(
        self,
        engine: Engine,
        sampling: SamplingParams | None,
        attention: AttentionPolicy,
        stops: frozenset[int],
        max_new_tokens: int,
    ) -> None:
        self.e = engine
        self.client = engine.client
        self.sampling = sampling
        self.attention = attention
        self.stops = stops
        self.max_new = max_new_tokens
        self.want_logprobs = sampling is not None and sampling.logprobs > 0
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: list[_Seq] = []
        self.admission_blocked = False
        self.finished = 0
        self.total = 0
        self.preemptions = 0
        self.steps = 0

    def generate(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        gens = []
        for i, prompt in enumerate(prompts):
            tokens = [int(t) for t in prompt]
            if not tokens:
                raise ValueError(f"prompt {i} is empty")
            if len(tokens) > self.e.max_context:
                raise ValueError(
                    f"prompt {i} has {len(tokens)} tokens, the model's context is {self.e.max_context}"
                )
            gen = Generation(prompt=list(tokens))
            if self.want_logprobs:
                gen.logprobs, gen.top_logprobs = [], []
            gens.append(gen)
            if self.max_new <= 0:
                gen.finish_reason = "length"
            else:
                self.waiting.append(_Seq(gen, tokens))
        self.total = len(self.waiting)
        try:
            while self.waiting or self.running:
                self._one_step()
        except BaseException:
            self._close_all()
            raise
        return gens

    # ------------------------------------------------------------ planning

    def _plan(self) -> list[tuple[_Seq, int, bool]]:
        """(sequence, tokens to feed, sample) for the next step, within budget."""
        plan: list[tuple[_Seq, int, bool]] = []
        left = self.e.max_batch_tokens
        # Decode tokens first: one for every running sequence that has one.
        for s in self.running:
            if s.pending == 1 and left > 0:
                plan.append((s, 1, True))
                left -= 1
        # Then prompt chunks of running sequences, oldest first.
        for s in self.running:
            if s.pending > 1 and left > 0:
                left -= self._chunk(s, left, plan)
        # Then new admissions, unless a preemption is waiting for room.
        while (
            self.waiting
            and left > 0
            and len(self.running) < self.e.max_running
            and not (self.admission_blocked and self.running)
        ):
            s = self._admit()
            left -= self._chunk(s, left, plan)
        return plan

    def _chunk(self, s: _Seq, left: int, plan: list[tuple[_Seq, int, bool]]) -> int:
        n = min(s.pending, self.e.prefill_chunk, left)
        plan.append((s, n, s.cached + n == len(s.tokens)))
        return n

    def _admit(self) -> _Seq:
        s = self.waiting.popleft()
        s.seq_id = self.e._next_seq_id
        self.e._next_seq_id += 1
        self.client.open_sequence(s.seq_id, self.attention, self.sampling, False)
        s.cached = 0
        s.admitted = self.e._admissions
        self.e._admissions += 1
        self.running.append(s)
        return s

    # ------------------------------------------------------------ one step

    def _one_step(self) -> None:
        tries = 0
        while True:
            plan = self._plan()
            if not plan:
                raise EngineError("nothing to schedule: the token budget admits no work")
            entries = [
                StepEntry(s.seq_id, s.tokens[s.cached : s.cached + n], None, sample)
                for s, n, sample in plan
            ]
            t0 = time.perf_counter()
            try:
                out = self.client.step(entries)
            except OutOfKvBlocks as exc:
                self._preempt(exc)
                tries += 1
                continue
            wall = time.perf_counter() - t0
            break
        if len(out.results) != len(plan):
            raise EngineError(f"step sent {len(plan)} entries, got {len(out.results)} results")
        record = StepRecord(
            self.steps,
            wall,
            out.timing.queued_us,
            out.timing.run_us,
            len(plan),
            sum(n for _, n, _ in plan),
            tries,
        )
        self.steps += 1
        for (s, n, sample), result in zip(plan, out.results):
            self._apply(s, n, sample, result, record)
        if self.e.progress is not None:
            self.e.progress(
                Progress(record, len(self.running), len(self.waiting), self.finished, self.total, self.preemptions)
            )

    def _apply(self, s: _Seq, n: int, sample: bool, result: StepResult, record: StepRecord) -> None:
        s.cached += n
        if result.seq_id != s.seq_id or result.num_tokens != s.cached:
            raise EngineError(
                f"result for sequence {result.seq_id} with {result.num_tokens} tokens, "
                f"expected sequence {s.seq_id} with {s.cached}"
            )
        gen = s.gen
        gen.timings.append(record)
        if not sample:
            return
        if result.token is None:
            raise EngineError(f"sequence {s.seq_id} sampled no token")
        token = int(result.token)
        s.tokens.append(token)
        gen.tokens.append(token)
        if gen.logprobs is not None and gen.top_logprobs is not None:
            gen.logprobs.append(result.logprob)
            gen.top_logprobs.append(result.top_logprobs)
        if token in self.stops:
            self._finish(s, "stop")
        elif len(gen.tokens) >= self.max_new or len(s.tokens) >= self.e.max_context:
            self._finish(s, "length")

    def _finish(self, s: _Seq, reason: str) -> None:
        s.gen.finish_reason = reason
        self.running.remove(s)
        self.client.close_sequence(s.seq_id)
        self.finished += 1
        self.admission_blocked = False  # its blocks are free again

    # ------------------------------------------------------------ preemption

    def _preempt(self, exc: OutOfKvBlocks) -> None:
        if len(self.running) <= 1:
            s = self.running[0] if self.running else None
            what = f"a sequence of {len(s.tokens)} tokens" if s else "the step"
            raise EngineError(
                f"{what} does not fit in the KV cache even alone "
                f"(needed {exc.detail.get('needed', '?')} blocks, "
                f"{exc.detail.get('free', '?')} free): {exc.message}"
            ) from exc
        victim = max(self.running, key=lambda s: s.admitted)
        self.running.remove(victim)
        self.client.close_sequence(victim.seq_id)
        victim.cached = 0
        victim.gen.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)
        self.admission_blocked = True

    def _close_all(self) -> None:
        for s in self.running:
            try:
                self.client.close_sequence(s.seq_id)
            except TacflowError:
                pass
        self.running.clear()
