"""The reference engine against a fake client that simulates paged KV blocks."""

from __future__ import annotations

from typing import Callable, Sequence

import pytest

from tacflow.engine import Engine, EngineError, Progress
from tacflow.errors import ContextTooLong, OutOfKvBlocks, UnknownSequence
from tacflow.protocol import AttentionPolicy, SamplingParams, StepEntry
from tacflow.results import (
    BackendInfo,
    HelloInfo,
    KvInfo,
    Limits,
    ModelInfo,
    StepOutput,
    StepResult,
    StepTiming,
)

BLOCK = 16


def blocks(n: int) -> int:
    return -(-n // BLOCK)


def toy_model(context: Sequence[int]) -> int:
    """A deterministic 'model': the next token depends on the whole context,
    so a recomputed sequence continues exactly as it would have."""
    h = 0
    for i, t in enumerate(context):
        h = (h * 31 + t * (i + 7)) % 1_000_003
    return 3 + h % 500


class FakeKvClient:
    """What the engine needs of a Client, with the daemon's KV accounting.

    Steps are atomic: one that needs more blocks than are free raises
    OutOfKvBlocks and changes nothing, as PROTOCOL.md §4.5 says. It also
    checks the engine's side of the protocol: one entry per sequence, a
    sampled token fed back (alone) in the very next step, the token budget,
    and that the preemption victim is the most recently opened sequence.
    """

    def __init__(
        self,
        total_blocks: int = 10_000,
        max_step_tokens: int = 65536,
        max_sequences: int = 4096,
        max_context: int = 4096,
        model: Callable[[Sequence[int]], int] = toy_model,
    ) -> None:
        self.info = HelloInfo(
            session=b"\0" * 16,
            instance_id="fake",
            protocol=(1, 0),
            daemon="fake",
            model=ModelInfo("toy", "llama", 512, 64, 2, 4, 2, 16, max_context, "f32"),
            backend=BackendInfo("cpu", "fake"),
            kv=KvInfo(BLOCK, total_blocks, total_blocks),
            attention_policies=("full",),
            lease_ms=30000,
            limits=Limits(max_sequences, 64, 1 << 30, 256, max_step_tokens),
        )
        self.total = total_blocks
        self.free = total_blocks
        self.model = model
        self.seqs: dict[int, list[int]] = {}
        self.sampling: dict[int, SamplingParams | None] = {}
        self.open_order: list[int] = []
        self.awaiting: dict[int, int] = {}  # seq -> sampled token not yet fed
        self.steps: list[list[StepEntry]] = []
        self.step_kinds: list[list[str]] = []  # "decode" / "prefill" per entry
        self.failed_steps = 0
        self.closes: list[int] = []
        self.victim: int | None = None
        self.max_open = 0

    def open_sequence(
        self, seq_id: int, attention: AttentionPolicy, sampling: SamplingParams | None, diagnostics: bool
    ) -> int:
        assert seq_id not in self.seqs
        self.seqs[seq_id] = []
        self.sampling[seq_id] = sampling
        self.open_order.append(seq_id)
        self.max_open = max(self.max_open, len(self.seqs))
        return 0

    def close_sequence(self, seq_id: int) -> None:
        if seq_id not in self.seqs:
            raise UnknownSequence("unknown_sequence", str(seq_id))
        if self.victim is not None:
            assert seq_id == self.victim, "preempted a sequence other than the newest"
            self.victim = None
        self.free += blocks(len(self.seqs.pop(seq_id)))
        self.open_order.remove(seq_id)
        self.awaiting.pop(seq_id, None)
        self.closes.append(seq_id)

    def step(self, entries: Sequence[StepEntry]) -> StepOutput:
        ids = [e.seq_id for e in entries]
        assert len(set(ids)) == len(ids), "a sequence appears twice in a step"
        assert all(e.tokens for e in entries) and all(e.positions is None for e in entries)
        assert sum(len(e.tokens) for e in entries) <= self.info.limits.max_step_tokens
        for seq, token in self.awaiting.items():
            assert seq in ids, f"sequence {seq} skipped its decode step"
        for e in entries:
            if e.seq_id in self.awaiting:
                assert list(e.tokens) == [self.awaiting[e.seq_id]] and e.sample
        for e in entries:
            if len(self.seqs[e.seq_id]) + len(e.tokens) > self.info.model.max_context:
                raise ContextTooLong("context_too_long", f"sequence {e.seq_id}")
        need = sum(blocks(len(self.seqs[e.seq_id]) + len(e.tokens)) - blocks(len(self.seqs[e.seq_id])) for e in entries)
        if need > self.free:
            self.failed_steps += 1
            self.victim = self.open_order[-1]
            raise OutOfKvBlocks("out_of_kv_blocks", "no room", {"needed": need, "free": self.free})
        self.free -= need
        self.step_kinds.append(["decode" if e.seq_id in self.awaiting else "prefill" for e in entries])
        self.awaiting.clear()
        self.steps.append(list(entries))
        return StepOutput([self._run(e) for e in entries], StepTiming(5, 50))

    def _run(self, e: StepEntry) -> StepResult:
        ctx = self.seqs[e.seq_id]
        ctx.extend(e.tokens)
        if not e.sample:
            return StepResult(e.seq_id, len(ctx))
        token = self.model(ctx)
        self.awaiting[e.seq_id] = token
        sp = self.sampling[e.seq_id]
        if sp is not None and sp.logprobs:
            return StepResult(e.seq_id, len(ctx), token, -0.5, ((token, -0.5), (1, -2.0))[: sp.logprobs])
        return StepResult(e.seq_id, len(ctx), token)


def reference(prompt: Sequence[int], n: int, stops: Sequence[int] = (), max_context: int = 4096) -> list[int]:
    ctx, out = list(prompt), []
    while len(out) < n and len(ctx) < max_context:
        t = toy_model(ctx)
        out.append(t)
        ctx.append(t)
        if t in stops:
            break
    return out


def prompts(lengths: Sequence[int]) -> list[list[int]]:
    return [[(i * 13 + j) % 400 + 3 for j in range(n)] for i, n in enumerate(lengths)]


def test_generates_what_the_model_says() -> None:
    fake = FakeKvClient()
    ps = prompts([5, 17, 1, 40])
    gens = Engine(fake).generate(ps, max_new_tokens=12)
    assert [g.prompt for g in gens] == ps
    for p, g in zip(ps, gens):
        assert g.tokens == reference(p, 12) and g.finish_reason == "length"
        assert g.timings and g.preemptions == 0 and g.logprobs is None
    assert fake.seqs == {} and fake.free == fake.total  # every sequence closed


def test_prefill_is_chunked_and_only_the_last_chunk_samples() -> None:
    fake = FakeKvClient()
    [p] = prompts([1000])
    [g] = Engine(fake, max_batch_tokens=300, prefill_chunk=256).generate([p], max_new_tokens=3)
    feeds = [(len(s[0].tokens), s[0].sample) for s in fake.steps]
    assert feeds == [(256, False), (256, False), (256, False), (232, True), (1, True), (1, True)]
    assert g.tokens == reference(p, 3)


def test_decodes_and_prefill_chunks_share_steps_within_budget() -> None:
    fake = FakeKvClient()
    ps = prompts([8, 8, 300, 300])
    Engine(fake, max_batch_tokens=100, prefill_chunk=64).generate(ps, max_new_tokens=20)
    assert all(sum(len(e.tokens) for e in s) <= 100 for s in fake.steps)
    assert any(set(k) == {"decode", "prefill"} for k in fake.step_kinds), "no mixed step"
    for kinds in fake.step_kinds:  # decode tokens first, then prompt chunks
        assert kinds == sorted(kinds)


def test_stop_tokens_finish_early() -> None:
    [p] = prompts([10])
    free_run = reference(p, 30)
    stop = free_run[4]
    [g] = Engine(FakeKvClient()).generate([p], max_new_tokens=30, stop_token_ids=[stop])
    assert g.finish_reason == "stop" and g.tokens == free_run[: free_run.index(stop) + 1]


def test_context_limit_finishes_with_length() -> None:
    fake = FakeKvClient(max_context=20)
    [p] = prompts([15])
    [g] = Engine(fake).generate([p], max_new_tokens=100)
    # The last sampled token is returned but never fed (it would not fit).
    assert g.finish_reason == "length" and len(p) + len(g.tokens) == 20
    assert g.tokens == reference(p, 100, max_context=20)
    with pytest.raises(ValueError, match="context"):
        Engine(fake).generate(prompts([21]), max_new_tokens=1)


def test_preemption_recomputes_and_changes_nothing() -> None:
    ps = prompts([20, 40, 30, 60, 25, 50])
    want = [reference(p, 40) for p in ps]
    fake = FakeKvClient(total_blocks=14)  # 224 tokens for ~ 6 * 80 needed
    gens = Engine(fake, max_batch_tokens=128, prefill_chunk=32).generate(ps, max_new_tokens=40)
    assert [g.tokens for g in gens] == want
    assert fake.failed_steps > 0 and sum(g.preemptions for g in gens) > 0
    assert fake.seqs == {} and fake.free == fake.total


def test_preemption_with_sampling_logprobs_keeps_lists_aligned() -> None:
    ps = prompts([30, 30, 30])
    fake = FakeKvClient(total_blocks=7)
    sp = SamplingParams(logprobs=2)
    gens = Engine(fake).generate(ps, max_new_tokens=30, sampling=sp)
    assert sum(g.preemptions for g in gens) > 0
    for p, g in zip(ps, gens):
        assert g.tokens == reference(p, 30)
        assert g.logprobs is not None and len(g.logprobs) == len(g.tokens)
        assert g.top_logprobs is not None and g.top_logprobs[0] == ((g.tokens[0], -0.5), (1, -2.0))


def test_a_sequence_that_cannot_fit_alone_is_a_clear_error() -> None:
    fake = FakeKvClient(total_blocks=2)  # 32 tokens
    with pytest.raises(EngineError, match="does not fit"):
        Engine(fake).generate(prompts([20, 20]), max_new_tokens=30)
    assert fake.seqs == {}  # nothing left open


def test_max_running_and_limits_are_respected() -> None:
    fake = FakeKvClient(max_sequences=3, max_step_tokens=50)
    gens = Engine(fake, max_running=10, max_batch_tokens=1000).generate(prompts([30] * 7), max_new_tokens=5)
    assert fake.max_open == 3
    assert all(sum(len(e.tokens) for e in s) <= 50 for s in fake.steps)
    assert all(g.finish_reason == "length" for g in gens)


def test_progress_callback_and_timings() -> None:
    seen: list[Progress] = []
    fake = FakeKvClient()
    gens = Engine(fake, progress=seen.append).generate(prompts([4, 4]), max_new_tokens=3)
    assert len(seen) == len(fake.steps) == 3
    assert [p.step.index for p in seen] == [0, 1, 2]
    assert seen[-1].finished == seen[-1].total == 2 and seen[-1].running == 0
    rec = seen[0].step
    assert (rec.queued_us, rec.run_us, rec.num_sequences, rec.num_tokens) == (5, 50, 2, 8)
    assert gens[0].timings == [p.step for p in seen]


def test_zero_new_tokens_and_empty_prompts() -> None:
    fake = FakeKvClient()
    [g] = Engine(fake).generate(prompts([5]), max_new_tokens=0)
    assert g.tokens == [] and g.finish_reason == "length" and fake.steps == []
    with pytest.raises(ValueError, match="empty"):
        Engine(fake).generate([[]], max_new_tokens=1)
