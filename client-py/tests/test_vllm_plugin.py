"""The parts of tacflow's vLLM integration that need no vLLM: the opt-in,
the mapping of vLLM's sampling parameters onto the daemon's, what is refused
per request and at start. (tests/test_vllm.py runs a real ``vllm serve``.)"""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from tacflow import FixedBudget, Full, OracleTopP, Tactic
from tacflow.vllm import SUPPORTED_VLLM, daemon_address, register
from tacflow.vllm.blocks import BlockValidity
from tacflow.vllm.checks import (
    StartupRefused,
    check_model,
    check_options,
    check_scheduler,
    check_vllm_version,
    model_mismatches,
)
from tacflow.vllm.mapping import Refused, external_request_id, plan_attention, plan_request, rank_in_top

VOCAB = 49152


def params(**kw):
    """A stand-in for vLLM's SamplingParams with its defaults."""
    base = dict(
        temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, logprobs=None,
        prompt_logprobs=None, presence_penalty=0.0, frequency_penalty=0.0,
        repetition_penalty=1.0, logit_bias=None, structured_outputs=None,
        allowed_token_ids=None, bad_words=[], min_tokens=0, extra_args=None,
        logprob_token_ids=None, prompt_logprob_token_ids=None, prompt_logprob_start=None,
        thinking_token_budget=None, trace_decode_token_ids=None,
    )
    base.update(kw)
    return NS(**base)


def test_the_plugin_is_inactive_unless_asked_for(monkeypatch):
    monkeypatch.delenv("TACFLOW_VLLM", raising=False)
    assert register() is None
    monkeypatch.setenv("TACFLOW_VLLM", "ipc:///run/x.sock")
    assert register() == "tacflow.vllm.platform.TacflowPlatform"
    assert daemon_address() == "ipc:///run/x.sock"
    for auto in ("1", "auto"):
        monkeypatch.setenv("TACFLOW_VLLM", auto)
        assert daemon_address() is None


def test_greedy_and_random_sampling_map_onto_the_daemons():
    g = plan_request(params(temperature=0.0, top_p=0.5, top_k=5, min_p=0.2, seed=7, logprobs=3), VOCAB)
    s = g.sampling
    # vLLM's greedy ignores the cuts; so does the daemon's.
    # The daemon is asked for its longest top list: vLLM's rank is counted there.
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed, s.logprobs) == (0.0, 1.0, 0, 0.0, 7, 64)
    assert g.logprobs == 3 and g.attention == Full() and not g.diagnostics
    r = plan_request(
        params(temperature=0.7, top_p=0.9, top_k=-1, min_p=0.05, presence_penalty=0.5,
               frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={5: 2.0, 9: -100.0},
               prompt_logprobs=2),
        VOCAB,
    ).sampling
    assert (r.temperature, r.top_p, r.top_k, r.min_p) == pytest.approx((0.7, 0.9, 0, 0.05))
    assert (r.presence_penalty, r.frequency_penalty, r.repetition_penalty) == (0.5, -0.5, 1.2)
    assert dict(r.logit_bias) == {5: 2.0, 9: -100.0}
    assert r.prompt_logprobs == 64 and r.seed is None and r.logprobs == 0


@pytest.mark.parametrize(
    "kw, param",
    [
        (dict(structured_outputs=NS(json={})), "structured_outputs"),
        (dict(allowed_token_ids=[1, 2]), "allowed_token_ids"),
        (dict(bad_words=["no"]), "bad_words"),
        (dict(min_tokens=2), "min_tokens"),
        (dict(logprobs=65), "logprobs"),
        (dict(logprobs=-1), "logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(seed=-3), "seed"),
        (dict(logit_bias={VOCAB: 1.0}), "logit_bias"),
        (dict(thinking_token_budget=10), "thinking_token_budget"),
        (dict(logprob_token_ids=[3]), "logprob_token_ids"),
        (dict(trace_decode_token_ids=[3]), "trace_decode_token_ids"),
        (dict(extra_args={"my_plugin": 1}), "vllm_xargs"),
    ],
)
def test_what_the_daemon_cannot_honour_is_refused_by_name(kw, param):
    with pytest.raises(Refused) as err:
        plan_request(params(**kw), VOCAB)
    assert err.value.parameter == param


def test_a_request_picks_its_attention_policy():
    assert plan_attention(None) == (Full(), False)
    assert plan_attention({"tacflow_attention": "tactic", "tacflow_p": 0.8, "tacflow_diagnostics": 1}) == (
        Tactic(0.8), True)
    assert plan_attention({"tacflow_attention": "tactic"})[0] == Tactic(0.9)
    assert plan_attention({"tacflow_attention": "fixed_budget", "tacflow_tokens": 256})[0] == FixedBudget(256)
    assert plan_attention({"tacflow_attention": "oracle_top_p", "tacflow_p": 0.95})[0] == OracleTopP(0.95)
    assert plan_attention({"tacflow_diagnostics": "true"}) == (Full(), True)
    for bad in (
        {"tacflow_attention": "sparse"},
        {"tacflow_attention": "tactic", "tacflow_p": 1.5},
        {"tacflow_attention": "tactic", "tacflow_p": "x"},
        {"tacflow_attention": "fixed_budget"},
        {"tacflow_p": 0.9},
        {"tacflow_diagnostics": 2},
        {"tacflow_attention": "tactic", "tacflow_tokens": 3},
    ):
        with pytest.raises(Refused):
            plan_attention(bad)
    with pytest.raises(Refused, match="does not serve"):
        plan_attention({"tacflow_attention": "tactic"}, policies=("full",))


def test_the_external_request_id_drops_vllms_random_suffix(monkeypatch):
    monkeypatch.delenv("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", raising=False)
    assert external_request_id("cmpl-abc-0-1a2b3c4d") == "cmpl-abc-0"
    assert external_request_id("chatcmpl-x-9672fbd9") == "chatcmpl-x"
    assert external_request_id("plain") == "plain"


def test_unsupported_vllm_releases_are_refused():
    check_vllm_version(SUPPORTED_VLLM[0])
    with pytest.raises(StartupRefused, match="supports vLLM"):
        check_vllm_version("0.31.0")


def vllm_config(**over):
    cfg = NS(
        parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_size=1,
                           decode_context_parallel_size=1, prefill_context_parallel_size=1,
                           distributed_executor_backend="uni"),
        lora_config=None, speculative_config=None, kv_transfer_config=None, ec_transfer_config=None,
        watermark_config=None,
        model_config=NS(runner_type="generate", logprobs_mode="raw_logprobs", multimodal_config=None,
                        is_multimodal_model=False, quantization=None, enable_prompt_embeds=False,
                        logits_processors=None),
        scheduler_config=NS(max_num_batched_tokens=8192, max_num_seqs=256),
    )
    for k, v in over.items():
        obj, _, attr = k.rpartition("__")
        setattr(getattr(cfg, obj) if obj else cfg, attr, v)
    return cfg


def test_options_the_daemon_cannot_serve_are_refused_at_start():
    check_options(vllm_config())
    check_options(vllm_config(parallel_config__distributed_executor_backend="tacflow.vllm.executor.TacflowExecutor"))
    for over, what in (
        (dict(parallel_config__tensor_parallel_size=2), "--tensor-parallel-size 2"),
        (dict(parallel_config__pipeline_parallel_size=2), "--pipeline-parallel-size 2"),
        (dict(parallel_config__distributed_executor_backend="mp"), "--distributed-executor-backend"),
        (dict(lora_config=NS()), "--enable-lora"),
        (dict(speculative_config=NS()), "--speculative-config"),
        (dict(kv_transfer_config=NS()), "--kv-transfer-config"),
        (dict(model_config__logprobs_mode="processed_logprobs"), "--logprobs-mode"),
        (dict(model_config__quantization="fp8"), "--quantization"),
        (dict(model_config__runner_type="pooling"), "--runner"),
    ):
        with pytest.raises(StartupRefused, match=what.replace("-", r"\-")):
            check_options(vllm_config(**over))


DAEMON = NS(name="smollm2", architecture="llama", vocab_size=VOCAB, hidden_size=576, num_layers=30,
            num_heads=9, num_kv_heads=3, head_dim=64, max_context=8192)


def model_config(**hf):
    h = dict(model_type="llama", num_hidden_layers=30, num_attention_heads=9, hidden_size=576)
    h.update(hf)
    return NS(model="m", hf_text_config=NS(**h), max_model_len=hf.pop("max_model_len", 8192),
              get_total_num_kv_heads=lambda: 3, get_head_size=lambda: 64, get_vocab_size=lambda: VOCAB)


def test_vllms_model_must_be_the_daemons():
    info = NS(model=DAEMON, limits=NS(max_step_tokens=1 << 17, max_sequences=4096))
    assert model_mismatches(model_config(), DAEMON) == []
    check_model(model_config(), info)
    bad = model_mismatches(model_config(num_hidden_layers=2, model_type="qwen2"), DAEMON)
    assert bad == ["architecture: vLLM's model has qwen2, tacflowd's has llama",
                   "num_layers: vLLM's model has 2, tacflowd's has 30"]
    with pytest.raises(StartupRefused, match="is not the model tacflowd serves"):
        check_model(model_config(hidden_size=64), info)
    long = model_config()
    long.max_model_len = 16384
    with pytest.raises(StartupRefused, match="above tacflowd's context"):
        check_model(long, info)
    check_scheduler(vllm_config(), info)
    with pytest.raises(StartupRefused, match="--max-num-seqs 9000"):
        check_scheduler(vllm_config(scheduler_config__max_num_seqs=9000), info)


def test_ranks_are_counted_in_the_daemons_top_list():
    top = ((7, -0.1), (3, -2.0), (9, -2.0), (1, -5.0))
    assert rank_in_top(7, -0.1, top) == 1
    assert rank_in_top(3, -2.0, top) == 3  # ties count, as vLLM's >= does
    assert rank_in_top(1, -5.0, top) == 4
    assert rank_in_top(42, -9.0, top) == 5  # below the list: a lower bound


def test_both_backends_take_vllms_processing_options():
    for kw in (
        dict(min_p=0.1),
        dict(presence_penalty=0.5),
        dict(frequency_penalty=0.5),
        dict(repetition_penalty=1.1),
        dict(logit_bias={3: 1.0}),
        dict(prompt_logprobs=1),
    ):
        assert plan_request(params(**kw), VOCAB, backend="cpu") == plan_request(
            params(**kw), VOCAB, backend="cuda"
        )


# ------------------------------------------------------------ block validity


def test_every_block_is_trusted_until_a_daemon_is_lost():
    v = BlockValidity(16)
    assert not v.tracking and v.losses == 0
    assert v.usable_prefix([7, 3, 9], 48) == 48
    v.written([7, 3, 9], 0, 48)  # costs nothing: nothing is tracked yet
    assert v.is_valid(12345)


def test_after_a_loss_a_prefix_stops_at_the_first_block_not_written_since():
    v = BlockValidity(16)
    v.lost()
    assert v.tracking and v.losses == 1
    blocks = [7, 3, 9, 4]
    assert v.usable_prefix(blocks, 48) == 0
    assert v.usable_prefix(blocks, 0) == 0
    # Another request rewrote the first two blocks (a shared prompt prefix).
    v.written([7, 3, 11], 0, 40)
    assert v.usable_prefix(blocks, 48) == 32
    # A prefix shorter than the written blocks stays as it is.
    assert v.usable_prefix(blocks, 20) == 20
    assert v.usable_prefix(blocks, 32) == 32
    # A hole before a written block still stops the prefix there.
    v.written([9], 0, 16)
    assert v.usable_prefix([7, 5, 9], 48) == 16


def test_a_write_marks_every_block_it_touches_even_partly():
    v = BlockValidity(16)
    v.lost()
    blocks = [1, 2, 3, 4]
    v.written(blocks, 15, 17)  # the last slot of block 1, the first of block 2
    assert [v.is_valid(b) for b in blocks] == [True, True, False, False]
    v.written(blocks, 40, 40)  # an empty range writes nothing
    assert not v.is_valid(3)
    v.written(blocks, 47, 48)  # a block boundary: block 3's last slot only
    assert v.is_valid(3) and not v.is_valid(4)


def test_a_second_loss_forgets_what_the_first_instance_wrote():
    v = BlockValidity(4)
    v.lost()
    v.written([5, 6], 0, 8)
    assert v.usable_prefix([5, 6], 8) == 8
    v.lost()
    assert v.losses == 2
    assert v.usable_prefix([5, 6], 8) == 0
    # A block table shorter than the tokens vLLM counts never reads past it.
    assert v.usable_prefix([5], 8) == 0
    v.written([5], 0, 4)
    assert v.usable_prefix([5], 8) == 4
