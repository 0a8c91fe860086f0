#!/usr/bin/env python3
"""Decode-step throughput of a Llama-3-8B-shaped model against its floor.

One run, one card:

1. the two ceilings, measured here with torch: the device-to-device copy
   bandwidth (bytes read + written) and the bf16 GEMM rate (torch.matmul of
   8192^3 on random data);
2. ``tacflowd bench-decode`` (in-process: the step's host wall time and its
   GPU-only time with every launch queued ahead, so the difference is the
   launch overhead);
3. the daemon (``tacflowd serve --model random:llama-3-8b``) driven through
   the Python client: 128 sequences prefilled with 2,048 random tokens, then
   decode steps at each batch size, timed inside the daemon (the reply's
   ``run_us``: from the executor taking the step to the tokens being ready,
   greedy sampling included) and end to end (the client's ``step()`` call).

The floor of a step is max(bytes / copy bandwidth, FLOPs / GEMM rate): the
weights read once (every matrix, the LM head, the embedding rows of the
batch), every cached K and V row read once, the new K and V written; FLOPs
2 per weight per token plus the attention's 4 per cached key per head.

    python3 bench/decode/run.py --tacflowd /tmp/tacflowd --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# random:llama-3-8b (sidecar/src/model/config.rs)
LAYERS, HIDDEN, INTER, VOCAB = 32, 4096, 14336, 128256
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BATCHES = [1, 16, 64, 128]
CONTEXT = 2048


def step_cost(batch: int, ctx: int) -> tuple[float, float]:
    """(bytes, FLOPs) of one decode step: `batch` new tokens on `ctx` cached."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    per_layer = HIDDEN * (q + 2 * kv) + q * HIDDEN + HIDDEN * 2 * INTER + INTER * HIDDEN
    matrix_params = LAYERS * per_layer + VOCAB * HIDDEN  # + the LM head
    weight_bytes = 2 * matrix_params + 2 * batch * HIDDEN  # embedding rows of the batch
    kv_read = batch * ctx * LAYERS * 2 * kv * 2
    kv_write = batch * LAYERS * 2 * kv * 2
    flops = 2 * batch * matrix_params + 4 * batch * (ctx + 1) * HEADS * HEAD_DIM * LAYERS
    return weight_bytes + kv_read + kv_write, flops


def ceilings() -> dict:
    import torch

    def timed(fn, n, warm=3):
        for _ in range(warm):
            fn()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in ev:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) * 1e-3 for a, b in ev)

    nbytes = 2 << 30
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy = 2 * nbytes / timed(lambda: dst.copy_(src), 20)
    del src, dst
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    gemm = 2 * n**3 / timed(lambda: torch.matmul(a, b), 20)
    del a, b
    torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_Bps": copy, "gemm_flops": gemm}


def wait_for(path: Path, proc: subprocess.Popen, limit_s: float) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"tacflowd exited with {proc.returncode} before binding {path}")
        if time.time() - t0 > limit_s:
            raise RuntimeError(f"tacflowd did not bind {path} within {limit_s} s")
        time.sleep(0.2)


def end_to_end(tacflowd: str, steps: int, prefill_per_step: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "client-py"))
    from tacflow import Client, StepEntry

    work = Path(tempfile.mkdtemp(prefix="tfbench-"))
    sock = work / "d.sock"
    blocks = max(BATCHES) * ((CONTEXT + steps + 8) // 16 + 2) + 64
    cmd = [tacflowd, "serve", "--backend", "cuda", "--model", "random:llama-3-8b", "--socket", str(sock),
           "--kv-blocks", str(blocks), "--session-lease-ms", "600000"]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, TACFLOW_LOG=os.environ.get("TACFLOW_LOG", "warn"))
    proc = subprocess.Popen(cmd, env=env)
    out = {"kv_blocks": blocks, "batches": []}
    try:
        wait_for(sock, proc, 300)
        c = Client(f"ipc://{sock}", timeout_s=600)
        rng = random.Random(5)
        n = max(BATCHES)
        for s in range(n):
            c.open_sequence(s)
        last = {}
        t0 = time.time()
        for s0 in range(0, n, prefill_per_step):
            entries = [StepEntry(s, [rng.randrange(VOCAB) for _ in range(CONTEXT)]) for s in range(s0, min(n, s0 + prefill_per_step))]
            r = c.step(entries)
            for e, res in zip(entries, r.results):
                last[e.seq_id] = res.token
        out["prefill_s"] = time.time() - t0
        print(f"prefilled {n} x {CONTEXT} tokens in {out['prefill_s']:.1f} s", flush=True)
        for batch in BATCHES:
            run_us, wall_us = [], []
            for i in range(steps + 3):
                entries = [StepEntry(s, [last[s]]) for s in range(batch)]
                t = time.perf_counter()
                r = c.step(entries)
                dt = (time.perf_counter() - t) * 1e6
                for e, res in zip(entries, r.results):
                    last[e.seq_id] = res.token
                if i >= 3:
                    run_us.append(r.timing.run_us)
                    wall_us.append(dt)
            for s in range(batch):  # back to CONTEXT cached tokens
                c.truncate_sequence(s, steps + 3)
            row = {
                "batch": batch,
                "run_ms": statistics.median(run_us) / 1e3,
                "e2e_ms": statistics.median(wall_us) / 1e3,
                "run_ms_p90": sorted(run_us)[int(0.9 * (len(run_us) - 1))] / 1e3,
                "e2e_ms_p90": sorted(wall_us)[int(0.9 * (len(wall_us) - 1))] / 1e3,
            }
            print(f"e2e batch {batch}: in-daemon {row['run_ms']:.2f} ms, client {row['e2e_ms']:.2f} ms", flush=True)
            out["batches"].append(row)
        c.close()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tacflowd", default="target/release/tacflowd")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill-per-step", type=int, default=4)
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ceil = ceilings()
    print(f"ceilings on {ceil['device']}: copy {ceil['copy_Bps'] / 1e9:.0f} GB/s, "
          f"bf16 GEMM {ceil['gemm_flops'] / 1e12:.0f} TFLOP/s", flush=True)
    inproc_json = args.out / "decode-inprocess.json"
    cmd = [args.tacflowd, "bench-decode", "--steps", str(args.steps), "--json", str(inproc_json)]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    inproc = json.loads(inproc_json.read_text()) if rc == 0 and inproc_json.exists() else {"results": []}
    e2e = {"batches": []}
    if not args.skip_e2e:
        try:
            e2e = end_to_end(args.tacflowd, args.steps, args.prefill_per_step)
        except Exception as e:
            print(f"end to end failed: {type(e).__name__}: {e}", flush=True)
            e2e["error"] = str(e)
    lines = [
        "| batch | floor (ms) | bound | step in-process (ms) | GPU-only (ms) | in-daemon run_us (ms) | end to end (ms) | floor / in-daemon | floor / end to end |",
        "|" + " --- |" * 9,
    ]
    rows = []
    for batch in BATCHES:
        nbytes, flops = step_cost(batch, CONTEXT)
        t_mem, t_fl = nbytes / ceil["copy_Bps"], flops / ceil["gemm_flops"]
        floor_ms = 1e3 * max(t_mem, t_fl)
        ip = next((r for r in inproc["results"] if r["batch"] == batch), {})
        ee = next((r for r in e2e["batches"] if r["batch"] == batch), {})
        row = {"batch": batch, "context": CONTEXT, "bytes": nbytes, "flops": flops, "floor_ms": floor_ms,
               "bound": "memory" if t_mem >= t_fl else "compute", "inprocess": ip, "e2e": ee}
        rows.append(row)
        f = lambda v: f"{v:.2f}" if isinstance(v, float) else "-"
        r = lambda v: f"{floor_ms / v:.0%}" if isinstance(v, float) and v > 0 else "-"
        lines.append(f"| {batch} | {floor_ms:.2f} | {row['bound']} | {f(ip.get('step_ms'))} | {f(ip.get('gpu_ms'))} | "
                     f"{f(ee.get('run_ms'))} | {f(ee.get('e2e_ms'))} | {r(ee.get('run_ms'))} | {r(ee.get('e2e_ms'))} |")
    (args.out / "decode.json").write_text(json.dumps({"ceilings": ceil, "rows": rows, "e2e": e2e}, indent=2))
    (args.out / "decode.md").write_text("\n".join(lines) + "\n")
    print()
    print(f"ceilings: copy {ceil['copy_Bps'] / 1e9:.0f} GB/s, bf16 GEMM {ceil['gemm_flops'] / 1e12:.0f} TFLOP/s")
    print("\n".join(lines))
    b64 = next(r for r in rows if r["batch"] == 64)
    ok = b64["e2e"].get("run_ms") is not None and b64["e2e"]["run_ms"] <= b64["floor_ms"] / 0.6
    print(f"batch 64 in-daemon step <= floor / 0.6 ({b64['floor_ms'] / 0.6:.2f} ms): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
