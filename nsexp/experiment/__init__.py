"""The chained-execution experiment: layout, prediction, one run, its files and ``nsexp run``.

A run builds the hierarchy (``nsexp.hierarchy``) in this process, starts the manager
(``nsexp.manager``) in threads of this same process, opens the worker's gate and waits until the
worker has made its last hop (or failed). Then everything is torn down and the run folder gets
``hops.csv`` (one row per hop, from the worker's ``records.jsonl``), ``processes.csv`` (the tree
before the first hop and after each hop) and ``run.json`` (metadata). On the ``vm`` testbed the
same command runs inside the guest (``--testbed native`` there) and the host reads the folder.

The run path is standard library only: it is what the guest imports.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import queue
import secrets
import shlex
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nsexp.backends import BACKENDS, MigrationError, Peer, get_backend, worker_side
from nsexp.experiment.worker import Worker, WorkerConfig, blank_record, records_path
from nsexp.hierarchy import Hierarchy, NamespacePlan
from nsexp.manager import Manager
from nsexp.records import (
    HOP_COLUMNS,
    HOPS_FILE,
    PROCESS_COLUMNS,
    PROCESSES_FILE,
    RECORDS_FILE,
    RUN_FILE,
    append_jsonl,
    code_version,
    read_jsonl,
)
from nsexp.records import write_csv as _write_csv

TESTBEDS = ("vm", "native")
SOCKET_DIRS = ("/run/nsexp", "/tmp/nsexp")  # never the 9p share: no sockets there


# -- layout ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutSpec:
    """The hierarchy and the worker's route. The defaults are the paper's layout.

    ``children[i]`` is how many children the init of ``namespaces[i]`` forks; the worker is
    child number ``worker_index`` (0-based) of ``worker_ns``'s init; ``route`` lists the
    namespaces the worker visits, starting where it is born (it may come back to a namespace).
    """

    namespaces: tuple[str, ...] = ("NS2", "NS3", "NS4", "NS5")
    children: tuple[int, ...] = (2, 3, 4, 5)
    worker_ns: str = "NS2"
    worker_index: int = 1
    increments: int = 100
    route: tuple[str, ...] = ("NS2", "NS3", "NS4", "NS5")

    @classmethod
    def make(
        cls,
        namespaces: int | Sequence[str] | None = None,
        children: Sequence[int] | None = None,
        increments: int = 100,
        route: Sequence[str] | None = None,
        hops: int | None = None,
        worker_index: int = 1,
    ) -> LayoutSpec:
        """A layout from CLI-like options; unspecified parts follow the paper's pattern.

        ``namespaces`` may be a count (named NS2, NS3, ...); by default namespace i (0-based)
        gets i + 2 children; without ``route`` the worker cycles through the namespaces in
        order for ``hops`` migrations (default: one pass).
        """
        if namespaces is None:
            names: tuple[str, ...] = (
                cls.namespaces if children is None else _ns_names(len(children))
            )
        elif isinstance(namespaces, int):
            names = _ns_names(namespaces)
        else:
            names = tuple(namespaces)
        kids = tuple(children) if children is not None else tuple(i + 2 for i in range(len(names)))
        if route is None:
            n = len(names) - 1 if hops is None else hops
            route = tuple(names[i % len(names)] for i in range(n + 1))
        elif hops is not None and hops != len(route) - 1:
            raise ValueError(f"--hops {hops} disagrees with a route of {len(route) - 1} hops")
        spec = cls(
            namespaces=names,
            children=kids,
            worker_ns=route[0],
            worker_index=worker_index,
            increments=increments,
            route=tuple(route),
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        """Raise ValueError if the layout cannot be run."""
        if not self.namespaces:
            raise ValueError("at least one namespace is needed")
        if len(set(self.namespaces)) != len(self.namespaces):
            raise ValueError("namespace names must be unique")
        if len(self.children) != len(self.namespaces):
            raise ValueError(
                f"{len(self.children)} child counts for {len(self.namespaces)} namespaces"
            )
        if any(c < 0 for c in self.children):
            raise ValueError("child counts must be >= 0")
        if self.worker_ns not in self.namespaces:
            raise ValueError(f"worker namespace {self.worker_ns} is not in the layout")
        n = self.children[self.namespaces.index(self.worker_ns)]
        if not 0 <= self.worker_index < n:
            raise ValueError(f"worker index {self.worker_index} but {self.worker_ns} has {n}")
        if not self.route or self.route[0] != self.worker_ns:
            raise ValueError("the route starts in the worker's namespace")
        for a, b in zip(self.route, self.route[1:], strict=False):
            if b not in self.namespaces:
                raise ValueError(f"route goes to unknown namespace {b}")
            if a == b:
                raise ValueError(f"route stays in {a}: a hop goes to another namespace")
        if self.increments < 0:
            raise ValueError("increments must be >= 0")

    @property
    def hops(self) -> int:
        """Number of migrations."""
        return len(self.route) - 1

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayoutSpec:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def cli_args(self) -> list[str]:
        """Options of ``nsexp run`` that reproduce this layout."""
        return [
            "--namespaces",
            ",".join(self.namespaces),
            "--children",
            ",".join(map(str, self.children)),
            "--worker-index",
            str(self.worker_index),
            "--increments",
            str(self.increments),
            "--route",
            ",".join(self.route),
        ]


def _ns_names(n: int) -> tuple[str, ...]:
    # NS1 is the global namespace; the experiment's namespaces start at NS2.
    return tuple(f"NS{i + 2}" for i in range(n))


def predict_pids(spec: LayoutSpec) -> list[int]:
    """The worker's PID at each stop of the route, by the rule "next free PID in the target".

    Linux allocates PIDs cyclically: the next PID after the last one allocated in that
    namespace that is not in use (PIDs freed behind the cursor are not reused before a wrap).
    The init is PID 1 and its children 2..n+1; a migration frees the worker's PID in the source.
    """
    last = {ns: 1 + c for ns, c in zip(spec.namespaces, spec.children, strict=True)}
    used = {ns: set(range(1, 2 + c)) for ns, c in zip(spec.namespaces, spec.children, strict=True)}
    pid = spec.worker_index + 2
    pids = [pid]
    for src, dst in zip(spec.route, spec.route[1:], strict=False):
        used[src].discard(pid)
        pid = last[dst] + 1
        while pid in used[dst]:  # only after a wrap, which small layouts never reach
            pid += 1
        used[dst].add(pid)
        last[dst] = pid
        pids.append(pid)
    return pids


def predict_values(spec: LayoutSpec) -> list[int]:
    """The worker's value at each stop: increments added once per stop, state carried over."""
    return [spec.increments * (hop + 1) for hop in range(len(spec.route))]


# -- one run ---------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What a run produced: its hop rows (as written to hops.csv) and where it wrote them."""

    run_id: str
    backend: str
    testbed: str
    out: Path
    hops: list[dict[str, Any]]
    ok: bool
    error: str | None = None
    processes: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The hop table as text: ns, value, pid, global pid, start time, status."""
        return format_table(self.hops)


def format_table(hops: Sequence[dict[str, Any]]) -> str:
    head = ("hop", "ns", "value", "pid", "global_pid", "start_time", "status")
    rows = [head] + [
        tuple("" if h.get(c) in (None, "") else str(h[c]) for c in head[:-1])
        + (str(h.get("status")) + (f": {h['error']}" if h.get("error") else ""),)
        for h in hops
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1]
        for r in rows
    )


def new_run_id(backend: str) -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{backend}-{secrets.token_hex(3)}"


def _socket_dir() -> str:
    for d in SOCKET_DIRS:
        try:
            os.makedirs(d, mode=0o755, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise RuntimeError(f"no writable directory for the manager socket among {SOCKET_DIRS}")


class _Terminated(Exception):
    """SIGTERM during a run: unwound like Ctrl-C so that teardown runs."""


def run(
    spec: LayoutSpec,
    backend: str,
    testbed: Any,
    out: Path,
    *,
    timeout: float | None = None,
    kernel: str | None = None,
    echo: bool = True,
    record_testbed: str | None = None,
    command: Sequence[str] | None = None,
) -> RunResult:
    """Run the experiment once and write ``out``/{hops.csv, processes.csv, run.json}.

    ``testbed`` is "native", "vm" or a Testbed object. Natively everything happens in this
    process and its forks; on "vm" the run happens inside the guest. ``timeout`` bounds the
    wait for the worker (default grows with the number of hops).
    """
    spec.validate()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    out = Path(out).resolve()
    name = testbed if isinstance(testbed, str) else getattr(testbed, "name", "")
    if name == "native":
        return _run_native(
            spec,
            backend,
            out,
            timeout=timeout,
            echo=echo,
            testbed_label=record_testbed or "native",
            command=command,
        )
    if name == "vm":
        return _run_vm(spec, backend, testbed, out, timeout=timeout, kernel=kernel, echo=echo)
    raise ValueError(f"unknown testbed {testbed!r} (choose from {', '.join(TESTBEDS)})")


def _run_native(
    spec: LayoutSpec,
    backend_name: str,
    out: Path,
    *,
    timeout: float | None,
    echo: bool,
    testbed_label: str,
    command: Sequence[str] | None,
) -> RunResult:
    options = {"log_dir": str(out / "criu-logs")} if backend_name == "criu" else {}
    backend = get_backend(backend_name, **options)
    backend.check()
    run_id = new_run_id(backend_name)
    kernel = os.uname().release
    out.mkdir(parents=True, exist_ok=True)
    for stale in (RECORDS_FILE, HOPS_FILE, PROCESSES_FILE, RUN_FILE):
        (out / stale).unlink(missing_ok=True)
    socket_path = os.path.join(_socket_dir(), f"{run_id}.sock")
    cfg = WorkerConfig(
        run_id=run_id,
        backend=backend_name,
        testbed=testbed_label,
        kernel=kernel,
        socket_path=socket_path,
        out_dir=str(out),
        route=list(spec.route),
        increments=spec.increments,
        echo=echo,
        own_proc=backend_name == "criu",
    )
    worker = Worker(cfg, worker_side(backend_name))
    plans = [
        NamespacePlan(ns, n, {spec.worker_index: worker.start} if ns == spec.worker_ns else {})
        for ns, n in zip(spec.namespaces, spec.children, strict=True)
    ]
    hierarchy = Hierarchy(plans, entries={"worker": worker.resume}, own_proc=cfg.own_proc)
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    snapshots: list[dict[str, Any]] = []
    snap_lock = threading.Lock()

    def on_record(peer: Peer, record: dict[str, Any]) -> None:
        # Runs before the worker is answered, so the tree is exactly as it is after the hop.
        if record.get("status") == "ok" and isinstance(record.get("hop"), int):
            rows = hierarchy.snapshot(record["hop"], peer.pid)
            with snap_lock:
                snapshots.extend(rows)
        events.put(record)

    def on_failure(peer: Peer, req: dict[str, Any], exc: MigrationError) -> None:
        # The requester cannot write this row itself any more (gone or dumped): write it here.
        hop = req.get("hop") if isinstance(req.get("hop"), int) else None
        rec = blank_record(cfg, hop if hop is not None else -1, str(req.get("target")))
        state = req.get("state") if isinstance(req.get("state"), dict) else {}
        rec.update(status="failed", error=str(exc), value=state.get("value"))
        rec["request_sent"] = req.get("request_sent")
        for col, stamp in exc.timings.items():
            if col in rec:
                rec[col] = stamp
        rec["final"] = True
        append_jsonl(records_path(cfg), rec)
        events.put(rec)

    if timeout is None:
        timeout = 30.0 + (30.0 if backend_name == "criu" else 10.0) * spec.hops
    started = dt.datetime.now(dt.UTC)
    error: str | None = None
    old_term = _install_sigterm()
    interrupted: BaseException | None = None
    try:
        with hierarchy.serving(
            backend,
            socket_path,
            policy=zip(spec.route, spec.route[1:], strict=False),
            on_record=on_record,
            on_failure=on_failure,
        ):
            error = _wait_final(events, timeout)
    except (KeyboardInterrupt, _Terminated) as exc:
        error = "interrupted"
        interrupted = exc
    finally:
        signal.signal(signal.SIGTERM, old_term)
    ended = dt.datetime.now(dt.UTC)
    namespaces = {
        name: {"init_pid": ns.init_pid, "inode": ns.inode}
        for name, ns in hierarchy.namespaces.items()
    }
    result = _assemble(
        out,
        spec,
        cfg,
        snapshots,
        namespaces=namespaces,
        error=error,
        started=started,
        ended=ended,
        command=command,
    )
    if interrupted is not None:
        raise KeyboardInterrupt from interrupted
    return result


def _wait_final(events: queue.Queue[dict[str, Any]], timeout: float) -> str | None:
    """Wait for the worker's final record; the run's error (None if every hop happened)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"timed out after {timeout:g} s waiting for the worker"
        try:
            rec = events.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        if rec.get("final"):
            if rec.get("status") != "ok":
                return f"hop {rec.get('hop')} failed: {rec.get('error')}"
            return None


def _install_sigterm() -> Any:
    def handler(signum: int, frame: Any) -> None:
        raise _Terminated()

    if threading.current_thread() is not threading.main_thread():
        return signal.getsignal(signal.SIGTERM)
    return signal.signal(signal.SIGTERM, handler)


def read_records(out: Path) -> list[dict[str, Any]]:
    """The worker's hop records, in hop order."""
    rows = read_jsonl(out / RECORDS_FILE)
    return sorted(rows, key=lambda r: r.get("hop") if isinstance(r.get("hop"), int) else 1e9)


def _assemble(
    out: Path,
    spec: LayoutSpec,
    cfg: WorkerConfig,
    snapshots: list[dict[str, Any]],
    *,
    namespaces: dict[str, dict[str, int]],
    error: str | None,
    started: dt.datetime,
    ended: dt.datetime,
    command: Sequence[str] | None,
) -> RunResult:
    hops = read_records(out)
    _write_csv(out / HOPS_FILE, HOP_COLUMNS, hops)
    _write_csv(out / PROCESSES_FILE, PROCESS_COLUMNS, snapshots)
    complete = len([h for h in hops if h.get("status") == "ok"]) == len(spec.route)
    ok = error is None and complete
    if error is None and not complete:
        error = f"{len(hops)} of {len(spec.route)} hops recorded"
    meta = {
        "run_id": cfg.run_id,
        "backend": cfg.backend,
        "testbed": cfg.testbed,
        "kernel": cfg.kernel,
        "code_version": code_version(),
        "spec": spec.to_dict(),
        "expected": {"pids": predict_pids(spec), "values": predict_values(spec)},
        "namespaces": namespaces,
        "started": started.isoformat(timespec="milliseconds"),
        "ended": ended.isoformat(timespec="milliseconds"),
        "duration_s": round((ended - started).total_seconds(), 3),
        "command": shlex.join(command) if command else shlex.join(sys.argv),
        "ok": ok,
        "error": error,
        "python": sys.version.split()[0],
    }
    (out / RUN_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return RunResult(
        run_id=cfg.run_id,
        backend=cfg.backend,
        testbed=cfg.testbed,
        out=out,
        hops=hops,
        ok=ok,
        error=error,
        processes=snapshots,
        meta=meta,
    )


# -- the VM testbed --------------------------------------------------------------------------


def guest_command(
    spec: LayoutSpec, backend: str, out: Path | str, *, timeout: float, echo: bool = True
) -> str:
    """The shell command that makes one native run inside the guest, recorded as "vm".

    ``python3 -m nsexp.experiment`` imports only this module's standard-library chain (not the
    whole CLI), which matters where each import is slow.
    """
    return shlex.join(
        [
            "python3",
            "-m",
            "nsexp.experiment",
            "run",
            "--backend",
            backend,
            "--testbed",
            "native",
            "--record-testbed",
            "vm",
            "--out",
            str(out),
            "--timeout",
            f"{timeout:g}",
            *([] if echo else ["--quiet"]),
            *spec.cli_args(),
        ]
    )


def _run_vm(
    spec: LayoutSpec,
    backend: str,
    testbed: Any,
    out: Path,
    *,
    timeout: float | None,
    kernel: str | None,
    echo: bool,
) -> RunResult:
    from nsexp import testbed as tb  # host side only

    bed = testbed if not isinstance(testbed, str) else tb.get_testbed("vm", kernel=kernel)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (RECORDS_FILE, HOPS_FILE, PROCESSES_FILE, RUN_FILE):
        (out / stale).unlink(missing_ok=True)
    inner = (
        timeout if timeout is not None else 60.0 + (30.0 if backend == "criu" else 10.0) * spec.hops
    )
    guest = guest_command(spec, backend, out, timeout=inner, echo=echo)
    batch = bed.run_batch([guest], out_dir=out, timeout=inner + 600, load_module=backend == "kmod")
    res = batch.results[0]
    if echo:
        # The worker's own lines, as printed inside the guest (the table is reprinted below).
        for line in res.stdout.splitlines():
            if line.startswith("hop ") and line[4:5].isdigit():
                print(f"[guest] {line}")
    meta: dict[str, Any] = {}
    if (out / RUN_FILE).exists():
        meta = json.loads((out / RUN_FILE).read_text())
    meta["vm"] = {
        "kernel_release": batch.kernel_release,
        "module_loaded": batch.module_loaded,
        "module_unloaded": batch.module_unloaded,
        "kernel_log_problems": batch.kernel_log_problems(),
        "returncode": res.returncode,
        "timed_out": res.timed_out,
        "duration_s": round(res.duration_s, 3),
        "host_command": shlex.join(sys.argv),
    }
    (out / "dmesg.txt").write_text(batch.dmesg or "")
    hops = read_records(out)
    error = meta.get("error")
    if not meta.get("run_id"):
        error = f"the guest run wrote no run.json (exit {res.returncode}): {res.stderr[-2000:]}"
        meta.update(backend=backend, testbed="vm", kernel=batch.kernel_release, error=error)
    if backend == "kmod" and not batch.module_loaded:
        error = error or "the nsmigrate module could not be loaded in the guest"
    ok = bool(meta.get("ok")) and error is None
    meta["ok"] = ok
    meta["error"] = error
    (out / RUN_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    processes: list[dict[str, Any]] = []
    if (out / PROCESSES_FILE).exists():
        with (out / PROCESSES_FILE).open() as f:
            processes = list(csv.DictReader(f))
    return RunResult(
        run_id=str(meta.get("run_id", "")),
        backend=backend,
        testbed="vm",
        out=out,
        hops=hops,
        ok=ok,
        error=error,
        processes=processes,
        meta=meta,
    )


# -- many clients at once --------------------------------------------------------------------


CONCURRENCY_FILE = "concurrency.json"


def concurrency(backend_name: str, clients: int, out: Path, timeout: float = 120.0) -> dict:
    """``clients`` processes of namespace A ask at the same moment to move to namespace B.

    Each writes what it became (pid, namespace, start time) to ``out``; the summary goes to
    ``out/concurrency.json`` and is returned. With kmod the same processes continue in B (same
    start time); with restart successors are forked there. B's next free PIDs are 2..clients+1.
    """
    backend = get_backend(backend_name)
    backend.check()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    landed_dir = out / "landed"
    landed_dir.mkdir(exist_ok=True)
    for old in landed_dir.glob("*.json"):
        old.unlink()
    socket_path = os.path.join(_socket_dir(), f"{new_run_id(backend_name)}-conc.sock")
    side = worker_side(backend_name, entry="land") if backend_name == "restart" else None
    side = side or worker_side(backend_name)

    def land(state: dict[str, Any], error: str | None = None) -> None:
        from nsexp import nsutil

        me = nsutil.self_info()
        rec = {**state, "pid": os.getpid(), "global_pid": me.global_pid, "inode": me.ns_inode}
        rec.update(start_time_after=me.start_time, error=error)
        tmp = landed_dir / f"{state['i']}.tmp"
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, landed_dir / f"{state['i']}.json")

    def client(i: int) -> Any:
        def main() -> None:
            from nsexp import nsutil
            from nsexp.client import Client, ManagerError

            side.prepare()
            me = nsutil.self_info()
            state = {"i": i, "pid_before": os.getpid(), "start_time_before": me.start_time}
            try:
                reply = Client(socket_path).migrate(
                    "B", request_sent=time.monotonic_ns(), **side.request_fields(state)
                )
                if side.after_reply(reply) is None:
                    return  # restart: the successor reports
            except (ManagerError, MigrationError) as exc:
                land(state, str(exc))
                return
            land(state)

        return main

    hierarchy = Hierarchy(
        [
            NamespacePlan("A", clients, {i: client(i) for i in range(clients)}),
            NamespacePlan("B", 0),
        ],
        entries={"land": lambda payload: land(payload["state"])},
    )
    manager = None
    started = time.monotonic()
    try:
        hierarchy.start()
        manager = Manager(socket_path, backend, hierarchy.namespaces, {("A", "B")})
        manager.start()
        hierarchy.go()
        deadline = time.monotonic() + timeout
        while len(list(landed_dir.glob("*.json"))) < clients and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        inode_b = hierarchy.namespaces["B"].inode
    finally:
        if manager is not None:
            manager.stop(timeout=2.0)
        hierarchy.stop()
    rows = [json.loads(p.read_text()) for p in sorted(landed_dir.glob("*.json"))]
    ok_rows = [r for r in rows if not r.get("error")]
    summary = {
        "backend": backend_name,
        "clients": clients,
        "landed": len(ok_rows),
        "errors": [r["error"] for r in rows if r.get("error")],
        "pids": sorted(r["pid"] for r in ok_rows),
        "all_in_target": all(r["inode"] == inode_b for r in ok_rows),
        "same_process": all(r["start_time_before"] == r["start_time_after"] for r in ok_rows),
        "elapsed_s": round(elapsed, 3),
        "kernel": os.uname().release,
    }
    (out / CONCURRENCY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# -- command line ----------------------------------------------------------------------------


def _csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="kmod")
    p.add_argument("--testbed", choices=TESTBEDS, default="vm")
    p.add_argument("--out", type=Path, required=True, help="run folder to write")
    p.add_argument("--kernel", help="VM kernel release (default: the testbed's)")
    p.add_argument(
        "--namespaces", help="number of namespaces, or their names (NS2,NS3,...); default 4"
    )
    p.add_argument("--children", help="children per namespace, e.g. 2,3,4,5")
    p.add_argument("--increments", type=int, default=100, help="additions per hop (N)")
    p.add_argument("--route", help="namespaces visited, e.g. NS2,NS3,NS4,NS5 (may cycle)")
    p.add_argument("--hops", type=int, help="number of migrations (the route cycles)")
    p.add_argument("--worker-index", type=int, default=1, help="worker's index among siblings")
    p.add_argument("--timeout", type=float, help="seconds to wait for the worker")
    p.add_argument("--quiet", action="store_true", help="do not let the worker print its hops")
    p.add_argument(
        "--figures",
        type=Path,
        help="also draw the run's hop table and process trees into this folder (host side)",
    )
    p.add_argument("--record-testbed", help=argparse.SUPPRESS)  # "vm" when run inside the guest


def spec_from_args(args: argparse.Namespace) -> LayoutSpec:
    namespaces: int | list[str] | None = None
    if args.namespaces:
        namespaces = (
            int(args.namespaces) if args.namespaces.isdigit() else _csv_list(args.namespaces)
        )
    children = [int(c) for c in _csv_list(args.children)] if args.children else None
    route = _csv_list(args.route) if args.route else None
    return LayoutSpec.make(
        namespaces=namespaces,
        children=children,
        increments=args.increments,
        route=route,
        hops=args.hops,
        worker_index=args.worker_index,
    )


def command(args: argparse.Namespace) -> int:
    """``nsexp run``: run once, print the hop table, exit 0 only if every hop happened."""
    try:
        spec = spec_from_args(args)
    except ValueError as exc:
        print(f"nsexp run: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(
            spec,
            args.backend,
            args.testbed,
            args.out,
            timeout=args.timeout,
            kernel=args.kernel,
            echo=not args.quiet,
            record_testbed=args.record_testbed,
            command=["nsexp", *sys.argv[1:]],
        )
    except Exception as exc:  # noqa: BLE001 - a clear message instead of a traceback
        if type(exc).__name__ == "TestbedError":
            raise
        print(f"nsexp run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"run {result.run_id} ({result.backend} on {result.testbed}) -> {result.out}")
    print(result.table())
    if not result.ok:
        print(f"nsexp run: {result.error}", file=sys.stderr)
    if getattr(args, "figures", None):
        # pandas and matplotlib are host-side only: imported here, never in the guest.
        from nsexp.plotting import figures_for_run

        for path in figures_for_run(result.out, args.figures):
            print(f"figure {path}")
    return 0 if result.ok else 1


def register_cli(subparsers: Any) -> None:
    """Add ``nsexp run`` to the CLI."""
    p = subparsers.add_parser("run", help="run the chained-execution experiment once")
    add_arguments(p)
    p.set_defaults(func=command)


def _concurrency_command(args: argparse.Namespace) -> int:
    summary = concurrency(args.backend, args.clients, args.out, timeout=args.timeout)
    print(json.dumps(summary))
    return 0 if summary["landed"] == args.clients and summary["all_in_target"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nsexp.experiment {run,concurrency}``: what the VM guest runs."""
    parser = argparse.ArgumentParser(prog="python -m nsexp.experiment")
    sub = parser.add_subparsers(dest="cmd", required=True)
    register_cli(sub)
    p = sub.add_parser("concurrency", help="many clients migrating at the same moment")
    p.add_argument("--backend", choices=BACKENDS, default="kmod")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=_concurrency_command)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
