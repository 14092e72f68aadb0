"""The stages the benchmark's workers hop on: layouts of namespaces, one served run, the nested
pair of the depth sweep, and the processes parked in a target. Guest side, standard library only.

A run is :meth:`nsexp.hierarchy.Hierarchy.serving` (tree + manager + gates) plus a wait for the
workers' final records; the depth sweep alone builds its namespaces by hand (nested, which the
flat hierarchy does not do), with :func:`nsexp.nsutil.fork_pidns_init` and the same manager.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nsexp import nsutil, records
from nsexp.backends import MigrationError, Namespace, Peer, get_backend
from nsexp.hierarchy import Hierarchy, NamespacePlan
from nsexp.manager import Manager

Program = Callable[[], None]
Progress = Callable[[str], None]
NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"
DONE_FILE = "done.json"  # WorkerConfig.done_path of each worker, in its records folder


def _pids_from(first: int) -> Program:
    """A program that makes its namespace hand out PIDs from ``first`` on (CRIU's helpers in a
    target then never take the PID a restore needs: criu dump/restore runs inside it)."""

    def run() -> None:
        Path(NS_LAST_PID).write_text(str(first - 1))

    return run


def pair(*programs: Program, b_children: int = 0) -> list[NamespacePlan]:
    """A (init, one idle child, then one child per program: the first worker is PID 3) and B
    (init and ``b_children`` idle children; with none, B hands out PIDs from 1000 on)."""
    a = NamespacePlan("A", 1 + len(programs), {1 + j: p for j, p in enumerate(programs)})
    b = (
        NamespacePlan("B", b_children)
        if b_children
        else NamespacePlan("B", 1, {0: _pids_from(1000)})
    )
    return [a, b]


def chain(names: list[str], program: Program) -> list[NamespacePlan]:
    """A route's namespaces: the worker is the second child of the first, the rest are empty."""
    return [NamespacePlan(names[0], 2, {1: program})] + [NamespacePlan(n, 0) for n in names[1:]]


def finished(out: str) -> bool:
    """True once the worker recording into ``out`` wrote its done file (however it ended)."""
    return (Path(out) / DONE_FILE).exists()


def outcome(out: str) -> dict[str, Any]:
    """The done file of the worker recording into ``out``: {"ok", "error"}."""
    try:
        return json.loads((Path(out) / DONE_FILE).read_text())
    except FileNotFoundError:
        return {"ok": False, "error": "the worker never finished"}


def wait_finished(
    outs: list[str], timeout: float, lost: list[dict[str, Any]], watch: Progress | None = None
) -> None:
    """Until every worker wrote its final record (or, for one worker, the manager reported its
    hop lost); TimeoutError names how many are missing."""
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    while True:
        if all(finished(o) for o in outs) or (lost and len(outs) == 1):
            return
        if time.monotonic() > deadline:
            missing = sum(not finished(o) for o in outs)
            raise TimeoutError(f"{missing} of {len(outs)} worker(s) not done after {timeout:g} s")
        if watch is not None and time.monotonic() - last > 20:
            n = len(records.read_jsonl(Path(outs[0]) / records.RECORDS_FILE))
            watch(f"  {n} hops done")
            last = time.monotonic()
        time.sleep(0.05)


def run(
    plans: list[NamespacePlan],
    backend: str,
    socket_path: str,
    outs: list[str],
    timeout: float,
    *,
    entries: dict[str, Callable[[dict[str, Any]], None]] | None = None,
    own_proc: bool = False,
    before_go: Callable[[Hierarchy], None] | None = None,
    legacy: bool = False,
    watch: Progress | None = None,
) -> list[dict[str, Any]]:
    """Serve ``plans`` with ``backend`` until the workers recording into ``outs`` are done.

    Returns the hops the manager reported lost (the requester died: a CRIU restore that failed
    after the dump), one row each with the backend's own error and the stamps it took.
    ``legacy``: the manager's old thread-per-connection path (throughput baseline).
    """
    lost: list[dict[str, Any]] = []

    def on_failure(peer: Peer, req: dict[str, Any], exc: MigrationError) -> None:
        stamps = {k: v for k, v in exc.timings.items() if k in records.STAMPS}
        stamps.setdefault("request_sent", req.get("request_sent"))
        lost.append({"ns": req.get("target"), "status": "failed", "error": str(exc), **stamps})

    hierarchy = Hierarchy(plans, entries=entries, ready_timeout=120, own_proc=own_proc)
    mech = get_backend(backend)
    mech.check()
    hooks: dict[str, Any] = {"on_failure": on_failure}
    if legacy:
        hooks["legacy_threads"] = True
    with hierarchy.serving(mech, socket_path, before_go=before_go, **hooks):
        wait_finished(outs, timeout, lost, watch)
    return lost


# -- depth: two sibling namespaces under a chain of nested ones -----------------------------------


def _reap_forever() -> None:
    """What a namespace init does here: reap its children and those migrated in, forever."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(0.05)
        except InterruptedError:
            continue


def _init(body: Program, close: tuple[int, ...] = ()) -> int:
    """Fork the init of a new namespace running ``body`` (then reaping forever); its pid here."""
    pid = nsutil.fork_pidns_init()
    if pid:
        return pid
    for fd in close:
        with contextlib.suppress(OSError):
            os.close(fd)
    code = 0
    try:
        nsutil.set_pdeathsig(signal.SIGKILL)  # the chain dies with its creator
        body()
        _reap_forever()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 1
    os._exit(code)


def _nested(depth: int, program: Program, info_w: int, gate_r: int, gate_w: int) -> int:
    """A and B at level ``depth`` (1 = children of the global namespace) under a chain of
    ``depth - 1`` namespaces; ``program`` runs in a child of A's init once the gate closes.
    Each init writes "A <global pid>" / "B <global pid>" to ``info_w``. Returns the top's pid."""

    def report(tag: str) -> None:
        os.write(info_w, f"{tag} {nsutil.self_info().global_pid}\n".encode())

    def ns_a() -> None:
        if os.fork() == 0:
            try:
                while os.read(gate_r, 64):
                    pass
                program()
                os._exit(0)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                os._exit(1)
        report("A")

    def level(k: int) -> None:
        if k == depth - 1:
            _init(ns_a)
            _init(lambda: report("B"))
        else:
            _init(lambda: level(k + 1))

    if depth == 1:
        return _init(ns_a, (gate_w,))
    return _init(lambda: level(1), (gate_w,))


def nested_pair(depth: int, program: Program, socket_path: str, out: str, timeout: float) -> int:
    """Serve one worker hopping between nested siblings A and B at ``depth`` until it is done;
    returns the nesting level the kernel reports for A (NSpid entries - 1)."""
    info_r, info_w = os.pipe()
    gate_r, gate_w = os.pipe()
    top = _nested(depth, program, info_w, gate_r, gate_w)
    tops = [top]
    if depth == 1:
        tops.append(
            _init(
                lambda: os.write(info_w, f"B {nsutil.self_info().global_pid}\n".encode()), (gate_w,)
            )
        )
    os.close(info_w)
    os.close(gate_r)
    registry: dict[str, Namespace] = {}
    manager = None
    try:
        with os.fdopen(info_r) as info:
            while len(registry) < 2:
                line = info.readline()
                if not line:
                    raise RuntimeError(f"depth {depth}: the chain died before reporting")
                tag, pid = line.split()
                registry[tag] = Namespace.open(tag, int(pid))
        levels = len(nsutil.proc_info(registry["A"].init_pid).nspids) - 1
        manager = Manager(socket_path, get_backend("kmod"), registry).start()
        os.close(gate_w)
        gate_w = -1
        wait_finished([out], timeout, [])
        return levels
    finally:
        if gate_w >= 0:
            os.close(gate_w)
        if manager is not None:
            manager.stop(timeout=2.0)
        for pid in tops:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in tops:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for ns in registry.values():
            ns.close()


# -- population: idle processes parked in the target ---------------------------------------------


def raise_pid_limits(need: int, say: Progress) -> None:
    """Make room for ``need`` processes (pid_max, threads-max), saying what changed."""
    for name, want in (("pid_max", max(need, 65536)), ("threads-max", need)):
        path = Path(f"/proc/sys/kernel/{name}")
        have = int(path.read_text())
        if have < want:
            path.write_text(str(want))
            say(f"raised kernel.{name} {have} -> {want}")


class Population:
    """``count`` idle processes parked in B by the C helper ``populate`` (setns + fork + pause)
    before the gates open; collected after the namespace died."""

    def __init__(self, binary: str, count: int, say: Progress) -> None:
        self.binary = binary
        self.count = count
        self.say = say
        self.procs: list[subprocess.Popen] = []

    def fill(self, h: Hierarchy) -> None:
        """``before_go`` of the run: park the processes, check the count from /proc."""
        if self.count <= 0:
            return
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [self.binary, str(h.namespaces["B"].init_pid), str(self.count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)  # even if it failed: close() collects it
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("ready"):
            raise RuntimeError(f"populate {self.count} failed: {line.strip()!r}")
        in_b = len(nsutil.pids_in_namespaces({h.namespaces["B"].inode}))
        self.say(
            f"population {self.count}: B holds {in_b} processes ({time.monotonic() - t0:.1f} s)"
        )

    def close(self) -> None:
        """The helpers exit once the namespace's init died and they reaped their children."""
        for proc in self.procs:
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
