"""Whole messages in and out, whatever their number of frames."""

from __future__ import annotations

from typing import Iterator

import pytest
import zmq

from tacflow.transport import recv_message, send_message


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://transport-test")
    b.connect("inproc://transport-test")
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


@pytest.mark.parametrize("frames", [[b"\x01"], [b"\xb0", b"hdr"], [b"\xb0", b"h", b"p1", b""], [b"", b""]])
def test_messages_come_back_whole(pair: tuple[zmq.Socket, zmq.Socket], frames: list[bytes]) -> None:
    a, b = pair
    a.send_multipart(frames)
    a.send_multipart([b"next", b"message"])
    assert recv_message(b) == frames
    assert recv_message(b) == [b"next", b"message"]  # nothing bled over


def test_send_message_and_large_headers(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    big = bytes(range(256)) * 4096  # 1 MiB: the zero-copy path
    send_message(a, b"\x30", big)
    send_message(a, b"\x02", b"small")
    assert b.recv_multipart() == [b"\x30", big]
    assert b.recv_multipart() == [b"\x02", b"small"]


def test_receive_timeout_raises_again(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    _, b = pair
    b.setsockopt(zmq.RCVTIMEO, 10)
    with pytest.raises(zmq.Again):
        recv_message(b)
