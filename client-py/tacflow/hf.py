"""Hugging Face transformers with its attention in ``tacflowd``.

One line swaps the attention of every layer of a transformers model for the
daemon's, keeping the model itself (its weights, projections, norms, RoPE,
sampling) in transformers::

    import tacflow.hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="tacflow")
    model.generate(**inputs)                       # unchanged

Each generation opens one attention-only sequence per batch row
(``PROTOCOL.md`` §4.7): the KV cache lives in the daemon, and every layer of
every forward pass sends the new rows' q, k and v through a shared-memory
region (``attention_step``) and reads the attention output back. The
policy is chosen around the call::

    with tacflow.hf.attention(Tactic(0.9)):
        model.generate(**inputs)

What it takes from transformers (5.17 to 5.x, refused outside):

- ``AttentionInterface``: ``tacflow_attention`` replaces the attention
  function; ``AttentionMaskInterface``: the "mask" it receives is which new
  rows are real tokens (left or right padding is left out of the daemon's
  cache, so each sequence holds exactly its tokens at positions 0, 1, ...,
  the positions transformers gives a padded row's real tokens).
- ``Cache``: :class:`TacflowCache` stores nothing; its ``update`` hands the
  new k and v to the attention function, and it keeps the lengths
  transformers asks for. ``generate`` gets one by itself (the integration
  wraps ``GenerationMixin._prepare_cache_for_generation`` for models whose
  attention is ``"tacflow"``, and closes the cache's sequences when
  ``generate`` returns); a forward pass without a cache runs through
  short-lived sequences.

Features the daemon cannot honour exactly (logit softcapping, sliding
windows, attention sinks) are declared from the model's config when the
sequences open, and the daemon refuses them there: such a model raises
:class:`~tacflow.errors.Unsupported` instead of running approximately.
Beam search (reordering the cache) is not supported.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import TacflowError, Unsupported
from .protocol import AttentionLayout, AttentionPolicy, Full

#: The transformers versions this integration speaks (both ends tested).
SUPPORTED = ((5, 17), (6, 0))
NAME = "tacflow"


def _check_version() -> None:
    try:
        text = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("tacflow.hf needs transformers (pip install 'transformers>=5.17,<6')") from None
    parts = tuple(int(p) for p in text.split(".")[:2] if p.isdigit())
    if not (SUPPORTED[0] <= parts < SUPPORTED[1]):
        raise ImportError(
            f"tacflow.hf supports transformers >=5.17,<6 (its AttentionInterface, "
            f"AttentionMaskInterface and Cache layers); found {text}"
        )


_check_version()

import torch  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer  # noqa: E402
from transformers.generation.utils import GenerationMixin  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from .client import Client  # noqa: E402

_TORCH_TO_WIRE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------- the connection


class Connection:
    """One client session for every cache of this process, with one region
    (grown on demand) that carries each request's q, k, v and output.

    Closes requested by a finalizer (a cache dropped without ``close``) are
    queued and sent before the next request: a finalizer may run in the
    middle of another request, and the client is not re-entrant.
    """

    def __init__(self, address: str | None = None, timeout_s: float = 600.0):
        self.client = Client(address, timeout_s=timeout_s, client_name="tacflow-hf")
        self.region = None
        self._next_seq = 1
        self._lock = threading.Lock()
        self._pending_close: list[int] = []
        self._last = time.monotonic()
        self._staged: dict = {}
        #: Sequences this connection holds open in the daemon.
        self.open_sequences = 0

    def keep_alive(self) -> None:
        """Before a request: a session idle for most of its lease is renewed,
        and one that expired while it held nothing (between generations:
        the stock side of an A/B may run for minutes) is started afresh."""
        lease_s = self.client.info.lease_ms / 1000.0
        if time.monotonic() - self._last < 0.5 * lease_s:
            self._last = time.monotonic()
            return
        try:
            self.client.ping()
        except TacflowError as e:
            if self.open_sequences > 0 or getattr(e, "code", "") != "unknown_session":
                raise
            if self.region is not None:
                self.region.close(unregister=False)
                self.region = None
            self._staged = {}
            self._pending_close.clear()
            self.client.hello()
        self._last = time.monotonic()

    def new_seq_ids(self, n: int) -> list[int]:
        with self._lock:
            first = self._next_seq
            self._next_seq += n
        return list(range(first, first + n))

    def defer_close(self, seq_ids: list[int]) -> None:
        with self._lock:
            self._pending_close.extend(seq_ids)

    def flush(self) -> None:
        with self._lock:
            ids, self._pending_close = self._pending_close, []
        for s in ids:
            with contextlib.suppress(TacflowError):
                self.client.close_sequence(s)
            self.open_sequences -= 1

    def buffer(self, nbytes: int):
        """The shared region, at least ``nbytes`` large."""
        if self.region is None or self.region.byte_size < nbytes:
            # The views go first: they hold the old mapping.
            self._staged = {}
            if self.region is not None:
                self.region.close()
            size = 1 << 20
            while size < nbytes:
                size *= 2
            self.region = self.client.create_region(size)
        return self.region

    def staging(self, dtype, rows: int, h: int, hkv: int, d: int):
        """Tensor views of q, k, v and out for ``rows`` rows in the region,
        and their references. Kept per shape: a decode step asks for the
        same ones at every layer, and building them costs more than the
        copies they receive."""
        key = (dtype, rows, h, hkv, d)
        got = getattr(self, "_staged", {}).get(key)
        if got is not None and self.region is not None and not self.region.closed:
            return got
        esize = torch.tensor([], dtype=dtype).element_size()
        shapes = [(rows, h, d), (rows, hkv, d), (rows, hkv, d), (rows, h, d)]
        offsets, at = [], 0
        for sh in shapes:
            offsets.append(at)
            at += _align(sh[0] * sh[1] * sh[2] * esize)
        region = self.buffer(at)
        views = [
            torch.frombuffer(region.buf, dtype=dtype, count=sh[0] * sh[1] * sh[2], offset=o).view(*sh)
            for sh, o in zip(shapes, offsets)
        ]
        refs = [region.ref(o, _TORCH_TO_WIRE[dtype], sh) for o, sh in zip(offsets, shapes)]
        if len(self._staged) >= 16:  # prefill chunks of many sizes
            self._staged = {}
        self._staged[key] = (views, refs)
        return views, refs

    def close(self) -> None:
        self.flush()
        self._staged = {}
        if self.region is not None:
            self.region.close()
            self.region = None
        self.client.close()


@dataclass
class _Settings:
    address: str | None = None
    policy: AttentionPolicy = field(default_factory=Full)
    diagnostics: bool = False
    connection: Connection | None = None


_settings = _Settings()
_local = threading.local()


def connect(address: str | None = None) -> Connection:
    """Uses the daemon at ``address`` (a socket path or ZeroMQ endpoint;
    ``None``: found as ``tacflow.Client`` finds it) from now on."""
    if _settings.connection is not None:
        _settings.connection.close()
    _settings.address = address
    _settings.connection = Connection(address)
    return _settings.connection


@atexit.register
def _close_at_exit() -> None:
    # The region's shared-memory name is unlinked with it.
    conn, _settings.connection = _settings.connection, None
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


def connection() -> Connection:
    if _settings.connection is None or not _settings.connection.client.is_open:
        _settings.connection = Connection(_settings.address)
    return _settings.connection


def _current_policy() -> tuple[AttentionPolicy, bool]:
    stack = getattr(_local, "policies", None)
    if stack:
        return stack[-1]
    return _settings.policy, _settings.diagnostics


@contextlib.contextmanager
def attention(policy: AttentionPolicy, diagnostics: bool = True) -> Iterator[None]:
    """Caches made inside this block (by ``generate`` or by hand) run their
    decode attention under ``policy``; with ``diagnostics`` each cache
    records what its policy read (:attr:`TacflowCache.reads`)."""
    stack = getattr(_local, "policies", None)
    if stack is None:
        stack = _local.policies = []
    stack.append((policy, diagnostics))
    try:
        yield
    finally:
        stack.pop()


def set_default(policy: AttentionPolicy = Full(), diagnostics: bool = False) -> None:
    """The policy of caches made outside :func:`attention` blocks."""
    _settings.policy, _settings.diagnostics = policy, diagnostics


# ---------------------------------------------------------------- the cache


def layout_of(config: Any, scale: float) -> AttentionLayout:
    """The daemon's view of a model's attention, from its config: shapes,
    the scale the attention modules pass, and every feature the daemon must
    honour or refuse."""
    c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = int(c.num_attention_heads)
    kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
    softcap = getattr(c, "attn_logit_softcapping", None)
    window = None
    layer_types = getattr(c, "layer_types", None)
    if layer_types is not None:
        if any("sliding" in t for t in layer_types):
            window = getattr(c, "sliding_window", None)
    elif getattr(c, "use_sliding_window", True):
        window = getattr(c, "sliding_window", None)
    sinks = bool(getattr(c, "use_sinks", False)) or "gpt_oss" in str(getattr(c, "model_type", ""))
    return AttentionLayout(
        num_layers=int(c.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        scale=float(scale),
        softcap=None if softcap is None else float(softcap),
        sliding_window=None if window is None else int(window),
        sinks=sinks,
    )


class TacflowLayer(DynamicLayer):
    """One layer's length as transformers counts it (padding included);
    the keys and values themselves live in the daemon."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.length += key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("TacflowCache cannot be cropped (assisted generation is not supported)")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("TacflowCache cannot be reordered: beam search is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("TacflowCache cannot be expanded: use one row per sequence")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("TacflowCache cannot drop rows")


class TacflowCache(DynamicCache):
    """A transformers ``Cache`` whose keys and values live in ``tacflowd``:
    one attention-only sequence per batch row, opened at the first attention
    call (when the scale is known), closed by :meth:`close` or when the
    cache is dropped."""

    def __init__(
        self,
        config: Any,
        policy: AttentionPolicy | None = None,
        diagnostics: bool | None = None,
        conn: Connection | None = None,
    ) -> None:
        c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layers = [TacflowLayer() for _ in range(int(c.num_hidden_layers))]
        # DynamicCache's own __init__ builds storing layers from the config.
        Cache.__init__(self, layers=layers)
        current = _current_policy()
        self.config = config
        self.policy = policy if policy is not None else current[0]
        self.diagnostics = current[1] if diagnostics is None else diagnostics
        self.conn = conn
        self.seq_ids: list[int] | None = None
        #: Rows each sequence holds, per layer (the daemon's lengths).
        self.rows: list[list[int]] = []
        self.layout: AttentionLayout | None = None
        #: Per decode step of each sequence: the mean over layers of the
        #: fraction of its context the policy read (with diagnostics).
        self.reads: list[list[float]] = []
        self._step_reads: dict[int, list[float]] = {}
        #: Time spent in ``attention_step`` round trips, and their count.
        self.offload_s = 0.0
        self.offload_calls = 0
        self._finalizer: weakref.finalize | None = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        out = self.layers[layer_idx].update(key_states, value_states)
        # The attention function that follows this update in the same
        # attention module finds its cache by the tensor it is handed.
        _local.last = (self, layer_idx, out[0])
        return out

    def _open(self, batch: int, scale: float) -> None:
        conn = self.conn or connection()
        self.conn = conn
        conn.keep_alive()
        conn.flush()
        self.layout = layout_of(self.config, scale)
        ids = conn.new_seq_ids(batch)
        opened: list[int] = []
        try:
            for s in ids:
                conn.client.open_sequence(
                    s, attention=self.policy, diagnostics=self.diagnostics, layout=self.layout
                )
                opened.append(s)
                conn.open_sequences += 1
        except BaseException:
            conn.defer_close(opened)
            raise
        self.seq_ids = ids
        self.rows = [[0] * self.layout.num_layers for _ in ids]
        self.reads = [[] for _ in ids]
        self._finalizer = weakref.finalize(self, conn.defer_close, list(ids))

    def fork(self, policy: AttentionPolicy | None = None, diagnostics: bool | None = None) -> "TacflowCache":
        """A copy of this cache (its sequences forked in the daemon, K and V
        copied) that decodes on under ``policy``: one prefill, several
        policies on equal footing."""
        if self.seq_ids is None or self.conn is None:
            raise ValueError("nothing to fork: this cache has not run or is closed")
        conn = self.conn
        child = TacflowCache(
            self.config,
            policy if policy is not None else self.policy,
            self.diagnostics if diagnostics is None else diagnostics,
            conn=conn,
        )
        ids = conn.new_seq_ids(len(self.seq_ids))
        done: list[int] = []
        try:
            for p, c in zip(self.seq_ids, ids):
                conn.client.fork_sequence(p, c, attention=child.policy, diagnostics=child.diagnostics)
                done.append(c)
                conn.open_sequences += 1
        except BaseException:
            conn.defer_close(done)
            raise
        child.seq_ids, child.layout = ids, self.layout
        child.rows = [list(r) for r in self.rows]
        child.reads = [[] for _ in ids]
        for src, dst in zip(self.layers, child.layers):
            dst.length, dst.is_initialized = src.length, src.is_initialized
            if src.is_initialized:
                dst.device = src.device
        child._finalizer = weakref.finalize(child, conn.defer_close, list(ids))
        return child

    def close(self) -> None:
        """Frees the cache's sequences in the daemon."""
        if self._finalizer is not None and self._finalizer.alive:
            self._finalizer()
            if self.conn is not None:
                self.conn.flush()
        self.seq_ids = None

    def tokens_read(self) -> float | None:
        """The mean fraction of the context the policy read per decode step
        (diagnostics only; ``None`` without decode steps)."""
        all_reads = [r for rs in self.reads for r in rs]
        return sum(all_reads) / len(all_reads) if all_reads else None


# ---------------------------------------------------------------- mask and attention


class NewRows:
    """What the "tacflow" mask carries: per batch row, which of the new
    query rows are real tokens (``None``: all of them)."""

    def __init__(self, real: torch.Tensor | None):
        self.real = real


def tacflow_mask(batch_size=None, q_length=None, attention_mask=None, cache_position=None, **kwargs):
    """The mask interface's entry for ``"tacflow"``: the padding of the new
    rows, read off the 2-D attention mask (its last ``q_length`` columns
    are the new tokens)."""
    if q_length is None and cache_position is not None:
        q_length = int(cache_position.shape[-1])
    if attention_mask is None or q_length is None or attention_mask.ndim != 2:
        return NewRows(None)
    real = attention_mask[:, -q_length:].to(torch.bool)
    return NewRows(None if bool(real.all()) else real.cpu())


def _refuse_kwargs(kwargs: dict[str, Any]) -> None:
    for name, what in (("softcap", "logit softcapping"), ("sliding_window", "a sliding window"), ("s_aux", "attention sinks")):
        if kwargs.get(name) is not None:
            raise Unsupported(
                "unsupported",
                f"this layer asks for {what} ({name}), which tacflowd does not implement; "
                "run this model with its own attention",
            )


def tacflow_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` entry: the layer's attention through the
    daemon. ``query`` is ``[B, heads, q, D]``; ``key``/``value`` are the new
    rows ``[B, kv_heads, q, D]`` when a :class:`TacflowCache` handed them
    over. Returns ``([B, q, heads, D], None)``."""
    _refuse_kwargs(kwargs)
    if dropout:
        raise Unsupported("unsupported", "tacflow attention runs inference only (dropout > 0)")
    layer = int(getattr(module, "layer_idx", 0))
    if scaling is None:
        scaling = float(query.shape[-1]) ** -0.5
    last = getattr(_local, "last", None)
    if last is not None and last[1] == layer and last[2] is key:
        cache = last[0]
        return _through(cache, layer, query, key, value, attention_mask, float(scaling)), None
    if key.shape[-2] != query.shape[-2]:
        raise Unsupported(
            "unsupported",
            "tacflow attention needs a TacflowCache (generate() makes one; for forward "
            "passes with a cache, pass cache=TacflowCache(model.config))",
        )
    # A forward pass without a cache: short-lived sequences.
    cache = TacflowCache(module.config)
    try:
        return _through(cache, layer, query, key, value, attention_mask, float(scaling), one_layer=True), None
    finally:
        cache.close()


def _through(cache: TacflowCache, layer, query, key, value, mask, scale, one_layer=False):
    b, h, q_len, d = query.shape
    if cache.seq_ids is None:
        cache._open(b, scale)
    else:
        cache.conn.keep_alive()
        if one_layer:
            # Only this layer runs through these sequences.
            cache.rows = [[0] * cache.layout.num_layers for _ in range(b)]
    layout = cache.layout
    if len(cache.seq_ids) != b:
        raise Unsupported("unsupported", f"TacflowCache holds {len(cache.seq_ids)} rows, the batch has {b}")
    if abs(layout.scale - scale) > 1e-6 * max(1.0, abs(scale)):
        raise Unsupported("unsupported", f"layer {layer} scales scores by {scale}, layer 0 by {layout.scale}")
    real = mask.real if isinstance(mask, NewRows) else None
    if real is not None and real.shape != (b, q_len):
        real = None
    picks: list[torch.Tensor | None] = []
    for i in range(b):
        if real is None:
            picks.append(None)
        else:
            idx = torch.nonzero(real[i], as_tuple=False).flatten()
            picks.append(idx if idx.numel() < q_len else None)
    counts = [q_len if p is None else int(p.numel()) for p in picks]
    rows_of = [i for i in range(b) if counts[i] > 0]
    out = torch.zeros((b, q_len, h, d), dtype=query.dtype, device=query.device)
    if not rows_of:
        return out
    hkv = key.shape[1]
    total = sum(counts[i] for i in rows_of)
    dtype = query.dtype if query.dtype in _TORCH_TO_WIRE else torch.float32
    conn = cache.conn
    views, refs = conn.staging(dtype, total, h, hkv, d)
    qv, kv_, vv = views[0], views[1], views[2]
    r = 0
    for i in rows_of:
        n, p = counts[i], picks[i]
        qi, ki, vi = query[i], key[i], value[i]
        if p is not None:
            qi, ki, vi = qi[:, p], ki[:, p], vi[:, p]
        qv[r : r + n].copy_(qi.transpose(0, 1))
        kv_[r : r + n].copy_(ki.transpose(0, 1))
        vv[r : r + n].copy_(vi.transpose(0, 1))
        r += n
    ids = [cache.seq_ids[i] for i in rows_of]
    positions = [cache.rows[i][layer] for i in rows_of]
    conn.flush()
    t0 = time.perf_counter()
    reply = conn.client.attention_step(
        layer, ids, *refs, num_tokens=[counts[i] for i in rows_of], positions=positions
    )
    cache.offload_s += time.perf_counter() - t0
    cache.offload_calls += 1
    for i, n in zip(rows_of, reply.num_tokens):
        cache.rows[i][layer] = int(n)
    _note_reads(cache, layer, rows_of, reply.attention)
    res = views[3]
    r = 0
    for i in rows_of:
        n, p = counts[i], picks[i]
        if p is None:
            out[i].copy_(res[r : r + n])
        else:
            out[i, p] = res[r : r + n].to(out.device)
        r += n
    return out


def _align(nbytes: int) -> int:
    return (nbytes + 63) // 64 * 64


def _note_reads(cache: TacflowCache, layer: int, rows_of: list[int], diags) -> None:
    """Per decode step, the mean over layers of what each sequence's policy
    read (every layer sends its own diagnostics)."""
    if not diags:
        return
    for i, dg in zip(rows_of, diags):
        if dg is None:
            continue
        acc = cache._step_reads.setdefault(i, [])
        acc.append(dg.tokens_read_fraction)
        if layer == cache.layout.num_layers - 1:
            cache.reads[i].append(sum(acc) / len(acc))
            cache._step_reads[i] = []


# ---------------------------------------------------------------- generate


def _cache_kwarg(model: Any) -> str:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


_orig_prepare = GenerationMixin._prepare_cache_for_generation
_orig_generate = GenerationMixin.generate


def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    if getattr(self.config, "_attn_implementation", None) == NAME and generation_config.use_cache is not False:
        name = _cache_kwarg(self)
        if model_kwargs.get(name) is None:
            if getattr(generation_config, "cache_implementation", None) not in (None, "dynamic"):
                raise Unsupported(
                    "unsupported",
                    f"cache_implementation={generation_config.cache_implementation!r}: "
                    "tacflow attention keeps its cache in the daemon",
                )
            generation_config.cache_implementation = None
            cache = TacflowCache(self.config)
            model_kwargs[name] = cache
            made = getattr(_local, "made", None)
            if made is not None:
                made.append(cache)
    return _orig_prepare(self, generation_config, model_kwargs, *args, **kwargs)


def _generate(self, *args, **kwargs):
    if getattr(self.config, "_attn_implementation", None) != NAME:
        return _orig_generate(self, *args, **kwargs)
    outer = getattr(_local, "made", None)
    _local.made = []
    try:
        return _orig_generate(self, *args, **kwargs)
    finally:
        for cache in _local.made:
            cache.close()
            _local.last_generation = cache
        _local.made = outer


def last_cache() -> TacflowCache | None:
    """The cache of the last ``generate`` of this thread (closed; its
    :attr:`~TacflowCache.reads` and timings stay readable)."""
    return getattr(_local, "last_generation", None)


GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation
GenerationMixin.generate = _generate
AttentionInterface.register(NAME, tacflow_attention)
AttentionMaskInterface.register(NAME, tacflow_mask)
