"""Client side of the manager protocol (v2): one long-lived connection per process.

The manager learns who sends each request from the credentials the kernel attaches to every
message (SCM_CREDENTIALS: the sender's current pid), so one connection serves a process across
its migrations: after a kmod hop the same process keeps the same connected socket. A forked
child never shares its parent's connection: it opens its own on first use. A reply carrying
``"close": true`` (the process is handed over: restart exits, CRIU dumps it) ends the connection.
``reconnect=True`` opens a new connection per request: the old path, kept as a measured baseline.
Standard library only: used by processes inside the namespaces.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import weakref
from typing import Any

from nsexp import protocol
from nsexp.errors import NsexpError

DEFAULT_SOCKET = "/run/nsexp/manager.sock"
_TIMEVAL = struct.Struct("ll")  # struct timeval: tv_sec, tv_usec


class ManagerError(NsexpError):
    """The manager refused or failed a request; ``code`` and ``errno`` come from its reply."""

    def __init__(self, code: str, message: str, errno: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.errno = errno


class ManagerUnavailable(ManagerError):
    """No manager listens, or it went away before replying (killed, restarted)."""


_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _forget_connections_in_child() -> None:
    # The child holds copies of its parent's connections: using them would interleave both
    # processes' frames on one stream. Closing the copy leaves the parent's connection intact.
    for client in list(_clients):
        client._drop()


os.register_at_fork(after_in_child=_forget_connections_in_child)


class Client:
    """Talks to a manager at ``path``; ``timeout`` (s) bounds connect and each reply wait.

    One request at a time: threads that ask concurrently each need their own Client.
    ``reconnect=True``: a new connection per request (the old path; a baseline only).
    """

    def __init__(
        self, path: str = DEFAULT_SOCKET, timeout: float | None = None, *, reconnect: bool = False
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.reconnect = reconnect
        self._sock: socket.socket | None = None
        self._receiver = protocol.Receiver()  # one buffer for every connection it opens
        self._answered = False  # the open connection has carried a request and its reply
        _clients.add(self)

    # -- connection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is open (it is opened on the first request)."""
        return self._sock is not None

    def connect(self) -> None:
        """Open the connection now (otherwise the first request does)."""
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise ManagerUnavailable(
                "unavailable", f"cannot connect to {self.path}: {exc.strerror or exc}"
            ) from None
        # The timeout is the kernel's from here on (SO_RCVTIMEO/SO_SNDTIMEO): a Python socket
        # timeout would poll() before every send and recv, one more system call each.
        sock.settimeout(None)
        if self.timeout is not None:
            sec = max(self.timeout, 1e-6)
            tv = _TIMEVAL.pack(int(sec), int(sec % 1 * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._sock = sock
        self._receiver.reset()
        self._answered = False

    def close(self) -> None:
        """Close the connection; a later request opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _drop(self) -> None:
        self.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    # -- requests --------------------------------------------------------------------------

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one request, return the reply; raises ManagerError if the reply is an error."""
        try:
            reply = self._exchange(protocol.encode(msg))
        finally:
            if self.reconnect:
                self.close()
        if reply.get("close"):
            self.close()
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise ManagerError(
                str(err.get("code", "error")), str(err.get("message", "")), err.get("errno")
            )
        return reply

    def _exchange(self, frame: bytes) -> dict[str, Any]:
        reused = self._sock is not None and self._answered
        self.connect()
        assert self._sock is not None
        try:
            try:
                self._sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                if not reused:
                    return self._parting_words()
                # The manager closed this idle connection (it was restarted): it has not seen
                # this request, so send it on a new one.
                self.close()
                self.connect()
                assert self._sock is not None
                self._sock.sendall(frame)
            reply = self._receiver.recv(self._sock)
            self._answered = True
            return reply
        except protocol.ConnectionClosed:
            self.close()
            raise ManagerUnavailable(
                "manager_gone", "the manager closed the connection before replying"
            ) from None
        except protocol.ProtocolError as exc:
            self.close()
            raise ManagerError(exc.code, f"bad reply from the manager: {exc.message}") from None
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO/SO_SNDTIMEO
            self.close()  # a late reply would be read as the answer to the next request
            raise ManagerUnavailable("timeout", "no reply from the manager in time") from None
        except OSError as exc:
            self.close()
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise
            raise ManagerUnavailable(
                "manager_gone", f"connection to the manager lost: {exc.strerror}"
            ) from None

    def _parting_words(self) -> dict[str, Any]:
        """The reply a manager left before hanging up on a new connection (``busy``)."""
        assert self._sock is not None
        self._sock.setblocking(False)
        try:
            return {**protocol.recv_msg(self._sock), "close": True}
        except (OSError, protocol.ProtocolError):
            raise ManagerUnavailable(
                "manager_gone", "the manager closed the connection before reading the request"
            ) from None

    def ping(self) -> dict[str, Any]:
        """Ask the manager who it thinks we are (global pid, namespace)."""
        return self.request({"op": "ping"})

    def migrate(self, target: str, **fields: Any) -> dict[str, Any]:
        """Ask to be migrated into namespace ``target``; returns the manager's reply."""
        return self.request({"op": "migrate", "target": target, **fields})

    def record(self, record: dict[str, Any]) -> dict[str, Any]:
        """Hand a hop record to the manager (the experiment snapshots the tree before replying)."""
        return self.request({"op": "record", "record": record})
