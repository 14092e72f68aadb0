"""C1_A, the worker of the chained execution: compute, record, migrate, repeat.

At each stop of its route it adds 1 to its value ``increments`` times, records what it is (value,
PID in its namespace, global PID, parent, start time) with the timestamps of the migration that
brought it there, and asks the manager to move it to the next namespace. Records are appended
as JSON lines to the run's records file and handed to the manager (the experiment snapshots the
process tree before answering). Everything printed is read from the process itself.
Standard library only, single-threaded: it runs inside a PID namespace.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nsexp import nsutil
from nsexp.backends import MigrationError, WorkerSide
from nsexp.client import Client, ManagerError
from nsexp.records import HOP_COLUMNS, RECORDS_FILE, STAMPS, append_jsonl

TIMING_COLUMNS = STAMPS
REEXEC_ENV = "NSEXP_WORKER_CONFIG"  # set in a worker that re-executed itself (criu)


@dataclass
class WorkerConfig:
    """What the worker knows from the start (inherited through fork, never sent)."""

    run_id: str
    backend: str
    testbed: str
    kernel: str
    socket_path: str
    out_dir: str
    route: list[str]
    increments: int
    echo: bool = True  # print one line per hop to stdout
    own_proc: bool = False  # /proc is the namespace's (criu): ask the manager for the global pid


def blank_record(cfg: WorkerConfig, hop: int, ns: str) -> dict[str, Any]:
    """A hop row with the run's columns filled and everything else empty."""
    rec: dict[str, Any] = {c: None for c in HOP_COLUMNS}
    rec.update(
        run_id=cfg.run_id,
        backend=cfg.backend,
        testbed=cfg.testbed,
        kernel=cfg.kernel,
        hop=hop,
        ns=ns,
    )
    return rec


def append_record(out_dir: str, record: dict[str, Any]) -> None:
    """Append one hop record to the run's records file."""
    append_jsonl(Path(out_dir) / RECORDS_FILE, record)


class Worker:
    """The chained-execution process; ``side`` is its backend's worker side."""

    def __init__(self, cfg: WorkerConfig, side: WorkerSide) -> None:
        self.cfg = cfg
        self.side = side
        self.client = Client(cfg.socket_path)

    def start(self) -> None:
        """Entry of the original process (hop 0, no migration before it)."""
        if self.cfg.own_proc and REEXEC_ENV not in os.environ:
            self._reexec()
        self.side.prepare()
        self.run({"value": 0, "hop": 0, "route": self.cfg.route}, {}, None)

    def _reexec(self) -> None:
        """Start over as a fresh interpreter, same process (criu only).

        The process was forked before its init entered a new mount namespace, so its memory
        maps files through the old namespace's mounts, which CRIU cannot find ("Can't lookup
        mount"). exec maps everything again from the current namespace; the PID stays.
        """
        env = dict(os.environ)
        env[REEXEC_ENV] = json.dumps(asdict(self.cfg))
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "nsexp.worker"], env)

    def now(self) -> int:
        """CLOCK_MONOTONIC in ns, on the host's clock even after a CRIU restore."""
        stamp = time.monotonic_ns()
        if self.cfg.own_proc:  # criu: the restored task lives in a time namespace
            stamp -= nsutil.monotonic_offset_ns()
        return stamp

    def resume(self, payload: dict[str, Any]) -> None:
        """Entry of a restart successor: carry on from the forwarded state."""
        resumed = self.now()
        self.side.prepare()
        self.run(dict(payload["state"]), dict(payload.get("timings") or {}), resumed)

    def run(self, state: dict[str, Any], timings: dict[str, Any], resumed: int | None) -> None:
        route = self.cfg.route
        while True:
            hop = int(state["hop"])
            value = int(state["value"])
            for _ in range(self.cfg.increments):
                value += 1
            state["value"] = value
            self.emit(self.observe(hop, value, timings, resumed), final=hop == len(route) - 1)
            if hop == len(route) - 1:
                return
            target = route[hop + 1]
            state["hop"] = hop + 1
            sent = self.now()
            try:
                reply = self.client.migrate(
                    target, hop=hop + 1, request_sent=sent, **self.side.request_fields(state)
                )
                after = self.side.after_reply(reply)
            except (ManagerError, MigrationError) as exc:
                self.emit(self.failure(hop + 1, target, value, sent, exc), final=True)
                return
            if after is None:
                return  # restart: the successor carries on; this process ends here
            resumed = self.now()
            timings = {**after, "request_sent": sent}
            if "pid" in reply and reply["pid"] != os.getpid():
                timings["_error"] = f"manager reported pid {reply['pid']}, getpid {os.getpid()}"

    def observe(
        self, hop: int, value: int, timings: dict[str, Any], resumed: int | None
    ) -> dict[str, Any]:
        """This process as it is now, plus the timings of the hop that brought it here."""
        me = nsutil.self_info()
        global_pid = me.global_pid
        if self.cfg.own_proc:
            try:
                global_pid = int(self.client.ping()["global_pid"])
            except (ManagerError, KeyError, ValueError):
                global_pid = None
        start_time = me.start_time
        if self.cfg.own_proc:  # /proc shows start times on the time namespace's boot clock
            tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
            start_time -= nsutil.monotonic_offset_ns("boottime") // tick_ns
        rec = blank_record(self.cfg, hop, self.cfg.route[hop])
        rec.update(
            value=value,
            pid=os.getpid(),
            global_pid=global_pid,
            ppid=os.getppid(),
            start_time=start_time,
            status="ok",
            error=timings.get("_error"),
        )
        for col in TIMING_COLUMNS:
            if timings.get(col) is not None:
                rec[col] = int(timings[col])
        rec["resumed"] = resumed
        if me.pid != rec["pid"]:
            rec["status"] = "failed"
            rec["error"] = f"getpid {rec['pid']} but /proc NSpid says {me.pid}"
        return rec

    def failure(
        self, hop: int, target: str, value: int, sent: int, exc: ManagerError | MigrationError
    ) -> dict[str, Any]:
        """The row of a hop that did not happen: no PID, the error as the mechanism gave it."""
        rec = blank_record(self.cfg, hop, target)
        rec.update(value=value, request_sent=sent, status="failed", error=str(exc))
        for col, stamp in (getattr(exc, "timings", None) or {}).items():
            if col in TIMING_COLUMNS and stamp is not None:
                rec[col] = int(stamp)
        return rec

    def emit(self, record: dict[str, Any], final: bool) -> None:
        """Write the record, print it, and hand it to the manager (which may snapshot)."""
        record = {**record, "final": final or record["status"] != "ok"}
        append_record(self.cfg.out_dir, record)
        if self.cfg.echo:
            print(format_hop(record), flush=True)
        try:
            self.client.record(record)
        except ManagerError as exc:
            print(f"nsexp worker: could not report hop {record['hop']}: {exc}", file=sys.stderr)


def format_hop(rec: dict[str, Any]) -> str:
    """One human line per hop, from the recorded values."""
    if rec.get("status") != "ok":
        return f"hop {rec['hop']} {rec['ns']}: FAILED {rec.get('error')}"
    return (
        f"hop {rec['hop']} {rec['ns']}: value {rec['value']} pid {rec['pid']} "
        f"(global {rec['global_pid']}, ppid {rec['ppid']}, start {rec['start_time']})"
    )


def main() -> None:
    """``python -m nsexp.worker``: a worker that re-executed itself carries on here."""
    from nsexp.backends import worker_side

    nsutil.set_comm("nsexp-worker")
    cfg = WorkerConfig(**json.loads(os.environ[REEXEC_ENV]))
    Worker(cfg, worker_side(cfg.backend)).start()


if __name__ == "__main__":
    main()
