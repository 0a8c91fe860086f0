"""Client-named KV blocks, the sequence-state query and step idempotency
end to end: what a vLLM plug-in needs when vLLM accounts the blocks."""

from __future__ import annotations

import numpy as np
import pytest

from tacflow import StepEntry
from tacflow import errors as E
from tacflow.protocol import Kind, step_body

VOCAB = 512


def logits_of(c, region, entry):
    ref = region.ref(0, "f32", (len(entry.tokens), VOCAB))
    entry.logits = ref
    entry.sample = False
    c.step([entry])
    return np.array(region.view(ref), copy=True)


def test_named_blocks_equal_daemon_blocks_and_serve_a_prefix_hit(start_daemon):
    d = start_daemon("--kv-blocks", "64")
    c = d.client()
    region = c.create_region(4 * VOCAB * 64)
    prompt = [(5 * i) % 300 + 1 for i in range(40)]
    c.open_sequence(1)
    want = logits_of(c, region, StepEntry(1, prompt))
    want_next = logits_of(c, region, StepEntry(1, [7, 8]))
    free = c.stats().kv_free_blocks
    assert c.reserve_blocks(8) == 8
    assert c.stats().kv_free_blocks == free - 8
    c.open_sequence(2, blocks="named")
    got = logits_of(c, region, StepEntry(2, prompt, blocks=[6, 2, 0]))
    assert np.abs(got - want).max() < 1e-5
    # A prefix-cache hit: sequence 3 starts with 2's two full blocks.
    assert c.open_sequence(3, blocks="named", prefix=prompt[:32]) == 32
    tail = logits_of(c, region, StepEntry(3, prompt[32:] + [7, 8], blocks=[6, 2, 5]))
    assert np.abs(tail[-2:] - want_next).max() < 1e-5
    st = c.sequence_state(3)
    assert (st.num_tokens, st.mode, st.block_ids, st.num_blocks) == (42, "named", (6, 2, 5), 3)
    assert c.stats().kv_free_blocks == free - 8, "named steps take no block"


def test_foreign_block_ids_are_refused_and_change_nothing(start_daemon):
    d = start_daemon("--kv-blocks", "32")
    a, b = d.client(), d.client()
    a.reserve_blocks(4)
    b.reserve_blocks(20)
    a.open_sequence(1, blocks="named")
    a.step([StepEntry(1, [1, 2, 3], blocks=[0])])
    for blocks in ([4], [0, 19]):
        with pytest.raises(E.UnknownBlock) as err:
            a.step([StepEntry(1, [4], blocks=blocks)])
        assert err.value.detail["reserved"] == 4
    with pytest.raises(E.BadRequest):
        a.step([StepEntry(1, [4])])  # a named sequence must name its table
    assert a.sequence_state(1).num_tokens == 3
    with pytest.raises(E.OutOfKvBlocks) as err:
        a.reserve_blocks(100)
    assert err.value.detail["free"] == 8
    b.close()
    a.sequence_state(1)  # the executor has run the session's end before this
    assert a.stats().kv_free_blocks == 28, "a session's reservation goes with it"


def test_a_retried_step_is_answered_from_its_first_run(start_daemon):
    d = start_daemon("--kv-blocks", "32")
    c = d.client()
    c.open_sequence(1)
    body = step_body(777, c.session, [StepEntry(1, [1, 2, 3])])
    first = c.request(Kind.STEP, body)
    again = c.request(Kind.STEP, body)
    assert again == first
    assert c.sequence_state(1).num_tokens == 3, "the retry did not run"
    other = step_body(777, c.session, [StepEntry(1, [4])])
    with pytest.raises(E.BadRequest, match="already answered"):
        c.request(Kind.STEP, other)
    # A failed step is answered alike, and still changed nothing.
    bad = step_body(778, c.session, [StepEntry(1, [VOCAB])])
    for _ in range(2):
        with pytest.raises(E.BadRequest):
            c.request(Kind.STEP, bad)
    assert c.sequence_state(1).num_tokens == 3
    assert c.step([StepEntry(1, [4])]).results[0].num_tokens == 4


def test_a_1_2_session_is_not_deduplicated(start_daemon):
    from tacflow.protocol import hello_body

    d = start_daemon("--kv-blocks", "32")
    c = d.client()
    old = c.request(Kind.HELLO, hello_body(1, "old", (1, 2)), session=False)
    s = old["session"]
    c.request(Kind.OPEN_SEQUENCE, {"session": s, "seq_id": 1})
    body = step_body(5, s, [StepEntry(1, [1])])
    assert c.request(Kind.STEP, body)["results"][0]["num_tokens"] == 1
    assert c.request(Kind.STEP, body)["results"][0]["num_tokens"] == 2
