"""Migration backends: one interface, three mechanisms (kmod, restart, criu).

The manager side (``Backend``) runs in the manager, in the global namespace, one call per
request: ``migrate()`` on the manager's event loop (or in its pool for a stopped requester),
the slow ``after_reply`` part in the pool (docs/manager.md). The worker side (``WorkerSide``)
runs in the migrating process and says what to send and what to do with the reply. Standard
library only.
"""

from __future__ import annotations

import importlib
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from nsexp.errors import NsexpError

BACKENDS = ("kmod", "restart", "criu")


class BackendUnavailable(NsexpError, RuntimeError):
    """The backend cannot run on this machine (no module, no CRIU, ...)."""


class MigrationError(NsexpError):
    """A migration that did not happen. ``client_gone``: the requester no longer exists."""

    def __init__(
        self,
        code: str,
        message: str,
        errno: int | None = None,
        client_gone: bool = False,
        timings: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.errno = errno
        self.client_gone = client_gone
        self.timings = timings or {}


@dataclass(eq=False)
class Namespace:
    """A registered PID namespace: held open by an fd of /proc/<init>/ns/pid.

    ``control`` is the init's control channel (a socket to the spawner inside the namespace),
    used by the restart backend; ``lock`` serializes its request/reply exchanges.
    """

    name: str
    init_pid: int
    fd: int
    inode: int
    control: socket.socket | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, name: str, init_pid: int, control: socket.socket | None = None) -> Namespace:
        fd = os.open(f"/proc/{init_pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        return cls(name, init_pid, fd, os.fstat(fd).st_ino, control)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class Peer:
    """The requesting process, as the kernel (SO_PEERCRED) and /proc describe it."""

    pid: int  # global pid
    uid: int
    gid: int
    source: Namespace | None
    pid_in_ns: int


class Backend:
    """Manager side of a migration mechanism."""

    name = ""

    def check(self) -> None:
        """Raise BackendUnavailable if this backend cannot work here."""

    def migrate(self, peer: Peer, target: Namespace, request: dict[str, Any]) -> dict[str, Any]:
        """Move ``peer`` into ``target``; return reply fields (``timings`` dict of ns stamps).

        Raise MigrationError for a refused or failed migration.
        """
        raise NotImplementedError

    def after_reply(
        self,
        conn: socket.socket,
        peer: Peer,
        target: Namespace,
        request: dict[str, Any],
        reply: dict[str, Any],
    ) -> None:
        """Work that must follow the reply (restart: spawn the successor once the client left)."""


class WorkerSide:
    """Migrating-process side of a mechanism."""

    name = ""

    def prepare(self) -> None:
        """Called once when the worker starts (criu: make the process dumpable)."""

    def request_fields(self, state: dict[str, Any]) -> dict[str, Any]:
        """Extra fields of the migrate request (restart: the state to resume from)."""
        return {}

    def after_reply(self, reply: dict[str, Any]) -> dict[str, Any] | None:
        """Timings to record if this same process continues, None if it must exit now."""
        return dict(reply.get("timings") or {})


def wait_client_gone(conn: socket.socket, timeout: float) -> bool:
    """Wait until the client closes its end (it exited or is done); False on timeout."""
    conn.settimeout(timeout)
    try:
        while conn.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True  # reset by a dying peer: gone as well


def get_backend(name: str, **options: Any) -> Backend:
    """Instantiate the manager side of backend ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    module = importlib.import_module(f"nsexp.backends.{name}")
    return module.ManagerSide(**options)


def worker_side(name: str, **options: Any) -> WorkerSide:
    """Instantiate the worker side of backend ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}")
    module = importlib.import_module(f"nsexp.backends.{name}")
    return module.WorkerSide(**options)
