"""``attention_step`` and CUDA region registration over the wire (protocol
1.4), on a daemon without a model (``--attention-only``) and beside one:
every bad request is answered with its code and changes nothing the client
can see (the pool's blocks and per-layer counts, the next request's output).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tacflow import AttentionLayout, CudaRegion, Full, StepEntry, Tactic
from tacflow import errors as E

L, H, K, D = 3, 4, 2, 16
LAYOUT = AttentionLayout(L, H, K, D, scale=0.2)
UUID = "GPU-00000000-1111-2222-3333-444444444444"


def reference(q, keys, vals, scale):
    """Causal attention of the rows ``q`` (the last of the context), f64."""
    n, h, d = q.shape
    ctx = keys.shape[0]
    g = h // keys.shape[1]
    out = np.zeros((n, h, d))
    for r in range(n):
        sees = ctx - n + r + 1
        for head in range(h):
            s = keys[:sees, head // g] @ q[r, head].astype(np.float64) * scale
            w = np.exp(s - s.max())
            out[r, head] = (w / w.sum()) @ vals[:sees, head // g]
    return out


class Rows:
    """q, k, v and out of one request in a region (f32)."""

    def __init__(self, c, rows, seed):
        rng = np.random.default_rng(seed)
        self.stride = rows * H * D * 4
        self.region = c.create_region(4 * self.stride)
        self.q = self.region.array("f32", (rows, H, D), 0)
        self.k = self.region.array("f32", (rows, K, D), self.stride)
        self.v = self.region.array("f32", (rows, K, D), 2 * self.stride)
        self.out = self.region.array("f32", (rows, H, D), 3 * self.stride)
        for a in (self.q, self.k, self.v):
            a[:] = rng.normal(size=a.shape)

    def refs(self):
        return [self.region.ref_of(a) for a in (self.q, self.k, self.v, self.out)]


def pool(c):
    p = c.stats().attention_pool
    return (p.blocks, p.used_bytes, p.sequences, p.steps_by_layer)


def test_attention_only_daemon_serves_a_batch_and_refuses_bad_input(start_daemon):
    d = start_daemon("--attention-only", "--attention-pool-mb", "1")
    c = d.client()
    assert c.info.model.architecture == "none" and c.info.attention_pool.total_bytes == 1 << 20
    c.open_sequence(1, layout=LAYOUT)
    c.open_sequence(2, attention=Tactic(0.9), diagnostics=True, layout=LAYOUT)
    # A prefill chunk of 20 rows (two blocks) and one of 3, at layer 0.
    first = Rows(c, 23, 0)
    out = c.attention_step(0, [1, 2], *first.refs(), num_tokens=[20, 3], positions=[0, 0])
    assert out.num_tokens == [20, 3]
    for sl in (slice(0, 20), slice(20, 23)):
        want = reference(first.q[sl], first.k[sl], first.v[sl], 0.2)
        assert np.abs(first.out[sl] - want).max() < 1e-5
    other = d.client()  # another session
    other.open_sequence(9, layout=LAYOUT)
    before = pool(c)
    assert before[0] == 3 and before[2] == 3 and before[3] == (1,)
    bad = Rows(c, 2, 1)
    q, k, v, o = bad.refs()
    small = c.create_region(64)
    cases = [
        (E.BadRequest, dict(layer=L, seq_ids=[1, 2])),  # layer out of range
        (E.BadRequest, dict(layer=0, seq_ids=[1, 2], positions=[0, 3])),  # layer 0 holds 20 and 3
        (E.UnknownSequence, dict(layer=1, seq_ids=[1, 9])),  # another session's
        (E.BadRequest, dict(layer=1, seq_ids=[1, 1])),
        (E.ShapeMismatch, dict(layer=1, seq_ids=[1, 2], num_tokens=[1])),
        (E.ShapeMismatch, dict(layer=1, seq_ids=[1], num_tokens=[1])),  # 2 rows in the tensors
        (E.ShapeMismatch, dict(layer=1, seq_ids=[1, 2], k=bad.region.ref(bad.stride, "f32", (2, H, D)))),
        (E.DtypeMismatch, dict(layer=1, seq_ids=[1, 2], q=bad.region.ref(0, "i32", (2, H, D)))),
        (E.OutOfBounds, dict(layer=1, seq_ids=[1, 2], out=small.ref(0, "f32", (2, H, D), check=False))),
        (E.OutOfBounds, dict(layer=1, seq_ids=[1, 2], q=bad.region.ref(2, "f32", (2, H, D), check=False))),
        (E.UnknownRegion, dict(layer=1, seq_ids=[1, 2], v=q.__class__(999, 0, "f32", (2, K, D)))),
        # Strides: of another rank, and reaching past the region.
        (E.ShapeMismatch, dict(layer=1, seq_ids=[1, 2], q=q.__class__(q.region_id, 0, "f32", (2, H, D), (D, 1)))),
        (E.OutOfBounds, dict(layer=1, seq_ids=[1, 2], q=q.__class__(q.region_id, 0, "f32", (2, H, D), (1 << 30, D, 1)))),
        (E.OutOfKvBlocks, dict(layer=1, seq_ids=[1, 2], num_tokens=[1, 1])),  # see below
    ]
    for i, (cls, kw) in enumerate(cases[:-1]):
        args = dict(q=q, k=k, v=v, out=o, num_tokens=[], positions=[])
        args.update(kw)
        with pytest.raises(cls):
            c.attention_step(args["layer"], args["seq_ids"], args["q"], args["k"], args["v"], args["out"],
                             num_tokens=args["num_tokens"], positions=args["positions"])
        assert pool(c) == before, f"case {i} changed the pool"
    # The pool holds 1 MiB: a chunk that needs more blocks is refused whole.
    big = Rows(c, 1500, 2)
    with pytest.raises(E.OutOfKvBlocks):
        c.attention_step(0, [1], *big.refs(), num_tokens=[1500], positions=[20])
    assert pool(c) == before
    # Nothing changed: a decode row of each at layer 0 sees exactly the cache.
    step = Rows(c, 2, 3)
    out = c.attention_step(0, [1, 2], *step.refs(), positions=[20, 3])
    assert out.num_tokens == [21, 4]
    keys = np.concatenate([first.k[:20], step.k[:1]])
    vals = np.concatenate([first.v[:20], step.v[:1]])
    assert np.abs(step.out[:1] - reference(step.q[:1], keys, vals, 0.2)).max() < 1e-5
    assert out.attention[0] is None and out.attention[1] is not None, "sequence 2 asked for diagnostics"
    # A step or a sampled open are for the model: there is none.
    with pytest.raises(E.Unsupported):
        c.open_sequence(5)
    c.close_sequence(1)
    c.close_sequence(2)
    other.close()
    # The executor frees a closed session's sequences after the close.
    deadline = time.monotonic() + 5
    while pool(c)[:3] != (0, 0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool(c)[:3] == (0, 0, 0), "closing the other session freed its sequence"


def test_layouts_the_daemon_cannot_honour_are_refused(start_daemon):
    d = start_daemon("--attention-only")
    c = d.client()
    for lay, words in [
        (AttentionLayout(2, 4, 2, 16, 0.25, softcap=30.0), "softcapping"),
        (AttentionLayout(2, 4, 2, 16, 0.25, sliding_window=128), "sliding window"),
        (AttentionLayout(2, 4, 2, 16, 0.25, sinks=True), "sinks"),
    ]:
        with pytest.raises(E.Unsupported) as err:
            c.open_sequence(1, layout=lay)
        assert words in err.value.message
    with pytest.raises(E.BadRequest):
        c.open_sequence(1, layout=AttentionLayout(2, 5, 2, 16, 0.25))
    assert c.stats().attention_pool.sequences == 0


def test_beside_a_model_the_two_kinds_of_sequence_stay_apart(start_daemon):
    d = start_daemon("--kv-blocks", "64")
    c = d.client()
    assert c.info.attention_pool is not None and c.info.model.name == "tiny"
    c.open_sequence(1)
    c.open_sequence(2, layout=LAYOUT)
    with pytest.raises(E.SequenceExists):
        c.open_sequence(1, layout=LAYOUT)
    with pytest.raises(E.SequenceExists):
        c.open_sequence(2)
    with pytest.raises(E.BadRequest):
        c.step([StepEntry(2, [1, 2, 3])])
    r = Rows(c, 1, 4)
    with pytest.raises(E.BadRequest):
        c.attention_step(0, [1], *r.refs())
    c.step([StepEntry(1, [1, 2, 3])])
    c.attention_step(0, [2], *r.refs())
    s = c.stats()
    assert s.attention_pool.sequences == 1 and s.attention_pool.blocks == 1
    assert s.kv_free_blocks < s.kv_total_blocks, "the model's pool is its own"


def test_cuda_region_registration_refuses_bad_descriptors_and_changes_nothing(start_daemon):
    d = start_daemon("--attention-only")
    c = d.client()
    regions = c.stats().regions
    cases = [
        (E.BadRequest, CudaRegion(bytes(63), UUID, 4096)),  # a handle is 64 bytes
        (E.BadRequest, CudaRegion(bytes(64), UUID, 4096, event_handle=bytes(10))),
        (E.BadRequest, CudaRegion(bytes(64), UUID, 0)),
        (E.OutOfBounds, CudaRegion(bytes(64), UUID, 16, offset=2**64 - 8)),
        # Well-formed, but this daemon has no GPU to open it in.
        (E.Unsupported, CudaRegion(bytes(range(64)), UUID, 4096, event_handle=bytes(64))),
    ]
    for cls, desc in cases:
        with pytest.raises(cls):
            c.register_region(desc)
        assert c.stats().regions == regions
