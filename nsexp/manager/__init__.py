"""The migration manager: a Unix-socket service in the global PID namespace.

One thread runs an event loop (epoll) over every client connection; a connection lives as
long as its process wants (a worker keeps one across all its hops). The caller of each request
is the sender the kernel names for that message: the listening socket has SO_PASSCRED, so every
message arrives with SCM_CREDENTIALS holding the sender's current pid, translated into the
manager's (global) namespace; a pid written in a request is never used. Pings, and kmod
migrations (the ioctl only waits for the requester, which waits for this reply), are served on
the loop; other migrations and hop records go to a pool of threads that grows on demand, so a
slow migration (restart, CRIU, a stopped requester) never stalls the loop or another client. A
connection with a request in flight is not read until it is answered: replies keep the order
of requests. Targets are resolved by name through a registry of open namespace fds, and a policy
of allowed (source, target) pairs is checked before the backend is called. Bad input gets an
error reply and is logged; serving goes on. Protocol v2 (frames, credentials, ops, errors):
docs/manager.md.

``legacy_threads=True`` runs the previous design (nsexp.manager.legacy) as a baseline for the
benchmark only. Standard library only: it runs inside the VM guest.
"""

from nsexp.manager.cli import cmd_manager, main, register_cli
from nsexp.manager.requests import FailureHook, RecordHook
from nsexp.manager.service import Manager

__all__ = ["FailureHook", "Manager", "RecordHook", "cmd_manager", "main", "register_cli"]
