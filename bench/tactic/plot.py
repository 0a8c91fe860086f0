#!/usr/bin/env python3
"""Trade-off plot of the Tactic evaluator's JSON (kernels/examples/tactic_eval
--json): success rate of the true mass against tokens read, one line per
selector (its knob swept), one panel per P, for one text.

Usage: plot.py results.json bench/tactic/tradeoff.png [--text gpl3]
"""

import argparse
import json
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("png")
    ap.add_argument("--text", default=None)
    ap.add_argument("--only", default=None, help="regex of variant families to draw")
    args = ap.parse_args()
    rows = json.load(open(args.json))
    texts = sorted({r["text"] for r in rows})
    text = args.text or texts[0]
    rows = [r for r in rows if r["text"] == text]
    ps = sorted({r["p"] for r in rows})
    cols = 2
    rows_n = (len(ps) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 4.8 * rows_n), squeeze=False)
    flat = [a for row in axes for a in row]
    for ax in flat[len(ps):]:
        ax.axis("off")
    for ax, p in zip(flat, ps):
        lines = defaultdict(list)
        oracle = None
        for r in rows:
            if abs(r["p"] - p) > 1e-6:
                continue
            fam = r["variant"].split("@")[0]
            if fam == "oracle":
                oracle = r["read"]
                continue
            if args.only and not re.search(args.only, fam):
                continue
            lines[fam].append((100 * r["read"], 100 * r["success"]))
        for fam, pts in sorted(lines.items()):
            pts.sort()
            xs, ys = zip(*pts)
            label = "tactic (default)" if fam == "tactic" else fam
            ax.plot(xs, ys, marker="o", ms=3, label=label, lw=2.2 if fam == "tactic" else 1.2)
        if oracle is not None:
            ax.axvline(300 * oracle, color="k", ls=":", lw=1, label="3x oracle")
            ax.axvline(100 * oracle, color="grey", ls="--", lw=1, label="oracle")
        ax.axhline(90, color="r", ls=":", lw=1)
        ax.set_title(f"{text}, P = {p}")
        ax.set_xlabel("tokens read, % of context")
        ax.set_ylabel("success rate of the true mass, %")
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
    flat[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
