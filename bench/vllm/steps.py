#!/usr/bin/env python3
"""The vLLM executor's own cost per step, without vLLM's server around it.

``run.py`` measures inside a real ``vllm serve``, where vLLM's API server
and engine loop use the same cores as the daemon (2 on the development VM):
there the round trip also pays for that contention. This driver runs the
real ``TacflowExecutor`` in this process, on vLLM's real config and
``SchedulerOutput`` types, fed with the steps vLLM's scheduler would send
for B requests (a 16-token prompt, then decode steps, a new block every 16
tokens), and times each ``execute_model`` against the daemon's own step
time; then the same steps through the plain client (named blocks, no
vLLM types) as the floor. Run it with vLLM's venv::

    .vllm-venv/bin/python bench/vllm/steps.py --model-dir tiny
    .vllm-venv/bin/python bench/vllm/steps.py --model-dir .models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "client-py"))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def through_executor(ex, b: int, steps: int, vocab: int) -> dict:
    from vllm import SamplingParams
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    bs = 16
    per = -(-(16 + steps + 1) // bs)
    ids = [f"b{b}-r{i}" for i in range(b)]
    prompts = [[(i * 31 + k) % (vocab - 3) + 3 for k in range(16)] for i in range(b)]

    def output(new, cached, sched):
        return SchedulerOutput(
            scheduled_new_reqs=new, scheduled_cached_reqs=cached, num_scheduled_tokens=sched,
            total_num_scheduled_tokens=sum(sched.values()), scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={}, finished_req_ids=set(), free_encoder_mm_hashes=[],
        )

    sp = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    new = [
        NewRequestData(req_id=r, prompt_token_ids=p, mm_features=[], sampling_params=sp,
                       pooling_params=None, block_ids=([i * per + 0, i * per + 1],),
                       num_computed_tokens=0, lora_request=None)
        for i, (r, p) in enumerate(zip(ids, prompts))
    ]
    ex.execute_model(output(new, CachedRequestData.make_empty(), {r: 16 for r in ids}))
    ex.step_log.clear()
    totals = []
    for k in range(steps):
        computed = 16 + k
        # vLLM hands a request its next block when its tokens reach it.
        need = (computed + 1 + bs - 1) // bs
        grow = need > 2 and (computed % bs == 0)
        cached = CachedRequestData(
            req_ids=ids, resumed_req_ids=set(), new_token_ids=[], all_token_ids={},
            new_block_ids=[([i * per + need - 1],) if grow else None for i in range(b)],
            num_computed_tokens=[computed] * b, num_output_tokens=[k + 1] * b,
        )
        so = output([], cached, {r: 1 for r in ids})
        t0 = time.perf_counter_ns()
        ex.execute_model(so)
        totals.append((time.perf_counter_ns() - t0) // 1000)
    fin = output([], CachedRequestData.make_empty(), {})
    fin.finished_req_ids = set(ids)
    ex.execute_model(fin)
    log = list(ex.step_log)
    run = [s[2] for s in log]
    transport = [s[4] - s[2] - s[3] for s in log]
    executor = [s[5] - s[4] for s in log]
    overhead = [s[5] - s[2] for s in log]
    return {
        "batch": b, "steps": len(log),
        "daemon_p50_us": pct(run, 0.5), "transport_p50_us": pct(transport, 0.5),
        "executor_p50_us": pct(executor, 0.5), "overhead_p50_us": pct(overhead, 0.5),
        "overhead_p90_us": pct(overhead, 0.9),
        "overhead_share_p50": round(pct([o / max(t, 1) for o, t in zip(overhead, [s[5] for s in log])], 0.5), 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tacflowd", default=str(ROOT / "target" / "release" / "tacflowd"))
    ap.add_argument("--model-dir", default=str(ROOT / ".models" / "smollm2-135m-instruct"),
                    help="a Hugging Face folder, or `tiny` (the daemon's built-in model, exported)")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json")
    args = ap.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="tacflow-vllm-steps-"))
    sock = work / "d.sock"
    model_dir = args.model_dir
    if model_dir == "tiny":
        model_dir = str(work / "tiny-hf")
        subprocess.run([args.tacflowd, "export-model", "--model", "tiny", "--out", model_dir], check=True,
                       stdout=subprocess.DEVNULL)
    log = open(work / "tacflowd.log", "wb")
    daemon = subprocess.Popen([args.tacflowd, "serve", "--socket", str(sock), "--backend", "cpu", "--model",
                               args.model_dir, "--kv-blocks", "8192"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                sys.exit((work / "tacflowd.log").read_text())
            time.sleep(0.05)
        os.environ["TACFLOW_VLLM"] = f"ipc://{sock}"
        from vllm.engine.arg_utils import EngineArgs

        from plain import plain_client

        batches = [int(x) for x in args.batches.split(",")]
        floor = {b: plain_client(sock, b, args.steps) for b in batches}
        cfg = EngineArgs(model=model_dir, max_num_seqs=max(batches), max_model_len=2048,
                         max_num_batched_tokens=16384, skip_tokenizer_init=args.model_dir == "tiny",
                         num_gpu_blocks_override=4096).create_engine_config()
        from tacflow.vllm.executor import TacflowExecutor

        ex = TacflowExecutor(cfg)
        ex.initialize_from_config([SimpleNamespace(num_blocks=4096)])
        rows = []
        for b in batches:
            row = through_executor(ex, b, args.steps, ex.info.model.vocab_size)
            row.update(floor[b])
            rows.append(row)
            print(json.dumps(row), flush=True)
        ex.shutdown()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    print()
    print("| batch | daemon p50 | executor p50 | transport p50 | overhead p50 (p90) | share | plain client transport p50 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['batch']} | {r['daemon_p50_us'] / 1000:.2f} ms | {r['executor_p50_us']} µs | "
              f"{r['transport_p50_us']} µs | {r['overhead_p50_us']} µs ({r['overhead_p90_us']} µs) | "
              f"{100 * r['overhead_share_p50']:.1f}% | {r['plain_transport_p50_us']} µs |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"model": args.model_dir, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
