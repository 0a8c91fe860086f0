"""Address resolution order of PROTOCOL.md §1."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tacflow import address
from tacflow.address import default_socket_paths, resolve_address, to_endpoint
from tacflow.errors import DaemonUnavailable


def make_socket(path: Path) -> Path:
    """A real Unix socket file at ``path`` (a plain file would not count)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays
    return path


@pytest.fixture
def fake_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Points the /run/tacflow default into a temp dir."""
    system = tmp_path / "run" / "tacflow" / "tacflowd.sock"
    monkeypatch.setattr(address, "SYSTEM_SOCKET", system)
    return system


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {"TMPDIR": str(tmp_path / "tmp")}
    env.update(extra)
    return env


def test_endpoint_forms() -> None:
    assert to_endpoint("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    assert to_endpoint("ipc:///x/y.sock") == "ipc:///x/y.sock"
    assert to_endpoint("/x/y.sock") == "ipc:///x/y.sock"
    assert to_endpoint(Path("rel.sock")) == "ipc://" + os.path.abspath("rel.sock")


def test_explicit_wins_over_everything(tmp_path: Path, fake_system: Path) -> None:
    make_socket(fake_system)
    env = env_for(tmp_path, TACFLOW_SOCKET=str(tmp_path / "env.sock"))
    assert resolve_address("tcp://10.0.0.1:7000", env) == "tcp://10.0.0.1:7000"
    # An explicit path is taken even if no socket is there yet.
    assert resolve_address(tmp_path / "later.sock", env) == f"ipc://{tmp_path}/later.sock"


def test_env_wins_over_defaults(tmp_path: Path, fake_system: Path) -> None:
    make_socket(fake_system)
    env = env_for(tmp_path, TACFLOW_SOCKET="ipc:///somewhere/else.sock")
    assert resolve_address(None, env) == "ipc:///somewhere/else.sock"
    env["TACFLOW_SOCKET"] = ""  # empty counts as unset
    assert resolve_address(None, env) == f"ipc://{fake_system}"


def test_default_order(tmp_path: Path, fake_system: Path) -> None:
    xdg = tmp_path / "xdg"
    env = env_for(tmp_path, XDG_RUNTIME_DIR=str(xdg))
    tmp_sock = tmp_path / "tmp" / f"tacflow-{os.getuid()}" / "tacflowd.sock"
    xdg_sock = xdg / "tacflow" / "tacflowd.sock"
    assert default_socket_paths(env) == [fake_system, xdg_sock, tmp_sock]

    make_socket(tmp_sock)
    assert resolve_address(None, env) == f"ipc://{tmp_sock}"
    make_socket(xdg_sock)
    assert resolve_address(None, env) == f"ipc://{xdg_sock}"
    make_socket(fake_system)
    assert resolve_address(None, env) == f"ipc://{fake_system}"


def test_tmp_fallback_without_tmpdir(fake_system: Path) -> None:
    paths = default_socket_paths({})
    assert paths == [fake_system, Path(f"/tmp/tacflow-{os.getuid()}/tacflowd.sock")]


def test_plain_files_are_not_sockets(tmp_path: Path, fake_system: Path) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "tacflow").mkdir(parents=True)
    (xdg / "tacflow" / "tacflowd.sock").write_text("not a socket")
    tmp_sock = make_socket(tmp_path / "tmp" / f"tacflow-{os.getuid()}" / "tacflowd.sock")
    env = env_for(tmp_path, XDG_RUNTIME_DIR=str(xdg))
    assert resolve_address(None, env) == f"ipc://{tmp_sock}"


def test_nothing_found_names_every_path(tmp_path: Path, fake_system: Path) -> None:
    env = env_for(tmp_path, XDG_RUNTIME_DIR=str(tmp_path / "xdg"))
    with pytest.raises(DaemonUnavailable) as info:
        resolve_address(None, env)
    for path in default_socket_paths(env):
        assert str(path) in info.value.message
    assert isinstance(info.value, ConnectionError)


def test_reads_os_environ_by_default(
    tmp_path: Path, fake_system: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TACFLOW_SOCKET", str(tmp_path / "e.sock"))
    assert resolve_address() == f"ipc://{tmp_path}/e.sock"
