"""Wire protocol between manager and clients: length-prefixed, versioned JSON frames.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON encoding one
object, which carries ``"v": VERSION``. Frames larger than ``MAX_FRAME`` are refused before their
body is read, so a hostile or broken client cannot make the manager allocate without bound.
Standard library only: this module is imported inside the VM guest.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

VERSION = 1
MAX_FRAME = 64 * 1024
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame that cannot be accepted; ``code`` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (``partial`` is True if it did so inside a frame)."""

    def __init__(self, partial: bool) -> None:
        what = "in the middle of a frame" if partial else "before sending a frame"
        super().__init__("closed", f"connection closed {what}")
        self.partial = partial


def encode(obj: dict[str, Any]) -> bytes:
    """Encode one message as a frame; adds ``v`` if absent."""
    if not isinstance(obj, dict):
        raise TypeError("a message is a JSON object")
    if "v" not in obj:
        obj = {"v": VERSION, **obj}
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError("too_large", f"message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Parse and validate a frame body (without its length prefix)."""
    try:
        obj = json.loads(body.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("malformed", f"frame is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", "frame is not a JSON object")
    if obj.get("v") != VERSION:
        raise ProtocolError("version", f"unsupported protocol version {obj.get('v')!r}")
    return obj


def _recv_exact(sock: socket.socket, n: int, started: bool) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionClosed(partial=started or bool(buf))
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket, max_frame: int = MAX_FRAME) -> dict[str, Any]:
    """Read one frame; raises ProtocolError, ConnectionClosed or socket.timeout/OSError."""
    (length,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, False))
    if length > max_frame:
        raise ProtocolError("too_large", f"frame of {length} bytes exceeds {max_frame}")
    return decode_body(_recv_exact(sock, length, True))


def send_msg(sock: socket.socket, obj: dict[str, Any]) -> None:
    """Write one frame (blocking until all of it is sent)."""
    sock.sendall(encode(obj))


def error_reply(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The reply the manager sends for a refused or failed request."""
    return {"v": VERSION, "ok": False, "error": {"code": code, "message": message, **extra}}
