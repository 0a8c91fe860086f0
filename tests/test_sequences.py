"""Sequence lifecycle end to end: fork shares KV blocks copy-on-write,
truncate drops tokens, both give the logits a fresh sequence would; and
graceful shutdown finishes the step in flight and refuses the rest."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from tacflow import StepEntry
from tacflow import errors as E


def last_logits(c, region, seq_id, tokens):
    vocab = c.info.model.vocab_size
    ref = region.ref(0, "f32", (len(tokens), vocab))
    c.step([StepEntry(seq_id, tokens, sample=False, logits=ref)])
    return np.array(region.view(ref)[-1], copy=True)


def test_fork_is_copy_on_write_and_equals_a_fresh_sequence(start_daemon):
    d = start_daemon("--kv-blocks", "128")
    c = d.client()
    vocab = c.info.model.vocab_size
    region = c.create_region(4 * vocab * 64)
    prompt = [(7 * i) % 500 + 1 for i in range(37)]  # 2 full blocks + 5 tokens
    c.open_sequence(1)
    c.step([StepEntry(1, prompt, sample=False)])
    free = c.stats().kv_free_blocks
    assert c.fork_sequence(1, 2) == 37
    assert c.stats().kv_free_blocks == free, "a fork copies no block"
    # Parent and child diverge inside the shared partial block.
    a = last_logits(c, region, 1, [11])
    assert c.stats().kv_free_blocks == free - 1, "the first write into the shared block copies it"
    b = last_logits(c, region, 2, [22])
    c.open_sequence(3)
    c.step([StepEntry(3, prompt, sample=False)])
    ref_a = last_logits(c, region, 3, [11])
    c.open_sequence(4)
    c.step([StepEntry(4, prompt + [22], sample=False)])
    c.truncate_sequence(4, 1)
    ref_b = last_logits(c, region, 4, [22])
    np.testing.assert_allclose(a, ref_a, rtol=0, atol=1e-5)
    np.testing.assert_allclose(b, ref_b, rtol=0, atol=1e-5)
    for s in (1, 2, 3, 4):
        c.close_sequence(s)
    assert c.stats().kv_free_blocks == c.info.kv.total_blocks


def test_truncate_frees_blocks_and_checks_its_argument(start_daemon):
    d = start_daemon("--kv-blocks", "64")
    c = d.client()
    c.open_sequence(1)
    c.step([StepEntry(1, [1 + i % 400 for i in range(40)], sample=False)])
    total = c.info.kv.total_blocks
    assert c.stats().kv_free_blocks == total - 3
    assert c.truncate_sequence(1, 24) == 16
    assert c.stats().kv_free_blocks == total - 1
    with pytest.raises(E.BadRequest):
        c.truncate_sequence(1, 17)
    assert c.truncate_sequence(1, 16) == 0
    assert c.stats().kv_free_blocks == total


def test_shutdown_finishes_the_step_in_flight_and_refuses_the_rest(start_daemon):
    # A long prefill on the CPU keeps the executor busy while SIGTERM arrives.
    d = start_daemon("--model", "random:smollm2-135m", "--kv-blocks", "256", "--max-context", "4096")
    busy = d.client()
    busy.open_sequence(1)
    queued = d.client()
    queued.open_sequence(2)
    result: dict = {}

    def long_step():
        try:
            result["ok"] = busy.step([StepEntry(1, [1 + i % 1000 for i in range(2048)])])
        except Exception as e:  # noqa: BLE001 - the test inspects it
            result["err"] = e

    t = threading.Thread(target=long_step)
    t.start()
    time.sleep(0.5)  # the step is running
    late: dict = {}

    def queued_step():
        try:
            late["ok"] = queued.step([StepEntry(2, [1, 2, 3])])
        except Exception as e:  # noqa: BLE001
            late["err"] = e

    q = threading.Thread(target=queued_step)
    q.start()
    time.sleep(0.2)
    d.proc.send_signal(signal.SIGTERM)
    t.join(120)
    q.join(120)
    assert "ok" in result, f"the step in flight must finish: {result}"
    assert result["ok"].results[0].num_tokens == 2048
    assert isinstance(late.get("err"), E.ShuttingDown), late
    assert d.proc.wait(60) == 0
    assert not d.socket.exists()


def test_a_step_longer_than_the_lease_keeps_its_session(start_daemon):
    d = start_daemon("--model", "random:smollm2-135m", "--kv-blocks", "256", "--session-lease-ms", "300")
    c = d.client()
    c.open_sequence(1)
    out = c.step([StepEntry(1, [1 + i % 1000 for i in range(1024)])])
    assert out.timing.run_us > 300_000, "the step must outlast the lease for this test to mean anything"
    # The session lived through it, and its lease restarted at the reply.
    assert c.step([StepEntry(1, [out.results[0].token])]).results[0].num_tokens == 1025
