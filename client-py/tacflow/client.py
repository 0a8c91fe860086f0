"""The tacflow client: one ZeroMQ DEALER socket, one session with ``tacflowd``.

A :class:`Client` is what a Python serving stack holds to drive the daemon:
it opens a session with ``hello``, sends one request at a time, and matches
each reply to its request by ``request_id``. A reply for another id — the
late answer to a request that timed out — is dropped, so a timeout never
shifts every later answer by one.

The client is not thread-safe (neither is a ZeroMQ socket); give each thread
its own. The session's lease (``info.lease_ms``) is renewed by every request;
a caller that may stay idle longer should :meth:`Client.ping`.

``step`` is on the latency benchmark's path, so the request path is lean:
one dict, one pack with a reused packer, two ``send`` calls and two
``recv`` calls (:mod:`tacflow.transport`: pyzmq's ``*_multipart`` cost 4 µs
more), the socket's receive timeout instead of a poll, one unpack.
"""

from __future__ import annotations

import os
import time
from multiprocessing import shared_memory
from typing import Any, Callable, Mapping, Sequence

import msgpack
import zmq

from . import __version__
from .address import resolve_address
from .errors import (
    DaemonUnavailable,
    ProtocolError,
    RequestTimeout,
    TacflowError,
)
from .protocol import (
    require_1_3,
    require_1_4,
    AttentionLayout,
    AttentionStepOutput,
    TensorRef,
    attention_step_body,
    ERROR_KIND,
    REPLY_BIT,
    AttentionPolicy,
    Full,
    Health,
    HelloInfo,
    Kind,
    MemfdRegion,
    RegionDesc,
    SamplingParams,
    SequenceState,
    ShmRegion,
    Stats,
    StepEntry,
    StepOutput,
    close_sequence_body,
    decode_reply,
    fork_sequence_body,
    hello_body,
    open_sequence_body,
    register_region_body,
    reserve_blocks_body,
    sequence_state_body,
    session_body,
    truncate_sequence_body,
    unregister_region_body,
)
from .companion import close_quietly, companion_path, send_memfd
from .region import HostRegion, memfd_create_sealed
from .transport import recv_message, send_message

DEFAULT_CLIENT_NAME = f"tacflow-py/{__version__}"

_STEP_FRAME = Kind.STEP.frame
_STEP_REPLY_FRAME = bytes((Kind.STEP | REPLY_BIT,))


class Client:
    """A session with a running ``tacflowd``.

    ``address`` is a socket path or a ZeroMQ endpoint (``ipc://…``,
    ``tcp://…``); when ``None`` it is found as PROTOCOL.md §1 says
    (:func:`tacflow.address.resolve_address`). ``timeout_s`` bounds every
    request. The constructor sends ``hello``; a daemon that does not answer
    within ``connect_timeout_s`` (default: ``timeout_s``) raises
    :class:`DaemonUnavailable`. ZeroMQ connects whenever the daemon binds, so
    a client may be created while the daemon is still starting.
    """

    def __init__(
        self,
        address: str | os.PathLike[str] | None = None,
        timeout_s: float = 60.0,
        client_name: str = DEFAULT_CLIENT_NAME,
        context: zmq.Context | None = None,
        connect_timeout_s: float | None = None,
    ) -> None:
        self.address = resolve_address(address)
        self.client_name = client_name
        self._packer = msgpack.Packer(use_single_float=True)
        self._next_id = 1
        self._info: HelloInfo | None = None
        self._session: bytes = b""
        self._instance_id: str | None = None
        self._regions: dict[int, HostRegion] = {}
        ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        wait_s = timeout_s if connect_timeout_s is None else connect_timeout_s
        self.timeout_s = wait_s
        try:
            self._sock.connect(self.address)
            self.hello()
            self.timeout_s = timeout_s
        except RequestTimeout:
            self._close_socket()
            raise DaemonUnavailable(
                "unavailable",
                f"no answer to hello from {self.address} within {wait_s:g} s "
                "(is tacflowd running? `tacflowd serve --socket PATH`)",
            ) from None
        except BaseException:
            self._close_socket()
            raise

    @property
    def timeout_s(self) -> float:
        """How long a request waits for its reply before :class:`RequestTimeout`."""
        return self._timeout_s

    @timeout_s.setter
    def timeout_s(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError("timeout_s must be positive")
        self._timeout_s = float(seconds)
        self._timeout_ms = max(1, int(seconds * 1000))
        if self._sock is not None:
            self._sock.setsockopt(zmq.RCVTIMEO, self._timeout_ms)
            self._sock.setsockopt(zmq.SNDTIMEO, self._timeout_ms)

    # ------------------------------------------------------------ session

    def hello(self) -> HelloInfo:
        """Opens a (new) session; called by the constructor.

        Calling it again, e.g. after :class:`DaemonRestarted`, starts a fresh
        session: sequences and regions of the old one are not carried over.
        """
        rid = self._take_id()
        body = hello_body(rid, self.client_name or None)
        reply = self._exchange(Kind.HELLO, rid, self._packer.pack(body))
        info = HelloInfo.from_wire(reply)
        self._info, self._session, self._instance_id = info, info.session, info.instance_id
        return info

    @property
    def info(self) -> HelloInfo:
        """What ``hello`` said: model, backend, kv, limits, lease_ms, policies."""
        if self._info is None:
            raise ProtocolError("protocol_error", "no session: hello has not succeeded")
        return self._info

    @property
    def session(self) -> bytes:
        """The 16-byte session token."""
        return self.info.session

    @property
    def instance_id(self) -> str:
        """The daemon instance this session lives in (changes at every daemon start)."""
        return self.info.instance_id

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def ping(self) -> int:
        """Renews the session's lease; returns the lease in milliseconds."""
        return int(self._session_request(Kind.PING)["lease_ms"])

    def stats(self) -> Stats:
        return Stats.from_wire(self._session_request(Kind.STATS))

    def health(self) -> Health:
        return Health.from_wire(self._session_request(Kind.HEALTH))

    def close(self) -> None:
        """Ends the session (the daemon frees its sequences, blocks and regions),
        unlinks the client's host regions and closes the socket. Idempotent;
        a daemon that is already gone is not an error here.
        """
        if self._sock is None:
            return
        try:
            if self._info is not None:
                self._session_request(Kind.CLOSE)
        except TacflowError:
            pass
        finally:
            for region in list(self._regions.values()):
                region.close(unregister=False)
            self._close_socket()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ regions

    def register_region(self, region: RegionDesc) -> int:
        """Registers any region descriptor (shm, memfd, cuda); returns its id."""
        rid = self._take_id()
        body = register_region_body(rid, self._session, region)
        return int(self._exchange(Kind.REGISTER_REGION, rid, self._packer.pack(body))["region_id"])

    def register_shm(self, name: str, byte_size: int) -> int:
        """Registers an existing POSIX shared-memory object by name."""
        return self.register_region(ShmRegion(name, byte_size))

    def unregister_region(self, region_id: int) -> None:
        rid = self._take_id()
        body = unregister_region_body(rid, self._session, region_id)
        self._exchange(Kind.UNREGISTER_REGION, rid, self._packer.pack(body))

    def create_region(self, nbytes: int) -> HostRegion:
        """Creates host memory of ``nbytes``, registers it, and returns it;
        :meth:`HostRegion.close` (or :meth:`close`) undoes both.

        A shared-memory object by name when the daemon accepts that from
        this session (it runs as the same user: ``info.region_kinds`` has
        ``shm``, or the daemon predates 1.1), else a sealed memfd
        (:meth:`create_memfd_region`).
        """
        kinds = self.info.region_kinds
        if kinds and "shm" not in kinds:
            return self.create_memfd_region(nbytes)
        return self.create_shm_region(nbytes)

    def create_memfd_region(self, nbytes: int) -> HostRegion:
        """Creates a sealed memfd of ``nbytes``, hands it to the daemon over
        its companion socket, registers it, and returns it. Works whatever
        user the daemon runs as, and leaves nothing behind after a crash."""
        fd = memfd_create_sealed(nbytes)
        try:
            region_id = self.register_memfd(fd, nbytes)
            region = HostRegion(self, None, region_id, memfd=fd, byte_size=nbytes)
        finally:
            close_quietly(fd)  # the mappings (ours and the daemon's) keep it
        self._regions[region_id] = region
        return region

    def register_memfd(self, fd: int, byte_size: int) -> int:
        """Registers an existing memfd (sealed with ``F_SEAL_SHRINK`` and
        ``F_SEAL_SEAL``); returns the region id. The caller keeps ``fd``."""
        token = self.send_memfd(fd, byte_size)
        return self.register_region(MemfdRegion(token, byte_size))

    def send_memfd(self, fd: int, byte_size: int) -> int:
        """Sends a memfd on the companion socket; returns its ``fd_token``
        (register it with :class:`MemfdRegion` within one lease)."""
        self._socket()
        path = companion_path(self.address, self.info.fd_socket)
        return send_memfd(
            path, self._session, self._take_id(), fd, byte_size, self.timeout_s, self._instance_id
        )

    def create_shm_region(self, nbytes: int) -> HostRegion:
        """Creates a POSIX shared-memory object of ``nbytes`` and registers
        it by name (the daemon must run as this user)."""
        shm = shared_memory.SharedMemory(create=True, size=nbytes)
        try:
            region_id = self.register_shm(shm.name, nbytes)
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        region = HostRegion(self, shm, region_id)
        self._regions[region_id] = region
        return region

    def _forget_region(self, region: HostRegion) -> None:
        if self._regions.get(region.region_id) is region:
            del self._regions[region.region_id]

    # ------------------------------------------------------------ sequences

    def open_sequence(
        self,
        seq_id: int,
        attention: AttentionPolicy = Full(),
        sampling: SamplingParams | None = None,
        diagnostics: bool = False,
        *,
        blocks: str = "daemon",
        prefix: Sequence[int] = (),
        prompt_len: int | None = None,
        layout: AttentionLayout | None = None,
    ) -> int:
        """Opens a sequence; returns its cached length (0, or ``len(prefix)``).

        ``layout`` (1.4) opens an attention-only sequence instead: it holds
        the k and v rows :meth:`attention_step` appends, for a model the
        caller runs itself; a layout the daemon cannot honour (softcapping,
        a sliding window, sinks) raises :class:`Unsupported`.

        ``blocks="named"`` (1.3): every step entry names the sequence's whole
        block table from the session's reservation (:meth:`reserve_blocks`);
        ``prefix`` are tokens already cached in the blocks the first step
        names (a prefix-cache hit). ``prompt_len`` tells the penalties where
        the prompt ends (default: at the first sampling entry).
        """
        self._check_1_3(sampling, blocks != "daemon" or bool(prefix) or prompt_len is not None)
        if layout is not None:
            require_1_4(self._info, "an attention-only sequence")
        rid = self._take_id()
        body = open_sequence_body(
            rid, self._session, seq_id, attention, sampling, diagnostics, blocks, prefix, prompt_len,
            layout,
        )
        return int(self._exchange(Kind.OPEN_SEQUENCE, rid, self._packer.pack(body))["num_tokens"])

    def reserve_blocks(self, count: int) -> int:
        """(1.3) Grows this session's KV block reservation by ``count``
        blocks; returns its size (ids ``0..size`` are this session's). Freed
        when the session ends. :class:`OutOfKvBlocks` when too few are free."""
        self._check_1_3(None, True)
        rid = self._take_id()
        body = reserve_blocks_body(rid, self._session, count)
        return int(self._exchange(Kind.RESERVE_BLOCKS, rid, self._packer.pack(body))["blocks"])

    def sequence_state(self, seq_id: int) -> SequenceState:
        """(1.3) What the daemon holds for a sequence: its length, block
        mode, policy, sampling (with the seed in effect) and blocks."""
        self._check_1_3(None, True)
        rid = self._take_id()
        body = sequence_state_body(rid, self._session, seq_id)
        reply = self._exchange(Kind.SEQUENCE_STATE, rid, self._packer.pack(body))
        return SequenceState.from_wire(reply)

    def attention_step(
        self,
        layer: int,
        seq_ids: Sequence[int],
        q: TensorRef,
        k: TensorRef,
        v: TensorRef,
        out: TensorRef,
        num_tokens: Sequence[int] = (),
        positions: Sequence[int] = (),
    ) -> AttentionStepOutput:
        """(1.4) One layer of attention for attention-only sequences: the
        new rows' q (``[rows, heads, head_dim]``), k and v (``[rows,
        kv_heads, head_dim]``) are read from their regions, k and v appended
        to the layer's cache, and each row's attention output written to
        ``out`` under its sequence's policy. ``num_tokens`` rows per sequence
        (one each when empty), the first of each at ``positions`` (the
        layer's cached length; checked when given). A refused request
        changes nothing."""
        require_1_4(self._info, "attention_step")
        rid = self._take_id()
        body = attention_step_body(
            rid, self._session, layer, seq_ids, q, k, v, out, num_tokens, positions
        )
        reply = self._exchange(Kind.ATTENTION_STEP, rid, self._packer.pack(body))
        return AttentionStepOutput.from_wire(reply)

    def _check_1_3(self, sampling: SamplingParams | None, needs: bool) -> None:
        """Refuses, before sending, what a pre-1.3 daemon would ignore."""
        require_1_3(self._info, sampling, needs)

    def fork_sequence(
        self,
        parent: int,
        child: int,
        sampling: SamplingParams | None = None,
        attention: AttentionPolicy | None = None,
        diagnostics: bool | None = None,
    ) -> int:
        """Forks ``parent`` into a new ``child`` sharing its KV blocks
        copy-on-write; returns the child's cached length. The child keeps the
        parent's sampling, attention policy and diagnostics unless given."""
        self._check_1_3(sampling, False)
        rid = self._take_id()
        body = fork_sequence_body(rid, self._session, parent, child, sampling, attention, diagnostics)
        return int(self._exchange(Kind.FORK_SEQUENCE, rid, self._packer.pack(body))["num_tokens"])

    def truncate_sequence(self, seq_id: int, num_tokens: int) -> int:
        """Drops the last ``num_tokens`` cached tokens; returns how many remain."""
        rid = self._take_id()
        body = truncate_sequence_body(rid, self._session, seq_id, num_tokens)
        reply = self._exchange(Kind.TRUNCATE_SEQUENCE, rid, self._packer.pack(body))
        return int(reply["num_tokens"])

    def close_sequence(self, seq_id: int) -> None:
        rid = self._take_id()
        body = close_sequence_body(rid, self._session, seq_id)
        self._exchange(Kind.CLOSE_SEQUENCE, rid, self._packer.pack(body))

    def step(self, entries: Sequence[StepEntry]) -> StepOutput:
        """Runs one model step; results come in the order of ``entries``.

        A failed step changes no sequence on the daemon (e.g.
        :class:`OutOfKvBlocks`: preempt something and retry).
        """
        rid = self._next_id
        self._next_id = rid + 1
        header = self._packer.pack(
            {
                "request_id": rid,
                "session": self._session,
                "entries": [e.to_wire() for e in entries],
            }
        )
        return self._run_step(rid, header)

    def step_packed(
        self, entries: Sequence[bytes], *, abandon: Callable[[], str | None] | None = None
    ) -> StepOutput:
        """:meth:`step` with its entries already encoded, each the msgpack of
        a ``StepEntry.to_wire()`` (:func:`tacflow.protocol.pack_entry`
        builds them from parts): a caller that names the same block tables
        in every step (named blocks, PROTOCOL.md §4.8) encodes each table
        once, not once per step. The request's bytes are those of
        :meth:`step`.

        ``abandon``, asked about twice a second while the reply is awaited,
        gives up the wait (:class:`DaemonUnavailable` with its reason) when
        it returns a reason: a caller that learned otherwise that the daemon
        is gone need not wait out ``timeout_s``. The session is then of no
        further use."""
        rid = self._next_id
        self._next_id = rid + 1
        p = self._packer
        header = b"".join(
            (
                p.pack_map_header(3),
                p.pack("request_id"),
                p.pack(rid),
                p.pack("session"),
                p.pack(self._session),
                p.pack("entries"),
                p.pack_array_header(len(entries)),
                *entries,
            )
        )
        return self._run_step(rid, header, abandon)

    def _run_step(
        self, rid: int, header: bytes, abandon: Callable[[], str | None] | None = None
    ) -> StepOutput:
        sock = self._sock
        if sock is None:
            raise DaemonUnavailable("unavailable", "the client is closed")
        try:
            send_message(sock, _STEP_FRAME, header)
            if abandon is not None:
                deadline = time.monotonic() + self.timeout_s
                while not sock.poll(500, zmq.POLLIN):
                    reason = abandon()
                    if reason:
                        raise DaemonUnavailable(
                            "unavailable", f"step (request {rid}) abandoned: {reason}", request_id=rid
                        )
                    if time.monotonic() > deadline:
                        raise zmq.Again()
            frames = recv_message(sock)
        except zmq.Again:
            raise self._timeout(rid, Kind.STEP) from None
        if len(frames) == 2 and frames[0] == _STEP_REPLY_FRAME:
            try:
                body = msgpack.unpackb(frames[1])
            except Exception:
                body = None
            if type(body) is dict and body.get("request_id") == rid:
                return StepOutput.from_wire(body)
        # An error, a stale reply or garbage: the general path sorts it out.
        return StepOutput.from_wire(self._settle(Kind.STEP, rid, frames, time.monotonic()))

    # ------------------------------------------------------------ raw access

    def request(self, kind: int, body: Mapping[str, Any], *, session: bool = True) -> dict[str, Any]:
        """Sends any request and returns the reply body (raising on an error).

        An escape hatch for tests: ``request_id`` is filled in unless ``body``
        has one; ``session`` is filled in unless ``body`` has one or
        ``session=False`` (or the kind is hello).
        """
        full: dict[str, Any] = {}
        rid = body["request_id"] if "request_id" in body else self._take_id()
        full["request_id"] = rid
        if session and Kind.HELLO != kind and "session" not in body:
            full["session"] = self._session
        full.update(body)
        return self._exchange(int(kind), rid, self._packer.pack(full))

    def send_raw(self, frames: Sequence[bytes]) -> None:
        """Sends frames exactly as given (malformed-input tests)."""
        try:
            self._socket().send_multipart(list(frames))
        except zmq.Again:
            raise RequestTimeout("timeout", "send timed out") from None

    def recv_raw(self, timeout_s: float | None = None) -> list[bytes]:
        """Receives the next message's frames, whatever they are."""
        sock = self._socket()
        wait_ms = self._timeout_ms if timeout_s is None else max(0, int(timeout_s * 1000))
        if not sock.poll(wait_ms, zmq.POLLIN):
            raise RequestTimeout("timeout", f"no message within {wait_ms} ms")
        return recv_message(sock)

    # ------------------------------------------------------------ internals

    def _take_id(self) -> int:
        rid = self._next_id
        self._next_id = rid + 1
        return rid

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            raise DaemonUnavailable("unavailable", "the client is closed")
        return self._sock

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _session_request(self, kind: Kind) -> dict[str, Any]:
        rid = self._take_id()
        return self._exchange(kind, rid, self._packer.pack(session_body(rid, self._session)))

    def _exchange(self, kind: int, rid: Any, header: bytes) -> dict[str, Any]:
        """Sends ``[kind, header]`` and returns the body of the reply to ``rid``."""
        sock = self._socket()
        start = time.monotonic()
        try:
            send_message(sock, bytes((kind,)), header)
            frames = recv_message(sock)
        except zmq.Again:
            raise self._timeout(rid, kind) from None
        return self._settle(kind, rid, frames, start)

    def _settle(self, kind: int, rid: Any, frames: list[bytes], start: float) -> dict[str, Any]:
        """Reads replies until the one for ``rid``, dropping stale ones.

        An error reply without ``request_id`` (the daemon could not read the
        request at all) is taken as the answer: only one request is in flight.
        """
        sock = self._socket()
        while True:
            reply_id, kind_byte, body = _peek(frames)
            if reply_id == rid or (kind_byte == ERROR_KIND and reply_id is None):
                got, body = decode_reply(frames, self._instance_id)
                if got != kind:
                    raise ProtocolError(
                        "protocol_error",
                        f"reply kind 0x{got | REPLY_BIT:02x} to request kind 0x{kind:02x}",
                        request_id=rid if isinstance(rid, int) else None,
                    )
                return body
            remaining_ms = int((start + self.timeout_s - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not sock.poll(remaining_ms, zmq.POLLIN):
                raise self._timeout(rid, kind)
            frames = recv_message(sock)

    def _timeout(self, rid: Any, kind: int) -> RequestTimeout:
        try:
            name = Kind(kind).name.lower()
        except ValueError:
            name = f"kind 0x{kind:02x}"
        return RequestTimeout(
            "timeout",
            f"no reply to {name} (request {rid}) from {self.address} within {self.timeout_s:g} s",
            request_id=rid if isinstance(rid, int) else None,
        )


def _peek(frames: list[bytes]) -> tuple[Any, int | None, Any]:
    """``(request_id, kind byte, body)`` of a message, whatever its shape."""
    kind_byte = frames[0][0] if frames and len(frames[0]) == 1 else None
    try:
        body = msgpack.unpackb(frames[1]) if len(frames) >= 2 else None
    except Exception:
        body = None
    reply_id = body.get("request_id") if isinstance(body, dict) else None
    return reply_id, kind_byte, body
