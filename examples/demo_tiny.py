"""Generate through a running tacflowd with the reference scheduler and print
what happened: the daemon's description, the generated tokens, and a table of
step timings (client round trip against the daemon's own run time).

    python examples/demo_tiny.py --address ipc:///path/to/tacflowd.sock
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from tacflow import Client, Engine, SamplingParams


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--address", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()

    with Client(args.address) as c:
        m = c.info.model
        print(f"daemon   {c.info.daemon}, protocol {c.info.protocol[0]}.{c.info.protocol[1]}")
        print(f"backend  {c.info.backend.kind} ({c.info.backend.device})")
        print(
            f"model    {m.name}: {m.num_layers} layers, {m.num_heads} heads / {m.num_kv_heads} KV heads,"
            f" vocab {m.vocab_size}, context {m.max_context}, {m.dtype}"
        )
        print(f"KV cache {c.info.kv.total_blocks} blocks of {c.info.kv.block_size} tokens")
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, m.vocab_size, size=int(rng.integers(4, 60))).tolist() for _ in range(args.prompts)]
        engine = Engine(c, max_batch_tokens=256, prefill_chunk=64)
        greedy = engine.generate(prompts, max_new_tokens=args.max_new_tokens)
        sampled = engine.generate(
            prompts[:2], max_new_tokens=args.max_new_tokens, sampling=SamplingParams(temperature=0.8, top_p=0.95, seed=1)
        )

        print("\ngenerated (greedy, then two sampled at T=0.8, top-p 0.95):")
        for i, g in enumerate(greedy + sampled):
            head = " ".join(map(str, g.tokens[:16]))
            print(f"  [{i}] prompt {len(g.prompt):3d} tok -> {len(g.tokens)} tok ({g.finish_reason}): {head} ...")

        steps = {id(r): r for g in greedy for r in g.timings}.values()
        wall = [r.wall_s * 1e6 for r in steps]
        run = [r.run_us for r in steps]
        queued = [r.queued_us for r in steps]
        tokens = sum(r.num_tokens for r in steps)
        total_s = sum(r.wall_s for r in steps)
        print("\nstep timings (greedy batch):")
        print("| steps | tokens | tokens/s | round trip p50 µs | round trip p99 µs | daemon run p50 µs | queued p50 µs |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        print(
            f"| {len(wall)} | {tokens} | {tokens / total_s:,.0f} | {statistics.median(wall):,.0f} |"
            f" {pct(wall, 0.99):,.0f} | {statistics.median(run):,.0f} | {statistics.median(queued):,.0f} |"
        )
        s = c.stats()
        print(f"\ndaemon stats: {s.steps} steps, {s.prefill_tokens} prefill tokens, {s.decode_tokens} decode tokens")


if __name__ == "__main__":
    main()
