"""Host shared-memory regions: memory the daemon reads and writes in place.

Large tensors never travel inside messages (PROTOCOL.md §3): the client
creates a POSIX shared-memory object — or a sealed memfd, which it hands to
the daemon over the companion socket — registers it once, and then names
tensors in it by ``region_id`` + offset (:class:`~tacflow.protocol.TensorRef`).

By name or by descriptor: a daemon accepts regions by name only from a
client of its own user (``HelloInfo.region_kinds`` says so); a daemon that
runs as its own system user, or a client over TCP, gets memfds
(:func:`memfd_create_sealed`, :meth:`tacflow.Client.create_memfd_region`).
A memfd has no name to guess or leak, nothing is left behind after a crash,
and it is sealed against shrinking, so the daemon's mapping stays valid.
:class:`HostRegion` bundles the three things that go together — the mapping,
the daemon's region id, and numpy views of it — and cleans all of them up.

Views must never outlive the mapping: ``SharedMemory.close()`` (also run by
its ``__del__``) unmaps its memory even while ``np.ndarray(buffer=shm.buf)``
views exist, because numpy does not hold a buffer export for those, and the
next access segfaults. So the region maps the object itself and builds every
view with ``np.frombuffer``, which holds an export: while any view lives, the
mapping cannot be closed, and it is unmapped when the last one goes.

About Python's ``resource_tracker``: a ``SharedMemory`` created here is
registered with it, which is what we want (if the process dies, the tracker
unlinks the object, so nothing is left in ``/dev/shm``). ``close()`` unlinks
the object itself, which also unregisters it from the tracker, so the tracker
neither warns about a leak nor unlinks a second time. We never *attach* to an
existing object from Python, the case that makes the tracker double-unlink.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
from multiprocessing import shared_memory
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .errors import TacflowError
from .protocol import DTYPES, TensorRef

if TYPE_CHECKING:
    from .client import Client

#: Most dimensions a tensor reference may have (the daemon's ``MAX_RANK``).
MAX_RANK = 8

_NUMPY_TO_WIRE = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float16): "f16",
    np.dtype(np.int32): "i32",
    np.dtype(np.int64): "i64",
    np.dtype(np.uint8): "u8",
}
# numpy has no bfloat16: bf16 tensors are viewed as their raw 16-bit patterns.
_WIRE_TO_NUMPY = {v: k for k, v in _NUMPY_TO_WIRE.items()} | {"bf16": np.dtype(np.uint16)}


def wire_dtype(dtype: Any) -> str:
    """The protocol's name for ``dtype`` ("f32", "bf16", np.float32, "float16"...)."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    dt = np.dtype(dtype)
    if dt.name == "bfloat16":  # ml_dtypes' bfloat16, if the caller uses it
        return "bf16"
    try:
        return _NUMPY_TO_WIRE[dt]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} has no protocol equivalent") from None


def numpy_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype that holds ``dtype``'s elements (``bf16`` as ``uint16``)."""
    return _WIRE_TO_NUMPY[wire_dtype(dtype)]


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widens raw bf16 bit patterns (``uint16``) to float32 values."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def check_ref(ref: TensorRef, region_size: int) -> None:
    """The daemon's checks of §3.3, done early so mistakes fail in the caller.

    Raises ``ValueError`` for what the daemon would refuse with
    ``shape_mismatch`` or ``out_of_bounds``.
    """
    if len(ref.shape) > MAX_RANK:
        raise ValueError(f"tensor has {len(ref.shape)} dimensions, at most {MAX_RANK}")
    if ref.strides is not None and len(ref.strides) != len(ref.shape):
        raise ValueError(f"{len(ref.strides)} strides for {len(ref.shape)} dimensions")
    if any(n < 0 for n in ref.shape) or any(s < 0 for s in ref.strides or ()):
        raise ValueError("shapes and strides are unsigned")
    esize = DTYPES[ref.dtype]
    if ref.offset < 0 or ref.offset % esize:
        raise ValueError(f"offset {ref.offset} is not aligned to {ref.dtype}")
    if 0 in ref.shape:
        if ref.offset > region_size:
            raise ValueError(f"offset {ref.offset} is past the region's {region_size} bytes")
        return
    strides = ref.strides if ref.strides is not None else contiguous_strides(ref.shape)
    last = sum((n - 1) * s for n, s in zip(ref.shape, strides))
    end = ref.offset + (last + 1) * esize
    if end > region_size:
        raise ValueError(f"tensor ends at byte {end}, past the region's {region_size} bytes")


def memfd_create_sealed(nbytes: int, name: str = "tacflow-region") -> int:
    """A memfd of ``nbytes`` sealed against shrinking (and against changing
    its seals), as the daemon requires; returns the descriptor."""
    if nbytes <= 0:
        raise ValueError("a region needs at least one byte")
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major element strides (a zero-size dimension counts as 1)."""
    strides = []
    acc = 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


class HostRegion:
    """Host memory registered with the daemon: a POSIX shared-memory object
    (``kind == "shm"``) or a sealed memfd (``kind == "memfd"``, no name).

    Made by :meth:`tacflow.Client.create_region` or
    :meth:`tacflow.Client.create_memfd_region`. Numpy views from
    :meth:`array` and :meth:`view` share its memory with the daemon; they keep
    the mapping alive even after :meth:`close`, so keep them no longer than
    the region is meant to live.
    """

    def __init__(
        self,
        client: "Client | None",
        shm: shared_memory.SharedMemory | None,
        region_id: int,
        *,
        memfd: int | None = None,
        byte_size: int | None = None,
    ):
        self._client = client
        self.region_id = region_id
        self.closed = False
        self._shm = shm
        if shm is not None:
            self.kind = "shm"
            self.name: str | None = shm.name
            self.byte_size = shm.size
            # Our own mapping (see the module doc); SharedMemory's is closed
            # at once, and the object is kept only to unlink the name.
            self._mmap = mmap.mmap(shm._fd, shm.size)  # noqa: SLF001 (no public fd)
            shm.close()
        else:
            if memfd is None or byte_size is None:
                raise ValueError("a HostRegion needs a SharedMemory or a memfd and its size")
            self.kind = "memfd"
            self.name = None
            self.byte_size = int(byte_size)
            # The mapping keeps the memory; the descriptor is not needed.
            self._mmap = mmap.mmap(memfd, self.byte_size)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        what = f"name={self.name!r}" if self.name is not None else "memfd"
        return f"HostRegion(id={self.region_id}, {what}, bytes={self.byte_size}, {state})"

    def __enter__(self) -> "HostRegion":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def buf(self) -> memoryview:
        """The mapped bytes (the mapping stays while this view is referenced)."""
        self._check_open()
        return memoryview(self._mmap)

    def _raw(self) -> np.ndarray:
        """All bytes as a uint8 array that holds a buffer export on the mapping."""
        return np.frombuffer(self._mmap, dtype=np.uint8)

    def array(self, dtype: Any, shape: int | Sequence[int], offset: int = 0) -> np.ndarray:
        """A contiguous numpy view of ``shape`` elements starting at ``offset`` bytes.

        ``bf16`` gives a ``uint16`` array of raw bit patterns (see
        :func:`bf16_to_f32`).
        """
        self._check_open()
        dt = numpy_dtype(dtype)
        if offset % dt.itemsize:
            raise ValueError(f"offset {offset} is not aligned to {wire_dtype(dtype)}")
        shape = (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)
        if offset < 0 or offset + math.prod(shape) * dt.itemsize > self.byte_size:
            raise ValueError(f"{shape} {dt} at offset {offset} exceeds {self.byte_size} bytes")
        return np.ndarray(shape, dtype=dt, buffer=self._raw(), offset=offset)

    def ref(
        self,
        offset: int,
        dtype: Any,
        shape: Sequence[int],
        strides: Sequence[int] | None = None,
        check: bool = True,
    ) -> TensorRef:
        """A tensor reference into this region; ``strides`` count elements.

        ``check=False`` skips the local bounds checks, for tests that want to
        see the daemon refuse a bad reference.
        """
        ref = TensorRef(
            self.region_id,
            int(offset),
            wire_dtype(dtype),
            tuple(int(n) for n in shape),
            None if strides is None else tuple(int(s) for s in strides),
        )
        if check:
            check_ref(ref, self.byte_size)
        return ref

    def view(self, ref: TensorRef) -> np.ndarray:
        """The numpy view of what ``ref`` names in this region (strides honoured)."""
        self._check_open()
        if ref.region_id != self.region_id:
            raise ValueError(f"reference names region {ref.region_id}, this is {self.region_id}")
        check_ref(ref, self.byte_size)
        dt = numpy_dtype(ref.dtype)
        strides = ref.strides if ref.strides is not None else contiguous_strides(ref.shape)
        return np.ndarray(
            ref.shape,
            dtype=dt,
            buffer=self._raw(),
            offset=ref.offset,
            strides=tuple(s * dt.itemsize for s in strides),
        )

    def ref_of(self, arr: np.ndarray) -> TensorRef:
        """The reference of a numpy view that lies in this region."""
        self._check_open()
        base = self._raw().ctypes.data
        offset = arr.__array_interface__["data"][0] - base
        if not 0 <= offset <= self.byte_size:
            raise ValueError("array does not lie in this region")
        isz = arr.dtype.itemsize
        if any(s < 0 or s % isz for s in arr.strides):
            raise ValueError(f"strides {arr.strides} are not non-negative multiples of {isz}")
        strides = tuple(s // isz for s in arr.strides)
        keep = None if strides == contiguous_strides(arr.shape) else strides
        return self.ref(offset, arr.dtype, arr.shape, keep)

    def close(self, unregister: bool = True) -> None:
        """Unregisters the region (when its session is alive) and unlinks the
        object (a memfd has no name: its memory goes with the last mapping).

        Idempotent. Errors from the daemon while unregistering are ignored:
        the object is unlinked either way, and the daemon drops the region with
        its session.
        """
        if self.closed:
            return
        self.closed = True
        client, self._client = self._client, None
        try:
            if unregister and client is not None and client.is_open:
                try:
                    client.unregister_region(self.region_id)
                except TacflowError:
                    pass
        finally:
            if client is not None:
                client._forget_region(self)
            try:
                self._mmap.close()
            except BufferError:
                # Views still hold the mapping; it is unmapped when the last
                # one goes. The name can go now.
                pass
            if self._shm is not None:
                try:
                    self._shm.unlink()
                except FileNotFoundError:
                    pass

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"region {self.region_id} is closed")
