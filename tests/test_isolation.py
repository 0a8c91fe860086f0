"""Limits and isolation: per-session limits, socket modes,
sealed memfds over the companion socket, regions by name only from the
daemon's own user, TCP peers without credentials, and sessions that see
nothing of each other."""

from __future__ import annotations

import grp
import multiprocessing
import os
import pathlib
import shutil
import socket
import stat
import tempfile

import msgpack
import numpy as np
import pytest

from tacflow import Client, MemfdRegion, StepEntry
from tacflow import errors as E
from tacflow.protocol import Kind
from tacflow.region import memfd_create_sealed


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_session_limit_is_enforced(start_daemon):
    d = start_daemon(
        "--kv-blocks", "256", "--max-sequences", "3", "--max-regions", "2",
        "--max-mapped-bytes", "65536", "--max-step-tokens", "64",
    )
    c = d.client()
    assert (c.info.limits.max_sequences, c.info.limits.max_regions) == (3, 2)
    for s in (1, 2, 3):
        c.open_sequence(s)
    with pytest.raises(E.LimitExceeded):
        c.open_sequence(4)
    with pytest.raises(E.LimitExceeded):
        c.fork_sequence(1, 5)
    c.close_sequence(3)
    c.fork_sequence(1, 3)  # a freed slot can be used again
    with pytest.raises(E.LimitExceeded):
        c.step([StepEntry(1, [1] * 65)])
    c.step([StepEntry(1, [1] * 64)])
    a = c.create_region(32768)
    with pytest.raises(E.LimitExceeded):  # 32768 + 40000 > 65536
        c.create_region(40000)
    b = c.create_memfd_region(16384)
    with pytest.raises(E.LimitExceeded):  # a third region
        c.create_region(4096)
    a.close()
    b.close()
    c.create_region(65536)  # unregistering gave the bytes back
    # Another session has limits of its own.
    other = d.client()
    for s in (1, 2, 3):
        other.open_sequence(s)


def pipelined_steps(c: Client, n: int, tokens: list[int]) -> dict[str, int]:
    """Sends ``n`` steps without reading, then reads every reply; returns
    counts by outcome and checks that each request got exactly one reply."""
    for rid in range(1, n + 1):
        body = {"request_id": 10_000 + rid, "session": c.session,
                "entries": [{"seq_id": 1, "tokens": tokens, "sample": False}]}
        c.send_raw([bytes([Kind.STEP]), msgpack.packb(body)])
    seen: dict[int, str] = {}
    for _ in range(n):
        kind, header = c.recv_raw(timeout_s=120)
        body = msgpack.unpackb(header)
        rid = body["request_id"]
        assert rid not in seen, f"request {rid} answered twice"
        seen[rid] = body["code"] if kind[0] == 0xFF else "ok"
    assert sorted(seen) == list(range(10_001, 10_001 + n))
    out: dict[str, int] = {}
    for v in seen.values():
        out[v] = out.get(v, 0) + 1
    return out


def test_queued_requests_per_session_are_bounded(start_daemon):
    d = start_daemon("--kv-blocks", "4096", "--max-queued-requests", "4")
    c = d.client()
    c.open_sequence(1)
    outcome = pipelined_steps(c, 40, [7] * 16)
    assert outcome.get("busy", 0) > 0 and outcome.get("ok", 0) >= 4, outcome
    assert set(outcome) <= {"ok", "busy"}, outcome


def test_sockets_are_0600_by_default_and_0660_with_a_group(start_daemon):
    d = start_daemon()
    fd_sock = d.socket.with_name("tacflowd.fd.sock")
    for p in (d.socket, fd_sock):
        st = os.stat(p)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, p
    assert d.client().info.fd_socket == str(fd_sock)
    group = grp.getgrgid(os.getgid()).gr_name
    g = start_daemon("--socket-group", group)
    for p in (g.socket, g.socket.with_name("tacflowd.fd.sock")):
        st = os.stat(p)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid(), p


def companion(d, packet: bytes, fds: list[int]) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(10)
        s.connect(str(d.socket.with_name("tacflowd.fd.sock")))
        socket.send_fds(s, [packet], fds)
        return msgpack.unpackb(s.recv(65536))


def test_memfd_regions_and_what_the_companion_socket_refuses(start_daemon):
    d = start_daemon("--kv-blocks", "64")
    c = d.client()
    vocab = c.info.model.vocab_size
    region = c.create_memfd_region(4 * vocab * 4)
    assert region.kind == "memfd" and region.name is None
    c.open_sequence(1)
    c.step([StepEntry(1, [1, 2, 3], logits=region.ref(0, "f32", (3, vocab)))])
    assert np.isfinite(region.array("f32", (3, vocab))).all()
    assert np.abs(region.array("f32", (3, vocab))).sum() > 0
    other = d.client()
    fds_before = fd_count(d.proc.pid)
    body = lambda rid, n: msgpack.packb({"request_id": rid, "session": c.session, "byte_size": n})  # noqa: E731
    # Not sealed.
    plain = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.ftruncate(plain, 4096)
    r = companion(d, body(1, 4096), [plain])
    assert r["code"] == "bad_request" and "F_SEAL_SHRINK" in r["message"] and r["request_id"] == 1
    # Sealed, but smaller than declared.
    small = memfd_create_sealed(4096)
    assert companion(d, body(2, 8192), [small])["code"] == "out_of_bounds"
    # No descriptor, two descriptors, garbage, an unknown session.
    assert companion(d, body(3, 4096), [])["code"] == "bad_request"
    assert companion(d, body(4, 4096), [small, small])["code"] == "bad_request"
    assert companion(d, b"\xc1garbage", [small])["code"] == "bad_request"
    stranger = msgpack.packb({"request_id": 5, "session": b"\0" * 16, "byte_size": 4096})
    assert companion(d, stranger, [small])["code"] == "unknown_session"
    # A token sent by one session cannot be registered by another.
    token = companion(d, body(6, 4096), [small])["fd_token"]
    with pytest.raises(E.UnknownRegion):
        other.register_region(MemfdRegion(token, 4096))
    rid = c.register_region(MemfdRegion(token, 4096))
    with pytest.raises(E.UnknownRegion):  # used once
        c.register_region(MemfdRegion(token, 4096))
    c.unregister_region(rid)
    for fd in (plain, small):
        os.close(fd)
    assert fd_count(d.proc.pid) <= fds_before, "refused descriptors were closed"


def test_regions_cannot_be_named_across_sessions(start_daemon):
    d = start_daemon("--kv-blocks", "64")
    a, b = d.client(), d.client()
    vocab = a.info.model.vocab_size
    ra = a.create_region(4 * vocab)
    a.open_sequence(9)
    with pytest.raises(E.UnknownRegion):
        b.unregister_region(ra.region_id)
    b.open_sequence(1)
    with pytest.raises(E.UnknownRegion):
        b.step([StepEntry(1, [1], logits=ra.ref(0, "f32", (1, vocab)))])
    with pytest.raises(E.UnknownSequence):
        b.step([StepEntry(9, [1])])
    a.step([StepEntry(9, [1], logits=ra.ref(0, "f32", (1, vocab)))])


def test_tcp_peers_have_no_credentials_and_use_memfds(start_daemon):
    port = free_port()
    d = start_daemon("--kv-blocks", "64", "--tcp", str(port))
    c = Client(f"tcp://127.0.0.1:{port}", timeout_s=60)
    assert c.info.region_kinds == ("memfd",)
    shm_region = d.client().create_region(4096)  # same uid over ipc: by name is fine
    with pytest.raises(E.PermissionDenied) as err:
        c.register_shm(shm_region.name, 4096)
    assert "memfd" in err.value.message
    region = c.create_region(4 * c.info.model.vocab_size)  # picks a memfd by itself
    assert region.kind == "memfd"
    c.open_sequence(1)
    c.step([StepEntry(1, [3], logits=region.ref(0, "f32", (1, c.info.model.vocab_size)))])
    assert np.abs(region.array("f32", (1, c.info.model.vocab_size))).sum() > 0
    c.close()


def test_non_loopback_listeners_need_an_explicit_allowance(tmp_path):
    from conftest import BIN
    import subprocess

    for flags, key in ((["--tcp", "0.0.0.0:1"], "tcp_allow_remote"),
                       (["--metrics-addr", "0.0.0.0:1"], "metrics_allow_remote")):
        r = subprocess.run([str(BIN), "serve", "--socket", str(tmp_path / "x.sock"), *flags],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and key in r.stderr, r.stderr


def _as_nobody(address: str, out) -> None:
    """Runs in a forked child: becomes nobody, then tries both region kinds."""
    try:
        os.setgid(65534)
        os.setuid(65534)
        import zmq

        c = Client(address, timeout_s=30, context=zmq.Context())
        result = {"kinds": list(c.info.region_kinds)}
        from multiprocessing import shared_memory

        shm = shared_memory.SharedMemory(create=True, size=4096)
        try:
            c.register_shm(shm.name, 4096)
            result["by_name"] = "accepted"
        except E.PermissionDenied as e:
            result["by_name"] = e.code
        finally:
            shm.close()
            shm.unlink()
        vocab = c.info.model.vocab_size
        region = c.create_region(4 * vocab)
        c.open_sequence(1)
        c.step([StepEntry(1, [5], logits=region.ref(0, "f32", (1, vocab)))])
        result["memfd"] = region.kind
        result["logits"] = float(np.abs(region.array("f32", (1, vocab))).sum())
        c.close()
        out.send(result)
    except BaseException as e:  # report, never hang the parent
        out.send({"error": repr(e)})


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user (nobody)")
def test_another_user_gets_memfds_only():
    from conftest import Daemon

    # A folder nobody can traverse (pytest's tmp_path is private to root).
    sock_dir = pathlib.Path(tempfile.mkdtemp(prefix="tacflow-users-"))
    os.chmod(sock_dir, 0o711)
    d = Daemon(sock_dir, ["--kv-blocks", "64", "--socket-group", "nogroup"])
    try:
        assert d.client().info.region_kinds == ("shm", "memfd"), "the daemon's own user may use names"
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_as_nobody, args=(d.address, child))
        p.start()
        assert parent.poll(60), "the client running as nobody did not report"
        result = parent.recv()
        p.join(10)
    finally:
        assert d.stop() == 0, d.log()
        shutil.rmtree(sock_dir)
    assert "error" not in result, result
    assert result["kinds"] == ["memfd"]
    assert result["by_name"] == "permission_denied"
    assert result["memfd"] == "memfd" and result["logits"] > 0
