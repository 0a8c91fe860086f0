#!/usr/bin/env python3
"""Round-trip latency of an empty step, against two transport baselines.

The acceptance asks what the daemon adds to a request's round trip
beyond the transport itself. Three (plus one) measurements, same machine,
same run, same message bytes:

- ``daemon``: ``Client.step([])`` through a running ``tacflowd`` — the whole
  path a serving stack pays per step: client packing and decoding, ZeroMQ,
  the daemon's I/O thread, its executor queue and back.
- ``daemon_raw``: a bare pyzmq DEALER sending the same pre-packed step to the
  daemon and reading the reply without decoding it: the daemon's share
  without the Python client's (informative; not in the ratio).
- ``zmq_echo``: a pyzmq DEALER and a minimal pyzmq ROUTER echo server in
  another process, sending the empty step's two frames (1-byte kind, msgpack
  header) and getting them back: the floor of any ZeroMQ design.
- ``unix_socket``: a ``SOCK_SEQPACKET`` Unix socket ping-pong between two
  processes with a message of the same total size: the floor of the kernel.

The ZeroMQ baselines send and receive with the very calls the client uses
(:mod:`tacflow.transport`), so the ratio ``daemon_p50 / zmq_echo_p50``
measures the daemon and the client's packing and decoding, not differences
between pyzmq's APIs.

Each measurement runs a warm-up first, then the measured requests in blocks
that alternate between the measurements (the order rotates every block), so
that drift in the machine's state hits all of them alike. Nothing is pinned.

Usage (the daemon is started by the caller)::

    tacflowd serve --socket /tmp/tf.sock --model tiny --session-lease-ms 30000 &
    python bench/latency/run.py --address ipc:///tmp/tf.sock --json out.json

Without ``--address`` only the two baselines run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import zmq

try:
    import tacflow  # noqa: F401
except ImportError:  # not installed: use the repository's copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "client-py"))

from tacflow import Client  # noqa: E402
from tacflow.protocol import Kind, pack, step_body  # noqa: E402
from tacflow.transport import recv_message, send_message  # noqa: E402

RoundTrip = Callable[[], None]


# ---------------------------------------------------------------- servers (child processes)


def serve_zmq_echo(endpoint: str) -> None:
    """A ROUTER that sends every message (identity frame included) straight back."""
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    print("ready", flush=True)
    send, more = sock.send, zmq.SNDMORE
    while True:
        *head, last = recv_message(sock)
        for frame in head:
            send(frame, more)
        send(last)


def serve_unix_echo(path: str) -> None:
    """A SOCK_SEQPACKET server that echoes every packet of one connection."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(1)
    print("ready", flush=True)
    conn, _ = srv.accept()
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.send(data)


def start_server(mode: str, where: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, where], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{mode} server did not start")
    return proc


# ---------------------------------------------------------------- round trips


def daemon_round_trip(client: Client) -> RoundTrip:
    step = client.step

    def once() -> None:
        step([])

    return once


def zmq_round_trip(ctx: zmq.Context, endpoint: str, frames: list[bytes]) -> tuple[RoundTrip, zmq.Socket]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    kind, header = frames

    def once() -> None:
        send_message(sock, kind, header)
        recv_message(sock)

    return once, sock


def unix_round_trip(path: str, message: bytes) -> tuple[RoundTrip, socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    send, recv = sock.send, sock.recv

    def once() -> None:
        send(message)
        recv(65536)

    return once, sock


# ---------------------------------------------------------------- measuring


@dataclass
class Summary:
    n: int
    p50_us: float
    p99_us: float
    mean_us: float
    min_us: float

    @staticmethod
    def of(samples_ns: list[int]) -> "Summary":
        s = sorted(samples_ns)
        pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] / 1000  # noqa: E731
        return Summary(len(s), pick(0.50), pick(0.99), statistics.fmean(s) / 1000, s[0] / 1000)


def measure(trips: dict[str, RoundTrip], requests: int, warmup: int, blocks: int) -> dict[str, list[int]]:
    clock = time.perf_counter_ns
    for trip in trips.values():
        for _ in range(warmup):
            trip()
    samples: dict[str, list[int]] = {name: [] for name in trips}
    names = list(trips)
    per_block = [requests // blocks + (1 if b < requests % blocks else 0) for b in range(blocks)]
    for b, count in enumerate(per_block):
        order = names[b % len(names):] + names[: b % len(names)]
        for name in order:
            trip, out = trips[name], samples[name]
            for _ in range(count):
                t0 = clock()
                trip()
                out.append(clock() - t0)
    return samples


# ---------------------------------------------------------------- report


def table(results: dict[str, Summary], ratio: float | None) -> str:
    lines = [
        "| path | n | p50 (µs) | p99 (µs) | mean (µs) | min (µs) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in results.items():
        lines.append(
            f"| {name} | {s.n} | {s.p50_us:.1f} | {s.p99_us:.1f} | {s.mean_us:.1f} | {s.min_us:.1f} |"
        )
    if ratio is not None:
        lines.append("")
        lines.append(f"daemon_p50 / zmq_echo_p50 = **{ratio:.2f}**")
    return "\n".join(lines)


def environment() -> dict[str, object]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    ctx = zmq.Context()
    tmp = Path(tempfile.mkdtemp(prefix="tacflow-latency-"))
    servers: list[subprocess.Popen[str]] = []
    closers: list[Callable[[], None]] = []
    trips: dict[str, RoundTrip] = {}
    daemon_info: dict[str, object] | None = None
    try:
        if args.address:
            client = Client(args.address, timeout_s=args.timeout)
            closers.append(client.close)
            session = client.session
            info = client.info
            daemon_info = {
                "address": client.address, "daemon": info.daemon, "instance_id": info.instance_id,
                "model": info.model.name, "backend": f"{info.backend.kind} ({info.backend.device})",
            }
            trips["daemon"] = daemon_round_trip(client)
        else:
            session = bytes(16)
        # The empty step exactly as the client sends it (a mid-run request id).
        frames = [Kind.STEP.frame, pack(step_body(args.requests, session, []))]
        if args.address:
            trips["daemon_raw"], raw_sock = zmq_round_trip(ctx, client.address, frames)
            closers.append(raw_sock.close)
        echo_endpoint = f"ipc://{tmp}/echo.sock"
        servers.append(start_server("zmq-echo", echo_endpoint))
        trips["zmq_echo"], echo_sock = zmq_round_trip(ctx, echo_endpoint, frames)
        closers.append(echo_sock.close)
        unix_path = str(tmp / "unix.sock")
        servers.append(start_server("unix-echo", unix_path))
        message = b"".join(frames)
        trips["unix_socket"], unix_sock = unix_round_trip(unix_path, message)
        closers.append(unix_sock.close)

        samples = measure(trips, args.requests, args.warmup, args.blocks)
    finally:
        for close in reversed(closers):
            close()
        for proc in servers:
            proc.kill()
            proc.wait()
        ctx.term()
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()

    results = {name: Summary.of(s) for name, s in samples.items()}
    ratio = results["daemon"].p50_us / results["zmq_echo"].p50_us if "daemon" in results else None
    return {
        "environment": environment(),
        "daemon": daemon_info,
        "requests": args.requests,
        "warmup": args.warmup,
        "blocks": args.blocks,
        "message_bytes": {"kind": len(frames[0]), "header": len(frames[1])},
        "results": {name: vars(s) for name, s in results.items()},
        "ratio_daemon_p50_over_echo_p50": ratio,
        "table": table(results, ratio),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", help="tacflowd endpoint or socket path (ipc:///path, tcp://...); "
                   "without it only the baselines run")
    p.add_argument("--requests", type=int, default=10_000, help="measured round trips per path")
    p.add_argument("--warmup", type=int, default=1_000, help="unmeasured round trips per path first")
    p.add_argument("--blocks", type=int, default=20, help="alternating blocks the requests are split into")
    p.add_argument("--timeout", type=float, default=10.0, help="client timeout in seconds")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--serve", nargs=2, metavar=("MODE", "WHERE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.requests < 1 or args.blocks < 1 or args.warmup < 0:
        p.error("--requests and --blocks must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        mode, where = args.serve
        {"zmq-echo": serve_zmq_echo, "unix-echo": serve_unix_echo}[mode](where)
        return 0
    report = run(args)
    env = report["environment"]
    print(f"# empty-step round trip — {env['date']} on {env['host']} ({env['cpus']} CPUs), "
          f"{args.requests} requests after {args.warmup} warm-up, {args.blocks} alternating blocks")
    if report["daemon"]:
        d = report["daemon"]
        print(f"daemon: {d['daemon']} at {d['address']}, model {d['model']}, backend {d['backend']}")
    print(f"message: {report['message_bytes']['kind']} + {report['message_bytes']['header']} bytes\n")
    print(report["table"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
