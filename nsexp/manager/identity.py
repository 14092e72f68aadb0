"""Who sent a message: the manager's view of a sender, from /proc, proven per message.

Runs in the manager (global PID namespace); standard library only. docs/manager.md ("Who is
asking") explains why one pread() of a kept /proc/PID/stat proves a kept view current.
"""

from __future__ import annotations

import os

from nsexp.backends import Namespace, Peer


class Unidentified(Exception):
    """The sender of a message cannot be told (no credentials, or it is gone)."""


class KnownSender:
    """A sender, with an open /proc/PID/stat that tells whether it is still that process.

    The fd pins the struct pid the number named when it was opened: reading it fails (ESRCH)
    once that pid has no task (the process exited, or a kmod move gave it a new pid). While it
    reads, the number still names the same process, whose namespace and pid there are fixed
    (a move always allocates a new pid), so one pread() per message proves the cached view.
    """

    __slots__ = ("pid", "fd", "source", "pid_in_ns", "peer")

    def __init__(self, pid: int, fd: int, source: Namespace | None, pid_in_ns: int) -> None:
        self.pid = pid
        self.fd = fd
        self.source = source
        self.pid_in_ns = pid_in_ns
        self.peer: Peer | None = None  # built for the first message's credentials

    def state(self) -> str | None:
        """The process's state letter now, or None if it is not that process any more."""
        try:
            stat = os.pread(self.fd, 1024, 0)  # "PID (COMM) S ...": comm may hold ")"
        except OSError:
            return None
        return chr(stat[stat.rindex(b")") + 2])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_known(pid: int, registry: dict[str, Namespace]) -> tuple[KnownSender, str]:
    """Open the view of ``pid``: its /proc/PID/stat kept open, its namespace, its pid there;
    returns it with the state letter.

    The stat fd is opened first and read last: if that read works, the same process held the
    pid throughout, so the namespace link and the status read in between are its own.
    """
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise Unidentified(f"pid {pid} is gone: {exc.strerror}") from None
    try:
        link = os.readlink(f"/proc/{pid}/ns/pid")  # "pid:[INODE]"
        status_fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            status = os.read(status_fd, 16384)
        finally:
            os.close(status_fd)
    except OSError as exc:
        os.close(fd)
        raise Unidentified(f"pid {pid} is gone: {exc.strerror}") from None
    pid_in_ns = int(_status_field(status, b"NSpid").split()[-1])
    known = KnownSender(pid, fd, _registered(link, registry), pid_in_ns)
    state = known.state()
    if state is None:
        known.close()
        raise Unidentified(f"pid {pid} is gone")
    return known, state


def locate(pid: int, registry: dict[str, Namespace]) -> tuple[int, Namespace | None, int, str]:
    """(pid, its registered namespace or None, its pid there, its state letter).

    The legacy path's look-up, kept as it was (one readlink, one read of /proc/PID/status per
    request); the event loop keeps a view per connection instead (open_known).
    """
    try:
        link = os.readlink(f"/proc/{pid}/ns/pid")  # "pid:[INODE]"
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
    except OSError as exc:
        raise Unidentified(f"pid {pid} is gone: {exc.strerror}") from None
    pid_in_ns = int(_status_field(status, b"NSpid").split()[-1])
    return pid, _registered(link, registry), pid_in_ns, _status_field(status, b"State")[:1].decode()


def _registered(link: str, registry: dict[str, Namespace]) -> Namespace | None:
    """The registered namespace a /proc/PID/ns/pid link ("pid:[INODE]") names, if any."""
    inode = int(link[link.index("[") + 1 : -1])
    return next((ns for ns in registry.values() if ns.inode == inode), None)


def _status_field(status: bytes, name: bytes) -> bytes:
    """The value of one ``Name:\tvalue`` line of /proc/PID/status."""
    start = status.index(b"\n" + name + b":") + len(name) + 2
    return status[start : status.index(b"\n", start)].strip()
