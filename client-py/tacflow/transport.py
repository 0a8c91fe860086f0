"""Sending and receiving ``[kind, header]`` messages on a ZeroMQ socket, fast.

pyzmq's ``send_multipart``/``recv_multipart`` cost about 4 µs more per round
trip than the calls below (measured on the 2-core development VM: 6.5 µs
against 2.5 µs for a 52-byte message over ``inproc://``): the first
type-checks every part in Python, the second calls ``getsockopt(RCVMORE)``
after every part, about 1.4 µs each. An empty step's round trip through the
daemon is tens of microseconds, so that is worth a dozen lines.

The receive side stays correct for any shape of message: it reads the
"more" flag from each frame, so a one-frame message or one with extra
frames is returned whole and never bleeds into the next message.
"""

from __future__ import annotations

import zmq

_SNDMORE = zmq.SNDMORE
_ZERO_COPY_MIN = zmq.COPY_THRESHOLD


def send_message(sock: zmq.Socket, kind_frame: bytes, header: bytes) -> None:
    """Sends ``[kind, header]``; a large header goes zero-copy.

    Raises ``zmq.Again`` when the socket's send timeout expires.
    """
    sock.send(kind_frame, _SNDMORE)
    # Zero-copy only where it pays (long prompts): below pyzmq's copy
    # threshold it copies anyway, and asking costs 0.3 µs.
    if len(header) < _ZERO_COPY_MIN:
        sock.send(header)
    else:
        sock.send(header, copy=False)


def recv_message(sock: zmq.Socket) -> list[bytes]:
    """Receives one whole message, as a list of frames.

    Raises ``zmq.Again`` when the socket's receive timeout expires before
    the first frame (later frames of a message arrive with it).
    """
    first = sock.recv(copy=False)
    if not first.more:
        return [first.bytes]
    second = sock.recv(copy=False)
    frames = [first.bytes, second.bytes]
    more = second.more
    while more:
        extra = sock.recv(copy=False)
        frames.append(extra.bytes)
        more = extra.more
    return frames
