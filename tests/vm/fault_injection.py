"""Guest side: every allocation-failure path of a migration, taken by fault injection.

Run inside the VM on the debug kernel (CONFIG_FAILSLAB, CONFIG_FAIL_PAGE_ALLOC,
CONFIG_FAULT_INJECTION_DEBUG_FS, CONFIG_FAULT_INJECTION_STACKTRACE_FILTER), as root with the
module loaded (and the kernel booted with slab_nomerge):
    python3 tests/vm/fault_injection.py OUT_DIR
It writes OUT_DIR/fault_injection.json; tests/test_kmod_debug.py makes the assertions.

Each path is one allocation a migration makes, failed on purpose: failslab with probability
100, a ``times`` budget, the task filter (only the task whose /proc/PID/make-it-fail is 1: the
caller for the request's own allocation, the moving process for the switch's), a stack filter
(require-start/require-end: only allocations called from the named function) and the cache
filter (only the slab caches of that allocation; boot with ``slab_nomerge`` so that each cache is
its own). The cache filter keeps kmemleak's and debugobjects' own bookkeeping allocations out:
failing those would switch kmemleak off. fail_page_alloc is not used for the same reason (a new
slab page for kmemleak's metadata is allocated on the same stacks). Per attempt it records the
errno, how many failures were injected (the drop of ``times``), the process as seen before and
after (PIDs, parent, namespaces, session, its own state), and the /proc/nsmigrate counters.
Standard library only.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import re
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "kmod_checks"))

from harness import (  # noqa: E402
    SLAB_CACHES,
    WORK,
    Namespace,
    Subject,
    lib,
    settle,
    slab_objects,
    stats,
)

DEBUGFS = "/sys/kernel/debug"
#: failures injected per attempt at most (``times``); the drop of ``times`` counts them
BUDGET = 1000


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(f"{value}\n")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def mount_debugfs() -> None:
    if not os.path.exists(f"{DEBUGFS}/failslab"):
        os.system(f"mount -t debugfs none {DEBUGFS} 2>/dev/null")
    if not os.path.exists(f"{DEBUGFS}/failslab"):
        raise RuntimeError(
            "no /sys/kernel/debug/failslab: this kernel lacks CONFIG_FAILSLAB / "
            "CONFIG_FAULT_INJECTION_DEBUG_FS (boot the debug kernel: --kernel debug)"
        )


class Kallsyms:
    """Function address ranges from /proc/kallsyms (CONFIG_KALLSYMS_ALL)."""

    def __init__(self) -> None:
        self.addr: dict[str, int] = {}
        self.module: list[int] = []
        starts = set()
        with open("/proc/kallsyms") as f:
            for line in f:
                parts = line.split()
                a, kind, name = int(parts[0], 16), parts[1], parts[2]
                if kind not in "tT" or a == 0:
                    continue
                starts.add(a)
                self.addr.setdefault(name, a)
                if len(parts) > 3 and parts[3] == "[nsmigrate]":
                    self.module.append(a)
        if not starts or max(starts) == 0:
            raise RuntimeError("/proc/kallsyms shows no addresses (kptr_restrict?)")
        self.starts = sorted(starts)

    def function(self, name: str) -> tuple[int, int]:
        """[start, end) of a kernel function: up to the next symbol."""
        a = self.addr[name]
        i = bisect.bisect_right(self.starts, a)
        return a, self.starts[i]

    def module_text(self) -> tuple[int, int]:
        if not self.module:
            raise RuntimeError("no [nsmigrate] symbols in /proc/kallsyms: is the module loaded?")
        return min(self.module), max(self.module) + 0x10000  # the last function's end


class Fault:
    """The kernel's failslab attribute (/sys/kernel/debug/failslab)."""

    def __init__(self) -> None:
        self.dir = f"{DEBUGFS}/failslab"
        self.caches: list[str] = []

    def set(self, name: str, value) -> None:
        _write(f"{self.dir}/{name}", value)

    def arm(self, require: tuple[int, int], caches: list[str], *, times: int = BUDGET) -> None:
        self.set("probability", 0)
        self.caches = caches
        self.set("cache-filter", "Y")
        for c in caches:
            _write(f"/sys/kernel/slab/{c}/failslab", 1)  # EINVAL if merged: boot slab_nomerge
        self.set("interval", 1)
        self.set("task-filter", "Y")
        self.set("ignore-gfp-wait", "N")  # GFP_KERNEL allocations may sleep: include them
        self.set("verbose", 1)  # one line per failure, no stack: the log stays scannable
        self.set("stacktrace-depth", 32)
        self.set("require-start", require[0])
        self.set("require-end", require[1])
        self.set("reject-start", 0)
        self.set("reject-end", 0)
        self.set("space", 0)
        self.set("times", times)
        self.set("probability", 100)

    def disarm(self) -> int:
        """Stop injecting; return how many failures were injected since :meth:`arm`."""
        self.set("probability", 0)
        left = int(_read(f"{self.dir}/times"))
        self.set("times", 1)
        self.set("require-start", 0)
        self.set("require-end", 0)
        for c in self.caches:
            _write(f"/sys/kernel/slab/{c}/failslab", 0)
        return BUDGET - left


def make_it_fail(gpid: int, on: bool) -> None:
    _write(f"/proc/{gpid}/make-it-fail", 1 if on else 0)


def snapshot(subject: Subject, ns: Namespace) -> dict:
    """Everything a failed migration must leave as it was."""
    g = subject.gpid
    return {
        "outside": subject.outside(),
        "ns_pid": os.readlink(f"/proc/{g}/ns/pid"),
        "ns_pid_for_children": os.readlink(f"/proc/{g}/ns/pid_for_children"),
        "ns_mnt": os.readlink(f"/proc/{g}/ns/mnt"),
        "inside": subject.call("state"),
        "source_children": ns.children(),
        "exists": os.path.exists(f"/proc/{g}"),
    }


def kmalloc_caches() -> list[str]:
    """The plain kmalloc caches (kzalloc(GFP_KERNEL) comes from one of them)."""
    return sorted(c for c in os.listdir("/sys/kernel/slab") if re.fullmatch(r"kmalloc-\d+k?", c))


def paths(ks: Kallsyms, target_level: int) -> list[dict]:
    """The allocations of one migration, in the order they happen, with how to fail each."""
    pid_cache = "pid" if target_level == 0 else f"pid_{target_level + 1}"
    return [
        # the request's bookkeeping, allocated in the caller (nsm_work_alloc)
        {
            "path": "work",
            "side": "caller",
            "require": ks.module_text(),
            "caches": kmalloc_caches(),
        },
        # the moving task's new nsproxy (create_new_namespaces), in the task's task work
        {
            "path": "nsproxy",
            "side": "mover",
            "require": ks.function("create_new_namespaces"),
            "caches": ["nsproxy"],
        },
        # the new struct pid (alloc_pid's first allocation)
        {
            "path": "pid",
            "side": "mover",
            "require": ks.function("alloc_pid"),
            "caches": [pid_cache],
        },
        # the pid numbers: idr nodes; the idr falls back to its per-CPU preloaded nodes, so
        # this allocation may fail without failing the migration (recorded, not required)
        {
            "path": "pid_number",
            "side": "mover",
            "require": ks.function("alloc_pid"),
            "caches": ["radix_tree_node"],
            "required": False,
        },
    ]


def mntns_paths(ks: Kallsyms) -> list[dict]:
    """The allocation a migration with NSMIGRATE_F_MNTNS adds."""
    return [
        # the copy of the mover's root and cwd for the mount-namespace join (nsm_copy_fs)
        {
            "path": "fs_struct",
            "side": "mover",
            "require": ks.function("copy_fs_struct"),
            "caches": ["fs_cache"],
            "mntns": True,
        },
    ]


def migrate(subject: Subject, target: Namespace, mntns: str | None = None) -> int:
    """Move the subject into ``target``; 0 or the errno. Follows its new global PID."""
    try:
        m = lib.migrate(subject.gpid, target.path, timeout=30, mntns=mntns)
    except OSError as e:
        return e.errno
    subject.gpid = m.global_pid
    return 0


def attempt(p: dict, subject: Subject, a: Namespace, b: Namespace) -> dict:
    fault = Fault()
    who = os.getpid() if p["side"] == "caller" else subject.gpid
    before = snapshot(subject, a)
    counters_before = stats()
    mntns = f"/proc/{b.init}/ns/mnt" if p.get("mntns") else None
    make_it_fail(who, True)
    fault.arm(p["require"], p["caches"])
    try:
        err = migrate(subject, b, mntns)
    finally:
        injected = fault.disarm()
        # a move that went through despite the fault gave the subject a new global PID
        make_it_fail(os.getpid() if p["side"] == "caller" else subject.gpid, False)
    after = snapshot(subject, a)
    counters_after = stats()
    changed = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
    return {
        "errno": err,
        "errno_name": errno.errorcode.get(err, str(err)),
        "injected": injected,
        "unchanged": not changed,
        "changed": changed,
        "counters_delta": {
            k: counters_after.get(k, 0) - counters_before.get(k, 0) for k in counters_after
        },
    }


def take_paths(
    todo: list[dict], subject: Subject, a: Namespace, b: Namespace, repeat: int, out: dict
) -> None:
    """Fail each path of ``todo`` in turn (up to ``repeat`` attempts), recording into ``out``."""
    for p in todo:
        rec = {k: v for k, v in p.items() if k not in ("require",)}
        rec["require"] = [hex(x) for x in p["require"]]
        rec["attempts"] = []
        for _ in range(repeat):
            rec["attempts"].append(attempt(p, subject, a, b))
            if rec["attempts"][-1]["errno"] == 0:
                break  # it moved: nothing left to fail in this configuration
        out[p["path"]] = rec
        if rec["attempts"][-1]["errno"] == 0:
            break  # now in B: the next paths would only meet "already there"


def _mount_ns_join_paths(ks: Kallsyms, repeat: int) -> dict:
    """The F_MNTNS paths, on a subject in C's own mount namespace moving into D's."""
    c, d = Namespace("FIC", 1, own_proc=True), Namespace("FID", 1, own_proc=True)
    joiner = Subject(c)
    out: dict = {}
    try:
        joiner.join_mount_ns(f"/proc/{c.init}/ns/mnt")
        take_paths(mntns_paths(ks), joiner, c, d, repeat, out)
    finally:
        joiner.kill()
        c.kill()
        d.kill()
    return out


def run(repeat: int) -> dict:
    mount_debugfs()
    os.makedirs(WORK, exist_ok=True)
    ks = Kallsyms()
    settle()
    slab_start = slab_objects(SLAB_CACHES)
    a, b = Namespace("FIA", 1), Namespace("FIB", 1)
    subject = Subject(a)
    out: dict = {"paths": {}}
    try:
        subject.call("incr", n=7)
        take_paths(paths(ks, target_level=1), subject, a, b, repeat, out["paths"])
        # No leftover: the same process now moves normally (into the namespace it is not in).
        here = os.readlink(f"/proc/{subject.gpid}/ns/pid")
        other = a if here == os.readlink(f"/proc/{b.init}/ns/pid") else b
        state_before = subject.call("state")
        err = migrate(subject, other)
        state_after = subject.call("state") if err == 0 else {}
        out["clean_migration"] = {
            "errno": err,
            "counter_before": state_before["counter"],
            "counter_after": state_after.get("counter"),
            "pid_after": state_after.get("pid"),
        }
        out["paths"].update(_mount_ns_join_paths(ks, repeat))
    finally:
        subject.kill()
        a.kill()
        b.kill()
    settle()
    out["slab_start"] = slab_start
    out["slab_end"] = slab_objects(SLAB_CACHES)
    return out


def main() -> int:
    out_dir = sys.argv[1]
    repeat = int(os.environ.get("NSM_FAULT_REPEAT", "3"))
    t0 = time.monotonic()
    try:
        result = {"ok": True, **run(repeat)}
    except BaseException as e:
        result = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        }
    result["seconds"] = time.monotonic() - t0
    with open(os.path.join(out_dir, "fault_injection.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
