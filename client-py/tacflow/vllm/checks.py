"""Start-up checks: the vLLM release, the options the daemon cannot serve,
and vLLM's model against the daemon's.

Each check raises :class:`StartupRefused` with what is wrong and what to do,
before vLLM loads anything heavy; ``vllm serve`` then exits non-zero with
that message.
"""

from __future__ import annotations

from typing import Any

from . import SUPPORTED_VLLM


class StartupRefused(RuntimeError):
    """vLLM's configuration cannot run on tacflowd."""


def check_vllm_version(version: str) -> None:
    if version not in SUPPORTED_VLLM:
        raise StartupRefused(
            f"tacflow's vLLM integration supports vLLM {', '.join(SUPPORTED_VLLM)}; "
            f"this is vLLM {version}. Install a supported release "
            f"(pip install 'vllm=={SUPPORTED_VLLM[-1]}') or unset TACFLOW_VLLM."
        )


def check_options(vllm_config: Any) -> None:
    """Refuses the vLLM options that need vLLM to run the model itself or
    that the daemon does not implement."""
    par = vllm_config.parallel_config
    problems: list[str] = []
    for name, flag in (
        ("tensor_parallel_size", "--tensor-parallel-size"),
        ("pipeline_parallel_size", "--pipeline-parallel-size"),
        ("data_parallel_size", "--data-parallel-size"),
        ("decode_context_parallel_size", "--decode-context-parallel-size"),
        ("prefill_context_parallel_size", "--prefill-context-parallel-size"),
    ):
        value = getattr(par, name, 1)
        if value not in (None, 1):
            problems.append(
                f"{flag} {value}: the daemon runs the whole model on its own device "
                "(tensor and pipeline parallelism are not implemented)"
            )
    backend = par.distributed_executor_backend
    if backend not in (None, "uni") and not _is_ours(backend):
        problems.append(
            f"--distributed-executor-backend {backend!r}: with TACFLOW_VLLM the executor is "
            "tacflow's (leave the option out)"
        )
    if vllm_config.lora_config is not None:
        problems.append("--enable-lora: the daemon has no LoRA adapters")
    if vllm_config.speculative_config is not None:
        problems.append("--speculative-config: the daemon has no speculative decoding")
    if vllm_config.kv_transfer_config is not None:
        problems.append("--kv-transfer-config: the daemon's KV cache is not a vLLM KV connector")
    if getattr(vllm_config, "ec_transfer_config", None) is not None:
        problems.append("--ec-transfer-config: the daemon runs no encoder")
    if getattr(vllm_config, "watermark_config", None) is not None:
        problems.append("watermarking: it runs in vLLM's sampler, which does not run")
    mc = vllm_config.model_config
    if mc is not None:
        if mc.runner_type != "generate":
            problems.append(f"--runner {mc.runner_type}: the daemon serves text generation only")
        if getattr(mc, "logprobs_mode", "raw_logprobs") != "raw_logprobs":
            problems.append(
                f"--logprobs-mode {mc.logprobs_mode}: the daemon returns raw logprobs "
                "(vLLM's default) only"
            )
        if getattr(mc, "multimodal_config", None) is not None and mc.is_multimodal_model:
            problems.append("a multimodal model: the daemon serves text decoders only")
        if getattr(mc, "quantization", None):
            problems.append(
                f"--quantization {mc.quantization}: the daemon loads the weights itself "
                "(serve the checkpoint with tacflowd and leave the option out)"
            )
        if getattr(mc, "enable_prompt_embeds", False):
            problems.append("--enable-prompt-embeds: the daemon takes token ids only")
        if getattr(mc, "logits_processors", None):
            problems.append("--logits-processors: vLLM's sampler does not run")
    if problems:
        raise StartupRefused(
            "vLLM options that tacflowd cannot serve:\n  - " + "\n  - ".join(problems)
        )


def _is_ours(backend: Any) -> bool:
    name = backend if isinstance(backend, str) else f"{backend.__module__}.{backend.__qualname__}"
    return name == "tacflow.vllm.executor.TacflowExecutor"


def model_mismatches(mc: Any, daemon: Any) -> list[str]:
    """Where vLLM's model (its ``ModelConfig``) and the daemon's
    (``hello.model``) differ; empty when they agree."""
    hf = mc.hf_text_config
    mine = {
        "architecture": getattr(hf, "model_type", None),
        "num_layers": getattr(hf, "num_hidden_layers", None),
        "num_heads": getattr(hf, "num_attention_heads", None),
        "num_kv_heads": mc.get_total_num_kv_heads(),
        "head_dim": mc.get_head_size(),
        "hidden_size": getattr(hf, "hidden_size", None),
        "vocab_size": mc.get_vocab_size(),
    }
    out = []
    for key, value in mine.items():
        theirs = getattr(daemon, key)
        if value != theirs:
            out.append(f"{key}: vLLM's model has {value}, tacflowd's has {theirs}")
    return out


def check_model(mc: Any, info: Any) -> None:
    """Refuses a vLLM model that is not the daemon's, and a context longer
    than the daemon's."""
    bad = model_mismatches(mc, info.model)
    if bad:
        raise StartupRefused(
            f"vLLM's model {mc.model!r} is not the model tacflowd serves "
            f"({info.model.name!r}):\n  - " + "\n  - ".join(bad)
        )
    if mc.max_model_len > info.model.max_context:
        raise StartupRefused(
            f"--max-model-len {mc.max_model_len} is above tacflowd's context "
            f"({info.model.max_context} tokens): pass --max-model-len {info.model.max_context} "
            "or less, or start tacflowd with a longer --max-context"
        )


def check_scheduler(vllm_config: Any, info: Any) -> None:
    """vLLM's batch limits within the daemon's per-session limits."""
    sc = vllm_config.scheduler_config
    problems = []
    if sc.max_num_batched_tokens > info.limits.max_step_tokens:
        problems.append(
            f"--max-num-batched-tokens {sc.max_num_batched_tokens} is above tacflowd's "
            f"max_step_tokens {info.limits.max_step_tokens}"
        )
    if sc.max_num_seqs > info.limits.max_sequences:
        problems.append(
            f"--max-num-seqs {sc.max_num_seqs} is above tacflowd's max_sequences "
            f"{info.limits.max_sequences}"
        )
    if problems:
        raise StartupRefused("vLLM's batch limits exceed the daemon's:\n  - " + "\n  - ".join(problems))
