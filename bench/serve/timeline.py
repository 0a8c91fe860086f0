#!/usr/bin/env python3
"""The timeline of one step's lanes from `tacflowd bench-serve --json`: each
node of the schedule as a bar on its lane, coloured by op kind (GEMMs by
weight, attention, the row-wise rest), from the start and end times the
report holds: on the CPU, predicted by the cost model `tacflowd tune`
wrote, the lanes one after another as the CPU backend runs them; on the
GPU, measured by CUDA events on each node's lane, where overlap shows).

Usage: timeline.py report.json timeline.png
"""

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {
    "Qkv": "#1f77b4",
    "OProj": "#aec7e8",
    "GateUp": "#2ca02c",
    "Down": "#98df8a",
    "LmHead": "#9467bd",
    "Attention": "#d62728",
    "Rowwise": "#c7c7c7",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("png")
    args = ap.parse_args()
    report = json.load(open(args.json))
    t = report.get("timeline") or {}
    if "nodes" not in t:
        sys.exit(f"no timeline in {args.json}: {t.get('missing', 'absent')}")
    lanes = t["lanes"]
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.8 * lanes))
    for n in t["nodes"]:
        width = n["end_us"] - n["start_us"]
        ax.barh(n["lane"], width, left=n["start_us"], height=0.7,
                color=COLOURS.get(n["kind"], "#7f7f7f"), edgecolor="black", linewidth=0.2)
    ax.set_yticks(range(lanes), [f"lane {i}" for i in range(lanes)])
    ax.invert_yaxis()
    ax.set_xlabel("microseconds (" + t["source"] + ")")
    total = t.get("measured_us") or t.get("predicted_us") or 0.0
    ax.set_title(f"{report['model']} on {report['device']}, overlap {report['overlap']}: "
                 f"{t['step']}, {total:.0f} us")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    ax.legend(handles, COLOURS.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.35),
              ncol=len(COLOURS), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
