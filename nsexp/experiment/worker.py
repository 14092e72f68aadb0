"""C1_A, the worker of the chained execution: compute, record, migrate, repeat.

At each stop of its route it adds 1 to its value ``increments`` times, records what it is (value,
PID in its namespace, global PID, parent, start time) with the timestamps of the migration that
brought it there, and asks the manager to move it to the next namespace. Everything recorded is
read from the process itself. Standard library only, single-threaded: it runs inside a PID
namespace, in the guest.

The benchmarks build their migrating process on this one (``nsexp.bench.guest``), through three
hooks a subclass overrides: :meth:`Worker.before_hop` (called right before each migration
request, outside the timed interval of the previous hop), :meth:`Worker.sink` (where each hop
record goes; by default the run's records file, stdout and the manager) and the done file
(``WorkerConfig.done_path``: ``{"ok", "error"}`` written once the worker ends, however it ends).
A subclass keeps its settings in ``WorkerConfig.extra`` and names itself in
``WorkerConfig.factory``, so that a worker that re-executes itself (criu) comes back as itself.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nsexp import nsutil
from nsexp.backends import MigrationError, WorkerSide, worker_side
from nsexp.client import Client, ManagerError
from nsexp.records import HOP_COLUMNS, RECORDS_FILE, STAMPS, append_jsonl

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
    records_path: str = ""  # where sink() appends records; default out_dir/records.jsonl
    done_path: str = ""  # if set, {"ok", "error"} is written there when the worker ends
    report: bool = True  # hand each record to the manager (the experiment snapshots the tree)
    entry: str = "worker"  # restart: the entry point a successor runs (Hierarchy entries)
    timeout: float | None = None  # bound on each exchange with the manager
    factory: str = "nsexp.experiment.worker:Worker"  # the class a re-executed worker rebuilds
    extra: dict[str, Any] = field(default_factory=dict)  # a subclass's own settings


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


def records_path(cfg: WorkerConfig) -> str:
    """The file the worker's hop records go to."""
    return cfg.records_path or str(Path(cfg.out_dir) / RECORDS_FILE)


class Worker:
    """The chained-execution process; ``side`` is its backend's worker side."""

    def __init__(self, cfg: WorkerConfig, side: WorkerSide | None = None) -> None:
        self.cfg = cfg
        if side is None:
            opts = {"entry": cfg.entry} if cfg.backend == "restart" else {}
            side = worker_side(cfg.backend, **opts)
        self.side = side
        self.client = Client(cfg.socket_path, timeout=cfg.timeout)

    # -- hooks (a subclass overrides these) ----------------------------------------------------

    def before_hop(self, hop: int, target: str) -> None:
        """Called right before the request that makes hop ``hop`` (to ``target``). No-op here."""

    def sink(self, record: dict[str, Any]) -> None:
        """Where a hop record goes: the records file, one printed line, and the manager."""
        append_jsonl(records_path(self.cfg), record)
        if self.cfg.echo:
            print(format_hop(record), flush=True)
        if not self.cfg.report:
            return
        try:
            self.client.record(record)
        except ManagerError as exc:
            print(f"nsexp worker: could not report hop {record['hop']}: {exc}", file=sys.stderr)

    def finish(self, error: str | None) -> None:
        """The worker ends (route done, a hop failed, or an exception): write the done file."""
        if not self.cfg.done_path:
            return
        tmp = self.cfg.done_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"ok": error is None, "error": error}, f)
        os.replace(tmp, self.cfg.done_path)  # a waiter polls for the final name

    # -- entry points ----------------------------------------------------------------------------

    def start(self) -> None:
        """Entry of the original process (hop 0, no migration before it)."""
        if self.cfg.own_proc and REEXEC_ENV not in os.environ:
            self._reexec()
        self._guarded(lambda: self._first())

    def _first(self) -> None:
        self.side.prepare()
        self.run({"value": 0, "hop": 0}, {}, None)

    def resume(self, payload: dict[str, Any]) -> None:
        """Entry of a restart successor: carry on from the forwarded state."""
        resumed = self.now()

        def carry_on() -> None:
            self.side.prepare()
            self.run(dict(payload["state"]), dict(payload.get("timings") or {}), resumed)

        self._guarded(carry_on)

    def _guarded(self, body: Any) -> None:
        try:
            body()
        except BaseException as exc:  # the waiter must hear of it, whatever it was
            self.finish(f"{type(exc).__name__}: {exc}")
            raise

    def _reexec(self) -> None:
        """Start over as a fresh interpreter, same process (criu only).

        The process was forked before its init entered a new mount namespace, so its memory
        maps files through the old namespace's mounts, which CRIU cannot find ("Can't lookup
        mount"). exec maps everything again from the current namespace; the PID stays.
        """
        env = dict(os.environ)
        env[REEXEC_ENV] = json.dumps(asdict(self.cfg))
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        sys.stdout.flush()
        sys.stderr.flush()
        # -c, not -m: under -m this module would run as __main__, a second copy of its classes.
        code = "from nsexp.experiment.worker import main; main()"
        os.execve(sys.executable, [sys.executable, "-c", code], env)

    def now(self) -> int:
        """CLOCK_MONOTONIC in ns, on the host's clock even after a CRIU restore."""
        stamp = time.monotonic_ns()
        if self.cfg.own_proc:  # criu: the restored task lives in a time namespace
            stamp -= nsutil.monotonic_offset_ns()
        return stamp

    def run(self, state: dict[str, Any], timings: dict[str, Any], resumed: int | None) -> None:
        """Compute, record, migrate, until the route ends or a hop fails."""
        route = self.cfg.route
        while True:
            hop = int(state["hop"])
            value = int(state["value"])
            for _ in range(self.cfg.increments):
                value += 1
            state["value"] = value
            last = hop == len(route) - 1
            self.emit(self.observe(hop, value, timings, resumed), final=last)
            if last:
                return
            target = route[hop + 1]
            state["hop"] = hop + 1
            self.before_hop(hop + 1, target)
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
        for col in STAMPS:
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
            if col in STAMPS and stamp is not None:
                rec[col] = int(stamp)
        return rec

    def emit(self, record: dict[str, Any], final: bool) -> None:
        """Hand the record to the sink; a final one (last stop or a failure) ends the worker."""
        final = final or record["status"] != "ok"
        self.sink({**record, "final": final})
        if final:
            self.finish(
                None
                if record["status"] == "ok"
                else f"hop {record['hop']} failed: {record['error']}"
            )


def format_hop(rec: dict[str, Any]) -> str:
    """One human line per hop, from the recorded values."""
    if rec.get("status") != "ok":
        return f"hop {rec['hop']} {rec['ns']}: FAILED {rec.get('error')}"
    return (
        f"hop {rec['hop']} {rec['ns']}: value {rec['value']} pid {rec['pid']} "
        f"(global {rec['global_pid']}, ppid {rec['ppid']}, start {rec['start_time']})"
    )


def _factory(path: str) -> type[Worker]:
    module, _, name = path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Worker)):
        raise TypeError(f"{path} is not a Worker class")
    return cls


def main() -> None:
    """A worker that re-executed itself (see :meth:`Worker._reexec`) carries on here."""
    nsutil.set_comm("nsexp-worker")
    cfg = WorkerConfig(**json.loads(os.environ[REEXEC_ENV]))
    _factory(cfg.factory)(cfg).start()
