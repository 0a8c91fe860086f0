"""transformers with its attention in tacflowd (``tacflow.hf``), against
stock transformers, on SmolLM2-135M-Instruct (f32, CPU) and on decoders of
other families built from configs with random weights:

- Full attention through the daemon: greedy ``generate()`` of 64 tokens
  equals stock transformers token for token, logits within 1e-4, for three
  prompts and for a left-padded batch of 4; the daemon's stats count
  ``attention_step`` requests at every layer, and the sequences hold KV
  blocks while a cache lives and none after;
- a negative control: Tactic at P = 0.5 changes the logits;
- Tactic at P = 0.9 on a 4k-token prompt reads under 30% of the context,
  with a lower KL from stock than the Quest-style fixed budget given at
  least as many tokens to read;
- Qwen3 (QK-norm, which Llama lacks) matches stock; a model with logit
  softcapping or a sliding window is refused with a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tacflow.hf as th
from tacflow import FixedBudget, Full, Tactic
from tacflow import ab, prompts
from tacflow.errors import Unsupported

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]
NEW = 64


@pytest.fixture(scope="module")
def smollm2(smollm2_hf):
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    stock = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32, attn_implementation="eager").eval()
    ours = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32, attn_implementation="tacflow").eval()
    return tok, stock, ours


@pytest.fixture
def offload(start_daemon):
    d = start_daemon("--attention-only", "--attention-pool-mb", "2048", "--session-lease-ms", "600000")
    conn = th.connect(d.address)
    yield conn
    conn.close()


def _generate(model, enc, tok, new=NEW):
    with torch.no_grad():
        return model.generate(
            **enc,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tok.eos_token_id,
        )


def _logit_err(a, b, rows=None) -> float:
    worst = 0.0
    for x, y in zip(a.logits, b.logits):
        if rows is not None:
            x, y = x[rows], y[rows]
        worst = max(worst, float((x.double() - y.double()).abs().max()))
    return worst


def test_full_attention_through_the_daemon_equals_stock(offload, smollm2):
    tok, stock, ours = smollm2
    for p in PROMPTS:
        enc = tok([p], return_tensors="pt")
        a, b = _generate(stock, enc, tok), _generate(ours, enc, tok)
        assert torch.equal(a.sequences, b.sequences), f"{p!r}: tokens differ"
        err = _logit_err(a, b)
        assert err <= 1e-4, f"{p!r}: logits differ by {err:.2e}"
    # A padded batch of 4 (left padding, as generate wants it).
    tok.padding_side = "left"
    batch = PROMPTS + ["Once upon a time, in a land far away, there lived a dragon who"]
    enc = tok(batch, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any(), "the batch must be padded"
    a, b = _generate(stock, enc, tok), _generate(ours, enc, tok)
    assert torch.equal(a.sequences, b.sequences), "padded batch: tokens differ"
    err = _logit_err(a, b)
    assert err <= 1e-4, f"padded batch: logits differ by {err:.2e}"
    pool = offload.client.stats().attention_pool
    layers = ours.config.num_hidden_layers
    assert len(pool.steps_by_layer) == layers
    assert min(pool.steps_by_layer) == max(pool.steps_by_layer) > 0, pool.steps_by_layer
    # 3 single prompts and one batch, NEW forward passes each.
    assert pool.steps_by_layer[0] == 4 * NEW
    assert pool.sequences == 0 and pool.blocks == 0, "generate() closes its sequences"


def test_sampling_as_transformers_does_it(offload, smollm2):
    tok, stock, ours = smollm2
    enc = tok([PROMPTS[1]], return_tensors="pt")
    kw = dict(max_new_tokens=24, do_sample=True, temperature=0.7, top_p=0.9, pad_token_id=tok.eos_token_id)
    runs = []
    for model in (stock, ours):
        torch.manual_seed(1234)
        with torch.no_grad():
            runs.append(model.generate(**enc, **kw))
    assert torch.equal(runs[0], runs[1]), "the same seed draws the same tokens from the same logits"


def test_a_live_cache_holds_blocks_and_frees_them(offload, smollm2):
    tok, _, ours = smollm2
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    cache = th.TacflowCache(ours.config)
    with torch.no_grad():
        ours(**enc, **{th._cache_kwarg(ours): cache}, use_cache=True)
    pool = offload.client.stats().attention_pool
    assert pool.sequences == 2
    real = int(enc.attention_mask.sum())
    assert pool.blocks >= 2 and pool.used_bytes > 0, pool
    assert [r[0] for r in cache.rows] == enc.attention_mask.sum(dim=1).tolist(), "padding is not cached"
    assert sum(r[0] for r in cache.rows) == real
    cache.close()
    pool = offload.client.stats().attention_pool
    assert (pool.sequences, pool.blocks, pool.used_bytes) == (0, 0, 0)


def test_tactic_at_half_the_mass_changes_the_logits(offload, smollm2):
    tok, stock, ours = smollm2
    text = prompts.built_in(tok, 600, 1)[0].text
    enc = tok([text], return_tensors="pt")
    a = _generate(stock, enc, tok, new=8)
    with th.attention(Tactic(0.5)):
        b = _generate(ours, enc, tok, new=8)
    # The first token comes from the prefill (full attention everywhere);
    # the decode steps run under the policy.
    err = max(float((x - y).abs().max()) for x, y in zip(a.logits[1:], b.logits[1:]))
    assert err > 1e-2, f"Tactic(0.5) left the logits within {err:.2e} of stock"
    reads = th.last_cache().tokens_read()
    assert reads is not None and reads < 0.9


def test_tactic_reads_under_30_percent_of_4k_with_a_lower_kl_than_a_fixed_budget(offload, smollm2_hf):
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    stock = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32, attn_implementation="sdpa").eval()
    ours = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32, attn_implementation="tacflow").eval()
    ids = tok(prompts.built_in(tok, 4096, 1)[0].text)["input_ids"]
    assert len(ids) >= 4000
    a_tokens, a_logits, _ = ab.stock_run(stock, ids, 16)
    base, first = ab.hf_prefill(ours, ids)
    try:
        t = base.fork(policy=Tactic(0.9), diagnostics=True)
        t_logits, _, _ = ab.hf_decode(ours, t, first, a_tokens)
        t_read = t.tokens_read()
        t.close()
        budget = int(np.ceil(t_read * (len(ids) + len(a_tokens))))
        f = base.fork(policy=FixedBudget(budget), diagnostics=True)
        f_logits, _, _ = ab.hf_decode(ours, f, first, a_tokens)
        f_read = f.tokens_read()
        f.close()
    finally:
        base.close()
    t_kl = ab.compare(a_logits, t_logits, a_tokens)["kl_mean"]
    f_kl = ab.compare(a_logits, f_logits, a_tokens)["kl_mean"]
    print(f"tactic:0.9 reads {t_read:.1%}, KL {t_kl:.3g}; fixed:{budget} reads {f_read:.1%}, KL {f_kl:.3g}")
    assert t_read < 0.30
    assert f_read >= t_read * 0.98, "the fixed budget must read at least as much"
    assert t_kl < f_kl


def _random_model(cls_config, tmp_path, **kw):
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = cls_config(**kw)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    model.save_pretrained(tmp_path)
    AutoConfig.from_pretrained(tmp_path)
    return tmp_path


def test_qwen3_with_qk_norm_matches_stock(offload, tmp_path):
    from transformers import Qwen3Config

    path = _random_model(
        Qwen3Config, tmp_path, vocab_size=512, hidden_size=128, intermediate_size=256,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=512, tie_word_embeddings=False,
    )
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="tacflow").eval()
    assert hasattr(ours.model.layers[0].self_attn, "q_norm"), "Qwen3 normalises q and k per head"
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 250, 3], [1, 2, 3, 4, 5, 6, 7, 8]])
    kw = dict(max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        a = stock.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        b = ours.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert _logit_err(a, b) <= 1e-4


@pytest.mark.parametrize("family", ["gemma2-softcap", "mistral-window"])
def test_a_feature_the_daemon_cannot_honour_is_refused(offload, tmp_path, family):
    if family == "gemma2-softcap":
        from transformers import Gemma2Config

        path = _random_model(
            Gemma2Config, tmp_path, vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            attn_logit_softcapping=50.0, sliding_window=16,
        )
        words = "softcapping"
    else:
        from transformers import MistralConfig

        path = _random_model(
            MistralConfig, tmp_path, vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            sliding_window=8,
        )
        words = "sliding window"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="tacflow").eval()
    with pytest.raises(Unsupported) as err:
        with torch.no_grad():
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert words in str(err.value), str(err.value)
    pool = offload.client.stats().attention_pool
    assert pool.sequences == 0 and pool.blocks == 0
