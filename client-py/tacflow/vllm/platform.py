"""vLLM's platform when tacflowd executes the model.

The vLLM process needs no accelerator (the daemon owns it): the platform
reports a plain host device, names :class:`TacflowExecutor` as the
executor, fixes the block size to the daemon's, turns off what only an
in-process model runner uses (compilation, CUDA graphs, asynchronous
scheduling), refuses at start the options the daemon cannot serve, and
refuses per request (HTTP 400) the sampling options it cannot honour.
"""

from __future__ import annotations

import logging
from typing import Any

import vllm

from .checks import StartupRefused, check_model, check_options, check_scheduler, check_vllm_version

# Before anything of vLLM's internals is imported: another release may have
# moved them, and its user should read which releases are supported, not an
# ImportError. vLLM imports this module only when TACFLOW_VLLM is set.
check_vllm_version(vllm.__version__)

import torch  # noqa: E402
from vllm.platforms.interface import Platform, PlatformEnum  # noqa: E402

from . import daemon_address  # noqa: E402
from .mapping import Refused, plan_request  # noqa: E402

# Under vLLM's logger, so that its configuration (format, level) applies.
logger = logging.getLogger("vllm.tacflow")

EXECUTOR = "tacflow.vllm.executor.TacflowExecutor"


class TacflowPlatform(Platform):
    _enum = PlatformEnum.OOT
    device_name = "tacflow"
    # vLLM's host-side tensors (input processing, output processing) live on
    # the CPU; nothing of the model does.
    device_type = "cpu"
    dispatch_key = "CPU"
    dist_backend = "gloo"
    simple_compile_backend = "eager"

    #: What the daemon said at start: model, limits, policies (set by
    #: ``check_and_update_config`` in every vLLM process that builds a config).
    daemon_info: Any = None

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return "tacflowd"

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        return 0

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return False

    @classmethod
    def inference_mode(cls):
        return torch.no_grad()

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        pass

    @classmethod
    def manual_seed_all(cls, seed: int) -> None:
        pass

    @classmethod
    def check_if_supports_dtype(cls, dtype: torch.dtype) -> None:
        pass

    @classmethod
    def update_block_size_for_backend(cls, vllm_config: Any) -> None:
        # No attention backend runs in vLLM; the daemon's block size is set.
        pass

    @classmethod
    def check_and_update_config(cls, vllm_config: Any) -> None:
        if vllm_config.model_config is None:
            return
        info = cls._hello()
        cache = vllm_config.cache_config
        if cache.user_specified_block_size and cache.block_size != info.kv.block_size:
            raise StartupRefused(
                f"--block-size {cache.block_size}: tacflowd's KV blocks hold "
                f"{info.kv.block_size} tokens (leave --block-size out)"
            )
        cache.block_size = info.kv.block_size
        mc = vllm_config.model_config
        if mc.original_max_model_len is None and mc.max_model_len > info.model.max_context:
            logger.info(
                "tacflow: max model len %d lowered to tacflowd's context, %d",
                mc.max_model_len,
                info.model.max_context,
            )
            mc.max_model_len = info.model.max_context
            vllm_config.scheduler_config.max_model_len = info.model.max_context
        check_options(vllm_config)
        check_model(mc, info)
        check_scheduler(vllm_config, info)

        from vllm.config import CompilationMode, CUDAGraphMode

        vllm_config.parallel_config.distributed_executor_backend = EXECUTOR
        vllm_config.scheduler_config.async_scheduling = False
        comp = vllm_config.compilation_config
        comp.mode = CompilationMode.NONE
        comp.cudagraph_mode = CUDAGraphMode.NONE

    @classmethod
    def _hello(cls) -> Any:
        """Asks the daemon what it serves (once per process)."""
        if cls.daemon_info is None:
            from ..client import Client
            from ..errors import TacflowError

            try:
                with Client(daemon_address(), connect_timeout_s=10.0, client_name="tacflow-vllm/config") as c:
                    cls.daemon_info = c.info
            except TacflowError as exc:
                raise StartupRefused(f"TACFLOW_VLLM: cannot reach tacflowd: {exc}") from exc
        return cls.daemon_info

    @classmethod
    def validate_request(cls, processed_inputs: Any, params: Any) -> None:
        """Refuses, before it reaches the scheduler, a request whose options
        the daemon cannot honour (vLLM's OpenAI server answers HTTP 400)."""
        from vllm.exceptions import VLLMValidationError

        if not hasattr(params, "temperature"):
            raise VLLMValidationError("tacflowd serves text generation only (no pooling)")
        kind = processed_inputs.get("type") if isinstance(processed_inputs, dict) else None
        if kind not in (None, "token"):
            raise VLLMValidationError(f"tacflowd takes token prompts only, not {kind!r} inputs")
        info = cls._hello()
        try:
            plan_request(params, info.model.vocab_size, info.attention_policies, info.backend.kind)
        except Refused as exc:
            raise VLLMValidationError(str(exc), parameter=exc.parameter) from None
