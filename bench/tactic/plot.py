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
    fig, axes = plt.subplots(1, len(ps), figsize=(5 * len(ps), 4.5), squeeze=False)
    for ax, p in zip(axes[0], ps):
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
            ax.plot(xs, ys, marker="o", ms=3, label=fam)
        if oracle is not None:
            ax.axvline(300 * oracle, color="k", ls=":", lw=1, label="3x oracle")
            ax.axvline(100 * oracle, color="grey", ls="--", lw=1, label="oracle")
        ax.axhline(90, color="r", ls=":", lw=1)
        ax.set_title(f"{text}, P = {p}")
        ax.set_xlabel("tokens read, % of context")
        ax.set_ylabel("success rate of the true mass, %")
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
