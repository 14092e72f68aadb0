"""Client side of the manager protocol: one connection per request.

A fresh connection per request matters: the manager identifies the caller by SO_PEERCRED, which
the kernel records at connect time, and a migrated process has a new global pid afterwards.
Standard library only: used by processes inside the namespaces.
"""

from __future__ import annotations

import socket
from typing import Any

from nsexp import protocol

DEFAULT_SOCKET = "/run/nsexp/manager.sock"


class ManagerError(Exception):
    """The manager refused or failed a request; ``code`` and ``errno`` come from its reply."""

    def __init__(self, code: str, message: str, errno: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.errno = errno


class ManagerUnavailable(ManagerError):
    """No manager listens, or it went away before replying (killed, restarted)."""


class Client:
    """Talks to a manager at ``path``; ``timeout`` (s) bounds connect and each reply wait."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float | None = None) -> None:
        self.path = path
        self.timeout = timeout

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one request, return the reply; raises ManagerError if the reply is an error."""
        reply = self._exchange(msg)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise ManagerError(
                str(err.get("code", "error")), str(err.get("message", "")), err.get("errno")
            )
        return reply

    def _exchange(self, msg: dict[str, Any]) -> dict[str, Any]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except OSError as exc:
                raise ManagerUnavailable(
                    "unavailable", f"cannot connect to {self.path}: {exc.strerror or exc}"
                ) from None
            try:
                protocol.send_msg(sock, msg)
                return protocol.recv_msg(sock)
            except protocol.ConnectionClosed:
                raise ManagerUnavailable(
                    "manager_gone", "the manager closed the connection before replying"
                ) from None
            except TimeoutError:
                raise ManagerUnavailable("timeout", "no reply from the manager in time") from None
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise ManagerUnavailable(
                    "manager_gone", f"connection to the manager lost: {exc.strerror}"
                ) from None
        finally:
            sock.close()

    def ping(self) -> dict[str, Any]:
        """Ask the manager who it thinks we are (global pid, namespace)."""
        return self.request({"op": "ping"})

    def migrate(self, target: str, **fields: Any) -> dict[str, Any]:
        """Ask to be migrated into namespace ``target``; returns the manager's reply."""
        return self.request({"op": "migrate", "target": target, **fields})

    def record(self, record: dict[str, Any]) -> dict[str, Any]:
        """Hand a hop record to the manager (the experiment snapshots the tree before replying)."""
        return self.request({"op": "record", "record": record})
