"""The client against a fake daemon socket: hello, matching, timeouts, errors."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest

from tacflow import errors
from tacflow.client import Client
from tacflow.protocol import (
    Kind,
    SamplingParams,
    StepEntry,
    Tactic,
    fork_sequence_body,
    open_sequence_body,
    pack,
)

from .fake_daemon import INSTANCE_ID, FakeDaemon, Frames, error, ok


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    d = FakeDaemon(tmp_path / "tacflowd.sock")
    yield d
    d.close()


@pytest.fixture
def client(daemon: FakeDaemon) -> Iterator[Client]:
    c = Client(daemon.address, timeout_s=5)
    yield c
    c.close()


def test_hello_opens_a_session(daemon: FakeDaemon, client: Client) -> None:
    kind, body, frames = daemon.received[0]
    assert kind == Kind.HELLO
    assert body == {"request_id": 1, "protocol": [1, 4], "client": "tacflow-py/0.1.0"}
    assert client.session == bytes.fromhex("0123456789abcdeffedcba9876543210")
    assert client.instance_id == INSTANCE_ID
    assert client.info.model.name == "tiny" and client.info.kv.block_size == 16
    assert client.info.lease_ms == 30000 and client.info.attention_policies == ("full", "tactic")


def test_bare_path_address(daemon: FakeDaemon) -> None:
    with Client(daemon.address.removeprefix("ipc://"), timeout_s=5) as c:
        assert c.address == daemon.address and c.ping() == 30000


def test_requests_carry_session_and_increasing_ids(daemon: FakeDaemon, client: Client) -> None:
    client.ping()
    out = client.step([])
    client.step([StepEntry(3, [1, 2, 3], sample=False)])
    assert out.results == [] and out.timing.run_us == 2
    ids = [b["request_id"] for _, b, _ in daemon.received]
    assert ids == [1, 2, 3, 4]
    assert all(b["session"] == client.session for k, b, _ in daemon.received if k != Kind.HELLO)
    step = daemon.bodies(Kind.STEP)[1]
    assert step["entries"] == [{"seq_id": 3, "tokens": [1, 2, 3], "sample": False}]


def test_step_results(client: Client) -> None:
    out = client.step([StepEntry(3, [1, 2]), StepEntry(4, (9,))])
    assert [(r.seq_id, r.num_tokens, r.token) for r in out.results] == [(3, 2, 7), (4, 1, 7)]


def test_a_prepacked_step_has_the_bytes_of_a_step(daemon: FakeDaemon, client: Client) -> None:
    from tacflow.protocol import pack_blocks, pack_entry

    entries = [StepEntry(3, [1, 2], blocks=[4, 0, 2**20]), StepEntry(2**40, (9,), sample=False),
               StepEntry(5, [7], blocks=[])]
    out = client.step_packed(
        [pack_entry(e.seq_id, e.tokens, e.sample, None if e.blocks is None else pack_blocks(e.blocks))
         for e in entries]
    )
    assert [(r.seq_id, r.token) for r in out.results] == [(3, 7), (2**40, 7), (5, 7)]
    client.step(entries)
    (_, _, packed), (_, _, plain) = [r for r in daemon.received if r[0] == Kind.STEP]
    rid = client._next_id - 2  # the packed step's id; the plain one came next
    assert packed[1] == pack(
        {"request_id": rid, "session": client.session, "entries": [e.to_wire() for e in entries]}
    )
    assert plain[1] == pack(
        {"request_id": rid + 1, "session": client.session, "entries": [e.to_wire() for e in entries]}
    )


def test_a_packed_step_can_be_abandoned(daemon: FakeDaemon, client: Client) -> None:
    from tacflow.errors import DaemonUnavailable
    from tacflow.protocol import pack_entry

    daemon.handlers[Kind.STEP] = lambda kind, body: []  # never answers
    asked = []

    def gone() -> str | None:
        asked.append(1)
        return "found dead" if len(asked) >= 2 else None

    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable, match="abandoned: found dead"):
        client.step_packed([pack_entry(1, [2], True)], abandon=gone)
    assert len(asked) == 2 and time.monotonic() - t0 < 3


def test_sequence_requests_match_the_builders(daemon: FakeDaemon, client: Client) -> None:
    assert client.open_sequence(11, Tactic(0.9, recluster_limit=2048), SamplingParams(top_k=5), True) == 5
    assert client.fork_sequence(11, 12, SamplingParams(seed=3)) == 5
    assert client.truncate_sequence(11, 2) == 5
    client.close_sequence(12)
    (_, _, open_frames), (_, _, fork_frames) = [r for r in daemon.received if r[0] in (0x20, 0x21)]
    s = client.session
    assert open_frames[1] == pack(
        open_sequence_body(2, s, 11, Tactic(0.9, recluster_limit=2048), SamplingParams(top_k=5), True)
    )
    assert fork_frames[1] == pack(fork_sequence_body(3, s, 11, 12, SamplingParams(seed=3)))
    assert daemon.bodies(Kind.TRUNCATE_SEQUENCE)[0]["num_tokens"] == 2
    assert daemon.bodies(Kind.CLOSE_SEQUENCE)[0]["seq_id"] == 12


def test_stats_and_health(client: Client) -> None:
    st = client.stats()
    assert st.steps == 10 and st.errors == {"out_of_kv_blocks": 1}
    assert st.attention["tactic"].true_mass_by_layer_head == [[0.9, 0.95]]
    assert st.attention["tactic"].tokens_read_by_layer_head == []
    h = client.health()
    assert (h.status, h.backend.kind, h.executor_idle_ms) == ("ok", "cpu", 3)


def test_stale_replies_are_dropped(daemon: FakeDaemon, client: Client) -> None:
    def twice(kind: int, body: dict[str, Any]) -> list[Frames]:
        rid = body["request_id"]
        stale = ok(kind, {"request_id": rid - 100, "lease_ms": 1})
        return [stale, ok(kind, {"request_id": rid, "lease_ms": 2})]

    daemon.handlers[Kind.PING] = twice
    assert client.ping() == 2


def test_timeout_then_late_reply_is_discarded(daemon: FakeDaemon) -> None:
    held: list[Frames] = []

    def slow_step(kind: int, body: dict[str, Any]) -> list[Frames]:
        reply = daemon.default(kind, body)
        if not held and not body["entries"]:
            held.extend(reply)  # answer the first step only later
            return []
        return [*held, *reply]  # the late reply arrives first

    daemon.handlers[Kind.STEP] = slow_step
    with Client(daemon.address, timeout_s=0.3) as c:
        t0 = time.monotonic()
        with pytest.raises(errors.RequestTimeout) as info:
            c.step([])
        assert 0.25 < time.monotonic() - t0 < 2
        assert isinstance(info.value, TimeoutError) and info.value.request_id == 2
        out = c.step([StepEntry(5, [1])])
        assert [r.seq_id for r in out.results] == [5]  # not the late empty one


def test_error_replies_raise_their_class(daemon: FakeDaemon, client: Client) -> None:
    daemon.handlers[Kind.STEP] = lambda k, b: [
        error("out_of_kv_blocks", "no room", b["request_id"], needed=9, free=4, entry=0)
    ]
    with pytest.raises(errors.OutOfKvBlocks) as info:
        client.step([StepEntry(1, [1])])
    assert info.value.detail == {"needed": 9, "free": 4, "entry": 0}
    daemon.handlers[Kind.PING] = lambda k, b: [error("brand_new_code", "?", b["request_id"])]
    with pytest.raises(errors.TacflowError) as info2:
        client.ping()
    assert type(info2.value) is errors.TacflowError


def test_restart_is_detected(daemon: FakeDaemon, client: Client) -> None:
    daemon.handlers[Kind.STEP] = lambda k, b: [
        error("unknown_session", "no such session", b["request_id"], instance_id="another")
    ]
    with pytest.raises(errors.DaemonRestarted):
        client.step([])
    daemon.handlers[Kind.STEP] = lambda k, b: [
        error("unknown_session", "expired", b["request_id"], instance_id=INSTANCE_ID)
    ]
    with pytest.raises(errors.UnknownSession) as info:
        client.step([])
    assert type(info.value) is errors.UnknownSession
    # hello again: a new session, and the client works on.
    daemon.handlers.pop(Kind.STEP)
    client.hello()
    assert client.step([]).results == []


def test_unreadable_error_answers_the_request_in_flight(daemon: FakeDaemon, client: Client) -> None:
    daemon.handlers[Kind.STEP] = lambda k, b: [error("bad_request", "header too large", None)]
    with pytest.raises(errors.BadRequest):
        client.step([])


def test_wrong_reply_kind_is_a_protocol_error(daemon: FakeDaemon, client: Client) -> None:
    daemon.handlers[Kind.PING] = lambda k, b: [ok(Kind.STATS, {"request_id": b["request_id"]})]
    with pytest.raises(errors.ProtocolError):
        client.ping()
    daemon.handlers[Kind.STEP] = lambda k, b: [
        ok(Kind.STEP, {"request_id": b["request_id"], "results": [{"seq_id": 1}], "timing": {}})
    ]
    with pytest.raises(errors.ProtocolError):
        client.step([])


def test_no_daemon_is_unavailable(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(errors.DaemonUnavailable) as info:
        Client(tmp_path / "nobody.sock", timeout_s=0.2)
    assert time.monotonic() - t0 < 2
    assert isinstance(info.value, ConnectionError) and "nobody.sock" in str(info.value)


def test_connect_timeout_is_separate(daemon: FakeDaemon, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(errors.DaemonUnavailable):
        Client(tmp_path / "nobody.sock", timeout_s=30, connect_timeout_s=0.2)
    assert time.monotonic() - t0 < 2
    with Client(daemon.address, timeout_s=7, connect_timeout_s=1) as c:
        assert c.timeout_s == 7
        c.timeout_s = 0.2
        daemon.handlers[Kind.PING] = lambda k, b: []
        with pytest.raises(errors.RequestTimeout):
            c.ping()


def test_unsupported_version_surfaces(daemon: FakeDaemon) -> None:
    daemon.handlers[Kind.HELLO] = lambda k, b: [
        error("unsupported_version", "speak 2", b["request_id"], daemon_major=2, daemon_minor=0)
    ]
    with pytest.raises(errors.UnsupportedVersion) as info:
        Client(daemon.address, timeout_s=2)
    assert info.value.detail["daemon_major"] == 2


def test_regions_register_and_clean_up(daemon: FakeDaemon, client: Client) -> None:
    region = client.create_region(8192)
    reg = daemon.bodies(Kind.REGISTER_REGION)[0]
    assert reg["region"] == {"kind": "shm", "name": region.name, "byte_size": 8192}
    assert region.region_id == 1 and Path("/dev/shm", region.name).exists()
    region.close()
    assert daemon.bodies(Kind.UNREGISTER_REGION)[0]["region_id"] == 1
    assert not Path("/dev/shm", region.name).exists()
    # Regions still open at close() are unlinked with the session.
    other = client.create_region(64)
    client.close()
    assert other.closed and not Path("/dev/shm", other.name).exists()
    assert len(daemon.bodies(Kind.UNREGISTER_REGION)) == 1  # the session's end frees it
    assert len(daemon.bodies(Kind.CLOSE)) == 1
    client.close()  # idempotent
    with pytest.raises(errors.DaemonUnavailable):
        client.ping()


def test_failed_registration_unlinks(daemon: FakeDaemon, client: Client) -> None:
    names: list[str] = []

    def refuse(kind: int, body: dict[str, Any]) -> list[Frames]:
        names.append(body["region"]["name"])
        return [error("permission_denied", "not yours", body["request_id"])]

    daemon.handlers[Kind.REGISTER_REGION] = refuse
    with pytest.raises(errors.PermissionDenied):
        client.create_region(64)
    assert names and not Path("/dev/shm", names[0]).exists()


def test_raw_escape_hatches(daemon: FakeDaemon, client: Client) -> None:
    reply = client.request(Kind.PING, {"extra": [1, 2]})
    assert reply["lease_ms"] == 30000
    _, body, _ = daemon.received[-1]
    assert list(body) == ["request_id", "session", "extra"]
    with pytest.raises(errors.BadRequest):
        client.request(0x77, {}, session=False)
    assert "session" not in daemon.received[-1][1]
    client.send_raw([b"\x02", msgpack.packb({"request_id": 99, "session": client.session})])
    kind, header = client.recv_raw()
    assert kind == b"\x82" and msgpack.unpackb(header)["request_id"] == 99
    client.send_raw([b"\x02"])  # one frame: the daemon cannot read it
    kind, header = client.recv_raw()
    assert kind == b"\xff" and "request_id" not in msgpack.unpackb(header)
    with pytest.raises(errors.RequestTimeout):
        client.recv_raw(timeout_s=0.05)
