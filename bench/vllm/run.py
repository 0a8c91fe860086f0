#!/usr/bin/env python3
"""What tacflow's vLLM executor adds to each step, beside the daemon's own
step time, at batch 1, 64 and 256 (pure decode steps).

It starts ``tacflowd`` (CPU backend) and an unmodified ``vllm serve`` with
``TACFLOW_VLLM`` set, then for each batch size B sends B concurrent
completions (distinct prompts, ``ignore_eos``, ``--tokens`` each) and reads
back the executor's step log (``collective_rpc("tacflow_take_step_log")``,
served by vLLM's dev-mode ``/collective_rpc``). Of each vLLM step whose
requests are B decode tokens it reports, in microseconds (p50, p90):

- ``daemon``: the daemon's own time for the step (``timing.run_us``);
- ``queue``: the step's wait in the daemon's executor queue (``queued_us``);
- ``transport``: the client's round trip less the daemon's run and queue
  time: msgpack packing and decoding, ZeroMQ, the daemon's I/O thread;
- ``executor``: ``execute_model`` less the round trip: the executor's own
  Python (the step's entries from vLLM's ``SchedulerOutput``, the
  ``ModelRunnerOutput`` back);
- ``overhead``: ``execute_model`` less ``daemon``: all the integration adds,
  and its share of the whole step.

vLLM's scheduler and output processing run either way and are not counted.

Usage::

    python bench/vllm/run.py --model-dir .models/smollm2-135m-instruct \\
        --vllm-venv .vllm-venv --json bench/logs/vllm-overhead.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import pathlib
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as r:
        return json.loads(r.read())


def wait_for(cond, what: str, timeout_s: float, proc: subprocess.Popen, log: pathlib.Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if cond():
            return
        time.sleep(0.5)
    sys.exit(f"{what} not ready within {timeout_s} s:\n{log.read_text()[-4000:]}")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tacflowd", default=str(ROOT / "target" / "release" / "tacflowd"))
    ap.add_argument("--model-dir", default=str(ROOT / ".models" / "smollm2-135m-instruct"),
                    help="a Hugging Face folder, or `tiny`: the daemon's built-in model (exported for "
                         "vLLM's config; no tokenizer, prompts as token ids), whose steps take "
                         "microseconds, as a GPU's do, so that the overhead stands out")
    ap.add_argument("--vllm-venv", default=os.environ.get("TACFLOW_VLLM_VENV", str(ROOT / ".vllm-venv")))
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--tokens", type=int, default=40, help="tokens generated per request")
    ap.add_argument("--threads", type=int, help="the daemon's CPU threads (default: all cores)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    work = pathlib.Path(tempfile.mkdtemp(prefix="tacflow-vllm-bench-"))
    sock = work / "d.sock"
    dlog, vlog = work / "tacflowd.log", work / "vllm.log"
    tiny = args.model_dir == "tiny"
    model_dir = args.model_dir
    if tiny:
        model_dir = str(work / "tiny-hf")
        subprocess.run([args.tacflowd, "export-model", "--model", "tiny", "--out", model_dir], check=True,
                       stdout=subprocess.DEVNULL)
    daemon = subprocess.Popen(
        [args.tacflowd, "serve", "--socket", str(sock), "--backend", "cpu", "--model", args.model_dir,
         "--kv-blocks", "8192", *(["--threads", str(args.threads)] if args.threads else [])],
        stdout=open(dlog, "wb"), stderr=subprocess.STDOUT,
    )
    vllm = None
    try:
        wait_for(sock.exists, "tacflowd", 120, daemon, dlog)
        sys.path.insert(0, str(ROOT / "client-py"))
        from plain import plain_client

        baseline = {b: plain_client(sock, b, args.tokens - 1) for b in batches}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, TACFLOW_VLLM=f"ipc://{sock}", VLLM_SERVER_DEV_MODE="1",
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
        vllm = subprocess.Popen(
            [str(pathlib.Path(args.vllm_venv) / "bin" / "vllm"), "serve", model_dir, "--host", "127.0.0.1",
             "--port", str(port), "--max-num-seqs", str(max(batches)), "--max-num-batched-tokens", "16384",
             "--max-model-len", "2048", *(["--skip-tokenizer-init"] if tiny else [])],
            stdout=open(vlog, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, "vllm serve", 600, vllm, vlog)
        model = model_dir
        rows = []
        for b in batches:
            post(url + "/collective_rpc", {"method": "tacflow_take_step_log"})
            bodies = [
                {"model": model,
                 "prompt": [(i * 31 + k) % 500 + 3 for k in range(16)] if tiny
                 else f"Request {i}: write a long story about the number {i * 7919}.",
                 "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True}
                for i in range(b)
            ]
            t0 = time.monotonic()
            with cf.ThreadPoolExecutor(b) as pool:
                list(pool.map(lambda body: post(url + "/v1/completions", body), bodies))
            wall = time.monotonic() - t0
            log = post(url + "/collective_rpc", {"method": "tacflow_take_step_log"})["results"][0]
            # (requests, tokens, run, queued, round trip, total): pure decode steps of all B.
            steps = [s for s in log if s[0] == b and s[1] == b]
            if not steps:
                print(f"batch {b}: no pure decode step of {b} requests", file=sys.stderr)
                continue
            daemon_us = [s[2] for s in steps]
            queue_us = [s[3] for s in steps]
            transport_us = [s[4] - s[2] - s[3] for s in steps]
            executor_us = [s[5] - s[4] for s in steps]
            overhead_us = [s[5] - s[2] for s in steps]
            share = [(s[5] - s[2]) / s[5] for s in steps]
            row = {
                "batch": b,
                "steps": len(steps),
                "wall_s": round(wall, 2),
                **{f"{name}_p50_us": pct(xs, 0.5) for name, xs in (
                    ("daemon", daemon_us), ("queue", queue_us), ("transport", transport_us),
                    ("executor", executor_us), ("overhead", overhead_us))},
                **{f"{name}_p90_us": pct(xs, 0.9) for name, xs in (
                    ("daemon", daemon_us), ("transport", transport_us), ("executor", executor_us),
                    ("overhead", overhead_us))},
                "overhead_share_p50": round(statistics.median(share), 4),
                **baseline[b],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if vllm is not None and vllm.poll() is None:
            os.killpg(vllm.pid, signal.SIGTERM)
            try:
                vllm.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(vllm.pid, signal.SIGKILL)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)

    print()
    print("| batch | steps | daemon p50 | queue p50 | transport p50 | executor p50 | overhead p50 (p90) "
          "| overhead share | plain client: daemon p50, transport p50 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['batch']} | {r['steps']} | {r['daemon_p50_us'] / 1000:.2f} ms | {r['queue_p50_us']} µs | "
              f"{r['transport_p50_us']} µs | {r['executor_p50_us']} µs | {r['overhead_p50_us']} µs "
              f"({r['overhead_p90_us']} µs) | {100 * r['overhead_share_p50']:.1f}% | "
              f"{r['plain_daemon_p50_us'] / 1000:.2f} ms, {r['plain_transport_p50_us']} µs |")
    if args.json:
        meta = {
            "model": args.model_dir,
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "tokens_per_request": args.tokens,
            "daemon_threads": args.threads,
            "rows": rows,
        }
        pathlib.Path(args.json).write_text(json.dumps(meta, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
