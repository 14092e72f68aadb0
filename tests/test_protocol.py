"""Framing of the manager protocol: round trip, size limit, malformed frames, versions,
the incremental reader of the manager's loop, and kernel credentials per message."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

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
    body = json.dumps({"v": protocol.VERSION, "pad": ""}).encode()
    pad = protocol.MAX_FRAME - len(body)
    body = json.dumps({"v": protocol.VERSION, "pad": "y" * pad}).encode()
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
        (b'{"v": 1, "op": "ping"}', "version"),
        (b'{"v": 3, "op": "ping"}', "version"),
        (b'{"v": "2"}', "version"),
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
    a.sendall(raw_frame(b'{"v": 2}')[:7])  # header and 3 bytes of an 8-byte body
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
        "v": protocol.VERSION,
        "ok": False,
        "error": {"code": "forbidden_route", "message": "no", "errno": 1},
    }


def test_version_refusal_names_the_fix():
    with pytest.raises(protocol.ProtocolError) as ei:
        protocol.decode_body(b'{"v": 1, "op": "ping"}')
    assert ei.value.code == "version" and ei.value.peer_version == 1
    assert "v2" in ei.value.message and "nsexp.client.Client" in ei.value.message


def test_reader_cuts_a_stream_at_any_split_point():
    frames = [protocol.encode({"n": i, "pad": "z" * i}) for i in range(5)]
    stream = b"".join(frames)
    me = protocol.Credentials(10, 0, 0)
    for step in (1, 2, 3, 7, len(stream)):
        reader = protocol.FrameReader()
        got = []
        for i in range(0, len(stream), step):
            got += reader.feed(stream[i : i + step], me)
        assert [m["n"] for _, m in got] == list(range(5)), step
        assert all(c == me for c, _ in got) and not reader.partial


def test_reader_errors_bad_json_keeps_going_oversize_is_fatal():
    me = protocol.Credentials(10, 0, 0)
    reader = protocol.FrameReader()
    out = reader.feed(raw_frame(b"nope") + protocol.encode({"n": 1}), me)
    assert out[0][1].code == "malformed" and not out[0][1].fatal
    assert out[1][1]["n"] == 1
    out = reader.feed(struct.pack(">I", protocol.MAX_FRAME + 1) + b"xx", me)
    assert out[0][1].code == "too_large" and out[0][1].fatal


def test_reader_refuses_a_frame_from_two_senders():
    frame = protocol.encode({"n": 1})
    reader = protocol.FrameReader()
    assert reader.feed(frame[:5], protocol.Credentials(10, 0, 0)) == []
    assert reader.partial
    ((creds, err),) = reader.feed(frame[5:], protocol.Credentials(11, 0, 0))
    assert err.code == "mixed_senders" and err.fatal and creds.pid == 11


def test_kernel_attaches_the_current_sender_to_each_message():
    """SO_PASSCRED on the receiver: every message names its sender, forked children included."""
    recv_end, send_end = socket.socketpair()
    with recv_end, send_end:
        recv_end.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        send_end.sendall(b"parent")
        child = os.fork()
        if child == 0:
            send_end.sendall(b"child")
            os._exit(0)
        os.waitpid(child, 0)
        senders = []
        for _ in range(2):  # the kernel never glues two senders' data into one read
            data, anc, _, _ = recv_end.recvmsg(100, protocol.CMSG_CREDS_SPACE)
            senders.append((data, protocol.parse_credentials(anc)))
    assert senders == [
        (b"parent", protocol.Credentials(os.getpid(), os.getuid(), os.getgid())),
        (b"child", protocol.Credentials(child, os.getuid(), os.getgid())),
    ]


def test_receiver_one_read_per_frame_keeps_what_follows(pair):
    """Receiver (the client's reader): frames glued in one write, a frame split over writes,
    then the errors recv_msg gives (too large, closed inside a frame)."""
    a, b = pair
    reader = protocol.Receiver()
    a.sendall(protocol.encode({"n": 1}) + protocol.encode({"n": 2, "s": "é"}))
    assert reader.recv(b)["n"] == 1
    assert reader.recv(b) == {"v": protocol.VERSION, "n": 2, "s": "é"}
    frame = protocol.encode({"n": 3, "pad": "p" * 5000})

    def trickle():
        for k in range(0, len(frame), 1000):
            a.sendall(frame[k : k + 1000])
            time.sleep(0.01)

    t = threading.Thread(target=trickle)
    t.start()
    assert reader.recv(b)["n"] == 3
    t.join()
    a.sendall(raw_frame(b"nope"))
    with pytest.raises(protocol.ProtocolError) as ei:
        reader.recv(b)
    assert ei.value.code == "malformed"
    a.sendall(struct.pack(">I", protocol.MAX_FRAME + 1))
    with pytest.raises(protocol.ProtocolError) as ei:
        reader.recv(b)
    assert ei.value.code == "too_large" and ei.value.fatal
    reader = protocol.Receiver()
    a.sendall(raw_frame(b'{"v": 2}')[:7])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(protocol.ConnectionClosed) as ei:
        reader.recv(b)
    assert ei.value.partial
