"""tacflowd as vLLM's model executor.

vLLM keeps its OpenAI server, tokenizer, scheduler, KV block accounting,
prefix cache and preemption; tacflowd runs the model. Two of vLLM's
extension points, nothing patched:

- a platform plugin (entry point group ``vllm.platform_plugins``, name
  ``tacflow``: :func:`register`), so that the vLLM process needs no GPU (the
  daemon owns it), refuses what the daemon cannot do at start, and refuses
  request options it cannot honour with an HTTP 400;
- an ``Executor`` (:class:`tacflow.vllm.executor.TacflowExecutor`) that the
  platform names as vLLM's ``distributed_executor_backend``: each
  ``execute_model`` is one tacflow ``step``, vLLM's block ids are the
  daemon's named KV blocks. Its connection to the daemon (lease, loss,
  restart) is :mod:`tacflow.vllm.link`; what it keeps per request,
  :mod:`tacflow.vllm.state`; which block ids survived a restart,
  :mod:`tacflow.vllm.blocks`.

Opt in with ``TACFLOW_VLLM``: the daemon's address (``ipc:///path``,
``tcp://host:port``, a socket path) or ``auto`` (the socket the client
finds by itself, PROTOCOL.md §1). Unset, the plugin stays inactive and
``vllm serve`` is unchanged by the installed package.
"""

from __future__ import annotations

import os

#: The environment variable that opts a vLLM process in.
ENV = "TACFLOW_VLLM"
#: vLLM releases this integration was built and tested against (their
#: ``SchedulerOutput`` / ``ModelRunnerOutput`` and ``Executor`` shapes).
SUPPORTED_VLLM = ("0.32.0",)


def register() -> str | None:
    """vLLM's platform plugin hook: the platform's qualified name when the
    user opted in, else None (vLLM then picks its own platform as if the
    package were not installed).

    vLLM swallows exceptions raised here (it logs them at debug level and
    falls back to another platform), so nothing is checked here: the
    platform refuses an unsupported vLLM when vLLM builds its config."""
    if not os.environ.get(ENV):
        return None
    return "tacflow.vllm.platform.TacflowPlatform"


def daemon_address() -> str | None:
    """The daemon address ``TACFLOW_VLLM`` names (None for ``auto``)."""
    value = os.environ.get(ENV, "").strip()
    if value in ("", "1", "auto"):
        return None
    return value
