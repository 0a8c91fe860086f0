"""Typed views of the daemon's replies (PROTOCOL.md §4).

Replies arrive as msgpack maps; these dataclasses give them names and types
so that callers write ``out.results[0].token`` rather than dictionary
lookups. Each ``from_wire`` ignores fields it does not know, because v1.x
daemons may add optional fields (§6), and raises :class:`ProtocolError` when
a required field is missing, because that is a broken daemon, not a newer one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

from .errors import ProtocolError

T = TypeVar("T")


def _pick(cls: type[T], body: Mapping[str, Any], **override: Any) -> T:
    """Builds ``cls`` from the fields of ``body`` it knows, ignoring the rest."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {k: v for k, v in body.items() if k in names}
    kwargs.update(override)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ProtocolError(
            "protocol_error", f"reply is missing fields for {cls.__name__}: {exc}"
        ) from None


def _map(body: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = body.get(key)
    if not isinstance(value, Mapping):
        raise ProtocolError("protocol_error", f"reply field {key!r} is not a map: {value!r}")
    return value


# ---------------------------------------------------------------- hello


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model the daemon serves; enough to size tensors and stop decoding."""

    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    dtype: str
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> "ModelInfo":
        return _pick(cls, body, eos_token_ids=tuple(body.get("eos_token_ids") or ()))


@dataclass(frozen=True, slots=True)
class BackendInfo:
    kind: str  # "cpu" or "cuda"
    device: str

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> "BackendInfo":
        return _pick(cls, body)


@dataclass(frozen=True, slots=True)
class KvInfo:
    """KV cache capacity in blocks (``block_size`` tokens each) at hello time."""

    block_size: int
    total_blocks: int
    free_blocks: int

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> "KvInfo":
        return _pick(cls, body)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-session limits; exceeding one is answered ``limit_exceeded``."""

    max_sequences: int
    max_regions: int
    max_mapped_bytes: int
    max_queued_requests: int
    max_step_tokens: int

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> "Limits":
        return _pick(cls, body)


@dataclass(frozen=True, slots=True)
class AttentionPoolInfo:
    """(1.4) The KV pool of attention-only sequences (§4.7), apart from the
    model's: its byte budget, what sequences hold, ``attention_step``
    requests served per layer, and per policy what decode queries read."""

    block_size: int = 16
    total_bytes: int = 0
    used_bytes: int = 0
    blocks: int = 0
    sequences: int = 0
    steps_by_layer: tuple[int, ...] = ()
    attention: dict[str, "PolicyStats"] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, body: Mapping[str, Any] | None) -> "AttentionPoolInfo | None":
        if body is None:
            return None
        att = body.get("attention") or {}
        return _pick(
            cls,
            body,
            steps_by_layer=tuple(body.get("steps_by_layer") or ()),
            attention={k: PolicyStats.from_wire(v) for k, v in att.items()},
        )


@dataclass(frozen=True, slots=True)
class HelloInfo:
    """What ``hello`` told the client about the daemon and its session."""

    session: bytes
    instance_id: str
    protocol: tuple[int, int]
    daemon: str
    model: ModelInfo
    backend: BackendInfo
    kv: KvInfo
    attention_policies: tuple[str, ...]
    lease_ms: int
    limits: Limits
    #: Region kinds this session may register (protocol 1.1): ``shm`` only
    #: when the daemon runs as the client's own user, ``memfd`` when its
    #: companion socket is served. Empty from a 1.0 daemon.
    region_kinds: tuple[str, ...] = ()
    #: The companion socket's path for memfd regions (protocol 1.1).
    fd_socket: str | None = None
    #: (1.4) The attention-only sequences' pool; ``None`` from an older daemon.
    attention_pool: AttentionPoolInfo | None = None

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> "HelloInfo":
        session = body.get("session")
        if not isinstance(session, bytes) or len(session) != 16:
            raise ProtocolError("protocol_error", f"hello: bad session token {session!r}")
        return _pick(
            cls,
            body,
            protocol=tuple(body.get("protocol") or ()),
            model=ModelInfo.from_wire(_map(body, "model")),
            backend=BackendInfo.from_wire(_map(body, "backend")),
            kv=KvInfo.from_wire(_map(body, "kv")),
            attention_policies=tuple(body.get("attention_policies") or ()),
            limits=Limits.from_wire(_map(body, "limits")),
            region_kinds=tuple(body.get("region_kinds") or ()),
            attention_pool=AttentionPoolInfo.from_wire(body.get("attention_pool")),
        )


# ---------------------------------------------------------------- step


@dataclass(frozen=True, slots=True)
class AttentionDiagnostics:
    """What a sparse policy read and how much attention mass it kept (§4.6)."""

    policy: str
    tokens_read_fraction: float
    selected_fraction: float
    true_mass: float
    estimated_mass: float
    min_true_mass: float
    success_rate: float

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> "AttentionDiagnostics":
        return _pick(cls, body)


@dataclass(slots=True)  # not frozen: frozen init costs ~0.4 µs, on the step path
class StepResult:
    """One entry's outcome, in the order of the step's entries."""

    seq_id: int
    num_tokens: int
    token: int | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    attention: AttentionDiagnostics | None = None
    #: (1.3) Per new prompt token: ``(logprob, ((token, logprob), ...))``,
    #: ``None`` for the sequence's first token.
    prompt_logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]] | None, ...] = ()
    #: (1.4) vLLM's rank of ``token`` (how many tokens are at least as
    #: likely, itself included), when ``logprobs`` > 0; ``None`` from an
    #: older daemon.
    rank: int | None = None
    #: (1.4) The rank of each token of ``prompt_logprobs`` (``None`` where
    #: that is ``None``); empty from an older daemon.
    prompt_ranks: tuple[int | None, ...] = ()

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> "StepResult":
        # The common case (no logprobs, no diagnostics) skips the generic path:
        # step replies are on the latency benchmark's path.
        try:
            top = body.get("top_logprobs")
            att = body.get("attention")
            return cls(
                body["seq_id"],
                body["num_tokens"],
                body.get("token"),
                body.get("logprob"),
                tuple((t, lp) for t, lp in top) if top else (),
                AttentionDiagnostics.from_wire(att) if att is not None else None,
                _prompt_logprobs(body.get("prompt_logprobs")),
                body.get("rank"),
                tuple(body.get("prompt_ranks") or ()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError("protocol_error", f"bad step result {body!r}: {exc}") from None


def _prompt_logprobs(
    wire: Any,
) -> tuple[tuple[float, tuple[tuple[int, float], ...]] | None, ...]:
    if not wire:
        return ()
    return tuple(
        None if x is None else (float(x[0]), tuple((int(t), float(lp)) for t, lp in x[1]))
        for x in wire
    )


@dataclass(frozen=True, slots=True)
class SequenceState:
    """(1.3) What the daemon holds for one sequence (``sequence_state``)."""

    seq_id: int
    num_tokens: int
    mode: str
    attention: Mapping[str, Any]
    sampling: Mapping[str, Any]
    diagnostics: bool
    num_blocks: int
    prompt_len: int | None = None
    block_ids: tuple[int, ...] = ()

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> "SequenceState":
        try:
            return cls(
                int(body["seq_id"]),
                int(body["num_tokens"]),
                str(body["mode"]),
                dict(body["attention"]),
                dict(body["sampling"]),
                bool(body["diagnostics"]),
                int(body["num_blocks"]),
                body.get("prompt_len"),
                tuple(body.get("block_ids") or ()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError("protocol_error", f"bad sequence state {body!r}: {exc}") from None


@dataclass(slots=True)  # not frozen: frozen init costs ~0.4 µs, on the step path
class StepTiming:
    """Daemon-side time of a step: waiting in the queue, then running."""

    queued_us: int = 0
    run_us: int = 0


@dataclass(slots=True)  # not frozen: frozen init costs ~0.4 µs, on the step path
class StepOutput:
    results: list[StepResult]
    timing: StepTiming = field(default_factory=StepTiming)

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> "StepOutput":
        try:
            results = [StepResult.from_wire(r) for r in body["results"]]
            t = body["timing"]
            timing = StepTiming(t.get("queued_us", 0), t.get("run_us", 0))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ProtocolError("protocol_error", f"bad step reply: {exc!r}") from None
        return cls(results, timing)


# ---------------------------------------------------------------- stats, health


@dataclass(frozen=True, slots=True)
class PolicyStats:
    """Aggregates over decode queries of sequences opened with diagnostics."""

    decode_steps: int
    tokens_read_fraction: float
    true_mass: float
    success_rate: float
    true_mass_by_layer_head: list[list[float]] = field(default_factory=list)
    tokens_read_by_layer_head: list[list[float]] = field(default_factory=list)

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> "PolicyStats":
        return _pick(cls, body)


@dataclass(frozen=True, slots=True)
class Stats:
    """Daemon-wide counters (``stats``)."""

    instance_id: str
    uptime_s: float
    steps: int
    prefill_tokens: int
    decode_tokens: int
    sessions: int
    sequences: int
    regions: int
    kv_total_blocks: int
    kv_free_blocks: int
    queue_depth: int
    errors: dict[str, int] = field(default_factory=dict)
    attention: dict[str, PolicyStats] = field(default_factory=dict)
    #: (1.4) The attention-only sequences' pool.
    attention_pool: AttentionPoolInfo | None = None

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> "Stats":
        attention = body.get("attention") or {}
        return _pick(
            cls,
            body,
            errors=dict(body.get("errors") or {}),
            attention={k: PolicyStats.from_wire(v) for k, v in attention.items()},
            attention_pool=AttentionPoolInfo.from_wire(body.get("attention_pool")),
        )


@dataclass(slots=True)
class AttentionStepOutput:
    """(1.4) One ``attention_step``'s outcome: per sequence the layer's
    cached length after it, and for decode rows of sequences opened with
    diagnostics what the policy read and kept at this layer."""

    layer: int
    num_tokens: list[int]
    attention: list[AttentionDiagnostics | None]
    timing: StepTiming

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> "AttentionStepOutput":
        try:
            t = body["timing"]
            n = list(body["num_tokens"])
            att = body.get("attention") or [None] * len(n)
            return cls(
                int(body["layer"]),
                n,
                [None if a is None else AttentionDiagnostics.from_wire(a) for a in att],
                StepTiming(t.get("queued_us", 0), t.get("run_us", 0)),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ProtocolError("protocol_error", f"bad attention_step reply: {exc!r}") from None


@dataclass(frozen=True, slots=True)
class Health:
    """The daemon's own view of itself (``health``).

    ``status`` is ``"ok"``, ``"stopping"`` (shutdown began), ``"wedged"``
    (the executor has been on one command longer than the daemon's bound) or
    ``"failing"`` (a fatal fault: the daemon answers every request with
    :class:`~tacflow.errors.DaemonFailing` and exits shortly). It is never
    ``"ok"`` unless ``executor`` is ``"alive"`` and ``device`` is ``"ok"``.
    ``executor`` (``"alive"``, ``"wedged"``, ``"dead"``), ``device``
    (``"ok"``, ``"failed"``) and ``reason`` (why the status is not ok) come
    from protocol 1.2; a 1.0 or 1.1 daemon sends none of them, and they are
    ``None`` then.
    """

    status: str
    instance_id: str
    backend: BackendInfo
    executor_idle_ms: int
    executor: str | None = None
    device: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> "Health":
        return _pick(cls, body, backend=BackendInfo.from_wire(_map(body, "backend")))
