"""Load: N concurrent clients against one tacflowd, for a fixed time each.

Each client is a separate process with its own :class:`tacflow.Client`
session: it opens a sequence, prefills a short prompt, then decodes one
token per step (feeding the sampled token back), truncating the sequence
back to its prompt every ``--context`` tokens so that the context stays
bounded. Requests go out with their own ids through the raw socket, so that
every reply is accounted for: a missing, duplicated or unsolicited reply is
counted (and fails the run), never hidden by the client's matching.

Reported per N: steps/s (= decoded tokens/s), p50 and p99 step latency
(client send → reply), error replies by code, and the reply check.

    python bench/load/run.py --address ipc:///tmp/tf.sock --clients 1,2,4 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from typing import Any

import msgpack

STEP, STEP_REPLY, ERROR = 0x30, 0xB0, 0xFF


def _client_path() -> None:
    try:
        import tacflow  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "client-py"))


def worker(address: str, wid: int, prompt: int, context: int, start_at: float,
           seconds: float, out: Any) -> None:
    """One client: decode steps until the window closes, then report."""
    _client_path()
    from tacflow import Client, StepEntry

    c = Client(address, timeout_s=120, client_name=f"load-{wid}")
    c.open_sequence(1)
    toks = [(wid * 7 + i) % 500 + 1 for i in range(prompt)]
    token = c.step([StepEntry(1, toks)]).results[0].token
    length = prompt
    packer = msgpack.Packer()
    lat: list[float] = []
    errors: dict[str, int] = {}
    sent: set[int] = set()
    replies: dict[int, int] = {}
    rid = 1 << 32
    while time.time() < start_at:
        time.sleep(0.001)
    end = start_at + seconds
    while time.time() < end:
        if length >= prompt + context:
            c.truncate_sequence(1, length - prompt)
            length = prompt
        rid += 1
        header = packer.pack({"request_id": rid, "session": c.session,
                              "entries": [{"seq_id": 1, "tokens": [token], "sample": True}]})
        t0 = time.perf_counter()
        c.send_raw([bytes([STEP]), header])
        sent.add(rid)
        kind, body = c.recv_raw(timeout_s=120)
        lat.append(time.perf_counter() - t0)
        reply = msgpack.unpackb(body)
        got = reply.get("request_id")
        replies[got] = replies.get(got, 0) + 1
        if got != rid:
            errors["mismatched_reply"] = errors.get("mismatched_reply", 0) + 1
        elif kind[0] == STEP_REPLY:
            token = reply["results"][0]["token"]
            length += 1
        else:
            errors[reply.get("code", "?")] = errors.get(reply.get("code", "?"), 0) + 1
    # Anything after the last reply is unsolicited (a duplicate).
    extra = 0
    try:
        while True:
            c.recv_raw(timeout_s=0.3)
            extra += 1
    except Exception:
        pass
    c.close()
    out.put({
        "steps": len(lat), "lat": lat, "errors": errors,
        "missing": len(sent - set(replies)),
        "duplicates": sum(n - 1 for n in replies.values() if n > 1) + extra,
        "unknown": len(set(replies) - sent),
    })


def run_level(address: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 3.0 + 0.25 * n  # time for every client to connect and prefill
    procs = [ctx.Process(target=worker, args=(address, i, args.prompt, args.context, start_at,
                                              args.seconds, q)) for i in range(n)]
    for p in procs:
        p.start()
    results = [q.get(timeout=start_at - time.time() + args.seconds + 300) for _ in procs]
    for p in procs:
        p.join(60)
    lat = sorted(x for r in results for x in r["lat"])
    steps = sum(r["steps"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    ok = steps - sum(errors.values())
    return {
        "clients": n,
        "seconds": args.seconds,
        "steps": steps,
        "steps_per_s": ok / args.seconds,
        "p50_us": 1e6 * lat[len(lat) // 2] if lat else None,
        "p99_us": 1e6 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
        "mean_us": 1e6 * statistics.fmean(lat) if lat else None,
        "errors": errors,
        "missing": sum(r["missing"] for r in results),
        "duplicates": sum(r["duplicates"] for r in results),
        "unknown": sum(r["unknown"] for r in results),
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| clients | steps/s (= tokens/s) | p50 µs | p99 µs | errors by code | every request one reply |",
           "| ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "none"
        check = "yes" if not (r["missing"] or r["duplicates"] or r["unknown"]) else (
            f"NO: {r['missing']} missing, {r['duplicates']} duplicated, {r['unknown']} unknown")
        out.append(f"| {r['clients']} | {r['steps_per_s']:.0f} | {r['p50_us']:.0f} | "
                   f"{r['p99_us']:.0f} | {errs} | {check} ({r['steps']} requests) |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", required=True)
    ap.add_argument("--clients", default="1,2,4,8,16,32,64")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--context", type=int, default=240, help="decode tokens before truncating back")
    ap.add_argument("--json")
    args = ap.parse_args()
    _client_path()
    from tacflow import Client

    with Client(args.address, timeout_s=60, client_name="load-watcher") as watcher:
        info = watcher.info
    print(f"daemon: {info.daemon}, model {info.model.name}, backend {info.backend.kind} "
          f"({info.backend.device}), {info.kv.total_blocks} KV blocks")
    rows = []
    for n in (int(x) for x in args.clients.split(",")):
        row = run_level(args.address, n, args)
        rows.append(row)
        print(f"N={n:3d}: {row['steps_per_s']:8.0f} steps/s  p50 {row['p50_us']:8.0f} µs  "
              f"p99 {row['p99_us']:8.0f} µs  errors {row['errors'] or 'none'}  "
              f"missing {row['missing']} duplicated {row['duplicates']} unknown {row['unknown']}",
              flush=True)
    with Client(args.address, timeout_s=60, client_name="load-watcher") as watcher:
        stats = watcher.stats()
    print(f"daemon after the run: {stats.sessions} sessions, {stats.sequences} sequences, "
          f"{stats.kv_free_blocks}/{stats.kv_total_blocks} KV blocks free, errors {stats.errors}")
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "machine": platform.machine(), "cores": os.cpu_count(),
                       "python": platform.python_version(), "daemon": info.daemon}, f, indent=1)
    bad = [r for r in rows if r["missing"] or r["duplicates"] or r["unknown"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
