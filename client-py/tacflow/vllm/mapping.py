"""What a vLLM request asks for, in tacflowd's terms; and what it asks for
that the daemon cannot do.

Pure functions over duck-typed objects (a vLLM ``SamplingParams`` or
anything with its attributes), so that they are tested without vLLM. The
rule throughout: a request option the daemon cannot honour is refused with
its name and the reason, never dropped. A refusal here becomes an HTTP 400
in vLLM's OpenAI server (the platform's ``validate_request``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from ..protocol import AttentionPolicy, FixedBudget, Full, OracleTopP, SamplingParams, Tactic

#: vLLM's threshold below which a temperature means greedy decoding.
GREEDY_EPS = 1e-5
#: The most top logprobs (and prompt logprobs) the daemon returns per token.
MAX_LOGPROBS = 64
#: Keys of ``SamplingParams.extra_args`` (``vllm_xargs`` in the OpenAI API)
#: that this integration reads: the attention policy a request decodes under.
XARG_PREFIX = "tacflow_"
XARGS = {
    "tacflow_attention": "full | tactic | fixed_budget | oracle_top_p",
    "tacflow_p": "attention mass target of tactic, oracle_top_p (and fixed_budget's diagnostics)",
    "tacflow_tokens": "token budget of fixed_budget",
    "tacflow_cluster_size": "tactic's cluster size",
    "tacflow_diagnostics": "1 to collect the daemon's attention diagnostics for this request",
}


class Refused(ValueError):
    """A request option the daemon cannot honour; ``parameter`` names it."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class RequestPlan:
    """How one vLLM request runs on the daemon."""

    sampling: SamplingParams
    attention: AttentionPolicy
    diagnostics: bool
    #: vLLM's ``logprobs`` (None: none; 0: the sampled token's only).
    logprobs: int | None
    prompt_logprobs: int | None


def _empty(value: Any) -> bool:
    return value is None or (hasattr(value, "__len__") and len(value) == 0)


def plan_request(
    params: Any, vocab_size: int, policies: tuple[str, ...] = (), backend: str = "cpu"
) -> RequestPlan:
    """Maps a vLLM ``SamplingParams`` onto the daemon's options, or raises
    :class:`Refused` naming the first option the daemon cannot honour.

    ``policies`` are the attention policies the daemon serves
    (``hello.attention_policies``; empty: not checked here); ``backend`` is
    its ``hello.backend.kind`` (both backends serve every sampling option
    mapped here since the CUDA backend processes such rows on the host)."""
    # Options vLLM implements in its own sampler (logits processors, masks,
    # forced tokens): the daemon samples, so they would be ignored.
    if getattr(params, "structured_outputs", None) is not None:
        raise Refused(
            "structured_outputs",
            "structured outputs (guided decoding: json, regex, grammar, choice) are not "
            "supported with tacflowd: the daemon samples and cannot apply vLLM's token bitmask",
        )
    for name, what in (
        ("allowed_token_ids", "allowed_token_ids"),
        ("bad_words", "bad_words"),
        ("logprob_token_ids", "logprob_token_ids"),
        ("prompt_logprob_token_ids", "prompt_logprob_token_ids"),
        ("trace_decode_token_ids", "trace_decode_token_ids"),
    ):
        if not _empty(getattr(params, name, None)):
            raise Refused(name, f"{what} is not supported with tacflowd")
    if getattr(params, "prompt_logprob_start", None) is not None:
        raise Refused("prompt_logprob_start", "prompt_logprob_start is not supported with tacflowd")
    if getattr(params, "thinking_token_budget", None) is not None:
        raise Refused(
            "thinking_token_budget", "thinking_token_budget is not supported with tacflowd"
        )
    if int(getattr(params, "min_tokens", 0) or 0) > 0:
        raise Refused(
            "min_tokens",
            "min_tokens is not supported with tacflowd (it masks the stop tokens in vLLM's "
            "sampler, which does not run)",
        )
    logprobs = getattr(params, "logprobs", None)
    if logprobs is not None and not 0 <= int(logprobs) <= MAX_LOGPROBS:
        raise Refused("logprobs", f"logprobs must be in 0..{MAX_LOGPROBS} with tacflowd, not {logprobs}")
    prompt_logprobs = getattr(params, "prompt_logprobs", None)
    if prompt_logprobs is not None and not 0 <= int(prompt_logprobs) <= MAX_LOGPROBS:
        raise Refused(
            "prompt_logprobs",
            f"prompt_logprobs must be in 0..{MAX_LOGPROBS} with tacflowd, not {prompt_logprobs}",
        )
    seed = getattr(params, "seed", None)
    if seed is not None and not 0 <= int(seed) < 2**64:
        raise Refused("seed", f"seed must be in 0..2**64-1 with tacflowd, not {seed}")
    bias = getattr(params, "logit_bias", None) or {}
    for token in bias:
        if not 0 <= int(token) < vocab_size:
            raise Refused("logit_bias", f"logit_bias token {token} is outside the vocabulary ({vocab_size})")

    temperature = float(params.temperature)
    greedy = temperature < GREEDY_EPS
    top_k = int(params.top_k or 0)
    sampling = SamplingParams(
        temperature=0.0 if greedy else temperature,
        top_p=1.0 if greedy else float(params.top_p),
        top_k=0 if greedy or top_k < 0 else top_k,
        seed=None if seed is None else int(seed),
        # vLLM reports the sampled (or prompt) token's rank beside its top
        # k; the daemon reports the top list only, so it is asked for its
        # longest one and the rank counted there (exact unless the token
        # lies beyond the 64 best, then reported as 65, a lower bound).
        logprobs=0 if logprobs is None else MAX_LOGPROBS,
        min_p=0.0 if greedy else float(params.min_p or 0.0),
        presence_penalty=float(params.presence_penalty or 0.0),
        frequency_penalty=float(params.frequency_penalty or 0.0),
        repetition_penalty=float(params.repetition_penalty or 1.0),
        logit_bias=tuple((int(t), float(b)) for t, b in bias.items()),
        prompt_logprobs=None if prompt_logprobs is None else MAX_LOGPROBS,
    )
    attention, diagnostics = plan_attention(getattr(params, "extra_args", None), policies)
    return RequestPlan(
        sampling=sampling,
        attention=attention,
        diagnostics=diagnostics,
        logprobs=None if logprobs is None else int(logprobs),
        prompt_logprobs=None if prompt_logprobs is None else int(prompt_logprobs),
    )


def _number(xargs: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = xargs.get(key, default)
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise Refused("vllm_xargs", f"{key} must be a number, not {value!r}") from None
    if isinstance(value, bool) or number != float(value):
        raise Refused("vllm_xargs", f"{key} must be {'an integer' if kind is int else 'a number'}, not {value!r}")
    return number


def plan_attention(
    xargs: Mapping[str, Any] | None, policies: tuple[str, ...] = ()
) -> tuple[AttentionPolicy, bool]:
    """The attention policy and diagnostics flag a request picks through
    ``extra_args`` (``vllm_xargs`` in the OpenAI API). Any key this
    integration does not read is refused: no in-tree vLLM sampler reads
    them, and a custom one does not run here."""
    xargs = dict(xargs or {})
    unknown = sorted(k for k in xargs if k not in XARGS)
    if unknown:
        known = ", ".join(f"{k} ({v})" for k, v in XARGS.items())
        raise Refused(
            "vllm_xargs",
            f"unsupported vllm_xargs {', '.join(map(repr, unknown))} with tacflowd; known: {known}",
        )
    name = str(xargs.get("tacflow_attention", "full"))
    p = _number(xargs, "tacflow_p", float)
    if p is not None and not 0.0 < p <= 1.0:
        raise Refused("vllm_xargs", f"tacflow_p must be in (0, 1], not {p}")
    tokens = _number(xargs, "tacflow_tokens", int)
    cluster = _number(xargs, "tacflow_cluster_size", int)
    policy: AttentionPolicy
    if name == "full":
        if p is not None or tokens is not None or cluster is not None:
            raise Refused("vllm_xargs", "tacflow_p, tacflow_tokens and tacflow_cluster_size need a sparse tacflow_attention")
        policy = Full()
    elif name == "tactic":
        if tokens is not None:
            raise Refused("vllm_xargs", "tacflow_tokens is fixed_budget's; tactic takes tacflow_p")
        policy = Tactic(0.9 if p is None else p, cluster_size=cluster)
    elif name == "fixed_budget":
        if tokens is None or tokens <= 0:
            raise Refused("vllm_xargs", "fixed_budget needs tacflow_tokens > 0")
        if cluster is not None:
            raise Refused("vllm_xargs", "tacflow_cluster_size is tactic's")
        policy = FixedBudget(tokens, p)
    elif name == "oracle_top_p":
        if tokens is not None or cluster is not None:
            raise Refused("vllm_xargs", "oracle_top_p takes tacflow_p only")
        policy = OracleTopP(0.9 if p is None else p)
    else:
        raise Refused(
            "vllm_xargs",
            f"tacflow_attention {name!r} is not a policy: full, tactic, fixed_budget or oracle_top_p",
        )
    if policies and name not in policies:
        raise Refused(
            "vllm_xargs",
            f"this tacflowd does not serve attention policy {name!r} (it serves {', '.join(policies)})",
        )
    diag = xargs.get("tacflow_diagnostics", 0)
    if diag not in (0, 1, True, False, "0", "1", "true", "false"):
        raise Refused("vllm_xargs", f"tacflow_diagnostics must be 0 or 1, not {diag!r}")
    return policy, diag in (1, True, "1", "true")


def external_request_id(req_id: str) -> str:
    """The request id vLLM's API answered with (``cmpl-…-0``,
    ``chatcmpl-…``): the engine's id is it plus ``-`` and 8 random
    characters, unless ``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION`` is set."""
    head, sep, tail = req_id.rpartition("-")
    if sep and len(tail) == 8 and not os.environ.get("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION"):
        return head
    return req_id


def rank_in_top(token: int, logprob: float, top: tuple[tuple[int, float], ...]) -> int:
    """vLLM's rank of a token: how many tokens are at least as likely, itself
    included, from the daemon's best tokens (best first) alone: for a 1.3
    daemon, which does not send the rank (a 1.4 daemon does, exactly). Exact
    when the token is among ``top``; otherwise every token of ``top`` is more
    likely, and ``len(top) + 1`` is a lower bound."""
    return 1 + sum(1 for t, lp in top if lp > logprob or (lp == logprob and t != token))
