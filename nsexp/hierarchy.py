"""The experiment's process tree over real PID namespaces, built with fork from one process.

The parent (in NS1, the caller's namespace) creates one namespace per plan: unshare(CLONE_NEWPID)
then fork, so the child is PID 1 (init) there; right after each fork the parent joins its own
namespace again with setns, because a process whose children's namespace differs from its own
cannot create threads (and the manager's threads come later in the same process). Each init forks
its children: processes with a program (the worker) wait at a gate until ``go()``, the others
sleep forever. Then the init serves its control channel (a socketpair made before the fork):
``spawn`` forks a successor running a registered entry point (the restart backend's spawner),
``go`` opens the gate. It reaps every child with waitpid(-1), including processes migrated into
its namespace. Nothing else ever forks or starts a thread inside a namespace: PIDs are the
experiment's result. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nsexp import nsutil, protocol
from nsexp.backends import Backend, Namespace
from nsexp.errors import NsexpError
from nsexp.manager import Manager

Program = Callable[[], None]
Entry = Callable[[dict[str, Any]], None]


@dataclass
class NamespacePlan:
    """One namespace: its name, how many children its init forks, and which run a program."""

    name: str
    children: int
    programs: dict[int, Program] = field(default_factory=dict)  # child index (0-based) -> main


class HierarchyError(NsexpError, RuntimeError):
    """The tree could not be built or driven."""


def _close_fds_except(keep: set[int]) -> None:
    """Close every inherited fd >2 not in ``keep`` (a forked child owns only what it needs)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _rebind_stdio() -> None:
    """Point sys.stdin/stdout/stderr at fds 0-2 themselves.

    The parent's stream objects may write through another fd (pytest's capture does), which
    _close_fds_except just closed and which a new pipe or socket may reuse.
    """
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            continue
        stream = open(  # noqa: SIM115 - lives as long as the process
            fd, mode, buffering=1 if mode == "w" else -1, closefd=False, errors="replace"
        )
        setattr(sys, name, stream)


def _child_exit(run: Callable[[], None]) -> None:
    """Run ``run`` in a forked child and never return into the parent's code."""
    code = 0
    try:
        run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report and die, whatever happened
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os._exit(code)


def _sleep_forever() -> None:
    while True:
        signal.pause()


class _Init:
    """Code of a namespace init (PID 1); runs in the forked child, single-threaded."""

    def __init__(
        self,
        plan: NamespacePlan,
        ctl: socket.socket,
        entries: dict[str, Entry],
        own_proc: bool = False,
    ):
        self.plan = plan
        self.ctl = ctl
        self.entries = entries
        self.own_proc = own_proc
        self.go_r = -1
        self.go_w = -1

    def main(self) -> None:
        nsutil.set_comm(f"nsexp-init-{self.plan.name}")
        # If the parent dies (even by SIGKILL) this init dies, and with it the whole namespace.
        nsutil.set_pdeathsig(signal.SIGKILL)
        # Ctrl-C reaches the whole process group: the parent handles it (it kills every init);
        # the tree must not die in pieces with tracebacks. Children inherit these dispositions.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self.own_proc:
            nsutil.private_proc()  # before the children: they share it
        self.go_r, self.go_w = os.pipe()
        pids = [self._fork_child(i) for i in range(self.plan.children)]
        os.close(self.go_r)
        protocol.send_msg(self.ctl, {"op": "ready", "children": pids})
        self.serve()

    def _fork_child(self, index: int) -> int:
        program = self.plan.programs.get(index)
        pid = os.fork()
        if pid:
            return pid
        self.ctl.close()
        os.close(self.go_w)
        if program is None:
            os.close(self.go_r)
            nsutil.set_comm(f"nsexp-child-{self.plan.name}")
            _child_exit(_sleep_forever)
        nsutil.set_comm("nsexp-worker")
        # The gate: EOF on the pipe once the init closes its write end (on "go").
        while os.read(self.go_r, 64):
            pass
        os.close(self.go_r)
        _child_exit(program)
        raise AssertionError("unreachable")

    def reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def serve(self) -> None:
        while True:
            self.reap()
            ready, _, _ = select.select([self.ctl], [], [], 0.1)
            if not ready:
                continue
            try:
                msg = protocol.recv_msg(self.ctl)
            except (protocol.ProtocolError, OSError):
                os._exit(0)  # the parent went away: end the namespace
            op = msg.get("op")
            reply: dict[str, Any] = {"id": msg.get("id"), "ok": True}
            if op == "go":
                if self.go_w >= 0:
                    os.close(self.go_w)
                    self.go_w = -1
            elif op == "spawn":
                entry = self.entries.get(str(msg.get("entry")))
                if entry is None:
                    reply = {"id": msg.get("id"), "ok": False, "error": "unknown entry"}
                else:
                    reply["pid"] = self._spawn(entry, msg.get("payload") or {})
            elif op != "ping":
                reply = {"id": msg.get("id"), "ok": False, "error": f"unknown op {op!r}"}
            try:
                protocol.send_msg(self.ctl, reply)
            except OSError:
                pass  # the requester (a manager) died; the next one skips stale ids

    def _spawn(self, entry: Entry, payload: dict[str, Any]) -> int:
        pid = os.fork()
        if pid:
            return pid
        self.ctl.close()
        if self.go_w >= 0:
            os.close(self.go_w)
        nsutil.set_comm("nsexp-worker")
        _child_exit(lambda: entry(payload))
        raise AssertionError("unreachable")


class Hierarchy:
    """Parent side of the tree: build it, open the gate, snapshot it, tear it down."""

    def __init__(
        self,
        plans: list[NamespacePlan],
        entries: dict[str, Entry] | None = None,
        ready_timeout: float = 30.0,
        own_proc: bool = False,
    ) -> None:
        """``own_proc``: each namespace also gets a mount namespace with its own /proc (for
        CRIU); its processes then see namespace-local pids in /proc."""
        names = [p.name for p in plans]
        if len(set(names)) != len(names):
            raise ValueError("namespace names must be unique")
        self.plans = plans
        self.entries = entries or {}
        self.ready_timeout = ready_timeout
        self.own_proc = own_proc
        self.namespaces: dict[str, Namespace] = {}
        self.children: dict[str, list[int]] = {}  # in-namespace pids reported by each init
        self.inodes: dict[int, str] = {}
        self._init_pids: list[int] = []

    def start(self) -> Hierarchy:
        """Create every namespace and its children; returns once all inits report ready."""
        try:
            for plan in self.plans:
                self._start_one(plan)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_one(self, plan: NamespacePlan) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = nsutil.fork_pidns_init()
        if pid == 0:
            for other in self.namespaces.values():
                if other.control is not None:
                    other.control.detach()  # its fd is closed below; never close it twice
            parent_end.detach()
            _close_fds_except({child_end.fileno()})
            _rebind_stdio()
            init = _Init(plan, child_end, self.entries, self.own_proc)
            _child_exit(init.main)
        child_end.close()
        self._init_pids.append(pid)
        ns = Namespace.open(plan.name, pid, control=parent_end)
        self.namespaces[plan.name] = ns
        self.inodes[ns.inode] = plan.name
        parent_end.settimeout(self.ready_timeout)
        try:
            msg = protocol.recv_msg(parent_end)
        except (OSError, protocol.ProtocolError) as exc:
            raise HierarchyError(f"init of {plan.name} did not report ready: {exc}") from None
        self.children[plan.name] = list(msg.get("children", []))

    def _ask(self, ns: Namespace, msg: dict[str, Any]) -> dict[str, Any]:
        assert ns.control is not None
        with ns.lock:
            ns.control.settimeout(self.ready_timeout)
            protocol.send_msg(ns.control, msg)
            while True:
                reply = protocol.recv_msg(ns.control)
                if reply.get("id") == msg.get("id"):
                    return reply

    def go(self) -> None:
        """Open every gate: the programs (the worker) start now."""
        for ns in self.namespaces.values():
            self._ask(ns, {"op": "go", "id": f"go-{ns.name}"})

    @property
    def init_pids(self) -> dict[str, int]:
        """Global pid of each namespace's init."""
        return {name: ns.init_pid for name, ns in self.namespaces.items()}

    def live_pids(self) -> list[int]:
        """Global pids of every live process in the tree's namespaces."""
        return nsutil.pids_in_namespaces(set(self.inodes))

    def snapshot(self, index: int, worker_global_pid: int | None = None) -> list[dict[str, Any]]:
        """One row per live (non-zombie) process of the tree, in records.PROCESS_COLUMNS."""
        infos = []
        for pid in self.live_pids():
            try:
                infos.append(nsutil.proc_info(pid))
            except (OSError, KeyError, ValueError):
                continue
        by_global = {i.global_pid: i for i in infos}
        rows = []
        for i in infos:
            if i.state == "Z":
                continue
            parent = by_global.get(i.ppid)
            # The parent's pid as seen from the process's own namespace (0 if outside it).
            ppid = parent.pid if parent and parent.ns_inode == i.ns_inode else 0
            role = "init" if i.pid == 1 else "child"
            if i.global_pid == worker_global_pid or (
                worker_global_pid is None and i.comm == "nsexp-worker"
            ):
                role = "worker"
            rows.append(
                {
                    "snapshot": index,
                    "ns": self.inodes.get(i.ns_inode, "?"),
                    "role": role,
                    "pid": i.pid,
                    "global_pid": i.global_pid,
                    "ppid": ppid,
                    "state": i.state,
                    "start_time": i.start_time,
                }
            )
        order = {name: k for k, name in enumerate(self.namespaces)}
        rows.sort(key=lambda r: (order.get(r["ns"], 99), r["pid"]))
        return rows

    def stop(self) -> None:
        """Kill every init with SIGKILL (the kernel kills the rest of each namespace), reap."""
        for pid in self._init_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self._init_pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self._init_pids.clear()
        # An init's exit waits for its namespace to empty; check anyway, never leave strays.
        deadline = time.monotonic() + 5
        while self.inodes and self.live_pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        for ns in self.namespaces.values():
            ns.close()
            if ns.control is not None:
                ns.control.close()

    @contextlib.contextmanager
    def serving(
        self,
        backend: Backend,
        socket_path: str,
        policy: Iterable[tuple[str, str]] | None = None,
        *,
        before_go: Callable[[Hierarchy], None] | None = None,
        **hooks: Any,
    ) -> Iterator[Hierarchy]:
        """The stage of a run: build the tree, serve migrations, open the gates; tear down after.

        Starts the tree, calls ``before_go(self)`` (e.g. to populate a namespace), starts a
        :class:`~nsexp.manager.Manager` on ``socket_path`` for ``backend`` over the tree's
        namespaces with ``policy`` (allowed (source, target) pairs, None: any) and ``hooks``
        (its ``on_record``, ``on_failure``), opens the gates and yields. On leaving, however
        it is left, stops the manager, then the tree.
        """
        manager = None
        try:
            self.start()
            if before_go is not None:
                before_go(self)
            allowed = None if policy is None else set(policy)
            manager = Manager(socket_path, backend, self.namespaces, policy=allowed, **hooks)
            manager.start()
            self.go()
            yield self
        finally:
            if manager is not None:
                manager.stop(timeout=2.0)
            self.stop()

    def __enter__(self) -> Hierarchy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
