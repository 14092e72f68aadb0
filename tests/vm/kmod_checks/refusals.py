"""Every refusal with its errno; a refused process is left exactly as it was."""

from __future__ import annotations

import os
import signal
import threading
import time

from harness import (
    Namespace,
    Subject,
    check,
    exists,
    ioctl_errno,
    lib,
    migrate_errno,
    nspid,
    seize,
    stats,
    status,
    stop,
    uapi,
)


@check
def refusals() -> dict:
    a, b = Namespace("RA", 1), Namespace("RB", 1)
    out: dict = {}
    try:
        s = Subject(a)

        def snap():
            return {"inside": s.call("state"), "outside": s.outside()}

        base = snap()
        out["base"] = base
        cases: dict = {}
        cases["nonexistent_pid"] = migrate_errno(4_000_000, b.path)
        cases["zero_pid"] = migrate_errno(0, b.path)
        cases["kernel_thread"] = migrate_errno(2, b.path)  # kthreadd
        cases["namespace_init"] = migrate_errno(a.init, b.path)
        cases["global_init"] = migrate_errno(1, b.path)
        cases["same_namespace"] = migrate_errno(s.gpid, a.path)
        net = os.open("/proc/self/ns/net", os.O_RDONLY)
        cases["target_net_ns"] = migrate_errno(s.gpid, net)
        os.close(net)
        reg = os.open("/proc/self/status", os.O_RDONLY)
        cases["target_regular_file"] = migrate_errno(s.gpid, reg)
        os.close(reg)
        cases["target_bad_fd"] = migrate_errno(s.gpid, 987)
        cases["target_negative_fd"] = migrate_errno(s.gpid, -3)
        cases["parent_outside_target"] = migrate_errno(s.gpid, b.path, parent=a.children()[0])
        # Without CAP_SYS_ADMIN: open the device as root, then drop to nobody.
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            lib._device()
            ns_fd = os.open(b.path, os.O_RDONLY)
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, str(migrate_errno(s.gpid, ns_fd)).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        cases["no_cap_sys_admin"] = int(os.read(r, 100))
        os.close(r)
        os.close(w)
        out["unchanged_after_simple"] = snap()

        s.kill()

        s = Subject(a)
        s.call("child")
        time.sleep(0.2)
        cases["has_children"] = migrate_errno(s.gpid, b.path)
        out["children_state"] = {"outside": s.outside()}
        os.kill(s.gpid, signal.SIGKILL)
        s.kill()

        s = Subject(a)
        before_traced = s.outside()
        tracer = seize(s.gpid)
        cases["traced"] = migrate_errno(s.gpid, b.path)
        out["traced_state"] = {"before": before_traced, "after": s.outside()}
        os.kill(tracer, signal.SIGKILL)
        os.waitpid(tracer, 0)
        out["traced_alive_after_tracer_exit"] = exists(s.gpid)
        s.kill()

        # A stopped process never reaches a safe point: the wait is bounded.
        s = Subject(a)
        stop(s.gpid)
        t0 = time.monotonic()
        cases["stopped_timeout"] = migrate_errno(s.gpid, b.path, timeout=1.0)
        out["timeout_elapsed"] = time.monotonic() - t0
        os.kill(s.gpid, signal.SIGCONT)
        time.sleep(0.3)
        out["after_timeout"] = {"inside": s.call("state"), "outside": s.outside()}

        # The target's init has died: the namespace is gone but the fd is still open.
        dead = Namespace("RDEAD", 1)
        os.kill(dead.init, signal.SIGKILL)
        os.waitpid(dead.init, 0)
        time.sleep(0.2)
        cases["target_init_dead"] = migrate_errno(s.gpid, dead.ns_fd)
        os.close(dead.ns_fd)
        out["after_dead_target"] = {"inside": s.call("state"), "outside": s.outside()}

        # The process is SIGKILLed while its migration is queued.
        stop(s.gpid)
        res: dict = {}

        def waiter():
            res["errno"] = migrate_errno(s.gpid, b.path, timeout=20.0)

        th = threading.Thread(target=waiter)
        th.start()
        time.sleep(0.5)
        os.kill(s.gpid, signal.SIGKILL)
        th.join(30)
        cases["killed_while_queued"] = res.get("errno", "hung")
        s.kill()
        out["b_children_after_kill"] = b.children()

        # A waiter interrupted by a signal leaves the process as it was.
        s = Subject(a)
        stop(s.gpid)
        st0 = stats()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:

            class Interrupted(Exception):
                pass

            def on_alarm(*_):
                raise Interrupted

            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            try:
                # the caller (this child) is not the parent (the runner): say it may lose it
                lib.migrate(s.gpid, b.path, timeout=20.0, leave_parent=True)
                msg = "migrated"
            except Interrupted:
                msg = "interrupted"
            except OSError as e:
                msg = f"errno {e.errno}"
            os.write(w, msg.encode())
            os._exit(0)
        os.waitpid(pid, 0)
        out["interrupted_waiter"] = os.read(r, 100).decode()
        os.close(r)
        os.close(w)
        out["eintr_counted"] = stats()["refused_eintr"] - st0["refused_eintr"]
        os.kill(s.gpid, signal.SIGCONT)
        time.sleep(0.5)
        out["after_interrupt"] = {"inside": s.call("state"), "outside": s.outside()}
        s.kill()
        out["cases"] = cases
        return out
    finally:
        a.kill()
        b.kill()


@check
def traced_then_stopped() -> dict:
    """A process whose tracer exited, then stopped, then asked to migrate, then continued."""
    a, b = Namespace("TA", 1), Namespace("TB", 1)
    steps: dict = {}
    try:
        s = Subject(a)
        tracer = seize(s.gpid)
        steps["traced"] = migrate_errno(s.gpid, b.path)
        os.kill(tracer, signal.SIGKILL)
        os.waitpid(tracer, 0)
        steps["alive_after_tracer_exit"] = exists(s.gpid)
        stop(s.gpid)
        steps["state_when_stopped"] = status(s.gpid)["State"]
        steps["stopped_timeout"] = migrate_errno(s.gpid, b.path, timeout=1.0)
        steps["alive_after_timeout"] = exists(s.gpid)
        os.kill(s.gpid, signal.SIGCONT)
        time.sleep(0.5)
        steps["alive_after_cont"] = exists(s.gpid)
        try:
            _, st = os.waitpid(s.gpid, os.WNOHANG)
            steps["wait_status"] = st
        except ChildProcessError:
            steps["wait_status"] = "ECHILD"
        if exists(s.gpid):
            steps["state"] = s.call("state")
        return steps
    finally:
        a.kill()
        b.kill()


@check
def bad_ioctl() -> dict:
    """Malformed requests, bad pointers and unknown commands."""
    import fcntl

    dev = lib._device()
    a, b = Namespace("BA", 1), Namespace("BB", 1)
    s = Subject(a)
    res: dict = {}

    def call(req_bytes: bytes | int, cmd: int = uapi.IOC_MIGRATE) -> int:
        arg = req_bytes if isinstance(req_bytes, int) else bytearray(req_bytes)
        return ioctl_errno(dev, cmd, arg)

    def req(**kw) -> bytes:
        base = dict(
            size=uapi.REQ_SIZE_VER1, version=uapi.ABI_VERSION, pid=s.gpid, target_fd=b.ns_fd
        )
        base.update(kw)
        return bytes(uapi.NsmigrateReq(**base))

    try:
        res["size_0"] = call(req(size=0))
        res["size_8"] = call(req(size=8))
        res["size_63"] = call(req(size=63))
        res["size_huge"] = call(req(size=1 << 20))
        res["version_0"] = call(req(version=0))
        res["version_3"] = call(req(version=3))
        res["v1_with_v2_flag"] = call(req(version=1, flags=uapi.F_LEAVE_PARENT))
        res["unknown_flag"] = call(req(flags=1 << 7))
        res["timeout_too_long"] = call(req(timeout_ns=uapi.MAX_TIMEOUT_NS + 1))
        res["negative_pid"] = call(req(pid=-5))
        res["huge_pid"] = call(req(pid=2**31 - 1))
        res["negative_fd"] = call(req(target_fd=-1))
        res["bad_pidfd"] = call(req(flags=uapi.F_PIDFD, pid=-1))
        res["null_pointer"] = call(0)
        res["unmapped_pointer"] = call(0xDEAD0000)
        res["kernel_pointer"] = call(0xFFFF888000000000)
        res["unknown_cmd"] = call(req(), cmd=uapi.IOC_MIGRATE + 5)
        res["version_ioctl"] = fcntl.ioctl(dev, uapi.IOC_VERSION)
        # A version-1 caller (same struct, same command number) still moves a process.
        s1 = Subject(a)
        res["v1_request"] = call(req(version=1, pid=s1.gpid))
        big = req(size=uapi.REQ_SIZE_VER2 + 8) + b"\1" * 8
        res["size_80_nonzero_tail"] = ioctl_errno(dev, uapi.IOC_MIGRATE, bytearray(big))
        res["reserved_nonzero"] = call(req(size=uapi.REQ_SIZE_VER2, reserved=1))
        res["state_after"] = s.outside()
        # A larger struct from a newer caller with a zero tail is accepted.
        s2 = Subject(a)
        big = req(size=uapi.REQ_SIZE_VER2 + 8, pid=s2.gpid) + b"\0" * 8
        res["size_80_zero_tail"] = ioctl_errno(dev, uapi.IOC_MIGRATE, bytearray(big))
        # The two pidfd forms.
        pidfd_task = os.pidfd_open(s.gpid)
        pidfd_target = os.pidfd_open(b.init)
        m = lib.migrate(pidfd_task, pidfd_target, pidfd=True)
        res["pidfd_migration"] = {
            "pid": m.pid,
            "global_pid": m.global_pid,
            "nspid": nspid(m.global_pid),
            "b_init": b.init,
        }
        os.close(pidfd_task)
        os.close(pidfd_target)
        return res
    finally:
        a.kill()
        b.kill()


def module_refs() -> int:
    with open("/sys/module/nsmigrate/refcnt") as f:
        return int(f.read())


@check
def abandoned_work() -> dict:
    """F17: requests that time out on a stopped process leave nothing queued on it."""
    a, b = Namespace("AWA", 1), Namespace("AWB", 1)
    try:
        s = Subject(a)
        stop(s.gpid)
        refs0 = module_refs()
        codes = [migrate_errno(s.gpid, b.path, timeout=1e-9) for _ in range(50)]
        refs1 = module_refs()
        os.kill(s.gpid, signal.SIGCONT)
        time.sleep(0.3)
        return {
            "codes": sorted(set(codes)),
            "module_refs_added": refs1 - refs0,
            "after": s.outside(),
            "still_answers": s.call("state")["pid"],
        }
    finally:
        a.kill()
        b.kill()
