"""Attention policies end to end: one step serves a batch of
sequences with different policies, forks A/B one prefilled prompt, the
diagnostics measure what each selection kept, and selections are
deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from tacflow import FixedBudget, Full, OracleTopP, StepEntry, Tactic
from tacflow import errors as E

PROMPT = [1 + (37 * i) % 500 for i in range(300)]


def decode_all(c, region, ids, token):
    vocab = c.info.model.vocab_size
    refs = [region.ref(4 * vocab * i, "f32", (1, vocab)) for i in range(len(ids))]
    out = c.step([StepEntry(s, [token], sample=False, logits=r) for s, r in zip(ids, refs)])
    return out, np.array(region.array("f32", (len(ids), vocab)), copy=True)


def test_one_step_mixes_policies_and_diagnostics_measure_them(start_daemon):
    d = start_daemon("--kv-blocks", "512")
    c = d.client()
    assert set(c.info.attention_policies) == {"full", "tactic", "fixed_budget", "oracle_top_p"}
    region = c.create_region(4 * c.info.model.vocab_size * 8)
    c.open_sequence(1, attention=Full(), diagnostics=True)
    c.step([StepEntry(1, PROMPT, sample=False)])
    policies = {
        2: Full(),
        3: Tactic(0.9),
        4: FixedBudget(64),
        5: OracleTopP(0.9),
        6: OracleTopP(1.0),
        7: Tactic(0.9),
    }
    for sid, pol in policies.items():
        assert c.fork_sequence(1, sid, attention=pol) == len(PROMPT)
    ids = list(policies)
    for step in range(3):
        out, logits = decode_all(c, region, ids, 7 + step)
        diag = {r.seq_id: r.attention for r in out.results}
        assert [r.num_tokens for r in out.results] == [len(PROMPT) + step + 1] * len(ids)
        assert diag[2].policy == "full" and diag[2].tokens_read_fraction == 1.0
        assert diag[3].policy == "tactic" and 0 < diag[3].tokens_read_fraction < 1
        # The oracle's union set reaches P for every query head by construction.
        assert diag[5].policy == "oracle_top_p" and diag[5].success_rate == 1.0
        assert diag[5].min_true_mass >= 0.9
        assert diag[4].policy == "fixed_budget"
        # A fixed budget of 64 tokens plus one bound per page.
        ctx = len(PROMPT) + step + 1
        assert diag[4].selected_fraction <= (64 + 16) / ctx
        # The oracle at P = 1 keeps everything: its logits are full attention's.
        np.testing.assert_allclose(logits[4], logits[0], rtol=0, atol=1e-4)
        # Same prompt, same policy: the same selection and the same logits.
        np.testing.assert_array_equal(logits[1], logits[5])
        assert diag[3] == diag[7]
    s = c.stats()
    assert s.attention["tactic"].decode_steps == 6
    assert len(s.attention["tactic"].true_mass_by_layer_head) == c.info.model.num_layers


def test_policy_arguments_are_checked(start_daemon):
    c = start_daemon("--kv-blocks", "64").client()
    for bad in (Tactic(0.0), Tactic(1.5), FixedBudget(0), OracleTopP(-1.0)):
        with pytest.raises(E.BadRequest):
            c.open_sequence(1, attention=bad)


def test_truncation_resets_a_tactic_clustering(start_daemon):
    d = start_daemon("--kv-blocks", "512")
    c = d.client()
    region = c.create_region(4 * c.info.model.vocab_size * 2)
    for sid in (1, 2):
        c.open_sequence(sid, attention=Tactic(0.95), diagnostics=True)
    c.step([StepEntry(1, PROMPT + [9, 9, 9], sample=False), StepEntry(2, PROMPT, sample=False)])
    decode_all(c, region, [1], 5)  # clusters sequence 1 over PROMPT + 3 tokens
    c.truncate_sequence(1, 4)
    _, a = decode_all(c, region, [1, 2], 5)
    # After the truncation both sequences hold PROMPT + [5] and cluster the
    # same keys: identical selections and logits.
    np.testing.assert_array_equal(a[0], a[1])
