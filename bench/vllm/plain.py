"""The floor the vLLM benchmarks compare with: the same decode steps
through the plain client, named blocks, no vLLM (``run.py``, ``steps.py``)."""

from __future__ import annotations

import pathlib
import time


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def plain_client(sock: pathlib.Path, b: int, steps: int) -> dict:
    """The same decode steps through the plain client, without vLLM: B
    named-block sequences of a 16-token prompt. Its transport (round trip
    less the daemon's run and queue time) is the floor the executor's
    transport compares with; run before vLLM starts, so nothing competes for
    the CPU."""
    from tacflow import Client, SamplingParams, StepEntry

    with Client(f"ipc://{sock}") as c:
        per = -(-(16 + steps + 1) // 16)
        c.reserve_blocks(b * per)
        tables = [list(range(i * per, (i + 1) * per)) for i in range(b)]
        for i in range(b):
            c.open_sequence(i + 1, sampling=SamplingParams(temperature=0.0), blocks="named")
        out = c.step([StepEntry(i + 1, [(i * 31 + k) % 500 + 3 for k in range(16)], blocks=tables[i])
                      for i in range(b)])
        toks = [r.token for r in out.results]
        transport, run = [], []
        for _ in range(steps):
            t0 = time.perf_counter_ns()
            out = c.step([StepEntry(i + 1, [toks[i]], blocks=tables[i]) for i in range(b)])
            rt = (time.perf_counter_ns() - t0) // 1000
            transport.append(rt - out.timing.run_us - out.timing.queued_us)
            run.append(out.timing.run_us)
            toks = [r.token for r in out.results]
    return {"plain_daemon_p50_us": pct(run, 0.5), "plain_transport_p50_us": pct(transport, 0.5)}


