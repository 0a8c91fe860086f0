"""tacflow: the Python client of the ``tacflowd`` GPU inference daemon.

Map of the package:

| module | holds |
| --- | --- |
| ``protocol`` | kind bytes, request body builders, policies, sampling, tensor refs, reply decoding |
| ``results`` | typed replies: ``HelloInfo``, ``StepOutput``, ``Stats``, ``Health`` |
| ``errors`` | one exception per wire error code, plus timeouts and restarts |
| ``address`` | where the daemon's socket is (PROTOCOL.md §1) |
| ``region`` | host shared-memory regions and numpy views of them |
| ``client`` | ``Client``: one session over one ZeroMQ DEALER socket |
| ``engine`` | ``Engine``: a small continuous-batching scheduler over a client |
| ``aio`` | ``AsyncClient``: the client for asyncio, many requests in flight |
| ``hf`` | transformers with its attention in the daemon (``attn_implementation="tacflow"``; imported on demand) |
| ``ab``, ``prompts``, ``cli`` | ``tacflow ab``: stock attention against the daemon's policies on your prompts |

The wire contract is ``ipc/PROTOCOL.md`` in the repository.
"""

__version__ = "0.1.0"

from .errors import *  # noqa: E402,F401,F403
from .errors import ERROR_CLASSES, TacflowError  # noqa: E402,F401
from .protocol import (  # noqa: E402,F401
    PROTOCOL_VERSION,
    AttentionLayout,
    CudaRegion,
    FixedBudget,
    Full,
    Kind,
    MemfdRegion,
    OracleTopP,
    SamplingParams,
    ShmRegion,
    StepEntry,
    Tactic,
    TensorRef,
)
from .results import (  # noqa: E402,F401
    AttentionDiagnostics,
    AttentionPoolInfo,
    AttentionStepOutput,
    BackendInfo,
    Health,
    HelloInfo,
    KvInfo,
    Limits,
    ModelInfo,
    PolicyStats,
    SequenceState,
    Stats,
    StepOutput,
    StepResult,
    StepTiming,
)
from .region import HostRegion  # noqa: E402,F401
from .client import Client  # noqa: E402,F401
from .engine import Engine, EngineError, Generation  # noqa: E402,F401
