"""What a migration does: state kept, next PID, parent, session, the paper's chain."""

from __future__ import annotations

import ctypes
import errno
import os
import time

from harness import (
    _MUTEX,
    Namespace,
    Subject,
    check,
    exists,
    lib,
    libc,
    nspid,
    robust_lock_with_timeout,
)


@check
def basic() -> dict:
    a, b = Namespace("A", 2), Namespace("B", 3)
    try:
        s = Subject(a)
        s.call("incr", n=42)
        before = {"inside": s.call("state"), "outside": s.outside(), "ps_a": a.ps()}
        m = lib.migrate(s.gpid, b.path)
        after_in = s.call("state")
        after = {
            "inside": after_in,
            "outside": s.outside(m.global_pid),
            "old_gpid_exists": exists(s.gpid) and s.gpid != m.global_pid,
            "ps_a": a.ps(),
            "ps_b": b.ps(),
            "b_init_children": b.children(),
            "runner_children": open(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
            .read()
            .split(),
        }
        forked = s.call("fork")
        robust_lock = s.call("robust")
        time.sleep(0.5)
        # Another process takes the mutex the migrated process died holding.
        got = robust_lock_with_timeout(3.0)
        if got == errno.EOWNERDEAD:
            libc.pthread_mutex_consistent(ctypes.byref(_MUTEX))
        libc.pthread_mutex_unlock(ctypes.byref(_MUTEX))
        time.sleep(1.0)
        try:
            os.waitpid(s.gpid, os.WNOHANG)
            old_parent_wait = "child"
        except ChildProcessError:
            old_parent_wait = "ECHILD"
        return {
            "a_init": a.init,
            "b_init": b.init,
            "before": before,
            "after": after,
            "migration": m.__dict__,
            "forked": forked,
            "robust_lock": robust_lock,
            "robust_next_lock": got,
            "b_reaped": b.reaped(),
            "a_reaped": a.reaped(),
            "old_parent_wait": old_parent_wait,
            "new_gpid_exists_after_exit": exists(m.global_pid),
        }
    finally:
        a.kill()
        b.kill()


@check
def chain() -> dict:
    """The paper's layout: C1_A is PID 3 of NS2, then hops to NS3, NS4, NS5."""
    nss = [Namespace("NS2", 1), Namespace("NS3", 3), Namespace("NS4", 4), Namespace("NS5", 5)]
    try:
        s = Subject(nss[0])
        start = s.outside()["starttime"]
        hops = []
        for i, ns in enumerate(nss):
            if i:
                m = lib.migrate(s.gpid, ns.path)
                s.gpid = m.global_pid
            rep = s.call("incr", n=100)
            st = s.call("state")
            hops.append(
                {
                    "ns": ns.name,
                    "value": rep["counter"],
                    "pid": rep["pid"],
                    "starttime": st["starttime"],
                    "ppid": st["ppid"],
                }
            )
        return {"hops": hops, "start": start}
    finally:
        for ns in nss:
            ns.kill()


@check
def parent_flag() -> dict:
    a, b = Namespace("PA", 1), Namespace("PB", 2)
    try:
        s = Subject(a)
        new_parent = b.children()[0]
        m = lib.migrate(s.gpid, b.path, parent=new_parent)
        return {
            "ppid_outside": s.outside(m.global_pid)["ppid"],
            "expected": new_parent,
            "ppid_inside": s.call("state")["ppid"],
            "parent_nspid": nspid(new_parent),
        }
    finally:
        a.kill()
        b.kill()
