"""Guest side of the kernel-module suite: run every check in one boot, record observations.

Run inside the VM testbed as root with the module loaded:
    python3 tests/vm/kmod_checks.py OUT_DIR [check ...]
Each check records what it observed (PIDs, errnos, states) into OUT_DIR/kmod_checks.json;
tests/test_kmod_vm.py makes the assertions on the host. Standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from nsexp import lib, uapi  # noqa: E402
from nsexp.nsutil import CLONE_NEWPID, setns, unshare  # noqa: E402

libc = ctypes.CDLL(None, use_errno=True)
WORK = "/tmp/nsm-checks"


def status(gpid: int) -> dict[str, str]:
    """/proc/PID/status of a global PID as a dict."""
    out = {}
    with open(f"/proc/{gpid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def starttime(gpid: int) -> int:
    with open(f"/proc/{gpid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def nspid(gpid: int) -> list[int]:
    return [int(x) for x in status(gpid)["NSpid"].split()]


def stop(gpid: int) -> None:
    """SIGSTOP and wait until the process is really stopped (delivery is asynchronous)."""
    os.kill(gpid, signal.SIGSTOP)
    for _ in range(200):
        if status(gpid)["State"].startswith("T"):
            return
        time.sleep(0.01)
    raise TimeoutError(f"{gpid} did not stop")


def exists(gpid: int) -> bool:
    return os.path.exists(f"/proc/{gpid}")


def fork_into(ns_fd: int | None, child) -> int:
    """Fork ``child()`` as a process of the PID namespace ``ns_fd`` (None: this one)."""
    self_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)
    try:
        if ns_fd is not None:
            setns(ns_fd, CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child()
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        return pid
    finally:
        setns(self_ns, CLONE_NEWPID)
        os.close(self_ns)


def sleeper() -> None:
    while True:
        time.sleep(1000)


class Namespace:
    """A PID namespace whose init forks ``children`` sleepers and reaps (and logs) any child."""

    def __init__(self, name: str, children: int) -> None:
        self.name = name
        self.reaped_log = f"{WORK}/{name}.reaped"
        open(self.reaped_log, "w").close()
        r, w = os.pipe()
        self_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)
        unshare(CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                self._init_main(children, w)
            finally:
                os._exit(1)
        setns(self_ns, CLONE_NEWPID)
        os.close(self_ns)
        os.close(w)
        with os.fdopen(r) as f:
            f.readline()  # the init has forked its children
        self.init = pid
        self.ns_fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY)
        self.path = f"/proc/{pid}/ns/pid"

    def _init_main(self, children: int, ready_fd: int) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
        for _ in range(children):
            if os.fork() == 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
                sleeper()
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
        log = open(self.reaped_log, "a")
        while True:
            while True:
                try:
                    pid, st = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                log.write(f"{pid} {st}\n")
                log.flush()
            signal.sigtimedwait([signal.SIGCHLD], 0.5)

    def children(self) -> list[int]:
        with open(f"/proc/{self.init}/task/{self.init}/children") as f:
            return [int(x) for x in f.read().split()]

    def reaped(self) -> list[list[int]]:
        with open(self.reaped_log) as f:
            return [[int(x) for x in line.split()] for line in f if line.strip()]

    def ps(self) -> list[int]:
        """PIDs listed by ps run inside the namespace with its own /proc."""
        out = subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.init),
                "-p",
                "--",
                "unshare",
                "-m",
                "--mount-proc",
                "ps",
                "-e",
                "-o",
                "pid=",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return sorted(int(x) for x in out.stdout.split())

    def kill(self) -> None:
        """SIGKILL the init, and with it the namespace.

        The init waits in zap_pid_ns_processes() until every process of the namespace is
        reaped, including ones this runner forked in with setns(): reap whatever exits.
        """
        try:
            os.kill(self.init, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while True:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == self.init:
                break
        os.close(self.ns_fd)


# A robust, process-shared mutex in shared memory: its owner field is libc's cached TID.
ROBUST = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)
_MUTEX = ctypes.c_char.from_buffer(ROBUST)
_ATTR = ctypes.create_string_buffer(16)
libc.pthread_mutexattr_init(_ATTR)
libc.pthread_mutexattr_setrobust(_ATTR, 1)
libc.pthread_mutexattr_setpshared(_ATTR, 1)
libc.pthread_mutex_init(ctypes.byref(_MUTEX), _ATTR)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def robust_lock_with_timeout(seconds: float) -> int:
    """pthread_mutex_timedlock on the shared robust mutex: 0, EOWNERDEAD or ETIMEDOUT."""
    deadline = time.time() + seconds
    ts = _Timespec(int(deadline), int((deadline % 1) * 1e9))
    return libc.pthread_mutex_timedlock(ctypes.byref(_MUTEX), ctypes.byref(ts))


class Subject:
    """A process with state (counter, open file, anonymous mapping) answering commands."""

    def __init__(self, ns: Namespace | None) -> None:
        a, b = socket.socketpair()
        self.gpid = fork_into(ns.ns_fd if ns else None, lambda: self._main(b))
        b.close()
        self.sock = a
        self.rfile = a.makefile("r")

    def call(self, cmd: str, **kw) -> dict:
        self.sock.sendall((json.dumps({"cmd": cmd, **kw}) + "\n").encode())
        line = self.rfile.readline()
        if not line:
            raise EOFError(f"subject {self.gpid} closed its socket")
        return json.loads(line)

    @staticmethod
    def _main(sock: socket.socket) -> None:
        counter = 0
        f = open(f"{WORK}/subject-{os.getpid()}-{time.monotonic_ns()}", "w+")
        f.write("file-state")
        f.flush()
        anon = mmap.mmap(-1, 8192)
        anon[:12] = b"anon-state!!"
        kept: list = []
        rfile = sock.makefile("r")
        for line in rfile:
            req = json.loads(line)
            cmd = req["cmd"]
            rep: dict = {}
            if cmd == "state":
                f.seek(0)
                rep = {
                    "pid": os.getpid(),
                    "ppid": os.getppid(),
                    "gpid": int(os.readlink("/proc/self")),
                    "counter": counter,
                    "file": f.read(),
                    "anon": anon[:12].decode(),
                    "starttime": starttime(int(os.readlink("/proc/self"))),
                    "sid": os.getsid(0),
                    "pgid": os.getpgid(0),
                    "threads": threading.active_count(),
                }
            elif cmd == "incr":
                for _ in range(req.get("n", 1)):
                    counter += 1
                rep = {"counter": counter, "pid": os.getpid()}
            elif cmd == "fork":
                r, w = os.pipe()
                child = os.fork()
                if child == 0:
                    me = int(os.readlink("/proc/self"))
                    os.write(
                        w,
                        json.dumps(
                            {"pid": os.getpid(), "ppid": os.getppid(), "nspid": nspid(me)}
                        ).encode(),
                    )
                    os._exit(0)
                os.close(w)
                rep = json.loads(os.read(r, 4096))
                os.close(r)
                _, st = os.waitpid(child, 0)
                rep["waited_status"] = st
            elif cmd == "thread":
                t = threading.Thread(target=time.sleep, args=(1000,), daemon=True)
                t.start()
                kept.append(t)
            elif cmd == "child":
                child = os.fork()
                if child == 0:
                    sleeper()
                kept.append(child)
            elif cmd == "robust":
                # Lock with libc's idea of our TID, then die holding it.
                rep = {"lock": libc.pthread_mutex_lock(ctypes.byref(_MUTEX))}
                sock.sendall((json.dumps(rep) + "\n").encode())
                os._exit(0)
            elif cmd == "exit":
                sock.sendall(b"{}\n")
                os._exit(req.get("code", 0))
            sock.sendall((json.dumps(rep) + "\n").encode())
        os._exit(0)

    def outside(self, gpid: int | None = None) -> dict:
        gpid = gpid or self.gpid
        st = status(gpid)
        return {
            "nspid": [int(x) for x in st["NSpid"].split()],
            "ppid": int(st["PPid"]),
            "starttime": starttime(gpid),
        }

    def kill(self) -> None:
        try:
            os.kill(self.gpid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.gpid, 0)
        except ChildProcessError:
            pass


def migrate_errno(pid: int, target, **kw) -> int:
    try:
        lib.migrate(pid, target, **kw)
    except OSError as e:
        return e.errno
    return 0


def stats() -> dict[str, int]:
    with open("/proc/nsmigrate") as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


def slab_objects(prefixes: tuple[str, ...]) -> dict[str, int]:
    """Active objects per slab cache whose name starts with one of ``prefixes``.

    SLUB counts objects sitting in per-CPU slabs as active; shrinking the cache first flushes
    those, so that the count is of objects really in use.
    """
    for name in os.listdir("/sys/kernel/slab"):
        if name.startswith(prefixes):
            try:
                with open(f"/sys/kernel/slab/{name}/shrink", "w") as f:
                    f.write("1")
            except OSError:
                pass
    out = {}
    with open("/proc/slabinfo") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0].startswith(prefixes):
                out[parts[0]] = int(parts[1])
    return out


def settle() -> None:
    """Let RCU-delayed frees (put_pid after free_pid) finish."""
    for _ in range(3):
        time.sleep(0.5)
        subprocess.run(["sync"], check=False)


CHECKS: dict[str, callable] = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


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

        s.call("thread")
        cases["multi_threaded"] = migrate_errno(s.gpid, b.path)
        out["threaded_state"] = snap()
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
        tracer = os.fork()
        if tracer == 0:
            if libc.ptrace(0x4206, s.gpid, None, None) != 0:  # PTRACE_SEIZE
                os._exit(1)
            time.sleep(60)
            os._exit(0)
        time.sleep(0.5)
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
                lib.migrate(s.gpid, b.path, timeout=20.0)
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
        tracer = os.fork()
        if tracer == 0:
            if libc.ptrace(0x4206, s.gpid, None, None) != 0:  # PTRACE_SEIZE
                os._exit(1)
            time.sleep(60)
            os._exit(0)
        time.sleep(0.5)
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
        if isinstance(req_bytes, int):
            return ioctl_ptr(dev, cmd, req_bytes)
        try:
            fcntl.ioctl(dev, cmd, bytearray(req_bytes), True)
        except OSError as e:
            return e.errno
        return 0

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
        res["version_2"] = call(req(version=2))
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
        big = req(size=uapi.REQ_SIZE_VER1 + 8) + b"\1" * 8
        res["size_72_nonzero_tail"] = _ioctl_buf(dev, big)
        res["state_after"] = s.outside()
        # A larger struct from a newer caller with a zero tail is accepted.
        s2 = Subject(a)
        big = req(size=uapi.REQ_SIZE_VER1 + 8, pid=s2.gpid) + b"\0" * 8
        res["size_72_zero_tail"] = _ioctl_buf(dev, big)
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


def ioctl_ptr(dev: int, cmd: int, ptr: int) -> int:
    """ioctl(2) with a raw pointer argument (fcntl.ioctl only takes a C int); the errno."""
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    rc = libc.ioctl(dev, cmd, ptr)
    return ctypes.get_errno() if rc == -1 else 0


def _ioctl_buf(dev: int, data: bytes) -> int:
    import fcntl

    try:
        fcntl.ioctl(dev, uapi.IOC_MIGRATE, bytearray(data), True)
    except OSError as e:
        return e.errno
    return 0


@check
def stress_back_and_forth() -> dict:
    n = int(os.environ.get("NSM_BACK_AND_FORTH", "10000"))
    a, b = Namespace("SA", 2), Namespace("SB", 2)
    try:
        s = Subject(a)
        s.call("incr", n=5)
        start = s.outside()["starttime"]
        settle()
        slab0 = slab_objects(("pid", "nsproxy"))
        fd = {0: a.ns_fd, 1: b.ns_fd}
        gpid = s.gpid
        errors = 0
        t0 = time.monotonic()
        for i in range(n):
            try:
                gpid = lib.__migrate(gpid, fd[(i + 1) % 2]).global_pid
            except OSError:
                errors += 1
            if i % 1000 == 0:
                print(f"back-and-forth {i}/{n}", flush=True)
        elapsed = time.monotonic() - t0
        s.gpid = gpid
        state = s.call("state")
        settle()
        slab1 = slab_objects(("pid", "nsproxy"))
        return {
            "n": n,
            "errors": errors,
            "elapsed_s": elapsed,
            "state": state,
            "start": start,
            "slab_before": slab0,
            "slab_after": slab1,
            "final_nspid": nspid(gpid),
            "a_children": a.children(),
            "b_children": b.children(),
            "gpid": gpid,
        }
    finally:
        a.kill()
        b.kill()


def churn(stop_after: float) -> None:
    """Fork and reap short-lived children until ``stop_after`` seconds have passed."""
    end = time.monotonic() + stop_after
    while time.monotonic() < end:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)


@check
def stress_concurrent() -> dict:
    per = int(os.environ.get("NSM_CONCURRENT_EACH", "200"))
    a, b = Namespace("CA", 1), Namespace("CB", 1)
    churners = [fork_into(ns.ns_fd, lambda: churn(60)) for ns in (a, b)]
    try:
        subjects = [Subject(a) for _ in range(8)]
        for i, s in enumerate(subjects):
            s.call("incr", n=i)
        results: dict[int, dict] = {}
        targets = (b.ns_fd, a.ns_fd)

        def run(idx: int, s: Subject) -> None:
            gpid, errs = s.gpid, []
            for i in range(per):
                try:
                    gpid = lib.__migrate(gpid, targets[i % 2]).global_pid
                except OSError as e:
                    errs.append(e.errno)
            results[idx] = {"gpid": gpid, "errors": errs}

        threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(subjects)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        elapsed = time.monotonic() - t0
        states = []
        for i, s in enumerate(subjects):
            s.gpid = results.get(i, {}).get("gpid", s.gpid)
            states.append({"counter": s.call("state")["counter"], "nspid": nspid(s.gpid)})
        return {
            "per": per,
            "results": results,
            "states": states,
            "elapsed_s": elapsed,
            "alive_threads": sum(t.is_alive() for t in threads),
        }
    finally:
        for c in churners:
            os.kill(c, signal.SIGKILL)
            os.waitpid(c, 0)
        a.kill()
        b.kill()


@check
def target_init_killed_in_burst() -> dict:
    a = Namespace("KA", 1)
    b = Namespace("KB", 2)
    subjects = [Subject(a) for _ in range(6)]
    errs: dict[int, list] = {}

    stop_burst = threading.Event()

    def run(idx: int, s: Subject) -> None:
        # Keep migrating until well after B's init is dead, so that some moves race its death.
        gpid, out = s.gpid, []
        for i in range(5000):
            if stop_burst.is_set() and i % 2 == 0:
                break
            try:
                target = b.ns_fd if i % 2 == 0 else a.ns_fd
                gpid = lib.__migrate(gpid, target).global_pid
                out.append(0)
            except OSError as e:
                out.append(e.errno)
        errs[idx] = out

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(subjects)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    os.kill(b.init, signal.SIGKILL)
    t0 = time.monotonic()
    os.waitpid(b.init, 0)
    init_reaped_after = time.monotonic() - t0
    time.sleep(0.5)
    stop_burst.set()
    for t in threads:
        t.join(120)
    codes = sorted({e for v in errs.values() for e in v})
    for s in subjects:
        s.kill()
    os.close(b.ns_fd)
    a.kill()
    return {
        "codes": codes,
        "init_reaped_after_s": init_reaped_after,
        "hung_threads": sum(t.is_alive() for t in threads),
    }


@check
def fuzz() -> dict:
    """Random ioctl calls; the valid-looking ones only ever name sacrificial processes."""
    import fcntl

    n = int(os.environ.get("NSM_FUZZ", "100000"))
    a, b = Namespace("FA", 1), Namespace("FB", 1)
    victims = [Subject(a) for _ in range(2)]
    rng = random.Random(int(os.environ.get("NSM_FUZZ_SEED", "1")))
    dev = lib._device()
    other = os.open("/proc/self/ns/net", os.O_RDONLY)
    pid_choices = [0, -1, 1, 2, 2**31 - 1, 4_000_000, a.init] + [v.gpid for v in victims]
    fd_choices = [-1, 0, 1, 2, 999, dev, other, a.ns_fd, b.ns_fd]
    counts: dict[int, int] = {}
    try:
        for i in range(n):
            kind = rng.random()
            if kind < 0.1:
                arg: int | bytearray = rng.choice(
                    [0, 1, 0xDEAD0000, 0xFFFF888000000000, rng.getrandbits(64)]
                )
            elif kind < 0.4:
                arg = bytearray(rng.getrandbits(8) for _ in range(rng.choice([4, 8, 64, 72])))
            else:
                r = uapi.NsmigrateReq(
                    size=rng.choice([uapi.REQ_SIZE_VER1] * 6 + [0, 63, 65, 4096, 4097]),
                    version=rng.choice([1, 1, 1, 0, 2]),
                    flags=rng.choice([0, 0, 0, 1, 2, 3, 4, 0x80000000]),
                    pid=rng.choice(pid_choices),
                    target_fd=rng.choice(fd_choices),
                    parent=rng.choice([0, -1, 1, a.init, b.init]),
                    timeout_ns=rng.choice([0, 1, 1000, 10**9, 2**64 - 1]),
                )
                arg = bytearray(r)
            cmd = uapi.IOC_MIGRATE if rng.random() < 0.95 else rng.getrandbits(32)
            if isinstance(arg, int):
                e = ioctl_ptr(dev, cmd, arg)
            else:
                try:
                    fcntl.ioctl(dev, cmd, arg, True)
                    e = 0
                except OSError as ex:
                    e = ex.errno
            counts[e] = counts.get(e, 0) + 1
            if i % 20000 == 0:
                print(f"fuzz {i}/{n}", flush=True)
        return {"n": n, "counts": counts}
    finally:
        os.close(other)
        for v in victims:
            v.kill()
        a.kill()
        b.kill()


def main() -> int:
    out_dir = sys.argv[1]
    wanted = sys.argv[2:] or list(CHECKS)
    os.makedirs(WORK, exist_ok=True)
    results: dict = {"uname": os.uname().release}
    path = os.path.join(out_dir, "kmod_checks.json")
    results["stats_before"] = stats()
    results["slab_start"] = slab_objects(("pid", "nsproxy"))
    for name in wanted:
        t0 = time.monotonic()
        print(f"check {name} ...", flush=True)
        try:
            results[name] = {"ok": True, "data": CHECKS[name]()}
        except BaseException as e:  # record and go on: one boot runs every check
            results[name] = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            }
        results[name]["seconds"] = time.monotonic() - t0
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
    settle()
    results["stats_after"] = stats()
    results["slab_end"] = slab_objects(("pid", "nsproxy"))
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
