"""The asyncio client against the real daemon: many requests in flight on
one connection, each answered with its own reply."""

from __future__ import annotations

import asyncio

import numpy as np

from tacflow import StepEntry
from tacflow import errors as E
from tacflow.aio import AsyncClient, as_tensor, write_tensor

VOCAB = 512


def test_many_requests_in_flight_get_their_own_replies(start_daemon):
    d = start_daemon("--kv-blocks", "256", "--max-sequences", "64")
    n = 24
    prompts = [[(i * 7 + j) % 400 + 1 for j in range(5 + i % 9)] for i in range(n)]
    sync = d.client()
    want = []
    for i, p in enumerate(prompts):
        sync.open_sequence(i)
        want.append(sync.step([StepEntry(i, p)]).results[0].token)
    sync.close()

    async def main():
        async with await AsyncClient.connect(d.address, timeout_s=120) as c:
            await asyncio.gather(*(c.open_sequence(i) for i in range(n)))
            peak = 0

            async def one(i):
                nonlocal peak
                peak = max(peak, c.in_flight)
                return (await c.step([StepEntry(i, prompts[i])])).results[0]

            tasks = [one(i) for i in range(n)] + [c.ping(), c.stats(), c.health()]
            got = await asyncio.gather(*tasks)
            results, lease, stats, health = got[:n], got[n], got[n + 1], got[n + 2]
            assert [r.seq_id for r in results] == list(range(n))
            assert [r.token for r in results] == want
            assert peak > 1 and lease > 0 and health.status == "ok"
            assert stats.sequences == n
            # Errors reach the request that caused them, not a neighbour.
            bad = c.step([StepEntry(999, [1])])
            good = c.step([StepEntry(0, [1])])
            out = await asyncio.gather(bad, good, return_exceptions=True)
            assert isinstance(out[0], E.UnknownSequence)
            assert out[1].results[0].num_tokens == len(prompts[0]) + 1
            states = await asyncio.gather(*(c.sequence_state(i) for i in range(n)))
            assert [s.num_tokens for s in states[1:]] == [len(p) for p in prompts[1:]]

    asyncio.run(main())


def test_regions_carry_tensors_both_ways(start_daemon):
    d = start_daemon("--kv-blocks", "64")

    async def main():
        async with await AsyncClient.connect(d.address, timeout_s=120) as c:
            region = await c.create_region(4 * VOCAB * 8)
            ref = region.ref(0, "f32", (3, VOCAB))
            await c.open_sequence(1)
            await c.step([StepEntry(1, [1, 2, 3], sample=False, logits=ref)])
            t = as_tensor(region, ref)
            assert tuple(t.shape) == (3, VOCAB)
            assert np.isfinite(np.asarray(t)).all() and float(abs(t).sum()) > 0
            inp = region.ref(4 * VOCAB * 4, "f32", (2, 4))
            write_tensor(region, inp, np.arange(8, dtype=np.float32).reshape(2, 4))
            assert np.array_equal(region.view(inp).ravel(), np.arange(8))
            try:
                import torch
            except ImportError:
                return
            write_tensor(region, inp, torch.ones(2, 4, dtype=torch.float64))
            assert isinstance(as_tensor(region, inp), torch.Tensor)
            assert float(as_tensor(region, inp).sum()) == 8.0
            await c.close_region(region)

    asyncio.run(main())
