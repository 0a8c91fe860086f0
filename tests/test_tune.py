"""`tacflowd tune` and `tacflowd bench-serve` end to end on the CPU backend
with the tiny model: profile -> cost file -> search -> cached schedule ->
`serve --overlap on` loads it, says so, and gives the sequential pass's
logits and tokens; bench-serve's report and timeline PNG; and the
refusals (other file versions, a corrupt or foreign schedule, the CUDA
paths of tune and bench-serve without a GPU, SM-share mechanisms that do
not combine)."""

from __future__ import annotations

import json
import pathlib
import re
import struct
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from conftest import BIN, ROOT
from tacflow import StepEntry

TUNE = ["--backend", "cpu", "--model", "tiny", "--rows", "1,4,16", "--shapes", "2,4+12", "--context", "64"]


def tacflowd(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    if not BIN.exists():
        pytest.fail(f"{BIN} is missing: build it with `cargo build --release`")
    r = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=120)
    if ok and r.returncode != 0:
        raise AssertionError(f"tacflowd {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> pathlib.Path:
    """A schedule directory `tune` filled; returns the schedule file."""
    cache = tmp_path_factory.mktemp("schedules")
    r = tacflowd("tune", *TUNE, "--schedule-dir", str(cache))
    for line in ("profiled Attention", "wrote the cost file", "searched", "wrote the schedule"):
        assert line in r.stderr, r.stderr
    path = pathlib.Path(re.search(r"wrote the schedule (\S+)", r.stderr).group(1))
    assert path.parent == cache
    return path


def run_workload(c) -> tuple[list[list[int]], np.ndarray]:
    """Three sequences: prompts of 5, 21 and 33 tokens in one mixed step,
    then six decode steps; every sampled token, and every row's logits."""
    vocab = c.info.model.vocab_size
    region = c.create_region(4 * vocab * 64)
    prompts = [[(7 * i + s) % 400 + 3 for i in range(n)] for s, n in enumerate((5, 21, 33))]
    tokens: list[list[int]] = [[] for _ in prompts]
    logits = []
    for s in range(3):
        c.open_sequence(s)
    step = [list(p) for p in prompts]
    for _ in range(7):
        entries, offset = [], 0
        for s, toks in enumerate(step):
            ref = region.ref(offset * vocab * 4, "f32", (len(toks), vocab))
            entries.append(StepEntry(s, toks, logits=ref))
            offset += len(toks)
        results = c.step(entries).results
        for s, (e, r) in enumerate(zip(entries, results)):
            logits.append(np.array(region.view(e.logits), copy=True))
            tokens[s].append(r.token)
        step = [[t[-1]] for t in tokens]
    return tokens, np.concatenate(logits)


def three_lane_file(tuned: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The tuned file with its steps replaced by NanoFlow's three lanes
    (whatever this machine's profile chose, this one overlaps)."""
    text = tuned.read_text().split("[[steps]]")[0]
    text += """[[steps]]
shape = "hand-written"
rows = 64
dense_cuts = [0.375]
attn_cuts = [0.5]
gemm_lanes = [0]
other_lanes = [2]
attention_lanes = [1]
skew = 2
shares = [0.5, 0.25, 0.25]
predicted_us = 1.0
sequential_us = 1.0
"""
    out.write_text(text)
    return out


def test_tune_writes_versioned_files_and_serve_runs_the_schedule(tuned, start_daemon, tmp_path):
    schedule = tomllib.loads(tuned.read_text())
    assert schedule["version"] == 1 and schedule["policy"] == "full"
    assert [s["rows"] for s in schedule["steps"]] == [2, 16]
    cost = tomllib.loads(pathlib.Path(schedule["cost_file"]).read_text())
    assert cost["version"] == 1
    kinds = {p["op"] for p in cost["points"]}
    assert kinds == {"qkv", "o_proj", "gate_up", "down", "lm_head", "attention", "rowwise"}
    assert all(p["us"] > 0 for p in cost["points"])

    base = start_daemon("--kv-blocks", "64", "--overlap", "off")
    assert "schedule: sequential (overlap off)" in base.log()
    want_tokens, want_logits = run_workload(base.client())

    on = start_daemon("--kv-blocks", "64", "--overlap", "on", "--schedule-dir", str(tuned.parent))
    assert "schedule: tuned (overlap on)" in on.log() and str(tuned) in on.log(), on.log()
    hand = three_lane_file(tuned, tmp_path / "three.toml")
    three = start_daemon("--kv-blocks", "64", "--overlap", str(hand))
    assert "3 lane(s)" in three.log(), three.log()
    for d in (on, three):
        tokens, logits = run_workload(d.client())
        assert tokens == want_tokens
        np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-5)


def test_bad_schedules_and_cost_files_are_refused(tuned, tmp_path):
    serve = ["serve", "--backend", "cpu", "--model", "tiny", "--kv-blocks", "16", "--socket", str(tmp_path / "s.sock")]
    text = tuned.read_text()
    cases = {
        "version 7": text.replace("version = 1", "version = 7"),
        "tuned for": text.replace('device = "', 'device = "another '),
        "schedule file": text[: len(text) // 2] + "\n[[steps]\n",
    }
    for why, body in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(body)
        r = tacflowd(*serve, "--overlap", str(bad), ok=False)
        assert r.returncode != 0 and why in r.stderr, r.stderr
    empty = tmp_path / "empty"
    r = tacflowd(*serve, "--overlap", "on", "--schedule-dir", str(empty), ok=False)
    assert r.returncode != 0 and "no tuned schedule" in r.stderr, r.stderr
    cost = tomllib.loads(text)["cost_file"]
    bad_cost = tmp_path / "cost.toml"
    bad_cost.write_text(pathlib.Path(cost).read_text().replace("version = 1", "version = 2"))
    r = tacflowd("bench-serve", "--backend", "cpu", "--requests", "1", "--input-len", "4", "--output-len", "2",
                 "--kv-blocks", "16", "--cost-file", str(bad_cost), ok=False)
    assert r.returncode != 0 and "version 2" in r.stderr, r.stderr
    # Without a GPU the CUDA paths refuse, saying why; they never fall back to the CPU.
    for cmd in (["tune"], ["bench-serve", "--requests", "1", "--input-len", "4", "--output-len", "2"]):
        for share in ([], ["--sm-share", "grid,cublas"], ["--sm-share", "green"]):
            r = tacflowd(*cmd, "--backend", "cuda", *share, "--schedule-dir", str(empty), ok=False)
            assert r.returncode != 0 and "the CUDA backend needs a GPU" in r.stderr, r.stderr
    assert not empty.exists(), "a refused tune wrote nothing"
    r = tacflowd("tune", *TUNE, "--sm-share", "green,grid", "--schedule-dir", str(empty), ok=False)
    assert r.returncode != 0 and "not combined" in r.stderr, r.stderr
    # On the CPU an SM-share mechanism is refused, not ignored.
    for cmd in (["tune", *TUNE], ["bench-serve", "--backend", "cpu", "--requests", "1", "--input-len", "4",
                                  "--output-len", "2", "--kv-blocks", "16"]):
        r = tacflowd(*cmd, "--sm-share", "grid", "--schedule-dir", str(empty), ok=False)
        assert r.returncode != 0 and "the CPU backend has no SMs" in r.stderr, r.stderr
    assert not empty.exists(), "a refused run wrote nothing"


def png_size(path: pathlib.Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_bench_serve_reports_and_draws_a_timeline(tuned, tmp_path):
    out = tmp_path / "serve.json"
    args = ["bench-serve", "--backend", "cpu", "--model", "tiny", "--schedule-dir", str(tuned.parent),
            "--input-len", "40", "--output-len", "8", "--requests", "12", "--step-tokens", "64"]
    # 6 blocks of KV: requests of 48 tokens (3 blocks) are admitted two at a time.
    r = tacflowd(*args, "--overlap", "on", "--kv-blocks", "6", "--json", str(out))
    assert "tokens/s" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["overlap"] == "on" and rep["model"] == "tiny"
    assert rep["input_tokens"] == 12 * 40 and rep["output_tokens"] == 12 * 8
    assert rep["tokens_per_s"] > 0 and rep["wall_s"] > 0
    assert rep["optimum"]["gemm_params"] > 0
    assert rep["peak_running"] == 2, "KV admission: 6 blocks hold two requests"
    ph = rep["phases"]
    assert ph["prefill_s"] > 0 and ph["decode_s"] > 0
    assert ph["mixed_steps"] + ph["prefill_only_steps"] + ph["decode_only_steps"] == rep["steps"]
    assert rep["ttft"]["count"] == 12 and rep["itl"]["count"] == 12 * 7
    for k in ("ttft", "itl"):
        p = rep[k]
        assert 0 <= p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"]
    t = rep["timeline"]
    assert t["nodes"] and t["predicted_us"] > 0 and len(t["shares"]) == t["lanes"]
    assert {n["lane"] for n in t["nodes"]} == set(range(t["lanes"]))
    assert all(0 <= n["start_us"] <= n["end_us"] <= t["predicted_us"] + 1e-6 for n in t["nodes"])
    png = tmp_path / "timeline.png"
    subprocess.run([sys.executable, str(ROOT / "bench/serve/timeline.py"), str(out), str(png)], check=True)
    w, h = png_size(png)
    assert w > 100 and h > 50

    # Poisson arrivals, the sequential baseline.
    r = tacflowd(*args, "--overlap", "off", "--kv-blocks", "64", "--rate", "400", "--json", str(out))
    rep = json.loads(out.read_text())
    assert rep["overlap"] == "off" and rep["rate"] == 400
    assert rep["timeline"]["lanes"] == 1
    assert rep["output_tokens"] == 12 * 8 and rep["ttft"]["count"] == 12


def test_the_timeline_writer_draws_a_measured_gpu_timeline(tmp_path):
    """bench-serve's GPU report holds a timeline measured by CUDA events
    (`measured_us`; `predicted_us` null without a cost file): the PNG
    writer draws it. The report is written by hand here: no GPU."""
    nodes = [{"lane": lane, "op": op, "kind": kind, "rows": [0, 8], "start_us": s, "end_us": e}
             for lane, op, kind, s, e in [(0, "Qkv(0)", "Qkv", 0.0, 40.0), (1, "Attention(0)", "Attention", 5.0, 70.0),
                                          (2, "AttnNorm(1)", "Rowwise", 70.0, 72.0)]]
    report = {"model": "llama-3-8b", "device": "cuda (NVIDIA H200)", "overlap": "on",
              "timeline": {"step": "8 decodes at 512", "lanes": 3, "shares": [0.5, 0.25, 0.25],
                           "measured_us": 72.0, "predicted_us": None, "source": "measured by CUDA events",
                           "nodes": nodes}}
    js, png = tmp_path / "gpu.json", tmp_path / "gpu.png"
    js.write_text(json.dumps(report))
    subprocess.run([sys.executable, str(ROOT / "bench/serve/timeline.py"), str(js), str(png)], check=True)
    w, h = png_size(png)
    assert w > 100 and h > 50
