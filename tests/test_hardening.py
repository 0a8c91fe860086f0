"""Hostile input: oversized frames, deep nesting, huge
shapes, overflowing offsets and strides, a region unregistered under a
queued step, a by-name region truncated under the daemon's mapping (SIGBUS),
thousands of connect/disconnect cycles without leaks, and a client flooding
steps. After each, the daemon lives and other clients are served."""

from __future__ import annotations

import os
import time

import msgpack
import numpy as np
import pytest
import zmq

from tacflow import StepEntry, TensorRef
from tacflow import errors as E
from tacflow.protocol import ERROR_KIND, Kind


def bystander_ok(d) -> None:
    """A fresh client still gets a prefill and a decode step done."""
    c = d.client(timeout_s=30)
    c.open_sequence(1)
    t = c.step([StepEntry(1, [1, 2, 3])]).results[0].token
    assert c.step([StepEntry(1, [t])]).results[0].num_tokens == 4
    c.close()


def reply(c, timeout_s: float = 30) -> tuple[int, dict]:
    kind, header = c.recv_raw(timeout_s=timeout_s)
    return kind[0], msgpack.unpackb(header)


def send(c, kind: int, body: dict) -> None:
    c.send_raw([bytes([kind]), msgpack.packb({"session": c.session, **body})])


def test_oversized_frames_are_dropped_and_others_are_served(start_daemon):
    d = start_daemon("--kv-blocks", "64")
    ctx = zmq.Context()
    big = d.client(context=ctx, timeout_s=5)
    # Past the daemon's frame limit (16 MiB + 4 KiB): libzmq drops the
    # connection; nothing is read, nothing is answered, nothing crashes.
    big.send_raw([bytes([Kind.STEP]), b"\x00" * (20 << 20)])
    with pytest.raises(E.RequestTimeout):
        big.recv_raw(timeout_s=2)
    # Under the frame limit but over the header limit: a clear refusal.
    header = msgpack.packb({"request_id": 7, "session": b"\0" * 16, "pad": b"x" * (16 << 20)})
    c = d.client()
    c.send_raw([bytes([Kind.PING]), header])
    kind, body = reply(c)
    assert kind == ERROR_KIND and body["code"] == "bad_request" and body["request_id"] == 7
    assert "too large" in body["message"]
    bystander_ok(d)


def test_deep_nesting_and_garbage_headers(start_daemon):
    d = start_daemon("--kv-blocks", "64")
    c = d.client()
    for depth in (33, 1000, 200_000):
        h = b"\x82\xaarequest_id\x05\xa1x" + b"\x91" * depth + b"\xc0"
        c.send_raw([bytes([Kind.PING]), h])
        kind, body = reply(c)
        assert kind == ERROR_KIND and body["code"] == "bad_request", body
    # Random bytes behind every kind byte.
    rng = np.random.default_rng(1)
    for k in list(Kind) + [0x00, 0x7F, 0xFF]:
        c.send_raw([bytes([k]), rng.integers(0, 256, 64, dtype=np.uint8).tobytes()])
        kind, body = reply(c)
        assert kind == ERROR_KIND and body["code"] == "bad_request", (k, body)
    bystander_ok(d)


def test_huge_shapes_and_overflowing_offsets_and_strides(start_daemon):
    d = start_daemon("--kv-blocks", "64")
    c = d.client()
    vocab = c.info.model.vocab_size
    r = c.create_region(4 * vocab * 2)
    c.open_sequence(1)
    cases = [
        (TensorRef(r.region_id, 0, "f32", (2**40, 2**40)), (E.OutOfBounds, E.ShapeMismatch)),
        (TensorRef(r.region_id, 0, "f32", (2**63, 3)), (E.OutOfBounds, E.ShapeMismatch)),
        (TensorRef(r.region_id, 2**64 - 8, "f32", (1, vocab)), E.OutOfBounds),
        (TensorRef(r.region_id, 2**63, "f32", (1, vocab)), E.OutOfBounds),
        (TensorRef(r.region_id, 0, "f32", (1, vocab), strides=(2**63, 2**63)), E.OutOfBounds),
        (TensorRef(r.region_id, 0, "f32", (1, vocab), strides=(1, 2**62)), E.OutOfBounds),
        (TensorRef(r.region_id, 0, "f32", (1,) * 9), E.ShapeMismatch),
    ]
    for ref, err in cases:
        with pytest.raises(err):
            c.step([StepEntry(1, [1], logits=ref)])
    with pytest.raises(E.LimitExceeded):  # more than max_mapped_bytes
        c.register_shm(r.name, 2**63)
    with pytest.raises(E.LimitExceeded):
        c.step([StepEntry(1, [1] * (c.info.limits.max_step_tokens + 1))])
    raw = {"request_id": 99, "entries": [{"seq_id": 2**64 - 1, "tokens": [2**32 - 1]}]}
    send(c, Kind.STEP, raw)
    kind, body = reply(c)
    assert kind == ERROR_KIND and body["request_id"] == 99
    assert c.step([StepEntry(1, [1, 2])]).results[0].num_tokens == 2, "nothing changed"
    bystander_ok(d)


def test_region_unregistered_under_a_queued_step(start_daemon):
    d = start_daemon("--kv-blocks", "1024")
    c = d.client()
    vocab = c.info.model.vocab_size
    r = c.create_region(4 * vocab)
    out = r.array("f32", (1, vocab))
    out[:] = np.nan
    c.open_sequence(1)
    c.open_sequence(2)
    # A slow step first, so that the second one waits in the queue.
    send(c, Kind.STEP, {"request_id": 1, "entries": [{"seq_id": 1, "tokens": [5] * 4000, "sample": False}]})
    ref = {"region_id": r.region_id, "offset": 0, "dtype": "f32", "shape": [1, vocab]}
    send(c, Kind.STEP, {"request_id": 2, "entries": [{"seq_id": 2, "tokens": [9], "logits": ref}]})
    send(c, Kind.UNREGISTER_REGION, {"request_id": 3, "region_id": r.region_id})
    order = []
    for _ in range(3):
        kind, body = reply(c, timeout_s=120)
        order.append(body["request_id"])
        assert kind != ERROR_KIND, body
    assert order.index(3) < order.index(2), "the unregister was answered while the step waited"
    assert np.isfinite(out).all(), "the queued step still wrote its logits"
    with pytest.raises(E.UnknownRegion):
        c.step([StepEntry(2, [9], logits=TensorRef(r.region_id, 0, "f32", (1, vocab)))])
    del out
    bystander_ok(d)


def test_by_name_region_truncated_while_mapped(start_daemon):
    d = start_daemon("--kv-blocks", "64")
    c = d.client()
    vocab = c.info.model.vocab_size
    nbytes = 4 * vocab * 8
    r = c.create_shm_region(nbytes)
    c.open_sequence(1)
    c.step([StepEntry(1, [1], logits=r.ref(0, "f32", (1, vocab)))])
    # The client shrinks the object under the daemon's mapping: the pages
    # the daemon writes next no longer exist (SIGBUS for an unguarded map).
    fd = os.open(f"/dev/shm/{r.name}", os.O_RDWR)
    os.ftruncate(fd, 0)
    os.close(fd)
    ref = TensorRef(r.region_id, 4 * vocab * 4, "f32", (2, vocab))
    with pytest.raises(E.OutOfBounds) as err:
        c.step([StepEntry(1, [2, 3], logits=ref)])
    assert "truncated" in err.value.message and err.value.detail.get("truncated") == 1
    assert d.proc.poll() is None, "the daemon lives"
    # Only that request failed: the sequence is unchanged, later uses of the
    # region fail at once, other clients are served.
    assert c.step([StepEntry(1, [2, 3])]).results[0].num_tokens == 3
    with pytest.raises(E.OutOfBounds):
        c.step([StepEntry(1, [4], logits=TensorRef(r.region_id, 0, "f32", (1, vocab)))])
    c.unregister_region(r.region_id)
    assert c.stats().regions == 0
    bystander_ok(d)


def proc_counts(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    return fds, maps


def test_thousands_of_connect_disconnect_cycles_leak_nothing(start_daemon):
    d = start_daemon("--kv-blocks", "4096", "--session-lease-ms", "500")
    watcher = d.client()
    total = watcher.info.kv.total_blocks
    ctx = zmq.Context()
    bystander_ok(d)  # warm every lazy allocation once
    fds0, maps0 = proc_counts(d.proc.pid)
    cycles = 2000
    for i in range(cycles):
        if i % 20 == 0:
            watcher.ping()  # the watcher outlives the 500 ms lease
        c = d.client(context=ctx, timeout_s=30)
        c.open_sequence(1)
        c.step([StepEntry(1, list(range(1, 18)), sample=False)])  # two KV blocks
        if i % 4 == 0:
            c.create_region(8192) if i % 8 else c.create_memfd_region(8192)
        if i % 10 == 9:
            c._close_socket()  # vanish without `close`: the lease frees it
        else:
            c.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        watcher.ping()
        s = watcher.stats()
        if s.sessions == 1 and s.kv_free_blocks == total:
            break
        time.sleep(0.2)
    assert (s.sessions, s.sequences, s.regions, s.kv_free_blocks) == (1, 0, 0, total), s
    time.sleep(0.5)  # libzmq closes the last connections asynchronously
    fds1, maps1 = proc_counts(d.proc.pid)
    assert fds1 <= fds0 + 2, f"file descriptors {fds0} -> {fds1} after {cycles} cycles"
    assert maps1 <= maps0 + 8, f"mappings {maps0} -> {maps1} after {cycles} cycles"
    ctx.term()
    bystander_ok(d)


def test_a_client_flooding_steps_gets_busy_and_others_are_served(start_daemon):
    d = start_daemon("--kv-blocks", "4096", "--max-queued-requests", "8")
    flood = d.client()
    flood.open_sequence(1)
    n = 300
    for rid in range(1, n + 1):
        send(flood, Kind.STEP, {"request_id": rid, "entries": [{"seq_id": 1, "tokens": [3] * 32, "sample": False}]})
    # While the flood is queued, a bystander is answered promptly.
    other = d.client()
    t0 = time.monotonic()
    other.ping()
    other.open_sequence(5)
    other.step([StepEntry(5, [1, 2])])
    assert time.monotonic() - t0 < 10
    assert other.stats().queue_depth <= 8 + 1
    codes: dict[str, int] = {}
    seen = set()
    for _ in range(n):
        kind, body = reply(flood, timeout_s=120)
        assert body["request_id"] not in seen, "one reply per request"
        seen.add(body["request_id"])
        code = body["code"] if kind == ERROR_KIND else "ok"
        codes[code] = codes.get(code, 0) + 1
    assert seen == set(range(1, n + 1))
    assert codes.get("busy", 0) > 0 and codes.get("ok", 0) >= 8, codes
    assert set(codes) <= {"ok", "busy", "out_of_kv_blocks", "context_too_long"}, codes
    with pytest.raises(E.RequestTimeout):
        flood.recv_raw(timeout_s=0.5)  # and no reply twice
    assert other.stats().errors.get("busy", 0) == codes["busy"]
    bystander_ok(d)
