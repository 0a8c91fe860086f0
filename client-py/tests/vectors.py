"""Loading the shared test vectors of ``ipc/vectors/``.

Each vector is ``NAME.msgpack`` (the header bytes the Rust side encodes) and
``NAME.json`` (``{kind, direction, frame, body}``) where ``{"$bin": hex}`` is
a msgpack ``bin`` and ``{"$f32": x}`` a float32; a plain JSON float is a
float64. The JSON keeps the msgpack map order.

To check bytes exactly — including which floats are f32 and which f64, which
``msgpack`` in Python cannot express per value — this module has its own tiny
msgpack encoder for the JSON form.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VECTOR_DIR = Path(
    os.environ.get("TACFLOW_VECTORS", Path(__file__).resolve().parents[2] / "ipc" / "vectors")
)


@dataclass(frozen=True)
class F32:
    """A float the vector says is float32."""

    value: float


@dataclass(frozen=True)
class Vector:
    name: str
    kind: str
    direction: str
    frame: int
    body: Any  # JSON form: F32 for float32, bytes for bin
    raw: bytes  # the .msgpack file


def _from_json(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"$bin"}:
            return bytes.fromhex(v["$bin"])
        if set(v) == {"$f32"}:
            return F32(float(v["$f32"]))
        return {k: _from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def plain(v: Any) -> Any:
    """The JSON form as ``msgpack.unpackb`` would return it (F32 -> float)."""
    if isinstance(v, F32):
        return v.value
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def load_vectors() -> list[Vector]:
    out = []
    for path in sorted(VECTOR_DIR.glob("*.json")):
        meta = json.loads(path.read_text())
        raw = path.with_suffix(".msgpack").read_bytes()
        out.append(
            Vector(path.stem, meta["kind"], meta["direction"], meta["frame"], _from_json(meta["body"]), raw)
        )
    return out


def encode_exact(v: Any) -> bytes:
    """msgpack with the smallest int forms, F32 as 0xca and float as 0xcb."""
    out = bytearray()
    _enc(v, out)
    return bytes(out)


def _len_header(n: int, fix_base: int | None, fix_max: int, codes: tuple[int, int, int]) -> bytes:
    if fix_base is not None and n <= fix_max:
        return bytes([fix_base | n])
    c8, c16, c32 = codes
    if c8 and n < 1 << 8:
        return bytes([c8, n])
    if n < 1 << 16:
        return bytes([c16]) + struct.pack(">H", n)
    return bytes([c32]) + struct.pack(">I", n)


def _enc_int(v: int, out: bytearray) -> None:
    if 0 <= v < 128:
        out.append(v)
    elif -32 <= v < 0:
        out += struct.pack(">b", v)
    elif v >= 0:
        for code, fmt, limit in ((0xCC, ">B", 1 << 8), (0xCD, ">H", 1 << 16), (0xCE, ">I", 1 << 32), (0xCF, ">Q", 1 << 64)):
            if v < limit:
                out.append(code)
                out += struct.pack(fmt, v)
                return
        raise OverflowError(v)
    else:
        for code, fmt, limit in ((0xD0, ">b", 1 << 7), (0xD1, ">h", 1 << 15), (0xD2, ">i", 1 << 31), (0xD3, ">q", 1 << 63)):
            if v >= -limit:
                out.append(code)
                out += struct.pack(fmt, v)
                return
        raise OverflowError(v)


def _enc(v: Any, out: bytearray) -> None:
    if v is None:
        out.append(0xC0)
    elif v is True or v is False:
        out.append(0xC3 if v else 0xC2)
    elif isinstance(v, int):
        _enc_int(v, out)
    elif isinstance(v, F32):
        out.append(0xCA)
        out += struct.pack(">f", v.value)
    elif isinstance(v, float):
        out.append(0xCB)
        out += struct.pack(">d", v)
    elif isinstance(v, str):
        b = v.encode()
        out += _len_header(len(b), 0xA0, 31, (0xD9, 0xDA, 0xDB))
        out += b
    elif isinstance(v, bytes):
        out += _len_header(len(v), None, 0, (0xC4, 0xC5, 0xC6))
        out += v
    elif isinstance(v, list):
        out += _len_header(len(v), 0x90, 15, (0, 0xDC, 0xDD))
        for x in v:
            _enc(x, out)
    elif isinstance(v, dict):
        out += _len_header(len(v), 0x80, 15, (0, 0xDE, 0xDF))
        for k, x in v.items():
            _enc(k, out)
            _enc(x, out)
    else:
        raise TypeError(f"cannot encode {v!r}")
