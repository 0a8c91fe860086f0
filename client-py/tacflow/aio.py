"""The tacflow client for asyncio: one DEALER socket, many requests in flight.

:class:`AsyncClient` has the API of :class:`tacflow.Client` for ``hello``,
sequences, ``step``, regions, ``stats`` and ``health``, with coroutines. Any
number of requests may be in flight on its one connection: each gets a
fresh ``request_id``, and a single reader task hands every reply to the
request that waits for it (PROTOCOL.md §2: replies come in the order the
daemon finished them, so they are matched by id, never by position). A
request that times out leaves its id behind; its late reply is dropped.

Regions are host memory the daemon maps (sealed memfds); :func:`as_tensor`
and :func:`write_tensor` move torch tensors in and out of them through DLPack
without a copy on the way in, and fall back to numpy when torch is missing.

    async with await AsyncClient.connect() as c:
        await c.open_sequence(1)
        outs = await asyncio.gather(*(c.step([StepEntry(1, [t])]) for t in ...))
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np
import zmq
import zmq.asyncio

from . import __version__
from .address import resolve_address
from .companion import close_quietly, companion_path, send_memfd
from .errors import DaemonUnavailable, ProtocolError, RequestTimeout, TacflowError
from .protocol import (
    require_1_3,
    PROTOCOL_VERSION,
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
    Stats,
    StepEntry,
    StepOutput,
    TensorRef,
    decode_reply,
    fork_sequence_body,
    open_sequence_body,
    register_region_body,
    reserve_blocks_body,
    sequence_state_body,
    session_body,
    step_body,
    truncate_sequence_body,
    unregister_region_body,
    close_sequence_body,
)
from .region import HostRegion, memfd_create_sealed

__all__ = ["AsyncClient", "as_tensor", "write_tensor"]


class AsyncClient:
    """A session with a running ``tacflowd``, for asyncio.

    Make one with ``await AsyncClient.connect(address)``; ``timeout_s``
    bounds each request. Use it from one event loop.
    """

    def __init__(
        self,
        address: str | os.PathLike[str] | None = None,
        timeout_s: float = 60.0,
        client_name: str = f"tacflow-py/{__version__}",
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.address = resolve_address(address)
        self.client_name = client_name
        self.timeout_s = float(timeout_s)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.address)
        self._packer = msgpack.Packer(use_single_float=True)
        self._next_id = 1
        self._waiting: dict[int, asyncio.Future[list[bytes]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._info: HelloInfo | None = None
        self._session = b""
        self._instance_id: str | None = None

    @classmethod
    async def connect(
        cls,
        address: str | os.PathLike[str] | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float | None = None,
        **kw: Any,
    ) -> "AsyncClient":
        """Connects and sends ``hello``; :class:`DaemonUnavailable` if no
        daemon answers within ``connect_timeout_s`` (default ``timeout_s``)."""
        c = cls(address, timeout_s, **kw)
        try:
            await asyncio.wait_for(c.hello(), connect_timeout_s or timeout_s)
        except (asyncio.TimeoutError, RequestTimeout):
            await c.aclose(send_close=False)
            raise DaemonUnavailable(
                "unavailable", f"no answer to hello from {c.address} (is tacflowd running?)"
            ) from None
        except BaseException:
            await c.aclose(send_close=False)
            raise
        return c

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ session

    @property
    def info(self) -> HelloInfo:
        if self._info is None:
            raise DaemonUnavailable("unavailable", "no hello yet")
        return self._info

    @property
    def session(self) -> bytes:
        return self._session

    @property
    def in_flight(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._waiting)

    async def hello(self) -> HelloInfo:
        body: dict[str, Any] = {"protocol": list(PROTOCOL_VERSION)}
        if self.client_name:
            body["client"] = self.client_name
        reply = await self.request(Kind.HELLO, body, session=False)
        self._info = HelloInfo.from_wire(reply)
        self._session = self._info.session
        self._instance_id = self._info.instance_id
        return self._info

    async def ping(self) -> int:
        return int((await self._session_request(Kind.PING))["lease_ms"])

    async def stats(self) -> Stats:
        return Stats.from_wire(await self._session_request(Kind.STATS))

    async def health(self) -> Health:
        return Health.from_wire(await self._session_request(Kind.HEALTH))

    async def aclose(self, send_close: bool = True) -> None:
        """Ends the session (its sequences, blocks and regions are freed)
        and closes the socket; requests still waiting fail."""
        if self._sock is None:
            return
        if send_close and self._session:
            try:
                await self._session_request(Kind.CLOSE)
            except TacflowError:
                pass
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(DaemonUnavailable("unavailable", "the client closed"))
        self._waiting.clear()
        self._sock.close(linger=0)
        self._sock = None

    # ------------------------------------------------------------ sequences

    async def open_sequence(
        self,
        seq_id: int,
        attention: AttentionPolicy = Full(),
        sampling: SamplingParams | None = None,
        diagnostics: bool = False,
        *,
        blocks: str = "daemon",
        prefix: Sequence[int] = (),
        prompt_len: int | None = None,
    ) -> int:
        """As :meth:`tacflow.Client.open_sequence`."""
        self._check_1_3(sampling, blocks != "daemon" or bool(prefix) or prompt_len is not None)
        body = open_sequence_body(
            0, self._session, seq_id, attention, sampling, diagnostics, blocks, prefix, prompt_len
        )
        return int((await self._call(Kind.OPEN_SEQUENCE, body))["num_tokens"])

    async def fork_sequence(
        self,
        parent: int,
        child: int,
        sampling: SamplingParams | None = None,
        attention: AttentionPolicy | None = None,
        diagnostics: bool | None = None,
    ) -> int:
        self._check_1_3(sampling, False)
        body = fork_sequence_body(0, self._session, parent, child, sampling, attention, diagnostics)
        return int((await self._call(Kind.FORK_SEQUENCE, body))["num_tokens"])

    async def truncate_sequence(self, seq_id: int, num_tokens: int) -> int:
        body = truncate_sequence_body(0, self._session, seq_id, num_tokens)
        return int((await self._call(Kind.TRUNCATE_SEQUENCE, body))["num_tokens"])

    async def close_sequence(self, seq_id: int) -> None:
        await self._call(Kind.CLOSE_SEQUENCE, close_sequence_body(0, self._session, seq_id))

    async def reserve_blocks(self, count: int) -> int:
        """(1.3) Grows the session's block reservation; returns its size."""
        self._check_1_3(None, True)
        reply = await self._call(Kind.RESERVE_BLOCKS, reserve_blocks_body(0, self._session, count))
        return int(reply["blocks"])

    async def sequence_state(self, seq_id: int) -> SequenceState:
        """(1.3) What the daemon holds for a sequence."""
        self._check_1_3(None, True)
        body = sequence_state_body(0, self._session, seq_id)
        return SequenceState.from_wire(await self._call(Kind.SEQUENCE_STATE, body))

    async def step(self, entries: Sequence[StepEntry], request_id: int | None = None) -> StepOutput:
        """Runs one model step. ``request_id`` retries a step that timed
        out: a 1.3 daemon answers it from its first execution."""
        body = step_body(0, self._session, entries)
        if request_id is not None:
            body["request_id"] = request_id
        return StepOutput.from_wire(await self._call(Kind.STEP, body))

    # ------------------------------------------------------------ regions

    async def register_region(self, region: RegionDesc) -> int:
        body = register_region_body(0, self._session, region)
        return int((await self._call(Kind.REGISTER_REGION, body))["region_id"])

    async def unregister_region(self, region_id: int) -> None:
        await self._call(Kind.UNREGISTER_REGION, unregister_region_body(0, self._session, region_id))

    async def create_region(self, nbytes: int) -> HostRegion:
        """A sealed memfd of ``nbytes``, handed to the daemon and registered.
        Release it with :meth:`close_region` (or the session's end)."""
        fd = memfd_create_sealed(nbytes)
        try:
            path = companion_path(self.address, self.info.fd_socket)
            rid = self._take_id()
            token = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: send_memfd(
                    path, self._session, rid, fd, nbytes, self.timeout_s, self._instance_id
                ),
            )
            region_id = await self.register_region(MemfdRegion(token, nbytes))
            return HostRegion(None, None, region_id, memfd=fd, byte_size=nbytes)
        finally:
            close_quietly(fd)

    async def close_region(self, region: HostRegion) -> None:
        try:
            await self.unregister_region(region.region_id)
        finally:
            region.close(unregister=False)

    # ------------------------------------------------------------ raw access

    async def request(
        self, kind: int, body: Mapping[str, Any], *, session: bool = True
    ) -> dict[str, Any]:
        """Sends any request and returns its reply body (raising on an error)."""
        full: dict[str, Any] = {"request_id": body.get("request_id", 0)}
        if session and Kind.HELLO != kind and "session" not in body:
            full["session"] = self._session
        full.update(body)
        return await self._call(int(kind), full)

    # ------------------------------------------------------------ internals

    def _take_id(self) -> int:
        rid = self._next_id
        self._next_id = rid + 1
        return rid

    def _check_1_3(self, sampling: SamplingParams | None, needs: bool) -> None:
        require_1_3(self._info, sampling, needs)

    async def _session_request(self, kind: Kind) -> dict[str, Any]:
        return await self._call(kind, session_body(0, self._session))

    async def _call(self, kind: int, body: dict[str, Any]) -> dict[str, Any]:
        """Sends ``body`` (its ``request_id`` 0 replaced by a fresh one) and
        waits for the reply with that id."""
        if self._sock is None:
            raise DaemonUnavailable("unavailable", "the client is closed")
        rid = body.get("request_id") or self._take_id()
        body["request_id"] = rid
        if rid in self._waiting:
            raise ValueError(f"request {rid} is already in flight")
        fut: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read())
        try:
            await self._sock.send_multipart([bytes((kind,)), self._packer.pack(body)])
            frames = await asyncio.wait_for(fut, self.timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                "timeout",
                f"no reply to request {rid} from {self.address} within {self.timeout_s:g} s",
                request_id=rid,
            ) from None
        finally:
            self._waiting.pop(rid, None)
        got, reply = decode_reply(frames, self._instance_id)
        if got != kind:
            raise ProtocolError(
                "protocol_error", f"reply kind 0x{got | REPLY_BIT:02x} to request kind 0x{kind:02x}"
            )
        return reply

    async def _read(self) -> None:
        """Hands every reply to the request waiting for its id."""
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            try:
                body = msgpack.unpackb(frames[1]) if len(frames) >= 2 else None
            except Exception:
                body = None
            rid = body.get("request_id") if isinstance(body, dict) else None
            fut = self._waiting.get(rid) if rid is not None else None
            if fut is None and rid is None and len(self._waiting) == 1:
                # An error the daemon could not tie to an id: with one request
                # in flight, it is that one's.
                fut = next(iter(self._waiting.values()))
            if fut is not None and not fut.done():
                fut.set_result(frames)


# ---------------------------------------------------------------- tensors


def as_tensor(region: HostRegion, ref: TensorRef) -> Any:
    """The tensor ``ref`` names in ``region``, sharing its memory: a torch
    tensor (through DLPack) when torch is installed, else a numpy array.
    bf16 comes back as torch ``bfloat16`` (numpy: its raw ``uint16`` bits)."""
    arr = region.view(ref)
    try:
        import torch
    except ImportError:
        return arr
    if ref.dtype == "bf16":
        return torch.from_dlpack(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(arr)


def write_tensor(region: HostRegion, ref: TensorRef, value: Any) -> None:
    """Copies ``value`` (a torch tensor, on any device, or an array) into the
    tensor ``ref`` names in ``region``."""
    if hasattr(value, "detach"):
        dst = as_tensor(region, ref)
        if hasattr(dst, "copy_"):
            dst.copy_(value.detach().to(device="cpu", dtype=dst.dtype).reshape(dst.shape))
            return
        value = value.detach().cpu().numpy()
    if ref.dtype == "bf16":
        raise ValueError("write bf16 from a torch tensor (numpy has no bfloat16)")
    arr = region.view(ref)
    np.copyto(arr, np.asarray(value).reshape(arr.shape).astype(arr.dtype, copy=False))
