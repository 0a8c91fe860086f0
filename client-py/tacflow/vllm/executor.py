"""vLLM's ``Executor`` over tacflowd: each ``execute_model`` is one ``step``.

How vLLM's state maps onto the daemon's:

- **KV blocks.** At start the executor reports a KV cache of exactly the
  daemon's free blocks (one full-attention spec per layer, the daemon's
  block size), and once vLLM has sized its pool it reserves that many
  blocks in the daemon (``reserve_blocks``, PROTOCOL.md §4.8): vLLM's block
  id ``b`` is reservation id ``b``. vLLM's block manager, prefix cache and
  preemption then run unchanged: every step entry names the request's whole
  block table as the scheduler gave it.
- **Requests.** Each vLLM request is a named-block sequence of the daemon,
  opened when the scheduler first schedules it (with the tokens vLLM's
  prefix cache already holds as its ``prefix``), reopened the same way when
  it resumes after a preemption, closed when vLLM reports it finished or
  aborted.
- **Sampling** happens in the daemon with the request's ``SamplingParams``
  mapped by :mod:`tacflow.vllm.mapping`; an option the daemon cannot honour
  never gets here (the platform refuses the request).

The executor holds one session; a thread renews its lease while vLLM is
idle.

**A daemon restart under a running vLLM.** When the executor finds its
daemon gone (a step's reply never comes and a probe finds the daemon
silent or restarted; a renewal or health check fails), it waits for a new
daemon instance at the same address, up to ``TACFLOW_VLLM_RESTART_WAIT_S``
seconds (default 60; 0 fails at once), logging while it waits. It then
opens a new session and checks the new daemon as at start (protocol, the
same model, vLLM's limits, the block size), reserves vLLM's pool again
and carries on; a daemon that does not come back in time, or comes back
with another model or fewer free blocks, fails the engine with a message
that says so.

Every block id's contents died with the old instance, but vLLM does not
know it: its prefix cache still maps prompt prefixes onto those ids and
its running requests still count their tokens as computed.
:class:`~tacflow.vllm.blocks.BlockValidity` tracks the ids written since
the new instance started. Whenever a request's daemon sequence is
(re)opened with the tokens vLLM says its blocks hold, the prefix stops at
the first block not written in this instance and the executor prefills
the rest of those tokens itself (daemon steps of its own, without
sampling, chunked to the daemon's step budget) before vLLM's step runs.
Nothing ever reads lost KV, and vLLM's stale prefix cache entries are
refilled by the first request that hits them.

Requests running at the loss are **recomputed transparently**, not
failed: each is reopened in the new daemon and its whole history (prompt
and the tokens sampled so far, which the executor keeps) is prefilled
before the step that was cut off runs again. Failing them would need a
way for an executor to finish a request with an error, and vLLM 0.32.0
gives it none. Its scheduler finishes a request with ``FINISHED_ERROR``
only for a grammar error, an encoder-cache mismatch, an encoder
connector's lost input, or a KV transfer connector's load failure
(``KVConnectorOutput.invalid_block_ids`` under
``kv_load_failure_policy="fail"``); without a KV connector configured,
``Scheduler.__init__`` (``vllm/v1/core/sched/scheduler.py``) sets
``recompute_kv_load_failures = True``, so the same report only
reschedules the request. Declaring a KV connector that transfers nothing,
just to borrow its failure path, would run connector hooks in every
scheduler step for a daemon that owns its KV (the platform refuses KV
connectors), and an exception from ``execute_model`` fails the whole
engine. Greedy and seeded requests come out as they would have without
the restart (the daemon's draws are keyed by seed and position); an
unseeded request gets a fresh seed from the new daemon for the rest of
its tokens (still valid samples of its distribution).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np

from ..errors import TacflowError
from ..protocol import StepOutput, StepTiming, pack_blocks, pack_entry
from . import daemon_address
from .blocks import BlockValidity
from .checks import StartupRefused, check_options, check_vllm_version
from .link import IDLE_CHECK_S, RESTART_WAIT_DEFAULT_S, RESTART_WAIT_ENV, DaemonLink, DaemonLost
from .mapping import external_request_id, plan_request, rank_in_top
from .state import Diag, ReqState

from vllm import __version__ as VLLM_VERSION

# Before vLLM's internals: another release may have moved them (see platform).
check_vllm_version(VLLM_VERSION)

from vllm.v1.executor.abstract import Executor  # noqa: E402
from vllm.v1.outputs import (  # noqa: E402
    EMPTY_MODEL_RUNNER_OUTPUT,
    LogprobsLists,
    LogprobsTensors,
    ModelRunnerOutput,
)

# Under vLLM's logger, so that its configuration (format, level) applies.
logger = logging.getLogger("vllm.tacflow")

#: Where per-request attention diagnostics go (JSON lines), when set.
DIAGNOSTICS_ENV = "TACFLOW_VLLM_DIAGNOSTICS"

_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


class TacflowExecutor(DaemonLink, Executor):
    """Runs vLLM's scheduled batches on tacflowd (see the module's text)."""

    uses_ray = False
    supports_pp = False

    # ------------------------------------------------------------ start-up

    def _init_executor(self) -> None:
        check_vllm_version(VLLM_VERSION)
        check_options(self.vllm_config)
        self._timeout_s = float(os.environ.get("TACFLOW_VLLM_TIMEOUT_S", "600"))
        self._restart_wait_s = float(os.environ.get(RESTART_WAIT_ENV, RESTART_WAIT_DEFAULT_S))
        self._client = self._connect(daemon_address(), 10.0)
        info = self._client.info
        self._check_daemon(info)
        self.info = info
        #: Which block ids hold what vLLM thinks (all, until a daemon is lost).
        self.validity = BlockValidity(info.kv.block_size)
        #: Tokens prefilled again after a restart (lost KV), for logs and tests.
        self.recomputed_tokens = 0
        self._lock = threading.RLock()
        self._requests: dict[str, ReqState] = {}
        self._next_seq = 1
        self._reserved = 0
        self._failure_callbacks: list[Callable[[], None]] = []
        self._failed: BaseException | None = None
        self._closed = threading.Event()
        self._last_request = time.monotonic()
        self._diag_path = os.environ.get(DIAGNOSTICS_ENV) or None
        #: Finished requests' diagnostics, by vLLM request id (the latest few).
        self.request_stats: dict[str, dict[str, Any]] = {}
        #: Per vLLM step, for the overhead benchmark (bench/vllm/run.py):
        #: (requests, tokens, daemon run µs, daemon queue µs, the daemon
        #: round trip µs as the client saw it, the whole execute_model µs).
        self.step_log: list[tuple[int, int, int, int, int, int]] = []
        self._round_trip_ns = 0
        #: When the step in flight was sent (None between steps), and why
        #: the daemon is gone if a probe during it found so.
        self._step_started: float | None = None
        self._lost: str | None = None
        #: vLLM steps run as several daemon steps (see _step_in_waves).
        self.split_steps = 0
        self._keepalive = threading.Thread(
            target=self._keep_alive, name="tacflow-keepalive", daemon=True
        )
        self._keepalive.start()
        logger.info(
            "tacflow: executing on tacflowd at %s (%s, model %s, %s backend, %d KV blocks free)",
            self._client.address,
            info.daemon,
            info.model.name,
            info.backend.kind,
            info.kv.free_blocks,
        )

    def _kv_spec(self) -> Any:
        import torch
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        m = self.info.model
        return FullAttentionSpec(
            block_size=self.info.kv.block_size,
            num_kv_heads=m.num_kv_heads,
            head_size=m.head_dim,
            dtype=getattr(torch, _DTYPES.get(m.dtype, "float32")),
        )

    def _layer_names(self) -> list[str]:
        # Names only group the layers into one KV cache group in vLLM.
        return [f"model.layers.{i}.self_attn.attn" for i in range(self.info.model.num_layers)]

    def get_kv_cache_specs(self) -> list[dict[str, Any]]:
        spec = self._kv_spec()
        return [{name: spec for name in self._layer_names()}]

    def determine_available_memory(self) -> list[int]:
        """The daemon's free blocks, in the bytes vLLM divides back into
        exactly that many blocks (its pool is the daemon's reservation)."""
        with self._lock:
            free = self._client.stats().kv_free_blocks
        return [free * self._kv_spec().page_size_bytes * self.info.model.num_layers]

    def get_supported_kv_cache_layouts(self) -> list[list[str]]:
        # The layout is the daemon's own business: vLLM never touches the cache.
        return [["LBNHC"]]

    def set_kv_cache_layout(self, layout_name: str) -> None:
        pass

    def initialize_from_config(self, kv_cache_configs: list[Any]) -> None:
        want = int(kv_cache_configs[0].num_blocks)
        with self._lock:
            if want > self._reserved:
                try:
                    self._reserved = self._client.reserve_blocks(want - self._reserved)
                except TacflowError as exc:
                    raise StartupRefused(
                        f"tacflowd could not reserve {want} KV blocks for vLLM: {exc} "
                        "(lower --num-gpu-blocks-override or start tacflowd with more --kv-blocks)"
                    ) from exc
        logger.info("tacflow: reserved %d KV blocks of %d tokens", self._reserved, self.info.kv.block_size)

    def compile_or_warm_up_model(self) -> None:
        pass  # the daemon warmed up before it accepted clients

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    # ------------------------------------------------------------ steps

    def execute_model(self, scheduler_output: Any, non_block: bool = False) -> Any:
        if not non_block:
            return self._execute(scheduler_output)
        future: Future = Future()
        try:
            future.set_result(self._execute(scheduler_output))
        except BaseException as exc:
            future.set_exception(exc)
        return future

    def sample_tokens(self, grammar_output: Any, non_block: bool = False) -> Any:
        # execute_model always returns its sampled tokens, so vLLM calls this
        # only for a structured-output request, which the platform refuses.
        if grammar_output is not None and grammar_output.structured_output_request_ids:
            raise RuntimeError("tacflow: structured outputs reached the executor; they are refused per request")
        out = EMPTY_MODEL_RUNNER_OUTPUT
        if non_block:
            future: Future = Future()
            future.set_result(out)
            return future
        return out

    def take_draft_token_ids(self) -> None:
        return None

    def _execute(self, so: Any) -> ModelRunnerOutput:
        if self._failed is not None:
            raise RuntimeError(f"tacflow: the daemon failed earlier: {self._failed}")
        t0 = time.perf_counter_ns()
        with self._lock:
            try:
                out, step = self._execute_locked(so)
            except (TacflowError, DaemonLost, StartupRefused) as exc:
                self._fail(exc)
                raise
            finally:
                self._last_request = time.monotonic()
        if step is not None:
            total = (time.perf_counter_ns() - t0) // 1000
            self.step_log.append(
                (
                    len(out.req_ids),
                    so.total_num_scheduled_tokens,
                    step.timing.run_us,
                    step.timing.queued_us,
                    self._round_trip_ns // 1000,
                    total,
                )
            )
            if len(self.step_log) > 100_000:
                del self.step_log[: len(self.step_log) // 2]
        return out

    def _execute_locked(self, so: Any) -> tuple[ModelRunnerOutput, Any]:
        if time.monotonic() - self._last_request > IDLE_CHECK_S:
            self._with_daemon(lambda: self._quick(self._client.ping))
        for req_id in so.finished_req_ids:
            self._finish(req_id)
        for new in so.scheduled_new_reqs:
            self._add(new)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            r = self._requests[req_id]
            new_blocks = cached.new_block_ids[i]
            computed = cached.num_computed_tokens[i]
            reopen = computed != r.computed
            # A request that was not in the previous step comes with all its
            # tokens (vLLM's V1 runner contract): the truth after a
            # preemption, or after a streaming-input session's update (which
            # drops the last sampled token and extends the prompt).
            tokens = cached.all_token_ids.get(req_id)
            if tokens is not None and tokens != r.tokens:
                r.tokens = list(tokens)
                r.prompt_len = len(tokens) - cached.num_output_tokens[i]
                reopen = True
            if req_id in cached.resumed_req_ids:
                # Preempted and scheduled again: a fresh block table, and the
                # tokens vLLM's prefix cache still holds as the prefix.
                r.blocks = list(new_blocks[0]) if new_blocks is not None else []
                r.packed_blocks = None
                reopen = True
            elif new_blocks is not None and new_blocks[0]:
                r.blocks.extend(new_blocks[0])
                r.packed_blocks = None
            if reopen:
                r.open_at = computed
        if not so.num_scheduled_tokens:
            return EMPTY_MODEL_RUNNER_OUTPUT, None

        req_ids = list(so.num_scheduled_tokens)
        samples, step = self._with_daemon(lambda: self._run(req_ids, so))

        sampled: list[list[int]] = []
        width = 0
        for req_id in req_ids:
            self._requests[req_id].fresh_prefix = 0
        prompt_lp: dict[str, LogprobsTensors | None] = {}
        for req_id, res, sample in zip(req_ids, step.results, samples):
            r = self._requests[req_id]
            n = so.num_scheduled_tokens[req_id]
            if r.plan.prompt_logprobs is not None:
                self._gather_prompt_logprobs(r, res, n, prompt_lp)
            self.validity.written(r.blocks, r.computed, r.computed + n)
            r.computed += n
            if res.attention is not None and r.diag is not None:
                r.diag.add(res.attention)
            if sample and res.token is not None:
                r.tokens.append(res.token)
                sampled.append([res.token])
                if r.plan.logprobs is not None:
                    width = max(width, r.plan.logprobs + 1)
            else:
                sampled.append([])
        logprobs = self._logprobs(req_ids, step.results, samples, width) if width else None
        out = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            logprobs=logprobs,
            prompt_logprobs_dict=prompt_lp,
        )
        return out, step

    def _run(self, req_ids: list[str], so: Any) -> tuple[list[bool], Any]:
        """The daemon's part of one vLLM step: (re)opens the sequences that
        need it, then runs the step. Safe to repeat after a recovery."""
        for req_id in req_ids:
            r = self._requests[req_id]
            if r.open_at is not None:
                self._reopen(r, r.open_at)
        entries = []
        samples = []
        for req_id in req_ids:
            r = self._requests[req_id]
            n = so.num_scheduled_tokens[req_id]
            end = r.computed + n
            if end > len(r.tokens):
                raise RuntimeError(
                    f"tacflow: vLLM scheduled {n} tokens of request {req_id} past the "
                    f"{len(r.tokens)} it has (speculative tokens are not supported)"
                )
            sample = end == len(r.tokens)
            samples.append(sample)
            if r.packed_blocks is None:
                r.packed_blocks = pack_blocks(r.blocks)
            entries.append(pack_entry(r.seq_id, r.tokens[r.computed : end], sample, r.packed_blocks))
        return samples, self._step_in_waves(req_ids, entries, so)

    def _step_in_waves(self, req_ids: list[str], entries: list[bytes], so: Any) -> Any:
        """Runs vLLM's step as one daemon step, or as several when vLLM's
        prefix cache gave a request blocks that another request of the same
        step is still filling (vLLM registers a block in its cache as soon as
        it is scheduled to be full). vLLM's own runner writes every KV slot of
        a layer before any attention reads them; the daemon refuses such a
        step instead (PROTOCOL.md §4.8), so the readers run in a later daemon
        step, after their writers. Results come back in vLLM's order."""
        bs = self.info.kv.block_size
        readers: dict[int, set[int]] = {}
        for i, req_id in enumerate(req_ids):
            r = self._requests[req_id]
            if r.fresh_prefix:
                readers[i] = set(r.blocks[: -(-r.fresh_prefix // bs)])
        waves = [list(range(len(entries)))]
        if readers:
            # Which entry writes which block in this step...
            writer_of: dict[int, list[int]] = {}
            for j, req_id in enumerate(req_ids):
                r = self._requests[req_id]
                n = so.num_scheduled_tokens[req_id]
                for b in r.blocks[r.computed // bs : -(-(r.computed + n) // bs)]:
                    writer_of.setdefault(b, []).append(j)
            # ...so each reader waits for the writers of the blocks it reads.
            deps = {
                i: {j for b in blocks for j in writer_of.get(b, ()) if j != i}
                for i, blocks in readers.items()
            }
            waves, pending, done = [], list(range(len(entries))), set()
            while pending:
                wave = [i for i in pending if deps.get(i, done) <= done]
                if not wave:
                    raise RuntimeError("tacflow: requests of one step read each other's new KV blocks")
                waves.append(wave)
                done.update(wave)
                pending = [i for i in pending if i not in done]
        t0 = time.perf_counter_ns()
        self._step_started = time.monotonic()
        try:
            if len(waves) == 1:
                out = self._client.step_packed(entries, abandon=self._abandon)
                self._round_trip_ns = time.perf_counter_ns() - t0
                return out
            return self._steps(entries, waves, t0)
        finally:
            self._step_started = None

    def _abandon(self) -> str | None:
        return self._lost

    def _steps(self, entries: list[bytes], waves: list[list[int]], t0: int) -> Any:
        results: list[Any] = [None] * len(entries)
        run_us = queued_us = 0
        for wave in waves:
            out = self._client.step_packed([entries[i] for i in wave], abandon=self._abandon)
            run_us += out.timing.run_us
            queued_us += out.timing.queued_us
            for i, res in zip(wave, out.results):
                results[i] = res
        self._round_trip_ns = time.perf_counter_ns() - t0
        self.split_steps += 1
        return StepOutput(results, StepTiming(queued_us, run_us))

    def _add(self, new: Any) -> None:
        if new.prompt_token_ids is None:
            raise RuntimeError(f"tacflow: request {new.req_id} has no prompt token ids (prompt embeddings are not supported)")
        info = self.info
        plan = plan_request(new.sampling_params, info.model.vocab_size, info.attention_policies, info.backend.kind)
        seq_id = self._next_seq
        self._next_seq += 1
        prompt = list(new.prompt_token_ids)
        r = ReqState(
            req_id=new.req_id,
            seq_id=seq_id,
            plan=plan,
            prompt_len=len(prompt),
            tokens=prompt,
            blocks=list(new.block_ids[0]),
            diag=Diag() if plan.diagnostics else None,
        )
        self._requests[new.req_id] = r
        r.open_at = new.num_computed_tokens

    def _reopen(self, r: ReqState, computed: int) -> None:
        """(Re)opens the request's daemon sequence holding its first
        ``computed`` tokens, which vLLM says its blocks already hold. Those
        its blocks do not hold in this daemon instance (lost in a restart)
        are prefilled again first."""
        c = self._client
        if r.open:
            c.close_sequence(r.seq_id)
            r.open = False
        usable = self.validity.usable_prefix(r.blocks, computed)
        c.open_sequence(
            r.seq_id,
            attention=r.plan.attention,
            sampling=r.plan.sampling,
            diagnostics=r.plan.diagnostics,
            blocks="named",
            prefix=r.tokens[:usable],
            prompt_len=r.prompt_len,
        )
        r.open = True
        if usable < computed:
            self._prefill_lost(r, usable, computed)
        r.open_at = None
        r.computed = computed
        r.fresh_prefix = computed
        del r.prompt_rows[max(computed - 1, 0) :]

    def _prefill_lost(self, r: ReqState, start: int, end: int) -> None:
        """Writes tokens ``start..end`` of the request into its blocks again,
        in daemon steps of the executor's own that sample nothing (at most
        the daemon's step budget each): vLLM counts them as computed, but
        their KV died with an earlier daemon instance."""
        if r.packed_blocks is None:
            r.packed_blocks = pack_blocks(r.blocks)
        budget = max(int(self.info.limits.max_step_tokens), 1)
        for s in range(start, end, budget):
            e = min(s + budget, end)
            entry = pack_entry(r.seq_id, r.tokens[s:e], False, r.packed_blocks)
            self._step_started = time.monotonic()
            try:
                self._client.step_packed([entry], abandon=self._abandon)
            finally:
                self._step_started = None
            self.validity.written(r.blocks, s, e)
            self.recomputed_tokens += e - s
        logger.info(
            "tacflow: request %s: prefilled tokens %d..%d again (their KV blocks were lost with the daemon)",
            r.req_id, start, end,
        )

    def _finish(self, req_id: str) -> None:
        r = self._requests.get(req_id)
        if r is None:
            return
        self._with_daemon(lambda: self._close(r))
        del self._requests[req_id]
        if r.diag is not None:
            summary = {
                "request_id": req_id,
                "external_request_id": external_request_id(req_id),
                "output_tokens": len(r.tokens) - r.prompt_len,
            }
            summary.update(r.diag.summary())
            self.request_stats[req_id] = summary
            if len(self.request_stats) > 4096:
                self.request_stats.pop(next(iter(self.request_stats)))
            if self._diag_path:
                with open(self._diag_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(summary) + "\n")

    def _close(self, r: ReqState) -> None:
        if r.open:
            self._client.close_sequence(r.seq_id)
            r.open = False

    # ------------------------------------------------------------ logprobs

    def _logprobs(self, req_ids: list[str], results: list[Any], samples: list[bool], width: int) -> LogprobsLists:
        n = len(req_ids)
        ids = np.zeros((n, width), dtype=np.int32)
        lps = np.full((n, width), -np.inf, dtype=np.float32)
        ranks = np.ones(n, dtype=np.int32)
        for i, (req_id, res, sample) in enumerate(zip(req_ids, results, samples)):
            r = self._requests[req_id]
            if not sample or res.token is None or r.plan.logprobs is None:
                continue
            ids[i, 0] = res.token
            lps[i, 0] = res.logprob
            for j, (t, lp) in enumerate(res.top_logprobs[: width - 1]):
                ids[i, j + 1] = t
                lps[i, j + 1] = lp
            ranks[i] = res.rank if res.rank is not None else rank_in_top(res.token, res.logprob, res.top_logprobs)
        return LogprobsLists(ids, lps, ranks)

    def _gather_prompt_logprobs(self, r: ReqState, res: Any, n: int, out: dict[str, Any]) -> None:
        """vLLM returns a request's prompt logprobs once, when its prefill
        completes: rows for prompt positions 1.., each the token's logprob
        and the top ``k``."""
        import torch

        # The daemon's element for the token at position q is scored from
        # row q - 1; vLLM's rows start at position 1.
        ranks_in = res.prompt_ranks
        for e, row in enumerate(res.prompt_logprobs):
            if r.computed + e >= 1:
                r.prompt_rows.append((row, ranks_in[e] if e < len(ranks_in) else None))
        if r.computed + n < r.prompt_len:
            return
        k = r.plan.prompt_logprobs or 0
        rows = r.prompt_rows[: max(r.prompt_len - 1, 0)]
        m = len(rows)
        ids = torch.zeros((m, k + 1), dtype=torch.int32)
        lps = torch.full((m, k + 1), float("-inf"), dtype=torch.float32)
        ranks = torch.ones(m, dtype=torch.int32)
        for i, (row, rank) in enumerate(rows):
            token = r.tokens[i + 1]
            ids[i, 0] = token
            if row is None:
                continue
            lp, top = row
            lps[i, 0] = lp
            for j, (t, v) in enumerate(top[:k]):
                ids[i, j + 1] = t
                lps[i, j + 1] = v
            ranks[i] = rank if rank is not None else rank_in_top(token, lp, top)
        out[r.req_id] = LogprobsTensors(ids, lps, ranks)
        r.prompt_rows = []

    # ------------------------------------------------------------ the rest

    def collective_rpc(
        self,
        method: str | Callable[..., Any],
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        non_block: bool = False,
    ) -> Any:
        """vLLM's calls to its workers. There is no worker: the calls this
        executor can answer are answered here; any other is refused by name
        rather than silently ignored."""
        name = method if isinstance(method, str) else getattr(method, "__name__", repr(method))
        handler = _RPC.get(name)
        if handler is None:
            raise NotImplementedError(
                f"tacflow: vLLM asked its workers for {name!r}, which tacflowd does not implement"
            )
        result = [handler(self, *args, **(kwargs or {}))]
        if non_block:
            future: Future = Future()
            future.set_result(result)
            return future
        return result

    def check_health(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"tacflow: the daemon failed: {self._failed}")
        with self._lock:
            try:
                health = self._with_daemon(lambda: self._quick(self._client.health))
            except Exception as exc:  # noqa: BLE001 - the engine fails with it
                self._fail(exc)
                raise RuntimeError(f"tacflow: the daemon does not answer: {exc}") from exc
            self._last_request = time.monotonic()
        if not health.ok:
            raise RuntimeError(f"tacflowd is {health.status}: {health.reason or ''}")

    def shutdown(self) -> None:
        if getattr(self, "_closed", None) is None or self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            self._client.close()

    def add_lora(self, lora_request: Any) -> bool:
        raise NotImplementedError("tacflow: the daemon has no LoRA adapters")

    def sleep(self, level: int = 1) -> None:
        raise NotImplementedError("tacflow: sleep mode is not supported (the daemon owns the device)")

    def wake_up(self, tags: list[str] | None = None) -> None:
        raise NotImplementedError("tacflow: sleep mode is not supported (the daemon owns the device)")

    def reset_mm_cache(self) -> None:
        pass

    def reset_encoder_cache(self) -> None:
        pass

    def daemon_stats(self) -> dict[str, Any]:
        """The daemon's counters and the finished requests' diagnostics by
        vLLM request id (``collective_rpc("tacflow_stats")``)."""
        with self._lock:
            s = self._quick(self._client.stats)
            self._last_request = time.monotonic()
        return {
            "daemon": {
                "steps": s.steps,
                "prefill_tokens": s.prefill_tokens,
                "decode_tokens": s.decode_tokens,
                "kv_total_blocks": s.kv_total_blocks,
                "kv_free_blocks": s.kv_free_blocks,
                "sequences": s.sequences,
            },
            "reserved_blocks": self._reserved,
            "instance_id": self.info.instance_id,
            "daemon_losses": self.validity.losses,
            "recomputed_tokens": self.recomputed_tokens,
            "split_steps": self.split_steps,
            "open_requests": sorted(self._requests),
            "requests": dict(self.request_stats),
        }


def _take_step_log(self: TacflowExecutor) -> list[tuple[int, ...]]:
    with self._lock:
        log, self.step_log = self.step_log, []
    return log


_RPC: dict[str, Callable[..., Any]] = {
    "tacflow_stats": TacflowExecutor.daemon_stats,
    "tacflow_take_step_log": _take_step_log,
    "get_supported_tasks": lambda self: ("generate",),
    "check_health": TacflowExecutor.check_health,
    "reset_mm_cache": lambda self: None,
    "reset_encoder_cache": lambda self: None,
    "synchronize_device": lambda self: None,
    "shutdown": lambda self: None,
}
