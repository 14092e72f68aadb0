"""Framing of the manager protocol: round trip, size limit, malformed frames, versions."""

from __future__ import annotations

import json
import socket
import struct

import pytest

from nsexp import protocol


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(2)
    b.settimeout(2)
    yield a, b
    a.close()
    b.close()


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_round_trip_adds_version(pair):
    a, b = pair
    protocol.send_msg(a, {"op": "ping", "x": [1, "é"]})
    msg = protocol.recv_msg(b)
    assert msg == {"v": protocol.VERSION, "op": "ping", "x": [1, "é"]}


def test_frames_are_delimited(pair):
    a, b = pair
    a.sendall(protocol.encode({"n": 1}) + protocol.encode({"n": 2}))
    assert protocol.recv_msg(b)["n"] == 1
    assert protocol.recv_msg(b)["n"] == 2


def test_oversized_header_refused_before_body(pair):
    a, b = pair
    # Announce 1 MiB but send nothing more: the reader must refuse without waiting for it.
    a.sendall(struct.pack(">I", 1 << 20))
    with pytest.raises(protocol.ProtocolError) as ei:
        protocol.recv_msg(b)
    assert ei.value.code == "too_large"


def test_encode_refuses_oversized_message():
    with pytest.raises(protocol.ProtocolError) as ei:
        protocol.encode({"blob": "x" * protocol.MAX_FRAME})
    assert ei.value.code == "too_large"


def test_limit_is_exact(pair):
    a, b = pair
    body = json.dumps({"v": 1, "pad": ""}).encode()
    pad = protocol.MAX_FRAME - len(body)
    body = json.dumps({"v": 1, "pad": "y" * pad}).encode()
    assert len(body) == protocol.MAX_FRAME
    a.sendall(raw_frame(body))
    assert len(protocol.recv_msg(b)["pad"]) == pad


@pytest.mark.parametrize(
    "body, code",
    [
        (b"not json", "malformed"),
        (b"\xff\xfe", "malformed"),
        (b"[1, 2]", "malformed"),
        (b'"v"', "malformed"),
        (b'{"op": "ping"}', "version"),
        (b'{"v": 2, "op": "ping"}', "version"),
        (b'{"v": "1"}', "version"),
    ],
)
def test_bad_bodies(pair, body, code):
    a, b = pair
    a.sendall(raw_frame(body))
    with pytest.raises(protocol.ProtocolError) as ei:
        protocol.recv_msg(b)
    assert ei.value.code == code


def test_close_between_frames_and_inside_one(pair):
    a, b = pair
    a.sendall(raw_frame(b'{"v": 1}')[:7])  # header and 3 bytes of an 8-byte body
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(protocol.ConnectionClosed) as ei:
        protocol.recv_msg(b)
    assert ei.value.partial
    c, d = socket.socketpair()
    c.close()
    with pytest.raises(protocol.ConnectionClosed) as ei:
        protocol.recv_msg(d)
    assert not ei.value.partial
    d.close()


def test_error_reply_shape():
    reply = protocol.error_reply("forbidden_route", "no", errno=1)
    assert reply == {
        "v": 1,
        "ok": False,
        "error": {"code": "forbidden_route", "message": "no", "errno": 1},
    }
