"""Helpers shared by every area of the guest-side module checks (tests/vm/kmod_checks/).

Runs inside the VM testbed as root with the module loaded; standard library only.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, REPO)

from nsexp import lib, uapi  # noqa: E402, F401 (uapi: re-exported to the checks)
from nsexp.nsutil import CLONE_NEWPID, private_proc, proc_info, setns, unshare  # noqa: E402

libc = ctypes.CDLL(None, use_errno=True)
WORK = "/tmp/nsm-checks"
#: slab caches whose object counts must come back to baseline (prefixes)
SLAB_CACHES = ("pid", "nsproxy", "task_struct", "posix_timers_cache", "signal_cache")


def status(gpid: int) -> dict[str, str]:
    """/proc/PID/status of a global PID as a dict."""
    out = {}
    with open(f"/proc/{gpid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def starttime(gpid: int) -> int:
    return proc_info(gpid).start_time


def tty_nr(gpid: int) -> int:
    """The controlling terminal's device number (0: none), from /proc/PID/stat."""
    with open(f"/proc/{gpid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[4])


def nspid(gpid: int) -> list[int]:
    return list(proc_info(gpid).nspids)


def nspid_of(status_path: str) -> list[int]:
    """The NSpid line of a /proc/.../status file."""
    with open(status_path) as f:
        line = next(line for line in f if line.startswith("NSpid:"))
    return [int(x) for x in line.split()[1:]]


def stop(gpid: int) -> None:
    """SIGSTOP and wait until the process is really stopped (delivery is asynchronous)."""
    os.kill(gpid, signal.SIGSTOP)
    for _ in range(200):
        if status(gpid)["State"].startswith("T"):
            return
        time.sleep(0.01)
    raise TimeoutError(f"{gpid} did not stop")


def seize(gpid: int) -> int:
    """Fork a tracer that PTRACE_SEIZEs ``gpid`` and then waits; its pid (kill it to detach)."""
    tracer = os.fork()
    if tracer == 0:
        if libc.ptrace(0x4206, gpid, None, None) != 0:  # PTRACE_SEIZE
            os._exit(1)
        time.sleep(60)
        os._exit(0)
    time.sleep(0.5)
    return tracer


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

    def __init__(self, name: str, children: int, *, own_proc: bool = False) -> None:
        """``own_proc``: the init and its children get a mount namespace with their own /proc."""
        self.name = name
        self.own_proc = own_proc
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
        if self.own_proc:
            private_proc()
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

    def ps_threads(self, pid: int) -> list[int]:
        """The thread IDs (LWP) of ``pid`` (a PID of this namespace) listed by ``ps -L`` run
        inside the namespace with its own /proc."""
        out = subprocess.run(
            ["nsenter", "-t", str(self.init), "-p", "--", "unshare", "-m", "--mount-proc"]
            + ["ps", "-L", "-o", "lwp=", "-p", str(pid)],
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
        scope: dict = dict(globals())  # the harness's helpers, for "run" commands
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
            elif cmd == "run":
                # A check's own code, run in the subject; ``result`` is the reply.
                scope["result"] = None
                try:
                    exec(req["code"], scope)
                    rep = {"result": scope["result"]}
                except Exception as e:  # reported, and the subject goes on serving
                    rep = {"result": None, "error": f"{type(e).__name__}: {e}"}
            elif cmd == "exit":
                sock.sendall(b"{}\n")
                os._exit(req.get("code", 0))
            sock.sendall((json.dumps(rep) + "\n").encode())
        os._exit(0)

    def join_mount_ns(self, path: str, cwd: str | None = None) -> None:
        """setns(CLONE_NEWNS) in the subject (single-threaded at that point), then chdir."""
        code = "from nsexp.nsutil import CLONE_NEWNS, setns; "
        code += f"setns(os.open({path!r}, os.O_RDONLY), CLONE_NEWNS)"
        if cwd is not None:
            code += f"; os.chdir({cwd!r})"
        joined = self.call("run", code=code)
        if "error" in joined:
            raise RuntimeError(f"the subject could not join the mount namespace {path}: {joined}")

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


def thread_views(gpid: int) -> dict[str, dict]:
    """Every live thread of ``gpid`` by global TID: its NSpid and its PID namespaces (active,
    and for children) as /proc shows them; a thread that exits meanwhile is left out."""
    out = {}
    for tid in os.listdir(f"/proc/{gpid}/task"):
        base = f"/proc/{gpid}/task/{tid}"
        try:
            out[tid] = {
                "nspid": nspid_of(f"{base}/status"),
                "ns": os.readlink(f"{base}/ns/pid"),
                "ns_for_children": os.readlink(f"{base}/ns/pid_for_children"),
            }
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def hop_errors(gpid: int, ns_fds: tuple[int, int], hops: int) -> tuple[int, list[int]]:
    """Move ``gpid`` back and forth ``hops`` times between two namespace fds (to ``ns_fds[1]``
    first); its global pid at the end, and the errno of each failed move."""
    errors = []
    for i in range(hops):
        try:
            gpid = lib.__migrate(gpid, ns_fds[(i + 1) % 2]).global_pid
        except OSError as e:
            errors.append(e.errno)
        if i % 1000 == 0:
            print(f"hops {i}/{hops}", flush=True)
    return gpid, errors


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
    """Register ``fn`` as a check, named after the function."""
    CHECKS[fn.__name__] = fn
    return fn


def ioctl_ptr(dev: int, cmd: int, ptr: int) -> int:
    """ioctl(2) with a raw pointer argument (fcntl.ioctl only takes a C int); the errno."""
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    rc = libc.ioctl(dev, cmd, ptr)
    return ctypes.get_errno() if rc == -1 else 0


def ioctl_errno(dev: int, cmd: int, arg: int | bytearray) -> int:
    """ioctl(2) with a buffer (the reply copied back into it) or a raw pointer; the errno."""
    if isinstance(arg, int):
        return ioctl_ptr(dev, cmd, arg)
    import fcntl

    try:
        fcntl.ioctl(dev, cmd, arg, True)
    except OSError as e:
        return e.errno
    return 0


def churn(stop_after: float) -> None:
    """Fork and reap short-lived children until ``stop_after`` seconds have passed."""
    end = time.monotonic() + stop_after
    while time.monotonic() < end:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)


# POSIX timers through raw syscalls (glibc's timer_t hides the kernel's timer id).
SYS_TIMER_CREATE, SYS_TIMER_SETTIME, SYS_TIMER_GETTIME, SYS_TIMER_DELETE = 222, 223, 224, 226
CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID, CLOCK_THREAD_CPUTIME_ID = 1, 2, 3
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID = 0, 1, 4


class Sigevent(ctypes.Structure):
    _fields_ = [
        ("value", ctypes.c_void_p),
        ("signo", ctypes.c_int),
        ("notify", ctypes.c_int),
        ("tid", ctypes.c_int),
        ("pad", ctypes.c_int * 11),
    ]


class Itimerspec(ctypes.Structure):
    _fields_ = [("interval", _Timespec), ("value", _Timespec)]


def _sys(nr: int, *args) -> int:
    rc = libc.syscall(ctypes.c_long(nr), *args)
    if rc == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def process_cpu_clock(pid: int) -> int:
    """The clockid of process ``pid``'s CPU clock (MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED))."""
    return ((~pid) << 3) | 2


def timer_create(clock: int, notify: int, signo: int = 0, tid: int = 0) -> int:
    """timer_create(2); the kernel's timer id."""
    sev = Sigevent(None, signo, notify, tid)
    tid_out = ctypes.c_int()
    _sys(SYS_TIMER_CREATE, ctypes.c_int(clock), ctypes.byref(sev), ctypes.byref(tid_out))
    return tid_out.value


def _ts(seconds: float) -> _Timespec:
    return _Timespec(int(seconds), int((seconds % 1) * 1e9))


def timer_settime(timer: int, value: float, interval: float = 0.0) -> int:
    """Arm (relative) ``timer``; 0 or the errno."""
    spec = Itimerspec(_ts(interval), _ts(value))
    try:
        _sys(SYS_TIMER_SETTIME, ctypes.c_int(timer), 0, ctypes.byref(spec), None)
    except OSError as e:
        return e.errno
    return 0


def timer_gettime(timer: int) -> float | int:
    """Seconds left on ``timer``, or minus the errno."""
    spec = Itimerspec()
    try:
        _sys(SYS_TIMER_GETTIME, ctypes.c_int(timer), ctypes.byref(spec))
    except OSError as e:
        return -e.errno
    return spec.value.tv_sec + spec.value.tv_nsec / 1e9


def timer_delete(timer: int) -> int:
    """timer_delete(2); 0 or the errno."""
    try:
        _sys(SYS_TIMER_DELETE, ctypes.c_int(timer))
    except OSError as e:
        return e.errno
    return 0


PROGS = os.path.join(REPO, "build", "kmod-progs")


class LineProgram:
    """A program from tests/vm/progs (built by its Makefile) run in a namespace, line by line.

    ``libc`` is "glibc" or "musl". Its parent is this runner, the caller of every migration.
    """

    def __init__(self, ns: Namespace, prog: str, libc: str = "glibc") -> None:
        path = os.path.join(PROGS, libc, prog)
        if not os.access(path, os.X_OK):
            raise FileNotFoundError(f"{path}: build it on the host: make -C tests/vm/progs")
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()

        def child() -> None:
            os.dup2(in_r, 0)
            os.dup2(out_w, 1)
            os.execv(path, [path])

        self.gpid = fork_into(ns.ns_fd, child)
        os.close(in_r)
        os.close(out_w)
        self.stdin = os.fdopen(in_w, "w")
        self.stdout = os.fdopen(out_r)

    def send(self, cmd: str) -> None:
        self.stdin.write(cmd + "\n")
        self.stdin.flush()

    def reply(self) -> dict[str, int]:
        line = self.stdout.readline()
        if not line:
            raise EOFError(f"program {self.gpid} closed its stdout")
        return {k: int(v) for k, v in (kv.split("=", 1) for kv in line.split())}

    def call(self, cmd: str) -> dict[str, int]:
        self.send(cmd)
        return self.reply()

    def wait(self) -> int:
        """Close stdin and reap: the exit status, or "gone" if it is no longer our child."""
        self.stdin.close()
        try:
            return os.waitpid(self.gpid, 0)[1]
        except ChildProcessError:
            return -1


def busy_counts() -> dict[str, int]:
    """The busy_* refusal reasons of /proc/nsmigrate."""
    return {k: v for k, v in stats().items() if k.startswith("busy_")}


def stats_delta(before: dict[str, int]) -> dict[str, int]:
    """Counters of /proc/nsmigrate that changed since ``before``."""
    now = stats()
    return {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}


def migrate_counted(pid: int, target, **kw) -> tuple[int, dict[str, int]]:
    """:func:`migrate_errno`, with the /proc/nsmigrate counters the attempt moved."""
    before = stats()
    code = migrate_errno(pid, target, **kw)
    return code, stats_delta(before)
