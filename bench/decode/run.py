#!/usr/bin/env python3
"""Decode-step time of a Llama-3-8B-shaped model against its floor, per daemon configuration.

One run, one card:

1. the ceilings: the read-only bandwidth (the best of three read kernels
   over 2 GiB: torch's sum, a CuPy kernel, tacflowd's own through the lab's
   bench-attention), and with torch the copy bandwidth and the bf16 GEMM
   rate (8192^3 on random data);
2. for each configuration (activation dtype, CUDA graphs, fusions), a
   daemon (``tacflowd serve --model random:llama-3-8b``) driven through the
   Python client: sequences prefilled with 2,048 random tokens, then decode
   steps at each batch size, timed inside the daemon (the reply's
   ``run_us``: from the executor taking the step to the tokens being ready,
   greedy sampling included) and end to end (the client's ``step()``);
3. optionally ``tacflowd bench-decode`` (the lab's in-process step: host
   wall time and GPU-only time, whose difference is the launch overhead).

The floor of a step is max(bytes / read-only ceiling, FLOPs / GEMM rate):
the weights read once (every matrix, the LM head, the embedding rows of the
batch), every cached K and V row read once, the new K and V written; FLOPs
2 per weight per token plus the attention's 4 per cached key per head. The
verdict: the in-daemon time at >= 80% of the floor (floor / time) at batch
1, 64 and 256 for the first configuration; the others show what each
option is worth (each fusion on its own against none).

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
BATCHES = [1, 16, 64, 256]
CONTEXT = 2048
#: The share of the floor the in-daemon step must reach (floor / time).
OF_FLOOR = 0.80
JUDGED = (1, 64, 256)
FUSIONS = ["add-rmsnorm", "rope-kv-append", "silu-gemm-input"]
#: (name, daemon flags, batches). The first is judged against the floor;
#: the fusion rows run up to batch 64 (fewer sequences to prefill).
CONFIGS = [
    ("bf16+graphs+fusions", ["--gpu-activations", "bf16", "--cuda-graphs", "--fuse", ",".join(FUSIONS)], BATCHES),
    ("split (f32 GEMM inputs)", ["--gpu-activations", "split", "--no-fuse", "--no-cuda-graphs"], BATCHES),
    ("bf16+graphs", ["--gpu-activations", "bf16", "--cuda-graphs", "--no-fuse"], [1, 64]),
    *[(f"bf16+graphs+{f}", ["--gpu-activations", "bf16", "--cuda-graphs", "--fuse", f], [1, 64]) for f in FUSIONS],
    ("bf16, no graphs", ["--gpu-activations", "bf16", "--no-cuda-graphs", "--fuse", ",".join(FUSIONS)], [1, 64]),
]


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


def ceilings(tacflowd: str | None) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
    from ceilings import copy_bandwidth, gemm_rate, read_ceiling

    read = read_ceiling(torch)
    if tacflowd:
        # tacflowd's own read kernel, as bench-attention measures it (the lab build).
        with tempfile.TemporaryDirectory() as d:
            j = Path(d) / "a.json"
            cmd = [tacflowd, "bench-attention", "--cases", "1:4096", "--iters", "20", "--json", str(j)]
            if subprocess.call(cmd, stdout=subprocess.DEVNULL) == 0 and j.exists():
                read["tacflowd_read"] = json.loads(j.read_text())["read_gbps"] * 1e9
                read["best"] = max(read["best"], read["tacflowd_read"])
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "read_Bps": read["best"],
        "read_kernels_Bps": {k: v for k, v in read.items() if isinstance(v, float) and k != "best"},
        "copy_Bps": copy_bandwidth(torch),
        "gemm_flops": gemm_rate(torch),
    }


def wait_for(path: Path, proc: subprocess.Popen, limit_s: float) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"tacflowd exited with {proc.returncode} before binding {path}")
        if time.time() - t0 > limit_s:
            raise RuntimeError(f"tacflowd did not bind {path} within {limit_s} s")
        time.sleep(0.2)


def end_to_end(tacflowd: str, flags: list[str], batches: list[int], steps: int, prefill_per_step: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "client-py"))
    from tacflow import Client, StepEntry

    work = Path(tempfile.mkdtemp(prefix="tfbench-"))
    sock = work / "d.sock"
    blocks = max(batches) * ((CONTEXT + steps + 8) // 16 + 2) + 64
    cmd = [tacflowd, "serve", "--backend", "cuda", "--model", "random:llama-3-8b", "--socket", str(sock),
           "--kv-blocks", str(blocks), "--session-lease-ms", "600000", *flags]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, TACFLOW_LOG=os.environ.get("TACFLOW_LOG", "warn"))
    proc = subprocess.Popen(cmd, env=env)
    out = {"kv_blocks": blocks, "batches": []}
    try:
        wait_for(sock, proc, 300)
        c = Client(f"ipc://{sock}", timeout_s=600)
        rng = random.Random(5)
        n = max(batches)
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
        for batch in batches:
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
    ap.add_argument("--configs", type=int, default=len(CONFIGS), help="run the first N configurations")
    ap.add_argument("--inprocess", action="store_true", help="also run the lab's bench-decode")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ceil = ceilings(args.tacflowd)
    print(f"ceilings on {ceil['device']}: read {ceil['read_Bps'] / 1e9:.0f} GB/s, copy {ceil['copy_Bps'] / 1e9:.0f} GB/s, "
          f"bf16 GEMM {ceil['gemm_flops'] / 1e12:.0f} TFLOP/s", flush=True)
    inproc = {"results": []}
    if args.inprocess:
        inproc_json = args.out / "decode-inprocess.json"
        cmd = [args.tacflowd, "bench-decode", "--steps", str(args.steps), "--json", str(inproc_json),
               "--batches", ",".join(map(str, BATCHES))]
        print("$", " ".join(cmd), flush=True)
        if subprocess.call(cmd) == 0 and inproc_json.exists():
            inproc = json.loads(inproc_json.read_text())
    floors = {}
    for batch in BATCHES:
        nbytes, flops = step_cost(batch, CONTEXT)
        t_mem, t_fl = nbytes / ceil["read_Bps"], flops / ceil["gemm_flops"]
        floors[batch] = {"bytes": nbytes, "flops": flops, "floor_ms": 1e3 * max(t_mem, t_fl),
                         "bound": "memory" if t_mem >= t_fl else "compute"}
    results = []
    for name, flags, batches in CONFIGS[: args.configs]:
        print(f"\n== {name}", flush=True)
        t0 = time.time()
        try:
            e2e = end_to_end(args.tacflowd, flags, batches, args.steps, args.prefill_per_step)
        except Exception as e:
            print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
            e2e = {"batches": [], "error": str(e)}
        e2e.update(config=name, flags=flags, wall_s=time.time() - t0)
        results.append(e2e)

    f2 = lambda v: f"{v:.2f}" if isinstance(v, float) else "-"  # noqa: E731
    lines = ["| batch | floor (ms) | bound | " + " | ".join(r["config"] for r in results) + " |",
             "|" + " --- |" * (3 + len(results))]
    for batch in BATCHES:
        fl = floors[batch]
        cells = []
        for r in results:
            row = next((x for x in r["batches"] if x["batch"] == batch), None)
            cells.append(f"{row['run_ms']:.2f} ({fl['floor_ms'] / row['run_ms']:.0%})" if row else "-")
        lines.append(f"| {batch} | {fl['floor_ms']:.2f} | {fl['bound']} | " + " | ".join(cells) + " |")
    if inproc["results"]:
        lines.append("")
        lines.append("| batch | in-process step (ms) | GPU-only (ms) |")
        lines.append("| --- | --- | --- |")
        for ip in inproc["results"]:
            lines.append(f"| {ip['batch']} | {f2(ip.get('step_ms'))} | {f2(ip.get('gpu_ms'))} |")
    verdicts = []
    first = results[0] if results else {"batches": []}
    for batch in JUDGED:
        row = next((x for x in first["batches"] if x["batch"] == batch), None)
        share = floors[batch]["floor_ms"] / row["run_ms"] if row else 0.0
        verdicts.append({"batch": batch, "floor_share": share, "pass": share >= OF_FLOOR})
    (args.out / "decode.json").write_text(json.dumps(
        {"ceilings": ceil, "context": CONTEXT, "floors": floors, "configs": results, "inprocess": inproc,
         "verdicts": verdicts}, indent=2))
    (args.out / "decode.md").write_text("\n".join(lines) + "\n")
    print()
    print(f"ceilings: read {ceil['read_Bps'] / 1e9:.0f} GB/s, copy {ceil['copy_Bps'] / 1e9:.0f} GB/s, "
          f"bf16 GEMM {ceil['gemm_flops'] / 1e12:.0f} TFLOP/s; context {CONTEXT}; in-daemon ms (floor / time)")
    print("\n".join(lines))
    for v in verdicts:
        print(f"{first.get('config', '-')} batch {v['batch']}: {v['floor_share']:.0%} of the floor "
              f"(needs {OF_FLOOR:.0%}): {'PASS' if v['pass'] else 'FAIL'}")
    return 0 if verdicts and all(v["pass"] for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
