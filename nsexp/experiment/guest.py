"""One run of the experiment in this kernel: what the guest runs, and the native testbed.

The run builds the hierarchy (``nsexp.hierarchy``) in this process, serves migrations from the
manager (``nsexp.manager``) in threads of this same process on the one stage
(:meth:`~nsexp.hierarchy.Hierarchy.serving`), lets the worker go and waits until it has made its
last hop (or failed). Then everything is torn down and the run folder gets ``hops.csv`` (one row
per hop, from the worker's records), ``processes.csv`` (the tree before the first hop and after
each hop) and ``run.json`` (metadata, provenance included).

The guest's entry point: ``python3 -m nsexp.experiment.guest --out DIR [layout options]``
(:func:`main`). Standard library only: everything this module imports runs in the guest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import queue
import secrets
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsexp import records
from nsexp.backends import BACKENDS, MigrationError, Peer, get_backend, worker_side
from nsexp.experiment.layout import (
    LayoutSpec,
    add_layout_arguments,
    predict_pids,
    predict_values,
    spec_from_args,
)
from nsexp.experiment.worker import Worker, WorkerConfig, blank_record, records_path
from nsexp.hierarchy import Hierarchy, NamespacePlan

SOCKET_DIRS = ("/run/nsexp", "/tmp/nsexp")  # never the 9p share: no sockets there


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


def socket_dir() -> str:
    """A directory for the manager's socket: the guest's own tmpfs, never the 9p share."""
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


def run_here(
    spec: LayoutSpec,
    backend_name: str,
    out: Path,
    *,
    timeout: float | None = None,
    echo: bool = True,
    testbed_label: str = "native",
    command: str | None = None,
    code_version: str | None = None,
) -> RunResult:
    """Run the experiment once in this kernel and write ``out``/{hops.csv, processes.csv,
    run.json}: the tree and the manager (threads of this process) on one stage, the worker in
    the tree, until its last hop, a failure or ``timeout`` (default: the layout's).

    ``code_version`` and ``command`` are recorded as given (the host takes them before the
    run starts); without them this process takes its own.
    """
    if code_version is None:
        code_version = records.code_version()
    if command is None:
        command = records.command_line()
    options = {"log_dir": str(out / "criu-logs")} if backend_name == "criu" else {}
    backend = get_backend(backend_name, **options)
    backend.check()
    run_id = new_run_id(backend_name)
    kernel = os.uname().release
    records.clear_run_dir(out)
    socket_path = os.path.join(socket_dir(), f"{run_id}.sock")
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
        records.append_jsonl(records_path(cfg), rec)
        events.put(rec)

    if timeout is None:
        timeout = spec.guest_timeout(backend_name)
    started = dt.datetime.now(dt.UTC)
    error: str | None = None
    old_term = _install_sigterm()
    interrupted: BaseException | None = None
    broken: Exception | None = None
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
    except Exception as exc:  # the stage itself failed: the run folder still says how
        error = f"{type(exc).__name__}: {exc}"
        broken = exc
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
        code_version=code_version,
    )
    if interrupted is not None:
        raise KeyboardInterrupt from interrupted
    if broken is not None:
        raise broken
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
    rows = records.read_jsonl(out / records.RECORDS_FILE)
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
    command: str,
    code_version: str,
) -> RunResult:
    hops = read_records(out)
    records.write_csv(out / records.HOPS_FILE, records.HOP_COLUMNS, hops)
    records.write_csv(out / records.PROCESSES_FILE, records.PROCESS_COLUMNS, snapshots)
    complete = len([h for h in hops if h.get("status") == "ok"]) == len(spec.route)
    ok = error is None and complete
    if error is None and not complete:
        error = f"{len(hops)} of {len(spec.route)} hops recorded"
    meta = {
        "run_id": cfg.run_id,
        "backend": cfg.backend,
        "testbed": cfg.testbed,
        "kernel": cfg.kernel,
        "code_version": code_version,
        "spec": spec.to_dict(),
        "expected": {"pids": predict_pids(spec), "values": predict_values(spec)},
        "namespaces": namespaces,
        "started": started.isoformat(timespec="milliseconds"),
        "ended": ended.isoformat(timespec="milliseconds"),
        "duration_s": round((ended - started).total_seconds(), 3),
        "command": command,
        "ok": ok,
        "error": error,
        "python": sys.version.split()[0],
    }
    (out / records.RUN_FILE).write_text(json.dumps(meta, indent=2) + "\n")
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


def add_guest_arguments(p: argparse.ArgumentParser) -> None:
    """Options of one run in this kernel (the host's ``nsexp run`` adds its own)."""
    p.add_argument("--backend", choices=BACKENDS, default="kmod")
    p.add_argument("--out", type=Path, required=True, help="run folder to write")
    p.add_argument("--timeout", type=float, help="seconds to wait for the worker")
    p.add_argument("--quiet", action="store_true", help="do not let the worker print its hops")
    add_layout_arguments(p)


def guest_parser() -> argparse.ArgumentParser:
    """The options of :func:`main` (what :func:`nsexp.experiment.host.guest_command` writes)."""
    parser = argparse.ArgumentParser(prog="python3 -m nsexp.experiment.guest")
    add_guest_arguments(parser)
    parser.add_argument("--record-testbed", default="native", help="testbed to record (vm)")
    parser.add_argument("--code-version", help="the code version the host took before the run")
    parser.add_argument("--command", help="the command a person ran on the host")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m nsexp.experiment.guest``: one run here; exit 0 only if every hop happened."""
    parser = guest_parser()
    args = parser.parse_args(argv)
    spec = spec_from_args(args)
    result = run_here(
        spec,
        args.backend,
        args.out.resolve(),
        timeout=args.timeout,
        echo=not args.quiet,
        testbed_label=args.record_testbed,
        command=args.command,
        code_version=args.code_version,
    )
    print(f"run {result.run_id} ({result.backend} on {result.testbed}) -> {result.out}")
    print(result.table())
    if not result.ok:
        print(f"guest: {result.error}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
