"""The companion socket: how a client hands the daemon a sealed memfd
(PROTOCOL.md §3.4).

A ``SOCK_SEQPACKET`` Unix socket beside the daemon's main socket
(``tacflowd.sock`` → ``tacflowd.fd.sock``; ``hello`` also says where). One
packet carries a msgpack map ``{request_id, session, byte_size}`` and the
descriptor in ``SCM_RIGHTS``; the answer is ``{request_id, fd_token}`` or an
error body. The client then registers ``{kind: "memfd", fd_token,
byte_size}`` on the main socket, in the same session. The daemon reads the
sender's uid from the socket (``SO_PEERCRED``), so this works when the
daemon runs as another user and no name is shared.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import msgpack

from .errors import DaemonUnavailable, ProtocolError, error_from_reply
from .protocol import fd_transfer_body

#: Largest packet the daemon answers with (its own limit is 4 KiB).
_MAX_REPLY = 65536


def companion_path(address: str, announced: str | None) -> str:
    """The companion socket's path: what ``hello`` announced, else beside an
    ``ipc://`` socket (``X.sock`` → ``X.fd.sock``)."""
    if announced:
        return announced
    if not address.startswith("ipc://"):
        raise DaemonUnavailable(
            "unavailable",
            f"{address}: this daemon announced no companion socket, and a TCP "
            "address does not tell where it is",
        )
    path = address[len("ipc://"):]
    base = path[: -len(".sock")] if path.endswith(".sock") else path
    return base + ".fd.sock"


def send_memfd(
    path: str,
    session: bytes,
    request_id: int,
    fd: int,
    byte_size: int,
    timeout_s: float,
    instance_id: str | None = None,
) -> int:
    """Sends ``fd`` (a sealed memfd) for ``session``; returns its ``fd_token``."""
    packet = msgpack.packb(fd_transfer_body(request_id, session, byte_size))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout_s)
            s.connect(path)
            socket.send_fds(s, [packet], [fd])
            raw = s.recv(_MAX_REPLY)
    except OSError as exc:
        raise DaemonUnavailable(
            "unavailable", f"companion socket {path}: {exc.strerror or exc}"
        ) from None
    try:
        body: Any = msgpack.unpackb(raw)
    except Exception:
        body = None
    if not isinstance(body, dict):
        raise ProtocolError("protocol_error", f"companion socket {path}: unreadable reply {raw!r}")
    if "code" in body:
        raise error_from_reply(body, instance_id)
    if body.get("request_id") != request_id or not isinstance(body.get("fd_token"), int):
        raise ProtocolError("protocol_error", f"companion socket {path}: unexpected reply {body!r}")
    return int(body["fd_token"])


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
