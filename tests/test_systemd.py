"""Running as a daemon: sd_notify against a
NOTIFY_SOCKET this test listens on (READY after the warm-up, STATUS,
WATCHDOG pings driven by the executor, STOPPING, exit 0), socket
activation, the shutdown bound, journal-friendly logs, the unit files, and
the Prometheus endpoint."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from conftest import BIN, ROOT, Daemon
from tacflow import Client, StepEntry
from tacflow import errors as E

UNITS = ROOT / "examples" / "systemd"


@pytest.fixture
def reap():
    """Registers daemons started here; any still running at teardown (a
    failed assertion skipped its stop) is killed."""
    started: list[Daemon] = []
    yield lambda d: started.append(d) or d
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


class NotifySocket:
    """What systemd listens on: a datagram socket collecting sd_notify lines."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, list[str]]] = []

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return
            self.messages.append((time.monotonic(), data.decode().strip().split("\n")))

    def wait_for(self, line: str, timeout_s: float = 60) -> float:
        """Pumps until a message has ``line``; returns when it came."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for t, lines in self.messages:
                if line in lines:
                    return t
            self.pump(0.05)
        raise AssertionError(f"no {line!r} within {timeout_s} s: {self.messages}")

    def times(self, line: str) -> list[float]:
        return [t for t, lines in self.messages if line in lines]

    def statuses(self) -> list[str]:
        return [x[7:] for _, lines in self.messages for x in lines if x.startswith("STATUS=")]


def big_step(c: Client, n_seqs: int = 3) -> list[StepEntry]:
    """A step of several 4000-token prompts: seconds on the CPU."""
    entries = []
    for s in range(n_seqs):
        c.open_sequence(100 + s)
        entries.append(StepEntry(100 + s, [5 + s] * 4000, sample=False))
    return entries


def test_notify_ready_status_watchdog_and_stopping(tmp_path, reap):
    notify = NotifySocket(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"}
    d = reap(Daemon(tmp_path, ["--kv-blocks", "2048"], env))
    ready = notify.wait_for("READY=1")
    statuses = notify.statuses()
    assert statuses[0].startswith("loading model tiny"), statuses
    assert "warming up" in statuses
    assert statuses.index("warming up") < len(statuses) - 1, "READY comes after the warm-up"
    assert any(s.startswith("serving: 0 sessions") for s in statuses), statuses
    assert d.socket.exists(), "READY only once the socket accepts clients"
    c = d.client()
    notify.pump(1.0)
    pings = [t for t in notify.times("WATCHDOG=1") if t > ready]
    assert len(pings) >= 4, f"about one ping per 100 ms, got {len(pings)}"
    # A step that runs for seconds: the executor is busy, so no ping comes
    # until it finishes (a hung step would stop them for good).
    entries = big_step(c)
    t0 = time.monotonic()
    out = c.step(entries)
    t1 = time.monotonic()
    notify.pump(0.5)
    run_s = out.timing.run_us / 1e6
    assert run_s > 0.5, "the step is long enough to see a gap"
    during = [t for t in notify.times("WATCHDOG=1") if t0 < t < t1]
    window = [t0] + during + [min(t for t in notify.times("WATCHDOG=1") if t > t1)]
    gap = max(b - a for a, b in zip(window, window[1:]))
    assert gap >= 0.8 * run_s, f"pings kept coming during a {run_s:.2f} s step (gap {gap:.2f} s)"
    assert any(s.startswith("serving: 1 sessions, 3 sequences") for s in notify.statuses())
    # SIGTERM: STOPPING=1, then a clean exit.
    t = time.monotonic()
    rc = d.stop(timeout_s=20)
    assert rc == 0, d.log()
    assert time.monotonic() - t < 10
    notify.pump(0.2)
    assert notify.times("STOPPING=1"), notify.messages
    assert not d.socket.exists()


def test_shutdown_waits_for_the_step_in_flight_but_not_forever(tmp_path, reap):
    # Default bound: the step in flight finishes, the daemon exits 0.
    (tmp_path / "a").mkdir()
    d = reap(Daemon(tmp_path / "a", ["--kv-blocks", "2048"]))
    c = d.client()
    c.send_raw(_step_frames(c, big_step(c, 2)))
    time.sleep(0.2)
    d.proc.send_signal(signal.SIGTERM)
    kind, body = c.recv_raw(timeout_s=60)
    assert kind == b"\xb0", "the step in flight finished and was answered"
    assert d.stop(timeout_s=30) == 0, d.log()
    # A bound shorter than the step: the daemon gives up on it and exits
    # non-zero at once, instead of hanging until systemd kills it.
    (tmp_path / "b").mkdir()
    d = reap(Daemon(tmp_path / "b", ["--kv-blocks", "2048", "--shutdown-timeout-ms", "200"]))
    c = d.client()
    entries = big_step(c, 3)
    c.send_raw(_step_frames(c, entries))
    time.sleep(0.2)
    t = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(30)
    assert rc != 0 and time.monotonic() - t < 1.5, (rc, d.log())
    assert "did not finish within the shutdown timeout" in d.log()
    assert not d.socket.exists()


def _step_frames(c: Client, entries: list[StepEntry]) -> list[bytes]:
    import msgpack

    body = {"request_id": 777, "session": c.session, "entries": [e.to_wire() for e in entries]}
    return [bytes([0x30]), msgpack.packb(body, use_single_float=True)]


def _listening(path, kind: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(str(path))
    os.chmod(path, 0o660)
    s.listen(64)
    return s


def test_socket_activation_adopts_the_passed_sockets(tmp_path):
    main = _listening(tmp_path / "tacflowd.sock", socket.SOCK_STREAM)
    fdsock = _listening(tmp_path / "tacflowd.fd.sock", socket.SOCK_SEQPACKET)
    fds = (main.fileno(), fdsock.fileno())

    def place_fds():  # what systemd does: the sockets become fds 3 and 4
        high = [os.dup2(fd, 100 + i) for i, fd in enumerate(fds)]
        for i, fd in enumerate(high):
            os.dup2(fd, 3 + i)

    log = open(tmp_path / "log", "wb")
    cmd = ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=tacflowd:tacflowd exec "$@"',
           "sh", str(BIN), "serve", "--backend", "cpu", "--kv-blocks", "64"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, pass_fds=(3, 4),
                            preexec_fn=place_fds, env={**os.environ, "TACFLOW_LOG": "info"})
    try:
        # The kernel queues the connection until the daemon adopts the socket.
        c = Client(f"ipc://{tmp_path / 'tacflowd.sock'}", timeout_s=120)
        assert c.info.fd_socket == str(tmp_path / "tacflowd.fd.sock")
        c.open_sequence(1)
        assert c.step([StepEntry(1, [1, 2, 3])]).results[0].num_tokens == 3
        region = c.create_memfd_region(4096)
        assert region.kind == "memfd"
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        log.close()
    text = (tmp_path / "log").read_text()
    assert rc == 0, text
    assert "socket activation" in text
    # systemd keeps listening on its sockets: the daemon leaves them alone.
    assert (tmp_path / "tacflowd.sock").exists() and (tmp_path / "tacflowd.fd.sock").exists()
    main.close()
    fdsock.close()


def test_journal_log_format(tmp_path, reap):
    d = reap(Daemon(tmp_path, ["--kv-blocks", "64", "--log-format", "journal"]))
    d.client().close()
    assert d.stop() == 0
    lines = [x for x in d.log_path.read_text().splitlines() if x.strip()]
    assert len(lines) >= 4
    for line in lines:
        assert re.match(r"^<[3467]>[a-z_:]+: ", line), line
        assert "\x1b[" not in line, "no colours in the journal"
        assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", line), "journald adds its own time"
    assert any(x.startswith("<6>") and "listening" in x for x in lines)


def test_unit_files_pass_systemd_analyze_verify(tmp_path, reap):
    service = (UNITS / "tacflowd.service").read_text()
    for key in ("Type=notify", "WatchdogSec=", "TimeoutStopSec=", "NoNewPrivileges=yes",
                "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "RuntimeDirectory=tacflow",
                "DeviceAllow=/dev/nvidiactl rw", "DeviceAllow=/dev/nvidia-uvm rw", "User=tacflow",
                "--log-format journal"):
        assert key in service, key
    assert "PrivateDevices=yes" not in service, "the GPU device nodes must stay reachable"
    # The example config loads (minus the group, which this machine may lack).
    toml = (UNITS / "tacflowd.toml").read_text().replace('socket_group = "tacflow"', "")
    (tmp_path / "c.toml").write_text(toml)
    d = reap(Daemon(tmp_path, ["--config", str(tmp_path / "c.toml"), "--log-format", "text"]))
    assert d.client().info.model.name == "tiny"
    assert d.stop() == 0
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed: the unit files were NOT verified "
                    "(apt-get install systemd to run this check)")
    (tmp_path / "units").mkdir()
    # verify checks that ExecStart exists: point it at the binary under test.
    (tmp_path / "units" / "tacflowd.service").write_text(
        service.replace("/usr/local/bin/tacflowd", str(BIN)))
    shutil.copy(UNITS / "tacflowd.socket", tmp_path / "units")
    r = subprocess.run([tool, "verify", "--man=no", "tacflowd.service", "tacflowd.socket"],
                       cwd=tmp_path / "units", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def scrape(port: int, path: str = "/metrics") -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    assert "# TYPE tacflow_step_duration_seconds histogram" in text
    assert "# TYPE tacflow_attention_tokens_read_fraction gauge" in text
    return out


def test_prometheus_endpoint(tmp_path, reap):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = reap(Daemon(tmp_path, ["--kv-blocks", "64", "--metrics-addr", str(port)]))
    c = d.client()
    c.open_sequence(1)
    t = c.step([StepEntry(1, [1, 2, 3])]).results[0].token
    c.step([StepEntry(1, [t])])
    with pytest.raises(E.UnknownSequence):
        c.step([StepEntry(9, [1])])
    c.create_region(4096)
    m = scrape(port)
    assert m['tacflow_tokens_total{phase="prefill"}'] == 3
    assert m['tacflow_tokens_total{phase="decode"}'] == 1
    assert m["tacflow_step_duration_seconds_count"] == 2
    assert m['tacflow_step_duration_seconds_bucket{le="+Inf"}'] == 2
    assert m["tacflow_kv_blocks_used"] == 1 and m["tacflow_kv_blocks_free"] == 63
    assert (m["tacflow_sessions"], m["tacflow_sequences"], m["tacflow_regions"]) == (1, 1, 1)
    assert m['tacflow_requests_total{kind="step"}'] == 3
    assert m['tacflow_requests_total{kind="hello"}'] == 1
    assert m['tacflow_errors_total{code="unknown_sequence"}'] == 1
    assert m["tacflow_mapped_bytes"] == 4096
    with pytest.raises(urllib.error.HTTPError) as err:
        scrape(port, "/other")
    assert err.value.code == 404
    assert d.stop() == 0
