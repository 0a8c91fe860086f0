"""A stand-in for ``tacflowd``'s socket: a ZeroMQ ROUTER in a thread.

It answers requests with canned bodies (the hello reply of the shared
vectors) and lets a test replace the handler of any kind, to send stale,
malformed, late or error replies. It checks nothing about the model: it is
for testing the client's transport, matching and error handling.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import msgpack
import zmq

from tacflow.protocol import ERROR_KIND, REPLY_BIT, Kind

from .vectors import VECTOR_DIR

Frames = list[bytes]
# A handler gets (kind, body) and returns the messages to send back.
Handler = Callable[[int, dict[str, Any]], list[Frames]]

HELLO_REPLY = msgpack.unpackb((VECTOR_DIR / "hello_reply.msgpack").read_bytes())
INSTANCE_ID = HELLO_REPLY["instance_id"]


def ok(kind: int, body: dict[str, Any]) -> Frames:
    return [bytes([kind | REPLY_BIT]), msgpack.packb(body)]


def error(code: str, message: str, request_id: int | None, **detail: Any) -> Frames:
    body: dict[str, Any] = {}
    if request_id is not None:
        body["request_id"] = request_id
    body.update(code=code, message=message)
    if detail:
        body["detail"] = detail
    return [bytes([ERROR_KIND]), msgpack.packb(body)]


class FakeDaemon:
    def __init__(self, path: Path) -> None:
        self.address = f"ipc://{path}"
        self.received: list[tuple[int, dict[str, Any], Frames]] = []
        self.handlers: dict[int, Handler] = {}
        self.next_region = 1
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        self._ctx.term()

    def bodies(self, kind: int) -> list[dict[str, Any]]:
        return [b for k, b, _ in self.received if k == kind]

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(20):
                continue
            ident, *frames = self._sock.recv_multipart()
            try:
                kind = frames[0][0]
                body = msgpack.unpackb(frames[1])
            except Exception:
                replies = [error("bad_request", "unreadable", None)]
            else:
                self.received.append((kind, body, frames))
                handler = self.handlers.get(kind, self.default)
                replies = handler(kind, body)
            for reply in replies:
                self._sock.send_multipart([ident, *reply])

    def default(self, kind: int, body: dict[str, Any]) -> list[Frames]:
        rid = body.get("request_id")
        if kind == Kind.HELLO:
            return [ok(kind, {**HELLO_REPLY, "request_id": rid})]
        if kind == Kind.PING:
            return [ok(kind, {"request_id": rid, "lease_ms": 30000})]
        if kind == Kind.REGISTER_REGION:
            region_id, self.next_region = self.next_region, self.next_region + 1
            size = body["region"]["byte_size"]
            return [ok(kind, {"request_id": rid, "region_id": region_id, "byte_size": size})]
        if kind in (Kind.OPEN_SEQUENCE, Kind.TRUNCATE_SEQUENCE, Kind.FORK_SEQUENCE):
            seq = body.get("seq_id", body.get("child"))
            return [ok(kind, {"request_id": rid, "seq_id": seq, "num_tokens": 5})]
        if kind == Kind.STEP:
            results = [
                {"seq_id": e["seq_id"], "num_tokens": len(e["tokens"]), "token": 7}
                for e in body["entries"]
            ]
            return [ok(kind, {"request_id": rid, "results": results, "timing": {"queued_us": 1, "run_us": 2}})]
        if kind == Kind.HEALTH:
            return [
                ok(kind, {"request_id": rid, "status": "ok", "instance_id": INSTANCE_ID,
                          "backend": {"kind": "cpu", "device": "2 threads"}, "executor_idle_ms": 3})
            ]
        if kind == Kind.STATS:
            return [ok(kind, STATS | {"request_id": rid})]
        if kind in (Kind.CLOSE, Kind.UNREGISTER_REGION, Kind.CLOSE_SEQUENCE):
            return [ok(kind, {"request_id": rid})]
        return [error("bad_request", f"unknown request kind 0x{kind:02x}", rid)]


STATS = {
    "instance_id": INSTANCE_ID,
    "uptime_s": 1.5,
    "steps": 10,
    "prefill_tokens": 100,
    "decode_tokens": 20,
    "sessions": 1,
    "sequences": 2,
    "regions": 0,
    "kv_total_blocks": 1024,
    "kv_free_blocks": 1000,
    "queue_depth": 0,
    "errors": {"out_of_kv_blocks": 1},
    "attention": {
        "tactic": {"decode_steps": 4, "tokens_read_fraction": 0.2, "true_mass": 0.93,
                   "success_rate": 0.9, "true_mass_by_layer_head": [[0.9, 0.95]]},
    },
    "a_future_field": [1, 2, 3],
}
