"""The daemon fails fast and says so.

A fatal fault (an executor panic, a device that the backend reports lost,
injected by ``tacflowd-faults`` through ``TACFLOW_INJECT_FAULT``) ends the
daemon: every request waiting in it gets exactly one ``internal`` reply
marked fatal, ``health`` says ``failing`` until the exit, the exit code is
not 0, and the socket files are gone. A model or KV cache that cannot fit,
or a socket another daemon serves, is refused before any weight loads.
"""

from __future__ import annotations

import pathlib
import subprocess
import time

import msgpack
import pytest

from conftest import BIN, FAULTS_BIN, Daemon
from tacflow import StepEntry
from tacflow import errors as E
from tacflow.protocol import ERROR_KIND, REPLY_BIT, Kind

#: The daemon's linger after a fault, long enough here for a test to ask
#: ``health`` in it; the daemon exits within this plus 100 ms of the fault.
LINGER_MS = 3000
#: Slack on top of the documented bound for a loaded test machine.
SLACK_S = 10.0
STEPS_PER_CLIENT = 6


def start_faulty(tmp_path, plan: str) -> Daemon:
    workdir = tmp_path / "faulty"
    workdir.mkdir()
    return Daemon(
        workdir,
        ["--model", "tiny", "--kv-blocks", "64", "--fatal-linger-ms", str(LINGER_MS)],
        env={"TACFLOW_INJECT_FAULT": plan},
        binary=FAULTS_BIN,
    )


def send_steps(c, first_id: int, n: int) -> list[int]:
    """Pipelines ``n`` one-token steps of sequence 1; returns their ids."""
    ids = list(range(first_id, first_id + n))
    for rid in ids:
        body = {"request_id": rid, "session": c.session, "entries": [StepEntry(1, [5]).to_wire()]}
        c.send_raw([bytes([Kind.STEP]), msgpack.packb(body)])
    return ids


def replies(c, n: int) -> list[tuple[int, dict]]:
    """``n`` replies, then checks that no further reply arrives."""
    got = []
    for _ in range(n):
        kind, header = c.recv_raw(timeout_s=30)
        got.append((kind[0], msgpack.unpackb(header)))
    with pytest.raises(E.RequestTimeout):
        c.recv_raw(timeout_s=0.3)
    return got


def fault_ends_the_daemon(tmp_path, plan: str, reason: str):
    """Runs two clients' pipelined steps into the fault; returns the error a
    request sent after it got, and ``health`` asked in the linger."""
    d = start_faulty(tmp_path, plan)
    try:
        clients = [d.client(timeout_s=30) for _ in range(2)]
        for c in clients:
            c.open_sequence(1)
        sent = [send_steps(c, 100 + 100 * i, STEPS_PER_CLIENT) for i, c in enumerate(clients)]
        fatal_at = None
        for c, ids in zip(clients, sent):
            got = replies(c, len(ids))
            assert sorted(h["request_id"] for _, h in got) == ids, "exactly one reply each"
            errors = [h for k, h in got if k == ERROR_KIND]
            assert errors, "every client had requests waiting when the fault struck"
            for h in errors:
                assert h["code"] == "internal" and h["detail"]["fatal"] == 1, h
                assert h["detail"]["reason"] == reason and "going down" in h["message"]
            assert all(k == Kind.STEP | REPLY_BIT for k, _ in got if k != ERROR_KIND)
            fatal_at = fatal_at or time.monotonic()
        health = clients[0].health()
        assert health.status == "failing" and not health.ok
        assert health.executor == "dead" and health.reason
        with pytest.raises(E.DaemonFailing) as failing:
            clients[1].open_sequence(2)
        rc = d.proc.wait(LINGER_MS / 1000 + SLACK_S)
        assert time.monotonic() - fatal_at < LINGER_MS / 1000 + SLACK_S
        assert rc != 0, f"a fatal fault must exit non-zero:\n{d.log()}"
        assert not d.socket.exists(), "the socket file is left behind"
        assert not d.socket.with_name("tacflowd.fd.sock").exists()
        return failing.value, health
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def test_an_executor_panic_ends_the_daemon(tmp_path):
    err, health = fault_ends_the_daemon(tmp_path, "panic@step:3", "executor_panic")
    assert isinstance(err, E.Internal) and err.reason == "executor_panic"
    assert health.device == "ok"


def test_a_lost_device_ends_the_daemon(tmp_path):
    err, health = fault_ends_the_daemon(tmp_path, "device_lost@step:3", "device_failed")
    assert err.reason == "device_failed"
    assert health.device == "failed"


def test_a_recoverable_error_keeps_it_serving(tmp_path):
    d = start_faulty(tmp_path, "error@step:2")
    try:
        c = d.client(timeout_s=30)
        c.open_sequence(1)
        c.step([StepEntry(1, [1, 2])])
        with pytest.raises(E.TacflowError) as info:
            c.step([StepEntry(1, [3])])
        assert not isinstance(info.value, E.DaemonFailing)
        assert c.step([StepEntry(1, [3])]).results[0].num_tokens == 3
        h = c.health()
        assert (h.status, h.executor, h.device) == ("ok", "alive", "ok")
        c.close()
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()


def test_a_bad_fault_plan_refuses_to_start(tmp_path):
    r = subprocess.run(
        [str(FAULTS_BIN), "serve", "--backend", "cpu", "--socket", str(tmp_path / "s.sock")],
        env={"TACFLOW_INJECT_FAULT": "explode@now"},
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0 and "TACFLOW_INJECT_FAULT" in r.stderr


def test_a_real_device_fault_is_refused_on_the_cpu(tmp_path):
    # illegal_address launches a kernel that faults a CUDA context: on the
    # CPU backend there is none, so the plan is refused before the model
    # loads rather than turned into an ordinary step error.
    sock = tmp_path / "s.sock"
    plan = "illegal_address@step:3"
    r = subprocess.run(
        [str(FAULTS_BIN), "serve", "--backend", "cpu", "--socket", str(sock),
         "--model", "tiny", "--kv-blocks", "64"],
        env={"TACFLOW_INJECT_FAULT": plan, "TACFLOW_LOG": "info"},
        capture_output=True, text=True, timeout=60,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert f"TACFLOW_INJECT_FAULT={plan}" in out and "--backend cuda" in out, out
    assert "loading model" not in out, "refused after loading"
    assert not sock.exists()


# ---------------------------------------------------------------- refusals


def refused(tmp_path, *args: str) -> str:
    """Runs ``tacflowd serve`` expecting a refusal; returns its output."""
    sock = tmp_path / "refused.sock"
    r = subprocess.run(
        [str(BIN), "serve", "--backend", "cpu", "--socket", str(sock), *args],
        capture_output=True, text=True, timeout=60,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "loading weights" not in out and "loading model" not in out, "refused after loading"
    assert not sock.exists()
    return out


def test_a_model_too_large_for_the_host_is_refused_before_loading(tmp_path):
    out = refused(tmp_path, "--model", "random:llama-3-8b", "--memory-limit", "16GiB")
    assert "not enough memory" in out
    assert "weights 29.92 GiB (32121044992 bytes as f32)" in out, out
    assert "memory_limit is 16.00 GiB" in out


def test_a_model_too_large_for_available_memory_is_refused(tmp_path):
    # The weights (30 GiB of f32) plus a KV cache of twice the host's
    # available memory (4 MiB a block of 16 tokens): too large on any host.
    meminfo = pathlib.Path("/proc/meminfo").read_text()
    kb = int(next(l for l in meminfo.splitlines() if l.startswith("MemAvailable:")).split()[1])
    blocks = 2 * kb * 1024 // (4 << 20)
    out = refused(tmp_path, "--model", "random:llama-3-8b", "--kv-blocks", str(blocks))
    assert "not enough memory" in out and "host memory available is" in out, out


def test_a_kv_cache_too_large_is_refused_before_loading(tmp_path):
    out = refused(tmp_path, "--model", "tiny", "--kv-blocks", "100000000")
    assert "not enough memory" in out and "KV cache 1144.41 GiB" in out, out


def test_a_small_model_over_an_explicit_limit_is_refused(tmp_path):
    out = refused(tmp_path, "--model", "tiny", "--kv-blocks", "64", "--memory-limit", "1MiB")
    assert "memory_limit is 1.00 MiB (1048576 bytes)" in out, out
    # The same model fits a generous limit (the refusal is the limit's).
    d = Daemon(tmp_path, ["--model", "tiny", "--kv-blocks", "64", "--memory-limit", "1GiB"])
    assert d.client().health().ok
    assert d.stop() == 0


def test_a_second_daemon_on_a_live_socket_is_refused_before_loading(start_daemon, tmp_path):
    first = start_daemon("--model", "tiny", "--kv-blocks", "64")
    r = subprocess.run(
        [str(BIN), "serve", "--backend", "cpu", "--socket", str(first.socket),
         "--model", "random:llama-3-8b"],
        capture_output=True, text=True, timeout=60,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "another daemon is listening there" in out, out
    assert "loading model" not in out and "not enough memory" not in out, "checked after the model"
    assert first.client().health().ok, "the first daemon is untouched"
