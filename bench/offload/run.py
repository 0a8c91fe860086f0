"""What attention offload costs on the CPU: SmolLM2-135M-Instruct decoding
in transformers with its own attention (eager and sdpa) against the same
model with ``attn_implementation="tacflow"`` (Full attention in an
``--attention-only`` tacflowd), per decode step and per layer.

Torch runs on one thread by default (``--threads``): on a shared 2-core
machine, two OpenMP workers turn each of the many small ops of a decode
step into a wait for a descheduled thread (a `torch.cat` of the KV cache
measured 45 ms), which would credit offload with saving time that stock
attention only loses to the machine.

Per layer the offload's time splits into: the client's copies of q, k, v
into the shared region and of the output back (``copy``), the round trip
of ``attention_step`` as the client sees it (``rtt``), and of that the
daemon's own run (``run_us`` of the reply: reading the region, appending
k and v, attention, writing the output). Stock attention per layer is
measured by timing its attention function alone.

    python bench/offload/run.py --model .models/smollm2-135m-instruct [--ctx 512] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "client-py"))

import tacflow.hf as th  # noqa: E402
from tacflow import prompts  # noqa: E402


def decode_ms(model, ids, steps, cache=None):
    """Median ms per greedy decode step after a prefill."""
    kw = {}
    if cache is not None:
        kw = {th._cache_kwarg(model): cache}
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True, **kw)
        past = out.past_key_values if cache is None else cache
        tok = int(out.logits[0, -1].argmax())
        times = []
        for _ in range(steps):
            name = th._cache_kwarg(model)
            t0 = time.perf_counter()
            out = model(torch.tensor([[tok]]), use_cache=True, **{name: past})
            times.append(time.perf_counter() - t0)
            tok = int(out.logits[0, -1].argmax())
    return 1e3 * statistics.median(times)


class LayerTimer:
    """Wraps an attention function to time its calls (decode steps only)."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        r = self.fn(*a, **kw)
        if a[1].shape[-2] == 1:
            self.times.append(time.perf_counter() - t0)
        return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / ".models" / "smollm2-135m-instruct"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine, more threads make every small op "
                         "wait for descheduled OpenMP workers, which swamps the measurement)")
    ap.add_argument("--json")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(prompts.built_in(tok, args.ctx, 1)[0].text)["input_ids"]
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp()
    sock = os.path.join(work, "d.sock")
    daemon = subprocess.Popen(
        [str(ROOT / "target" / "release" / "tacflowd"), "serve", "--socket", sock, "--backend", "cpu",
         "--attention-only", "--session-lease-ms", "600000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    while not os.path.exists(sock):
        time.sleep(0.02)
    res = {"ctx": len(ids), "steps": args.steps, "threads": torch.get_num_threads()}
    try:
        th.connect(f"ipc://{sock}")
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.models.llama.modeling_llama import eager_attention_forward

        for impl in ("eager", "sdpa"):
            m = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=impl).eval()
            res[f"{impl}_ms_per_step"] = decode_ms(m, ids, args.steps)
            timer = LayerTimer(eager_attention_forward if impl == "eager" else sdpa_attention_forward)
            AttentionInterface.register(f"timed_{impl}", timer)
            m.set_attn_implementation(f"timed_{impl}") if hasattr(m, "set_attn_implementation") else None
            decode_ms(m, ids, args.steps)
            res[f"{impl}_attention_us_per_layer"] = 1e6 * statistics.median(timer.times) if timer.times else None
            del m
        m = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="tacflow").eval()
        cache = th.TacflowCache(m.config)
        timer = LayerTimer(th.tacflow_attention)
        AttentionInterface.register("tacflow", timer)
        res["offload_ms_per_step"] = decode_ms(m, ids, args.steps, cache)
        layers = m.config.num_hidden_layers
        res["offload_us_per_layer"] = 1e6 * statistics.median(timer.times)
        # The round trip alone, and the daemon's part of it, from raw requests
        # of one decode row (the same layout, a fresh sequence at this length).
        c = th.connection().client
        from tacflow import AttentionLayout

        lay = th.layout_of(m.config, m.model.layers[0].self_attn.scaling)
        c.open_sequence(999_999, layout=lay)
        h, k, d = lay.num_heads, lay.num_kv_heads, lay.head_dim
        stride = len(ids) * h * d * 4
        reg = c.create_region(4 * stride)
        pre = [reg.ref(0, "f32", (len(ids), h, d)), reg.ref(stride, "f32", (len(ids), k, d)),
               reg.ref(2 * stride, "f32", (len(ids), k, d)), reg.ref(3 * stride, "f32", (len(ids), h, d))]
        for layer in range(layers):
            c.attention_step(layer, [999_999], *pre, num_tokens=[len(ids)])
        one = [reg.ref(0, "f32", (1, h, d)), reg.ref(stride, "f32", (1, k, d)),
               reg.ref(2 * stride, "f32", (1, k, d)), reg.ref(3 * stride, "f32", (1, h, d))]
        rtt, run = [], []
        for _ in range(args.steps):
            for layer in range(layers):
                t0 = time.perf_counter()
                out = c.attention_step(layer, [999_999], *one)
                rtt.append(time.perf_counter() - t0)
                run.append(out.timing.run_us)
        res["rtt_us_per_layer"] = 1e6 * statistics.median(rtt)
        res["daemon_run_us_per_layer"] = statistics.median(run)
        res["layers"] = layers
        res["added_ms_per_step_vs_sdpa"] = res["offload_ms_per_step"] - res["sdpa_ms_per_step"]
        res["added_us_per_layer_vs_sdpa"] = res["offload_us_per_layer"] - (res["sdpa_attention_us_per_layer"] or 0)
    finally:
        th.connection().close()
        daemon.terminate()
        daemon.wait()
    print(json.dumps(res, indent=2))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
