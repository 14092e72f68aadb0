"""kmod backend: the kernel module moves the very same process (nsexp.lib.__migrate).

The client waits in recv() on its manager connection while the module switches it; the kernel
restarts that syscall transparently and the process reads the reply with its new PID.
"""

from __future__ import annotations

import errno as errno_mod
import os
import time
from typing import Any

from nsexp.backends import Backend, BackendUnavailable, MigrationError, Namespace, Peer
from nsexp.backends import WorkerSide as _WorkerSide
from nsexp.lib import __migrate
from nsexp.uapi import DEVICE

# Bound at module level: the name __migrate written inside a class body would be name-mangled.
_kernel_migrate = __migrate


class ManagerSide(Backend):
    name = "kmod"

    def check(self) -> None:
        if not os.path.exists(DEVICE):
            raise BackendUnavailable(
                f"{DEVICE} does not exist: the nsmigrate module is not loaded here "
                "(use --testbed vm, or load the module on this host)"
            )

    def migrate(self, peer: Peer, target: Namespace, request: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic_ns()
        try:
            m = _kernel_migrate(peer.pid, target.fd)
        except OSError as exc:
            code = errno_mod.errorcode.get(exc.errno or 0, "EIO")
            raise MigrationError(
                code,
                f"__migrate({peer.pid}, {target.name}) failed: {exc.strerror or exc}",
                errno=exc.errno,
                client_gone=exc.errno == errno_mod.ESRCH,
                timings={"migrate_started": started},
            ) from None
        return {
            "pid": m.pid,
            "global_pid": m.global_pid,
            "timings": {
                "migrate_started": started,
                "kernel_queued": m.t_queued_ns,
                "kernel_switch_started": m.t_switch_start_ns,
                "kernel_done": m.t_switch_done_ns,
            },
        }


class WorkerSide(_WorkerSide):
    """Nothing to do: the same process continues after the reply."""

    name = "kmod"
