"""``tacflow ab`` end to end on SmolLM2-135M-Instruct: through the
transformers integration (its own ``--attention-only`` daemon) and through a
daemon that loaded the whole model, writing the Markdown table, the JSON and
the PNG, whose content is checked: Full attention agrees with stock
transformers, a sparse policy reads less than the whole context, and every
policy and prompt is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from tacflow import prompts

from conftest import BIN, ROOT

POLICIES = ["full", "tactic:0.9", "fixed:64"]


def _prompt_file(tmp_path, smollm2_hf):
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    long = prompts.built_in(tok, 600, 1)[0]
    lines = [
        {"id": "short", "prompt": "The capital of France is"},
        {"id": long.id, "prompt": long.text, "answer": long.answer},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _ab(tmp_path, smollm2_hf, *extra):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tacflow.cli", "ab", "--model", str(smollm2_hf),
           "--prompts", str(_prompt_file(tmp_path, smollm2_hf)), "--new-tokens", "8",
           "--out", str(out), "--quiet", *[a for p in POLICIES for a in ("--policy", p)], *extra]
    env = dict(os.environ, TACFLOWD=str(BIN), PYTHONPATH=str(ROOT / "client-py"))
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout + run.stderr
    return out, run.stdout


def _check(out, stdout, full_kl):
    md = (out / "ab.md").read_text()
    assert "| policy | prompts | mean KL |" in md and stdout.startswith(md)
    for p in POLICIES:
        assert f"| {p} |" in md
    doc = json.loads((out / "ab.json").read_text())
    agg = {a["policy"]: a for a in doc["aggregate"]}
    assert set(agg) == set(POLICIES)
    assert [p["id"] for p in doc["prompts"]] == ["short", "gpl-3-passkey"]
    full = agg["full"]
    assert full["kl_mean"] < full_kl and full["top1"] == 1.0 and full["answers_agree"] == 2
    assert full["tokens_read"] == pytest.approx(1.0)
    long = doc["prompts"][1]
    assert long["prompt_tokens"] > 500
    by = {p["policy"]: p for p in long["policies"]}
    assert by["tactic:0.9"]["tokens_read"] < 0.9
    assert by["fixed:64"]["tokens_read"] < 0.5
    for p in long["policies"]:
        assert len(p["kl"]) == 8 and p["ms_per_token"] > 0
        assert p["first_divergence"] is None or 0 <= p["first_divergence"] < 8
    png = (out / "ab.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_ab_through_the_transformers_integration(tmp_path, smollm2_hf):
    out, stdout = _ab(tmp_path, smollm2_hf)
    _check(out, stdout, full_kl=1e-8)


def test_ab_through_a_daemon_that_loaded_the_model(tmp_path, smollm2_hf, start_daemon):
    d = start_daemon("--model", str(smollm2_hf), "--kv-blocks", "256")
    out, stdout = _ab(tmp_path, smollm2_hf, "--through", "daemon", "--address", d.address)
    # The daemon's own forward pass in f32 against transformers' sdpa.
    _check(out, stdout, full_kl=1e-6)
