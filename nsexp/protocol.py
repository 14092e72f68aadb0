"""Wire protocol v2 between manager and clients: length-prefixed, versioned JSON frames.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON encoding one
object, which carries ``"v": VERSION``. Frames larger than ``MAX_FRAME`` are refused before their
body is read, so a hostile or broken client cannot make the manager allocate without bound.
Who sent a frame is not part of it: the manager reads the sender's credentials that the kernel
attaches to each message (SCM_CREDENTIALS, see nsexp.manager and docs/manager.md).
Standard library only: this module is imported inside the VM guest.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, NamedTuple

from nsexp.errors import NsexpError

VERSION = 2
MAX_FRAME = 64 * 1024
HEADER = struct.Struct(">I")
UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
CMSG_CREDS_SPACE = socket.CMSG_SPACE(UCRED.size)
# One encoder for every frame: json.dumps() with separators builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_DECODER = json.JSONDecoder()


class Credentials(NamedTuple):
    """A sender as the kernel describes it, pid translated into the receiver's namespace."""

    pid: int
    uid: int
    gid: int


class ProtocolError(NsexpError):
    """A frame that cannot be accepted; ``code`` is a stable machine-readable reason.

    ``fatal``: the byte stream cannot be trusted past this frame (the connection must end).
    ``peer_version``: for a version error, the version the peer spoke (to answer it in kind).
    """

    def __init__(
        self, code: str, message: str, fatal: bool = False, peer_version: Any = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal
        self.peer_version = peer_version


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (``partial`` is True if it did so inside a frame)."""

    def __init__(self, partial: bool) -> None:
        what = "in the middle of a frame" if partial else "before sending a frame"
        super().__init__("closed", f"connection closed {what}", fatal=True)
        self.partial = partial


def version_message(version: Any) -> str:
    """Why a frame of another protocol version is refused, and what to do about it."""
    return (
        f"protocol version {version!r} is not served: this manager speaks v{VERSION} "
        "(one long-lived connection per process, the sender identified by kernel credentials "
        "per message); update the client to nsexp.client.Client of the same nsexp tree as "
        "the manager"
    )


def encode(obj: dict[str, Any]) -> bytes:
    """Encode one message as a frame; adds ``v`` if absent."""
    if not isinstance(obj, dict):
        raise TypeError("a message is a JSON object")
    if "v" not in obj:
        obj = {"v": VERSION, **obj}
    body = _ENCODER.encode(obj).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError("too_large", f"message of {len(body)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse and validate a frame body (without its length prefix)."""
    try:
        obj = _DECODER.decode(str(body, "utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("malformed", f"frame is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", "frame is not a JSON object")
    if obj.get("v") != VERSION:
        raise ProtocolError("version", version_message(obj.get("v")), peer_version=obj.get("v"))
    return obj


def parse_credentials(ancdata: list[tuple[int, int, bytes]]) -> Credentials | None:
    """The SCM_CREDENTIALS of a recvmsg() result, or None if it carries none."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            return Credentials(*UCRED.unpack(data[: UCRED.size]))
    return None


class FrameReader:
    """Cuts a byte stream into frames, each with the credentials it arrived with.

    The kernel never glues data of two senders into one recvmsg(), so every chunk has one
    sender; a frame whose chunks come from different senders is refused (fatal).
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._creds: Credentials | None = None  # of the frame being assembled

    @property
    def partial(self) -> bool:
        """True while a frame has started but is not complete."""
        return bool(self._buf)

    def feed(
        self, data: bytes, creds: Credentials | None
    ) -> list[tuple[Credentials | None, dict[str, Any] | ProtocolError]]:
        """Add received bytes; return the frames completed by them (or their errors)."""
        if not self._buf and len(data) > HEADER.size:
            # The common case: the chunk is exactly one whole frame (no copy into the buffer).
            (length,) = HEADER.unpack_from(data)
            if len(data) == HEADER.size + length and length <= self.max_frame:
                try:
                    return [(creds, decode_body(memoryview(data)[HEADER.size :]))]
                except ProtocolError as exc:
                    return [(creds, exc)]
        out: list[tuple[Credentials | None, dict[str, Any] | ProtocolError]] = []
        view = memoryview(data)
        while view:
            if not self._buf:
                self._creds = creds
            elif creds != self._creds:
                err = ProtocolError("mixed_senders", "a frame arrived from two processes", True)
                return [*out, (creds, err)]
            take = len(view)
            if len(self._buf) >= HEADER.size:
                (length,) = HEADER.unpack_from(self._buf)
                take = min(take, HEADER.size + length - len(self._buf))
            else:
                take = min(take, HEADER.size - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) < HEADER.size:
                continue
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                msg = f"frame of {length} bytes exceeds {self.max_frame}"
                return [*out, (self._creds, ProtocolError("too_large", msg, fatal=True))]
            if len(self._buf) == HEADER.size + length:
                body = bytes(self._buf[HEADER.size :])
                self._buf.clear()
                try:
                    out.append((self._creds, decode_body(body)))
                except ProtocolError as exc:
                    out.append((self._creds, exc))
        return out


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
    (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size, False))
    if length > max_frame:
        raise ProtocolError("too_large", f"frame of {length} bytes exceeds {max_frame}", True)
    return decode_body(_recv_exact(sock, length, True))


class Receiver:
    """Reads frames from one blocking socket, usually one recv() per frame.

    recv_msg() reads the header and the body apart (two system calls, no byte past the frame);
    this reader asks for as much as fits and keeps what follows the frame for the next call,
    so it must be the only reader of its socket.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray(HEADER.size + max_frame)
        self._view = memoryview(self._buf)
        self._have = 0  # bytes received and not yet returned

    def reset(self) -> None:
        """Forget buffered bytes (the reader moves to a new socket)."""
        self._have = 0

    def recv(self, sock: socket.socket) -> dict[str, Any]:
        """Read one frame; raises ProtocolError, ConnectionClosed or OSError (as recv_msg)."""
        need = HEADER.size
        length = -1
        while True:
            if self._have >= need:
                if length < 0:
                    (length,) = HEADER.unpack_from(self._buf)
                    if length > self.max_frame:
                        self._have = 0
                        msg = f"frame of {length} bytes exceeds {self.max_frame}"
                        raise ProtocolError("too_large", msg, True)
                    need = HEADER.size + length
                    continue
                body = self._view[HEADER.size : need]
                try:
                    return decode_body(body)
                finally:
                    body.release()
                    rest = self._have - need
                    if rest:
                        self._buf[:rest] = self._buf[need : self._have]
                    self._have = rest
            n = sock.recv_into(self._view[self._have :])
            if not n:
                partial = self._have > 0
                self._have = 0
                raise ConnectionClosed(partial=partial)
            self._have += n


def send_msg(sock: socket.socket, obj: dict[str, Any]) -> None:
    """Write one frame (blocking until all of it is sent)."""
    sock.sendall(encode(obj))


def error_reply(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The reply the manager sends for a refused or failed request."""
    return {"v": VERSION, "ok": False, "error": {"code": code, "message": message, **extra}}
