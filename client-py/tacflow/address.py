"""Where the daemon listens (PROTOCOL.md §1).

A client tries, in order: an explicit address, ``$TACFLOW_SOCKET``, then the
three places a daemon binds by default — ``/run/tacflow/tacflowd.sock``
(systemd's ``RuntimeDirectory``), ``$XDG_RUNTIME_DIR/tacflow/tacflowd.sock``,
``$TMPDIR/tacflow-<uid>/tacflowd.sock`` (``/tmp`` when ``TMPDIR`` is unset,
as Rust's ``std::env::temp_dir`` does on the daemon's side).

An explicit address and ``$TACFLOW_SOCKET`` are taken as given, without
checking that the socket exists: the user chose them, falling back to some
other daemon would be a surprise, and ZeroMQ connects to an ``ipc://`` path
as soon as a daemon binds it, so a client may start first. The default
paths are only candidates: the first that is an existing socket file wins.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Mapping

from .errors import DaemonUnavailable

SOCKET_NAME = "tacflowd.sock"
SYSTEM_SOCKET = Path("/run/tacflow") / SOCKET_NAME


def to_endpoint(address: str | os.PathLike[str]) -> str:
    """A ZeroMQ endpoint: ``ipc://``/``tcp://`` kept, a bare path made ``ipc://``."""
    text = os.fspath(address)
    if "://" in text:
        return text
    return "ipc://" + os.path.abspath(text)


def default_socket_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """The default socket paths, in the order a client tries them."""
    env = os.environ if env is None else env
    paths = [SYSTEM_SOCKET]
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        paths.append(Path(xdg) / "tacflow" / SOCKET_NAME)
    tmp = env.get("TMPDIR") or "/tmp"
    paths.append(Path(tmp) / f"tacflow-{os.getuid()}" / SOCKET_NAME)
    return paths


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def resolve_address(
    address: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> str:
    """The endpoint to connect to, following §1's order.

    Raises :class:`DaemonUnavailable` when nothing is given and no default
    path holds a socket, naming every path it tried.
    """
    env = os.environ if env is None else env
    if address is not None and os.fspath(address) != "":
        return to_endpoint(address)
    from_env = env.get("TACFLOW_SOCKET")
    if from_env:
        return to_endpoint(from_env)
    tried = default_socket_paths(env)
    for path in tried:
        if is_socket(path):
            return to_endpoint(path)
    listing = ", ".join(str(p) for p in tried)
    raise DaemonUnavailable(
        "unavailable",
        f"no tacflowd socket found (tried {listing}); start the daemon "
        "(`tacflowd serve --socket PATH`) or pass an address / set TACFLOW_SOCKET",
    )
