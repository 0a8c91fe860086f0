"""Accuracy harness: how close sparse decode attention comes to full
attention on a real model, and how few tokens it reads.

On SmolLM2-135M-Instruct and 4k–8k-token real texts (Debian's licence files),
per policy at matched budgets: next-token KL divergence from full attention,
perplexity, top-1 agreement with full attention (on the text and over a greedy
generation), the success rate of the attention mass (fraction of (layer, head,
step) whose true mass reaches P), and the fraction of tokens read (TACTIC.md's
token-equivalents), for P in {0.8, 0.9, 0.95, 0.99}; then a passkey test.

    python bench/accuracy/run.py --address ipc:///path/tacflowd.sock --hf-dir DIR

It prints tables, writes ``results.json`` and ``kl_vs_tokens.png`` into
``--out``, and a markdown block for ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import sys
import time
from datetime import datetime, timezone

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from harness import PolicyRun, Session, answer, first_number, greedy, teacher_forced  # noqa: E402
from texts import load_texts, passkey_trials  # noqa: E402

from tacflow import Client, FixedBudget, Full, OracleTopP, Tactic  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def summarize(runs: dict[str, PolicyRun], gen: dict[str, list[bool]]) -> list[dict]:
    rows = []
    for label, r in runs.items():
        rows.append(
            {
                "policy": label,
                "kl": mean(r.kl),
                "ppl": math.exp(mean(r.nll)),
                "top1_text": mean(r.agree),
                "top1_generation": mean(gen.get(label, [])),
                "success": mean(r.success),
                "tokens_read": mean(r.tokens_read),
                "selected": mean(r.selected),
                "true_mass": mean(r.true_mass),
                "estimated_mass": mean(r.est_mass),
                "positions": len(r.kl),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| policy | KL (nats) | ppl | top-1 (text) | top-1 (generation) | mass success | tokens read"
        " | selected | true mass |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    body = "".join(
        f"| {r['policy']} | {r['kl']:.4f} | {r['ppl']:.3f} | {r['top1_text']:.3f} | {r['top1_generation']:.3f}"
        f" | {r['success']:.3f} | {r['tokens_read']:.4f} | {r['selected']:.4f} | {r['true_mass']:.4f} |\n"
        for r in rows
    )
    return head + body


def text_track(s: Session, texts, ps, decode: int, gen_len: int):
    """KL, perplexity, agreement and mass statistics on every text."""
    runs: dict[str, PolicyRun] = {"full": PolicyRun("full", Full())}
    for p in ps:
        runs[f"tactic P={p}"] = PolicyRun(f"tactic P={p}", Tactic(p))
        runs[f"oracle P={p}"] = PolicyRun(f"oracle P={p}", OracleTopP(p))
    budget_runs: dict[str, PolicyRun] = {}
    gen: dict[str, list[bool]] = {}
    for text in texts:
        n = len(text.tokens) - decode - 1
        log(f"{text.name}: prefill {n} tokens")
        base = s.prefill(text.tokens[:n], lambda i, t: log(f"  prefill {i}/{t}") if i % 4096 == 0 else None)
        inputs, targets = text.tokens[n : n + decode], text.tokens[n + 1 : n + decode + 1]
        t0 = time.time()
        teacher_forced(s, base, list(runs.values()), inputs, targets)
        log(f"  {len(runs)} policies x {decode} steps in {time.time() - t0:.0f} s")
        # Fixed budget at the tokens Tactic read on this text.
        these = []
        for p in ps:
            frac = mean(runs[f"tactic P={p}"].tokens_read[-decode:])
            ctx = n + decode / 2
            pages = ctx / 16
            budget = max(16, int(round(frac * ctx - pages)))
            label = f"fixed_budget @tactic P={p}"
            r = budget_runs.setdefault(label, PolicyRun(label, None))
            r.policy = FixedBudget(budget, p=p)
            these.append(r)
        teacher_forced(s, base, [PolicyRun("full", Full())] + these, inputs, targets)
        # Top-1 agreement over full attention's own greedy generation.
        g = greedy(s, base, inputs[0], gen_len)
        gen_runs = [PolicyRun(k, r.policy) for k, r in {**runs, **budget_runs}.items()]
        teacher_forced(s, base, gen_runs, [inputs[0]] + g[:-1], g)
        for r in gen_runs:
            gen.setdefault(r.label, []).extend(r.agree)
        s.c.close_sequence(base)
    return {**runs, **budget_runs}, gen


def passkey_track(s: Session, tok, texts, args, which: list[str], checkpoint):
    """Per trial: one prefill, then a greedy answer under each policy. The
    fixed budget gets, trial by trial, the tokens Tactic read on that trial.
    ``checkpoint(policies, hits, read, done)`` is called after every trial, so a run cut
    short still leaves its finished trials on disk."""
    labels = {"full": "full", "tactic": "tactic P=0.9", "fixed_budget": "fixed_budget @tactic", "oracle": "oracle P=0.9"}
    policies = [labels[w] for w in which]
    trials = passkey_trials(tok, texts, args.passkey_context, args.depths, args.passkey_trials, seed=7)
    hits = {(label, d): 0 for label in policies for d in args.depths}
    read = {label: [] for label in policies}
    decode = lambda ids: tok.decode(ids)  # noqa: E731
    for i, trial in enumerate(trials):
        base = s.prefill(trial.tokens[:-1])
        ctx = len(trial.tokens)
        tactic_read = None
        for label in policies:
            if label == "full":
                pol = Full()
            elif label.startswith("tactic"):
                pol = Tactic(0.9)
            elif label.startswith("oracle"):
                pol = OracleTopP(0.9)
            else:
                frac = tactic_read if tactic_read is not None else 0.1
                pol = FixedBudget(max(16, int(round(frac * ctx - ctx / 16))), p=0.9)
            text, frac_read = answer(s, base, pol, trial.tokens[-1], 8, decode)
            if label.startswith("tactic"):
                tactic_read = frac_read
            read[label].append(frac_read)
            hits[(label, trial.depth)] += int(first_number(text) == trial.key)
        s.c.close_sequence(base)
        log(f"passkey {i + 1}/{len(trials)} depth {trial.depth}: " + ", ".join(
            f"{lab} {hits[(lab, trial.depth)]}" for lab in policies))
        checkpoint(policies, hits, read, i + 1)
    return policies, hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", required=True, help="a running tacflowd serving SmolLM2")
    ap.add_argument("--hf-dir", required=True, help="SmolLM2 Hugging Face folder (for the tokenizer)")
    ap.add_argument("--out", default="bench/accuracy/out")
    ap.add_argument("--ps", type=lambda s: [float(x) for x in s.split(",")], default=[0.8, 0.9, 0.95, 0.99])
    ap.add_argument("--decode", type=int, default=64, help="teacher-forced decode positions per text")
    ap.add_argument("--generation", type=int, default=32, help="greedy tokens for top-1 agreement")
    ap.add_argument("--texts", type=int, default=5)
    ap.add_argument("--passkey-context", type=int, default=4096)
    ap.add_argument("--passkey-trials", type=int, default=20)
    ap.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--skip-passkey", action="store_true")
    ap.add_argument("--skip-text", action="store_true", help="passkey only")
    ap.add_argument("--passkey-policies", default="full,tactic,fixed_budget,oracle")
    args = ap.parse_args()
    if not args.skip_passkey and (args.passkey_trials < 1 or not args.depths):
        ap.error("the passkey test needs --passkey-trials >= 1 and at least one depth (or --skip-passkey)")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.hf_dir)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = Client(args.address, timeout_s=3600)
    info = c.info
    log(f"daemon {info.daemon}: {info.model.name} on {info.backend.kind} ({info.backend.device})")
    texts = load_texts(tok)[: args.texts]
    s = Session(c, max_rows=64)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()}), backend {info.backend.kind} {info.backend.device}",
        "model": info.model.name,
    }
    rows: list[dict] = []
    if not args.skip_text:
        t0 = time.time()
        runs, gen = text_track(s, texts, args.ps, args.decode, args.generation)
        rows = summarize(runs, gen)
        result.update(
            texts={t.name: len(t.tokens) for t in texts},
            decode_positions=args.decode,
            rows=rows,
            text_track_s=time.time() - t0,
        )
        print("\n" + table(rows))
    results_path = out_dir / "results.json"

    def save() -> None:
        results_path.write_text(json.dumps(result, indent=2))

    if rows:
        save()  # the text track alone took minutes: keep it even if the passkey run is cut short
        plot(rows, out_dir / "kl_vs_tokens.png")
        log(f"wrote {out_dir / 'kl_vs_tokens.png'}")

    # The bar for a usable context: full attention right on 16 of 20
    # trials (80%) at a depth.
    full_need = math.ceil(0.8 * args.passkey_trials)

    def passkey_summary(policies, hits, read, done: int) -> None:
        full_ok = sum(hits[("full", d)] >= full_need for d in args.depths) if "full" in policies else None
        result["passkey"] = {
            "context": args.passkey_context,
            "trials": args.passkey_trials,
            "trials_done": done,
            "complete": done == args.passkey_trials * len(args.depths),
            "hits": {f"{k[0]}@{k[1]}": v for k, v in hits.items()},
            "tokens_read": {k: float(np.mean(v)) for k, v in read.items() if v},
            "full_need": full_need,
            "full_depths_at_need": full_ok,
        }
        save()

    if not args.skip_passkey:
        policies, hits = passkey_track(s, tok, texts, args, args.passkey_policies.split(","), passkey_summary)
        read = result["passkey"]["tokens_read"]
        lines = ["| policy | tokens read | " + " | ".join(f"depth {d}" for d in args.depths) + " |",
                 "| --- | ---: |" + " ---: |" * len(args.depths)]
        for label in policies:
            lines.append(f"| {label} | {read[label]:.4f} | "
                         + " | ".join(f"{hits[(label, d)]}/{args.passkey_trials}" for d in args.depths) + " |")
        full_ok = result["passkey"]["full_depths_at_need"]
        print(f"\npasskey, context {args.passkey_context} tokens, {args.passkey_trials} trials per depth:")
        print("\n".join(lines))
        print(f"full attention reaches {full_need}/{args.passkey_trials} at {full_ok} of {len(args.depths)} depths")
    s.region.close()
    save()
    log(f"wrote {results_path}")


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for family in ("tactic", "oracle", "fixed_budget"):
        pts = sorted((r["tokens_read"], r["kl"]) for r in rows if r["policy"].startswith(family))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=family)
    ax.set_xlabel("tokens read / context (token-equivalents)")
    ax.set_ylabel("mean next-token KL from full attention (nats)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Labelled ticks at round fractions (the default labels of 2-9 x 10^k overlap).
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:.0%}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("SmolLM2-135M, licence texts, decode attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
