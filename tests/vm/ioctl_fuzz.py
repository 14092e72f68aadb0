"""Guest side: an ioctl fuzzer for /dev/nsmigrate that looks like real use, under churn.

Run inside the VM as root with the module loaded (meant for the debug kernel):
    python3 tests/vm/ioctl_fuzz.py OUT_DIR      (NSM_IOCTL_FUZZ calls, default 100000)
It writes OUT_DIR/ioctl_fuzz.json; tests/test_kmod_debug.py makes the assertions.

Unlike the random-bytes part of kmod_checks/fuzz.py, most requests are well formed: random
flags, sizes, versions and timeouts, and processes and namespaces that exist, named by number
or by pidfd. Several workers call at once while their sacrificial processes fork, start
threads and exit on their own, and while namespaces are killed and made anew, so requests race
with exits, forks and dying namespaces. Only sacrificial processes are ever named: a victim's
PID is read from its pidfd right before the call (never a remembered number), and the other
numbers are ones no process can have. Standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import signal
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "kmod_checks"))

from harness import WORK, Namespace, fork_into, ioctl_errno, lib, settle, stats, uapi  # noqa: E402

#: errnos the module may answer; anything else is reported
EXPECTED = {
    0,
    errno.EINVAL,
    errno.ESRCH,
    errno.EPERM,
    errno.EBUSY,
    errno.ENXIO,
    errno.EINTR,
    errno.ETIMEDOUT,
    errno.EBADF,
    errno.EFAULT,
    errno.E2BIG,
    errno.ENOTTY,
}
#: numbers no process can have (pid_max is at most 2^22)
NO_SUCH_PIDS = [0, -1, -(2**31), 2**31 - 1, 4_194_305]
#: the whole request structure of this ABI (older callers pass REQ_SIZE_VER1 bytes)
FULL = ctypes.sizeof(uapi.NsmigrateReq)
NAMESPACES_PER_WORKER = 3
VICTIMS_PER_WORKER = 4


def victim_main(rng: random.Random) -> None:
    """A sacrificial process: sleeps, or now and then starts a thread or a child, and exits on
    its own after a while (the pauses leave the CPUs to the callers)."""
    mode = rng.choice(["sleep", "sleep", "fork", "thread"])
    end = time.monotonic() + rng.uniform(0.5, 6.0)
    while time.monotonic() < end:
        if mode == "fork":
            pid = os.fork()
            if pid == 0:
                time.sleep(rng.uniform(0, 0.02))
                os._exit(0)
            os.waitpid(pid, 0)
        elif mode == "thread":
            t = threading.Thread(target=time.sleep, args=(rng.uniform(0, 0.02),))
            t.start()
            t.join()
        time.sleep(rng.uniform(0.005, 0.05))


def pid_of(pidfd: int) -> int:
    """The process's PID now, as this process sees it (-1 once it has exited)."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return -1


class Worker:
    """One fuzzing process: its own namespaces and victims, and its share of the calls."""

    def __init__(self, index: int, seed: int) -> None:
        self.rng = random.Random(seed * 1000 + index)
        self.index = index
        self.namespaces: list[Namespace] = []
        self.dead_ns_fds: list[int] = []
        self.victims: list[int] = []  # pidfds
        self.counts: dict[str, int] = {}
        self.unexpected: list[dict] = []
        self.bad_replies = 0
        self.successes = 0

    def new_namespace(self) -> None:
        self.namespaces.append(Namespace(f"fz{self.index}-{time.monotonic_ns()}", 1))

    def kill_namespace(self) -> None:
        ns = self.namespaces.pop(self.rng.randrange(len(self.namespaces)))
        keep = os.dup(ns.ns_fd)  # a namespace whose init is gone: ENXIO from now on
        ns.kill()
        self.dead_ns_fds.append(keep)
        if len(self.dead_ns_fds) > 4:
            os.close(self.dead_ns_fds.pop(0))

    def new_victim(self) -> None:
        ns = self.rng.choice([None, *self.namespaces])
        seed = self.rng.getrandbits(32)
        pid = fork_into(ns.ns_fd if ns else None, lambda: victim_main(random.Random(seed)))
        self.victims.append(os.pidfd_open(pid))

    def reap(self) -> None:
        """Forget exited victims (their pidfds stay valid until closed), reap children, and
        start new victims up to :data:`VICTIMS_PER_WORKER`."""
        self.reap_children()
        alive = []
        for fd in self.victims:
            if pid_of(fd) > 0 and len(alive) < VICTIMS_PER_WORKER * 2:
                alive.append(fd)
            else:
                os.close(fd)
        self.victims = alive
        while len(self.victims) < VICTIMS_PER_WORKER:
            self.new_victim()

    @staticmethod
    def reap_children() -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break

    def request(self) -> tuple[int, bytearray | int]:
        rng = self.rng
        kind = rng.random()
        if kind < 0.02:
            return rng.getrandbits(32), bytearray(64)  # not our ioctl: ENOTTY
        if kind < 0.04:
            return uapi.IOC_MIGRATE, rng.choice([0, 1, 0xDEAD0000, 0xFFFF888000000000])
        if kind < 0.08:
            return uapi.IOC_MIGRATE, bytearray(rng.getrandbits(8) for _ in range(64))
        flags = rng.choice([0, 0, 0, uapi.F_PIDFD, uapi.F_PARENT, uapi.F_LEAVE_PARENT])
        flags |= rng.choice([0] * 6 + [uapi.F_PIDFD, uapi.F_PARENT])
        if rng.random() < 0.1:
            flags |= uapi.F_ALL & rng.getrandbits(16)  # any flag this ABI knows
        if rng.random() < 0.03:
            flags |= 1 << rng.randrange(32)  # maybe an unknown flag: EINVAL
        victim = rng.choice(self.victims)
        if flags & uapi.F_PIDFD:
            pid = rng.choice([victim] * 8 + [-1, 999, self.rng.choice(self.dead_ns_fds or [-1])])
        else:
            pid = pid_of(victim) if rng.random() < 0.9 else rng.choice(NO_SUCH_PIDS)
        live = [ns.ns_fd for ns in self.namespaces]
        target = rng.choice(
            live * 4 + self.dead_ns_fds + [rng.choice(self.victims), -1, 9999, self.root_ns]
        )
        inits = [ns.init for ns in self.namespaces]
        parent = rng.choice(inits + [pid_of(rng.choice(self.victims))] + NO_SUCH_PIDS[:3])
        timeout = rng.choice([0, 0, 1, 1000, 10**6, 10**8, 10**9, uapi.MAX_TIMEOUT_NS])
        if rng.random() < 0.01:
            timeout = uapi.MAX_TIMEOUT_NS + 1
        req = uapi.NsmigrateReq(
            size=rng.choice([FULL] * 14 + [uapi.REQ_SIZE_VER1] * 4 + [0, 63, 65, 4096, 4097]),
            version=rng.choice([uapi.ABI_VERSION] * 8 + [1, 1, 0, uapi.ABI_VERSION + 1]),
            flags=flags,
            pid=pid,
            target_fd=target,
            parent=parent,
            timeout_ns=timeout,
        )
        buf = bytearray(req)
        if req.size > len(buf) and rng.random() < 0.5:
            buf += bytearray(req.size - len(buf))  # a zeroed tail: a newer caller's struct
        elif req.size > len(buf):
            buf += bytearray([1]) + bytearray(req.size - len(buf) - 1)  # E2BIG
        return uapi.IOC_MIGRATE, buf

    def call(self, dev: int) -> None:
        cmd, arg = self.request()
        e = ioctl_errno(dev, cmd, arg)
        name = errno.errorcode.get(e, str(e)) if e else "ok"
        self.counts[name] = self.counts.get(name, 0) + 1
        if e not in EXPECTED and len(self.unexpected) < 20:
            self.unexpected.append({"errno": e, "cmd": cmd, "arg": bytes(arg).hex()[:160]})
        if e == 0 and cmd == uapi.IOC_MIGRATE and not isinstance(arg, int):
            self.successes += 1
            reply = uapi.NsmigrateReq.from_buffer_copy(bytes(arg[:FULL]))
            if reply.new_pid <= 0 or reply.new_pid_in_target <= 0:
                self.bad_replies += 1

    def run(self, n: int, out_path: str) -> None:
        os.makedirs(WORK, exist_ok=True)
        self.root_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)
        dev = lib._device()
        for _ in range(NAMESPACES_PER_WORKER):
            self.new_namespace()
        self.reap()
        t0 = time.monotonic()
        for i in range(n):
            if i % 100 == 0:
                self.reap()
            if i % 300 == 299:
                self.kill_namespace()
                self.new_namespace()
            self.call(dev)
            if i % 2000 == 0:
                print(f"worker {self.index}: {i}/{n} calls", flush=True)
        seconds = time.monotonic() - t0
        for fd in self.victims:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for ns in self.namespaces:
            ns.kill()
        self.reap_children()
        result = {
            "calls": n,
            "seconds": seconds,
            "counts": self.counts,
            "successes": self.successes,
            "bad_replies": self.bad_replies,
            "unexpected": self.unexpected,
        }
        with open(out_path, "w") as f:
            json.dump(result, f)


def main() -> int:
    out_dir = sys.argv[1]
    n = int(os.environ.get("NSM_IOCTL_FUZZ", "100000"))
    workers = int(os.environ.get("NSM_IOCTL_FUZZ_WORKERS", "3"))
    seed = int(os.environ.get("NSM_FUZZ_SEED", "1"))
    stats_before = stats()
    t0 = time.monotonic()
    pids = []
    parts = []
    for w in range(workers):
        part = os.path.join(out_dir, f"ioctl_fuzz.worker{w}.json")
        parts.append(part)
        share = n // workers + (1 if w < n % workers else 0)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                Worker(w, seed).run(share, part)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        pids.append(pid)
    statuses = [os.waitpid(p, 0)[1] for p in pids]
    seconds = time.monotonic() - t0
    settle()
    result: dict = {
        "calls_wanted": n,
        "workers": workers,
        "seconds": seconds,
        "worker_status": statuses,
        "stats_before": stats_before,
        "stats_after": stats(),
        "workers_results": [],
    }
    for part in parts:
        try:
            with open(part) as f:
                result["workers_results"].append(json.load(f))
        except (OSError, ValueError) as e:
            result["workers_results"].append({"error": str(e)})
    done = [r.get("calls", 0) for r in result["workers_results"]]
    result["calls"] = sum(done)
    result["calls_per_second"] = sum(done) / seconds if seconds else 0.0
    with open(os.path.join(out_dir, "ioctl_fuzz.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0 if all(s == 0 for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
