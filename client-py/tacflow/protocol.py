"""Protocol v1 on the Python side: kind bytes, request bodies, reply decoding.

``ipc/PROTOCOL.md`` is the contract and ``ipc/src/messages.rs`` its Rust
mirror. The builders here produce request bodies as dicts whose keys come in
the same order as the Rust struct fields, with the same rules for what is
left out (``skip_serializing_if``) and what is always sent (serde defaults
without a skip), so that :func:`pack` gives byte for byte what the Rust side
encodes. ``tests/test_vectors.py`` checks that against ``ipc/vectors/``.

Floats are packed as float32 (``use_single_float``), as §2 requires of
requests; every float field of a v1 request is an ``f32`` in Rust.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence, Union

import msgpack

from .errors import ProtocolError, Unsupported, error_from_reply
from .results import (  # re-exported: protocol.py is the one import for wire types
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

__all__ = [
    "PROTOCOL_VERSION", "Kind", "REPLY_BIT", "ERROR_KIND", "DTYPES",
    "Full", "Tactic", "FixedBudget", "OracleTopP", "AttentionPolicy",
    "SamplingParams", "TensorRef", "StepEntry",
    "ShmRegion", "MemfdRegion", "CudaRegion", "RegionDesc", "fd_transfer_body",
    "hello_body", "session_body", "register_region_body", "unregister_region_body",
    "open_sequence_body", "fork_sequence_body", "truncate_sequence_body",
    "close_sequence_body", "step_body", "attention_step_body", "AttentionLayout",
    "pack_entry", "pack_blocks",
    "reserve_blocks_body", "sequence_state_body", "SequenceState",
    "pack", "unpack", "decode_reply",
    "AttentionDiagnostics", "AttentionPoolInfo", "AttentionStepOutput", "BackendInfo", "Health", "HelloInfo", "KvInfo",
    "Limits", "ModelInfo", "PolicyStats", "Stats", "StepOutput", "StepResult",
    "StepTiming",
]

#: The protocol version this client speaks: (major, minor).
PROTOCOL_VERSION: tuple[int, int] = (1, 4)

#: A successful reply carries its request's kind with this bit set.
REPLY_BIT = 0x80
#: The kind byte of every error reply.
ERROR_KIND = 0xFF

#: Tensor dtypes of §3.3 and their element sizes in bytes.
DTYPES: dict[str, int] = {"f32": 4, "f16": 2, "bf16": 2, "i32": 4, "i64": 8, "u8": 1}


class Kind(enum.IntEnum):
    """Request kind bytes (§2)."""

    HELLO = 0x01
    PING = 0x02
    CLOSE = 0x03
    STATS = 0x04
    HEALTH = 0x05
    REGISTER_REGION = 0x10
    UNREGISTER_REGION = 0x11
    OPEN_SEQUENCE = 0x20
    FORK_SEQUENCE = 0x21
    TRUNCATE_SEQUENCE = 0x22
    CLOSE_SEQUENCE = 0x23
    RESERVE_BLOCKS = 0x24
    SEQUENCE_STATE = 0x25
    STEP = 0x30
    ATTENTION_STEP = 0x31

    @property
    def frame(self) -> bytes:
        """The one-byte kind frame of a request."""
        return _FRAMES[self]

    @property
    def reply(self) -> int:
        return self | REPLY_BIT


_FRAMES = {k: bytes([k]) for k in Kind}


def _ints(values: Iterable[int]) -> list[int]:
    """A plain ``list[int]`` (numpy arrays and ranges do not pack as-is)."""
    tolist = getattr(values, "tolist", None)
    if tolist is not None:
        return tolist()
    return values if type(values) is list else [int(v) for v in values]


# ---------------------------------------------------------------- attention policies


@dataclass(frozen=True, slots=True)
class Full:
    """Exact attention over every cached token: the stock side of an A/B."""

    def to_wire(self) -> dict[str, Any]:
        return {"policy": "full"}


@dataclass(frozen=True, slots=True)
class Tactic:
    """Tactic: the fewest tokens carrying a fraction ``p`` of the attention mass."""

    p: float
    cluster_size: int | None = None
    recluster_limit: int | None = None

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"policy": "tactic", "p": float(self.p)}
        if self.cluster_size is not None:
            body["cluster_size"] = int(self.cluster_size)
        if self.recluster_limit is not None:
            body["recluster_limit"] = int(self.recluster_limit)
        return body


@dataclass(frozen=True, slots=True)
class FixedBudget:
    """Quest-style page selection up to a fixed token budget (a baseline).
    ``p`` only sets the target mass its diagnostics count success against
    (the daemon uses 0.9 when it is absent)."""

    tokens: int
    p: float | None = None

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"policy": "fixed_budget", "tokens": int(self.tokens)}
        if self.p is not None:
            body["p"] = float(self.p)
        return body


@dataclass(frozen=True, slots=True)
class OracleTopP:
    """Exact smallest set reaching ``p`` (evaluation only)."""

    p: float

    def to_wire(self) -> dict[str, Any]:
        return {"policy": "oracle_top_p", "p": float(self.p)}


AttentionPolicy = Union[Full, Tactic, FixedBudget, OracleTopP]


# ---------------------------------------------------------------- sampling


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the daemon draws the next token (§4.4); temperature 0 is greedy.

    ``seed=None`` lets the daemon pick a fresh seed per sequence (1.3; a 1.2
    daemon takes 0). The options after ``logprobs`` are vLLM's (1.3, CPU
    backend): left out of the request at their defaults, refused by a
    daemon that cannot honour them.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    #: ``(token, bias)`` pairs, or a ``{token: bias}`` mapping.
    logit_bias: Sequence[tuple[int, float]] | Mapping[int, float] = ()
    prompt_logprobs: int | None = None

    def uses_1_3(self) -> bool:
        """Whether any option needs a 1.3 daemon (which an older one would
        ignore; a missing seed is fine there: it takes 0)."""
        return bool(
            self.min_p
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.prompt_logprobs is not None
        )

    def to_wire(self) -> dict[str, Any]:
        # The 1.2 fields have serde defaults but no skip in Rust: sent. The
        # 1.3 ones are skipped at their default, as Rust does.
        body: dict[str, Any] = {
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": int(self.top_k),
        }
        if self.seed is not None:
            body["seed"] = int(self.seed)
        body["logprobs"] = int(self.logprobs)
        for name in ("min_p", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value != 0.0:
                body[name] = float(value)
        if self.repetition_penalty != 1.0:
            body["repetition_penalty"] = float(self.repetition_penalty)
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        pairs = [[int(t), float(b)] for t, b in bias]
        if pairs:
            body["logit_bias"] = pairs
        if self.prompt_logprobs is not None:
            body["prompt_logprobs"] = int(self.prompt_logprobs)
        return body


# ---------------------------------------------------------------- tensors, entries


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor inside a registered region (§3.3); strides count elements."""

    region_id: int
    offset: int
    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...] | None = None

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "region_id": self.region_id,
            "offset": self.offset,
            "dtype": self.dtype,
            "shape": list(self.shape),
        }
        if self.strides is not None:
            body["strides"] = list(self.strides)
        return body


@dataclass(slots=True)
class StepEntry:
    """New tokens for one sequence in a step (§4.5).

    ``sample=False`` for every prompt chunk but the last; ``positions``
    default to the sequence's cached length onwards; ``logits`` receives the
    logits of every new token.
    """

    seq_id: int
    tokens: Sequence[int]
    positions: Sequence[int] | None = None
    sample: bool = True
    logits: TensorRef | None = None
    #: (1.3) A named-block sequence's whole block table (reservation ids).
    blocks: Sequence[int] | None = None

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"seq_id": self.seq_id, "tokens": _ints(self.tokens)}
        if self.positions is not None:
            body["positions"] = _ints(self.positions)
        body["sample"] = bool(self.sample)
        if self.logits is not None:
            body["logits"] = self.logits.to_wire()
        if self.blocks is not None:
            body["blocks"] = _ints(self.blocks)
        return body


# ---------------------------------------------------------------- regions


@dataclass(frozen=True, slots=True)
class ShmRegion:
    """A POSIX shared-memory object the client created (``shm_open`` name)."""

    name: str
    byte_size: int

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "shm", "name": self.name, "byte_size": int(self.byte_size)}


@dataclass(frozen=True, slots=True)
class MemfdRegion:
    """A sealed memfd handed over the companion socket, named by its token."""

    fd_token: int
    byte_size: int

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "memfd", "fd_token": int(self.fd_token), "byte_size": int(self.byte_size)}


@dataclass(frozen=True, slots=True)
class CudaRegion:
    """CUDA device memory exported with ``cuIpcGetMemHandle`` (64 bytes)."""

    ipc_handle: bytes
    device_uuid: str
    byte_size: int
    offset: int = 0
    #: (1.4) The client's interprocess event (``cuIpcGetEventHandle``, 64
    #: bytes), recorded after it writes a request's inputs.
    event_handle: bytes | None = None

    def to_wire(self) -> dict[str, Any]:
        # `offset` has a serde default but no skip: always sent.
        body: dict[str, Any] = {
            "kind": "cuda",
            "ipc_handle": bytes(self.ipc_handle),
            "device_uuid": self.device_uuid,
            "byte_size": int(self.byte_size),
            "offset": int(self.offset),
        }
        if self.event_handle is not None:
            body["event_handle"] = bytes(self.event_handle)
        return body


RegionDesc = Union[ShmRegion, MemfdRegion, CudaRegion]


# ---------------------------------------------------------------- attention offload


@dataclass(frozen=True, slots=True)
class AttentionLayout:
    """(1.4) What an attention-only sequence's attention is (§4.7): its
    shapes, its score scale, and every feature that changes the scores.
    ``softcap``, ``sliding_window`` and ``sinks`` are declared so that a
    daemon that cannot honour them refuses the sequence instead of
    computing something else."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    softcap: float | None = None
    sliding_window: int | None = None
    sinks: bool = False

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "num_layers": int(self.num_layers),
            "num_heads": int(self.num_heads),
            "num_kv_heads": int(self.num_kv_heads),
            "head_dim": int(self.head_dim),
            "scale": float(self.scale),
        }
        if self.softcap is not None:
            body["softcap"] = float(self.softcap)
        if self.sliding_window is not None:
            body["sliding_window"] = int(self.sliding_window)
        if self.sinks:
            body["sinks"] = True
        return body


# ---------------------------------------------------------------- request bodies


def hello_body(
    request_id: int, client: str | None = None, protocol: tuple[int, int] = PROTOCOL_VERSION
) -> dict[str, Any]:
    body: dict[str, Any] = {"request_id": request_id, "protocol": [protocol[0], protocol[1]]}
    if client:  # Rust skips an empty string
        body["client"] = client
    return body


def fd_transfer_body(request_id: int, session: bytes, byte_size: int) -> dict[str, Any]:
    """The packet sent with a memfd on the companion socket (PROTOCOL.md §3.4)."""
    return {"request_id": request_id, "session": session, "byte_size": int(byte_size)}


def session_body(request_id: int, session: bytes) -> dict[str, Any]:
    """The body of ``ping``, ``close``, ``stats`` and ``health``."""
    return {"request_id": request_id, "session": session}


def register_region_body(request_id: int, session: bytes, region: RegionDesc) -> dict[str, Any]:
    return {"request_id": request_id, "session": session, "region": region.to_wire()}


def unregister_region_body(request_id: int, session: bytes, region_id: int) -> dict[str, Any]:
    return {"request_id": request_id, "session": session, "region_id": region_id}


def open_sequence_body(
    request_id: int,
    session: bytes,
    seq_id: int,
    attention: AttentionPolicy | None = None,
    sampling: SamplingParams | None = None,
    diagnostics: bool = False,
    blocks: str = "daemon",
    prefix: Sequence[int] = (),
    prompt_len: int | None = None,
    layout: AttentionLayout | None = None,
) -> dict[str, Any]:
    # attention, sampling and diagnostics have serde defaults but no skip:
    # the Rust side always sends them, so do we. The 1.3 fields are skipped
    # at their defaults. No sampling given means the 1.2 default (seed 0), so
    # that a bare open has the bytes it always had.
    body: dict[str, Any] = {
        "request_id": request_id,
        "session": session,
        "seq_id": seq_id,
        "attention": (attention or Full()).to_wire(),
        "sampling": (sampling or SamplingParams(seed=0)).to_wire(),
        "diagnostics": bool(diagnostics),
    }
    if blocks not in ("daemon", "named"):
        raise ValueError(f"blocks must be 'daemon' or 'named', not {blocks!r}")
    if blocks != "daemon":
        body["blocks"] = blocks
    if prefix:
        body["prefix"] = _ints(prefix)
    if prompt_len is not None:
        body["prompt_len"] = int(prompt_len)
    if layout is not None:
        body["layout"] = layout.to_wire()
    return body


def reserve_blocks_body(request_id: int, session: bytes, count: int) -> dict[str, Any]:
    """(1.3) Grows the session's KV block reservation by ``count``."""
    return {"request_id": request_id, "session": session, "count": int(count)}


def sequence_state_body(request_id: int, session: bytes, seq_id: int) -> dict[str, Any]:
    """(1.3) Asks what the daemon holds for a sequence."""
    return {"request_id": request_id, "session": session, "seq_id": seq_id}


def fork_sequence_body(
    request_id: int,
    session: bytes,
    parent: int,
    child: int,
    sampling: SamplingParams | None = None,
    attention: AttentionPolicy | None = None,
    diagnostics: bool | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": request_id,
        "session": session,
        "parent": parent,
        "child": child,
    }
    if sampling is not None:
        body["sampling"] = sampling.to_wire()
    if attention is not None:
        body["attention"] = attention.to_wire()
    if diagnostics is not None:
        body["diagnostics"] = bool(diagnostics)
    return body


def truncate_sequence_body(
    request_id: int, session: bytes, seq_id: int, num_tokens: int
) -> dict[str, Any]:
    """``num_tokens`` is how many of the last cached tokens to drop."""
    return {"request_id": request_id, "session": session, "seq_id": seq_id, "num_tokens": num_tokens}


def close_sequence_body(request_id: int, session: bytes, seq_id: int) -> dict[str, Any]:
    return {"request_id": request_id, "session": session, "seq_id": seq_id}


def step_body(request_id: int, session: bytes, entries: Iterable[StepEntry]) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "session": session,
        "entries": [e.to_wire() for e in entries],
    }


_ENTRY_PACKER = msgpack.Packer(use_single_float=True)
_SEQ_ID = _ENTRY_PACKER.pack("seq_id")
_TOKENS = _ENTRY_PACKER.pack("tokens")
_SAMPLE_TRUE = _ENTRY_PACKER.pack("sample") + _ENTRY_PACKER.pack(True)
_SAMPLE_FALSE = _ENTRY_PACKER.pack("sample") + _ENTRY_PACKER.pack(False)
_BLOCKS = _ENTRY_PACKER.pack("blocks")


def pack_blocks(blocks: Iterable[int]) -> bytes:
    """A block table encoded once for :func:`pack_entry`."""
    return _ENTRY_PACKER.pack(_ints(blocks))


def pack_entry(seq_id: int, tokens: Sequence[int], sample: bool, packed_blocks: bytes | None = None) -> bytes:
    """The msgpack of ``StepEntry(seq_id, tokens, sample=sample,
    blocks=...).to_wire()`` with the block table given already encoded
    (:func:`pack_blocks`), for :meth:`Client.step_packed`."""
    p = _ENTRY_PACKER
    parts = [
        p.pack_map_header(3 if packed_blocks is None else 4),
        _SEQ_ID,
        p.pack(seq_id),
        _TOKENS,
        p.pack(_ints(tokens)),
        _SAMPLE_TRUE if sample else _SAMPLE_FALSE,
    ]
    if packed_blocks is not None:
        parts += (_BLOCKS, packed_blocks)
    return b"".join(parts)


def attention_step_body(
    request_id: int,
    session: bytes,
    layer: int,
    seq_ids: Sequence[int],
    q: TensorRef,
    k: TensorRef,
    v: TensorRef,
    out: TensorRef,
    num_tokens: Sequence[int] = (),
    positions: Sequence[int] = (),
) -> dict[str, Any]:
    """(1.4) One layer of attention for attention-only sequences (§4.7):
    ``num_tokens`` rows per sequence (one each when empty), the first at
    ``positions`` (checked by the daemon when given)."""
    body: dict[str, Any] = {
        "request_id": request_id,
        "session": session,
        "layer": int(layer),
        "seq_ids": _ints(seq_ids),
    }
    if len(num_tokens):
        body["num_tokens"] = _ints(num_tokens)
    if len(positions):
        body["positions"] = _ints(positions)
    body["q"] = q.to_wire()
    body["k"] = k.to_wire()
    body["v"] = v.to_wire()
    body["out"] = out.to_wire()
    return body


# ---------------------------------------------------------------- codec


def pack(body: Mapping[str, Any]) -> bytes:
    """A request body as msgpack, floats as float32 (§2)."""
    return msgpack.packb(body, use_single_float=True)


def unpack(data: bytes) -> Any:
    """A header as Python values: str keys, ``bin`` as bytes, arrays as lists."""
    return msgpack.unpackb(data, raw=False)


def decode_reply(
    frames: Sequence[bytes], instance_id: str | None = None
) -> tuple[int, dict[str, Any]]:
    """Decodes ``[kind, header]`` into ``(request kind, body)``.

    Raises the matching :class:`~tacflow.errors.TacflowError` subclass for an
    error reply, and :class:`ProtocolError` for frames that are not a reply.
    """
    if len(frames) < 2:
        raise ProtocolError("protocol_error", f"a reply is [kind, header]; got {len(frames)} frame(s)")
    kind_frame = frames[0]
    try:
        body = unpack(frames[1])
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError("protocol_error", f"reply header is not msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("protocol_error", f"reply header is not a map: {body!r}")
    if len(kind_frame) != 1:
        raise ProtocolError("protocol_error", f"reply kind frame has {len(kind_frame)} bytes")
    byte = kind_frame[0]
    if byte == ERROR_KIND:
        raise error_from_reply(body, instance_id)
    if not byte & REPLY_BIT:
        raise ProtocolError("protocol_error", f"kind 0x{byte:02x} is not a reply")
    return byte & ~REPLY_BIT, body


def require_1_4(info: HelloInfo | None, what: str) -> None:
    """Refuses, before sending, what a daemon older than 1.4 does not serve."""
    if info is None or tuple(info.protocol) >= (1, 4):
        return
    raise Unsupported(
        "unsupported",
        f"this daemon speaks protocol {info.protocol[0]}.{info.protocol[1]}; {what} needs 1.4",
    )


def require_1_3(info: HelloInfo | None, sampling: SamplingParams | None, needs: bool) -> None:
    """Refuses, before sending, what a daemon older than 1.3 would ignore:
    named blocks and ``sequence_state`` (``needs``), or vLLM's sampling
    options. Nothing is refused before ``hello`` (``info`` is None)."""
    if info is None or tuple(info.protocol) >= (1, 3):
        return
    if needs or (sampling is not None and sampling.uses_1_3()):
        raise Unsupported(
            "unsupported",
            f"this daemon speaks protocol {info.protocol[0]}.{info.protocol[1]}; "
            "named blocks, sequence_state and vLLM's sampling options need 1.3",
        )
