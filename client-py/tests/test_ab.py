"""``tacflow ab``'s pieces that need no model: policy names, the
comparison of two sides' logits, prompt files and the built-in prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tacflow import FixedBudget, Full, OracleTopP, Tactic
from tacflow import ab, prompts


def test_policies_parse_and_print_back():
    for text, want in [("full", Full()), ("tactic:0.9", Tactic(0.9)), ("fixed:2048", FixedBudget(2048)),
                       ("oracle:0.95", OracleTopP(0.95))]:
        assert ab.parse_policy(text) == want
        assert ab.policy_label(want) == text
    for bad in ["tactic", "fixed:x", "quest:3", "full:1"]:
        with pytest.raises(ValueError):
            ab.parse_policy(bad)
    assert [ab.policy_label(p) for p in ab.policies_or_default([])] == ["full", "tactic:0.9", "fixed:2048"]


def test_compare_finds_kl_top1_and_the_first_divergence():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 11))
    tokens = a.argmax(axis=-1).tolist()
    same = ab.compare(a, a.copy(), tokens)
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-12) and same["top1"] == 1.0
    assert same["first_divergence"] is None
    b = a.copy()
    b[3, tokens[3]] -= 100.0  # B's arg-max leaves A's token at position 3
    got = ab.compare(a, b, tokens)
    assert got["first_divergence"] == 3 and got["top1"] == pytest.approx(0.8)
    assert got["kl"][3] > 0.1 and max(got["kl"][:3]) < 1e-12
    # KL is of A's distribution against B's, in nats.
    pa = np.exp(ab.log_softmax(a[3]))
    want = float((pa * (ab.log_softmax(a[3]) - ab.log_softmax(b[3]))).sum())
    assert got["kl"][3] == pytest.approx(want)


def test_prompt_files_and_built_in_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "answer": "x"}) + "\n\n" + json.dumps({"id": "b", "prompt": "yo"}) + "\n")
    got = prompts.load(f)
    assert [(p.id, p.text, p.answer) for p in got] == [("1", "hi", "x"), ("b", "yo", None)]
    f.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        prompts.load(f)

    class Words:
        """A tokenizer of whitespace words, enough to cut texts."""

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": text.split()}

        def decode(self, ids):
            return " ".join(ids)

    built = prompts.built_in(Words(), 300)
    assert len(built) == 4 and len({p.answer for p in built}) == 4
    for p in built:
        assert f"The passkey is {p.answer}." in p.text and p.text.endswith("The passkey is")
        assert 250 <= len(p.text.split()) <= 310
