"""Guest side of ``nsexp bench hop`` and ``nsexp bench scaling``: standard library only.

Run inside the testbed as ``python3 -m nsexp.benchguest {hop,scaling} --out DIR --params JSON``.
Every measurement goes through the real pieces: the manager (``nsexp.manager``) in threads of this
process, its backends, its Unix socket on the guest's /run, and migrating processes that are
clients of it (``nsexp.client``), exactly as in the chained experiment. One Python interpreter
runs every session of a benchmark, because an interpreter costs about a second under TCG.

Output, in ``DIR``: ``<bench>-raw.csv`` (one row per measured hop or round trip, every
CLOCK_MONOTONIC stamp the pieces saw), ``<bench>-guest.json`` (the guest's facts: kernel,
CPUs, pid_max, errors of sessions that failed) and ``progress.log`` (tailed by the host).

Per-hop records are appended to a file on the guest's own /tmp, outside the timed interval
(between "resumed" and the next "request sent"), and copied to ``DIR`` after the session.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nsexp import nsutil
from nsexp.backends import get_backend, worker_side
from nsexp.client import Client
from nsexp.hierarchy import Hierarchy, NamespacePlan
from nsexp.manager import Manager

#: Stamps a hop record may carry (request_sent .. resumed as in the experiment's hops.csv;
#: dump_done/restore_done from the criu backend).
STAMPS = (
    "request_sent",
    "manager_received",
    "migrate_started",
    "kernel_queued",
    "kernel_switch_started",
    "kernel_done",
    "dump_done",
    "restore_done",
    "reply_sent",
    "resumed",
)
#: Columns of the raw tables the guest writes (the host adds run metadata).
RAW_COLUMNS = (
    "sweep",
    "backend",
    "kind",
    "x",
    "client",
    "i",
    "warmup",
    "status",
    "error",
    "ns",
    "pid",
    "global_pid",
    "start_time",
    *STAMPS,
)
GUEST_DIR = "/run/nsexp-bench"  # sockets and per-hop files: the guest's tmpfs, never 9p

_progress_path: Path | None = None


def progress(msg: str) -> None:
    """One line to the host (``progress.log`` in the shared folder) and to stderr."""
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, file=sys.stderr, flush=True)
    if _progress_path is not None:
        with open(_progress_path, "a") as f:
            f.write(line + "\n")


def _append(path: str, rec: dict[str, Any]) -> None:
    # One write on an O_APPEND fd opened each time: nothing stays open (CRIU must dump us).
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())
    finally:
        os.close(fd)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # torn last line of a killed process
    return rows


# -- the migrating process -------------------------------------------------------------------


class Migrator:
    """A manager client that hops along ``route`` ``warmup + n`` times, recording each hop.

    The same object runs in the original process and, for the restart backend, in each successor
    (forked by the target's init, which inherited this object through fork). ``pings`` bare
    round trips to the manager (op ``ping``: same socket, same framing, same peer lookup, no
    migration) come first, from inside the namespace.
    """

    def __init__(
        self,
        *,
        backend: str,
        socket_path: str,
        route: list[str],
        n: int,
        warmup: int,
        records: str,
        done: str,
        tags: dict[str, Any],
        pings: int = 0,
        ping_warmup: int = 0,
        start_at: int = 0,
        interleave: bool = False,
    ) -> None:
        self.backend = backend
        self.socket_path = socket_path
        self.route = route
        self.n = n
        self.warmup = warmup
        self.records = records
        self.done = done
        self.tags = tags
        self.pings = pings
        self.ping_warmup = ping_warmup
        self.start_at = start_at
        self.interleave = interleave
        opts = {"entry": "bench"} if backend == "restart" else {}
        self.side = worker_side(backend, **opts)

    def _rec(self, kind: str, i: int, warm: bool, **fields: Any) -> dict[str, Any]:
        """A record; ``i`` counts measured repetitions from 0 (warm-up ones are negative)."""
        me = nsutil.self_info()
        # With a namespace's own /proc (criu) /proc/self gives the in-namespace pid only.
        global_pid = None if self.backend == "criu" else me.global_pid
        rec = {
            **self.tags,
            "kind": kind,
            "i": i,
            "warmup": int(warm),
            "pid": os.getpid(),
            "global_pid": global_pid,
            "start_time": me.start_time,
            "status": "ok",
        }
        rec.update(fields)
        return rec

    def start(self) -> None:
        """Entry of the original process: pings, then the hops."""
        self.side.prepare()
        client = Client(self.socket_path, timeout=600)
        try:
            for j in range(self.ping_warmup + self.pings):
                t0 = time.monotonic_ns()
                client.ping()
                t1 = time.monotonic_ns()
                k = j - self.ping_warmup
                _append(
                    self.records, self._rec("round_trip", k, k < 0, request_sent=t0, resumed=t1)
                )
            self.loop({"i": 0, "at": self.start_at, "k": self.tags.get("client", 0)}, None, None)
        except BaseException as exc:  # noqa: BLE001 - the driver must hear of it
            self.finish(f"{type(exc).__name__}: {exc}")
            raise

    def resume(self, payload: dict[str, Any]) -> None:
        """Entry of a restart successor: record the hop that created it, carry on."""
        resumed = time.monotonic_ns()
        self.side.prepare()
        try:
            self.loop(dict(payload["state"]), dict(payload.get("timings") or {}), resumed)
        except BaseException as exc:  # noqa: BLE001
            self.finish(f"{type(exc).__name__}: {exc}")
            raise

    def loop(self, state: dict[str, Any], timings: dict[str, Any] | None, resumed: int | None):
        client = Client(self.socket_path, timeout=600)
        total = self.warmup + self.n
        if timings is not None:
            self._hop_done(state, timings, resumed)
        while state["i"] < total:
            i, at = state["i"], state["at"]
            if self.interleave:
                # A bare round trip right before each hop: both see the same conditions
                # (the host's load drifts; under TCG that matters more than anything).
                t0 = time.monotonic_ns()
                client.ping()
                t1 = time.monotonic_ns()
                rt = self._rec("round_trip", i - self.warmup, i < self.warmup, request_sent=t0)
                _append(self.records, {**rt, "resumed": t1})
            nxt = (at + 1) % len(self.route)
            target = self.route[nxt]
            new_state = {**state, "i": i + 1, "at": nxt}
            sent = time.monotonic_ns()
            try:
                reply = client.migrate(
                    target, request_sent=sent, **self.side.request_fields(new_state)
                )
                after = self.side.after_reply(reply)
            except Exception as exc:  # noqa: BLE001 - record the failed hop, stop
                _append(
                    self.records,
                    self._rec(
                        "hop",
                        i - self.warmup,
                        i < self.warmup,
                        ns=target,
                        status="failed",
                        error=str(exc)[:500],
                        request_sent=sent,
                        **{
                            k: v
                            for k, v in (getattr(exc, "timings", None) or {}).items()
                            if k in STAMPS and k != "request_sent"
                        },
                    ),
                )
                self.finish(f"hop {i} failed: {exc}")
                return
            if after is None:
                return  # restart: this process ends, the successor records the hop
            self._hop_done(new_state, {**after, "request_sent": sent}, time.monotonic_ns())
            state = new_state
        self.finish(None)

    def _hop_done(self, state: dict[str, Any], timings: dict[str, Any], resumed: int | None):
        i = state["i"] - 1
        stamps = {k: timings.get(k) for k in STAMPS if timings.get(k) is not None}
        stamps["resumed"] = resumed
        rec = self._rec(
            "hop", i - self.warmup, i < self.warmup, ns=self.route[state["at"]], **stamps
        )
        me_pid = nsutil.self_info().pid
        if me_pid != rec["pid"]:
            rec.update(status="failed", error=f"getpid {rec['pid']} but NSpid says {me_pid}")
        _append(self.records, rec)
        if i + 1 == self.warmup + self.n or (i + 1) % max(1, (self.warmup + self.n) // 4) == 0:
            _append(self.done + ".progress", {"i": i + 1})

    def finish(self, error: str | None) -> None:
        tmp = self.done + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"ok": error is None, "error": error}, f)
        os.replace(tmp, self.done)


def _wait_done(done_paths: list[str], timeout: float, label: str) -> list[dict[str, Any]]:
    """Wait until every migrator wrote its done file; report progress; return their contents."""
    deadline = time.monotonic() + timeout
    last = 0.0
    while True:
        if all(os.path.exists(p) for p in done_paths):
            return [json.loads(Path(p).read_text()) for p in done_paths]
        now = time.monotonic()
        if now > deadline:
            missing = sum(not os.path.exists(p) for p in done_paths)
            raise TimeoutError(f"{label}: {missing} migrator(s) not done after {timeout:g} s")
        if now - last > 15 and len(done_paths) == 1:
            steps = _read_jsonl(done_paths[0] + ".progress")
            if steps:
                progress(f"  {label}: {steps[-1]['i']} hops done")
            last = now
        time.sleep(0.05)


def _fresh(*paths: str) -> None:
    for p in paths:
        for suffix in ("", ".tmp", ".progress"):
            try:
                os.unlink(p + suffix)
            except FileNotFoundError:
                pass


class Session:
    """One hierarchy + one manager (one backend); migrators are children of namespace inits."""

    def __init__(self, name: str, backend: str) -> None:
        os.makedirs(GUEST_DIR, exist_ok=True)
        self.name = name
        self.backend = backend
        self.socket = f"{GUEST_DIR}/{name}.sock"
        self.records = f"{GUEST_DIR}/{name}.jsonl"
        _fresh(self.records)

    def done_path(self, k: int = 0) -> str:
        return f"{GUEST_DIR}/{self.name}.{k}.done"

    def migrator(self, route: list[str], n: int, warmup: int, k: int = 0, **kw: Any) -> Migrator:
        _fresh(self.done_path(k))
        tags = {**kw.pop("tags", {}), "backend": self.backend, "client": k}
        return Migrator(
            backend=self.backend,
            socket_path=self.socket,
            route=route,
            n=n,
            warmup=warmup,
            records=self.records,
            done=self.done_path(k),
            tags=tags,
            **kw,
        )

    def run(
        self,
        plans: list[NamespacePlan],
        migrators: list[Migrator],
        timeout: float,
        hook: Callable[[Hierarchy], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Build the tree, serve, open the gates, wait for every migrator; return the records."""

        def resume(payload: dict[str, Any]) -> None:  # a restart successor: which client?
            migrators[int(payload["state"].get("k", 0))].resume(payload)

        entries = {"bench": resume} if self.backend == "restart" else {}
        # criu: each namespace gets its own mount namespace and /proc (CRIU runs in there).
        hierarchy = Hierarchy(
            plans, entries=entries, ready_timeout=120, own_proc=self.backend == "criu"
        )
        manager = None
        try:
            hierarchy.start()
            if hook is not None:
                hook(hierarchy)
            backend = get_backend(self.backend)
            backend.check()
            manager = Manager(self.socket, backend, hierarchy.namespaces, policy=None)
            manager.start()
            hierarchy.go()
            results = _wait_done([m.done for m in migrators], timeout, self.name)
        finally:
            if manager is not None:
                manager.stop(timeout=2.0)
            hierarchy.stop()
        errors = [r["error"] for r in results if not r.get("ok")]
        records = _read_jsonl(self.records)
        if errors:
            progress(f"  {self.name}: {len(errors)} migrator(s) failed: {errors[0]}")
        return records


# -- hop: end-to-end latency per backend, beside the bare round trip -------------------------


def _split(total: int, parts: int, k: int) -> int:
    """Part ``k`` of ``total`` split in ``parts`` near-equal parts."""
    return total // parts + (1 if k < total % parts else 0)


def bench_hop(p: dict[str, Any], errors: list[str]) -> list[dict[str, Any]]:
    """The backends in rounds (kmod, restart, criu, criu-direct, then again), so that a drift of
    the host's load hits them alike; each session is a fresh tree between two namespaces (A:
    init + 2 children, the second being the migrator, PID 3; B: init + 1 child, so that CRIU
    finds PID 3 free in B), with a bare round trip to the manager before each hop."""
    rows: list[dict[str, Any]] = []
    rounds = max(1, int(p.get("rounds", 1)))
    criu_backend_failed = False
    for r in range(rounds):
        for backend in p["backends"]:
            total = p["criu_n"] if backend == "criu" else p["n"]
            n = _split(total, rounds, r)
            if n == 0 or (backend == "criu" and criu_backend_failed):
                continue
            warmup = p["criu_warmup"] if backend == "criu" else p["warmup"]
            progress(f"hop round {r + 1}/{rounds} {backend}: {n} hops (+{warmup} warm-up)")
            s = Session(f"hop-{backend}-{r}", backend)
            m = s.migrator(
                ["A", "B"],
                n,
                warmup,
                tags={"sweep": "hop", "x": r},
                pings=p["pings"] if r == 0 else 0,
                ping_warmup=p["ping_warmup"] if r == 0 else 0,
                interleave=bool(p.get("interleave", True)),
            )
            plans = [NamespacePlan("A", 2, {1: m.start}), NamespacePlan("B", 1)]
            slow = 40 if backend == "criu" else 1
            timeout = p["timeout_per_hop"] * (n + warmup) * slow + 120
            t0 = time.monotonic()
            try:
                recs = s.run(plans, [m], timeout)
            except Exception as exc:  # noqa: BLE001 - record and go on with the next backend
                errors.append(f"hop {backend}: {type(exc).__name__}: {exc}")
                progress(f"hop {backend}: FAILED {exc}")
                recs = _read_jsonl(s.records)
            if backend == "criu" and not any(
                x.get("kind") == "hop" and x.get("status") == "ok" for x in recs
            ):
                criu_backend_failed = True  # CRIU's message is in the rows; no point retrying
            progress(f"hop {backend}: {len(recs)} records in {time.monotonic() - t0:.1f} s")
            rows += recs
        if p.get("criu_direct"):
            n = _split(p["criu_n"], rounds, r)
            if n:
                rows += bench_criu_direct(p, errors, n, p["criu_warmup"] if r == 0 else 0, r)
    return rows


CRIU_PID = 500  # the criu subject's pid, in A and (restored) in B


def _criu_subject() -> None:
    """A process CRIU can dump: own session, nothing open, and exec'd inside its namespace, so
    that its mappings belong to the namespace's own mount namespace (a process that only forked
    after the unshare keeps mappings on the old mount namespace, which CRIU cannot look up).
    It imports what a migrator imports, to be of comparable size. CRIU restores the same pid,
    and nsenter + criu themselves take the next free pids in the target: so the subject gets a
    pid far above them (ns_last_pid of its namespace, which this /proc belongs to)."""
    Path("/proc/sys/kernel/ns_last_pid").write_text(str(CRIU_PID - 1))
    if os.fork():
        os._exit(0)  # the subject is reparented to the namespace's init
    os.setsid()
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.closerange(3, 65536)
    code = "import nsexp.benchguest, time\nwhile True: time.sleep(0.01)"
    os.execv(sys.executable, [sys.executable, "-c", code])


def _criu(init_pid: int, args: list[str], images: str, log: str, timeout: float) -> str | None:
    cmd = ["nsenter", "-t", str(init_pid), "-p", "-m", "criu", *args, "-D", images, "-o", log]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"criu {args[0]} timed out after {timeout:g} s"
    if proc.returncode == 0:
        return None
    try:
        lines = Path(images, log).read_text(errors="replace").splitlines()
    except OSError:
        lines = [proc.stderr.strip()]
    errs = [ln.strip() for ln in lines if "Error" in ln] or lines[-2:]
    return f"criu {args[0]}: " + " | ".join(errs[-3:])


def bench_criu_direct(
    p: dict[str, Any], errors: list[str], n: int, warmup: int, r: int = 0
) -> list[dict[str, Any]]:
    """CRIU dump in A + restore in B (and back), driven directly, of an exec'd Python process
    of the migrator's kind: the criu baseline measured by this benchmark itself, used when the
    criu backend cannot make the hop here. Stamps: request_sent (dump starts), dump_done,
    restore_done = resumed (``restore -d`` returns once the process runs again)."""
    progress(f"hop criu-direct: {n} dump+restore hops (+{warmup} warm-up) between two namespaces")
    plans = [NamespacePlan("A", 2, {1: _criu_subject}), NamespacePlan("B", 1)]
    h = Hierarchy(plans, ready_timeout=120, own_proc=True)
    rows: list[dict[str, Any]] = []
    pid = CRIU_PID
    names = ["A", "B"]
    try:
        h.start()
        h.go()
        time.sleep(3.0)  # let the exec'd interpreter finish starting before the first dump
        at = 0
        for j in range(warmup + n):
            src, dst = h.namespaces[names[at]], h.namespaces[names[1 - at]]
            images = f"{GUEST_DIR}/criu-direct-{j}"
            os.makedirs(images, exist_ok=True)
            t0 = time.monotonic_ns()
            err = _criu(src.init_pid, ["dump", "-t", str(pid)], images, "dump.log", 300)
            t1 = time.monotonic_ns()
            if err is None:
                err = _criu(dst.init_pid, ["restore", "-d"], images, "restore.log", 300)
            t2 = time.monotonic_ns()
            rec = {
                "sweep": "hop",
                "backend": "criu-direct",
                "kind": "hop",
                "x": r,
                "client": 0,
                "i": j - warmup,
                "warmup": int(j < warmup),
                "ns": dst.name,
                "pid": pid,
                "request_sent": t0,
                "dump_done": t1,
                "status": "ok" if err is None else "failed",
                "error": err,
            }
            if err is None:
                rec["resumed"] = t2
                # Check the hop happened: a process with pid CRIU_PID in the target namespace.
                there = [
                    g
                    for g in nsutil.pids_in_namespaces({dst.inode})
                    if nsutil.proc_info(g).pid == pid
                ]
                if not there:
                    err = f"restore returned, but no pid {pid} in {dst.name}"
                    rec.update(status="failed", error=err, resumed=None)
                else:
                    rec["global_pid"] = there[0]
            rows.append(rec)
            if err is not None:
                errors.append(f"criu-direct hop {j}: {err}")
                progress(f"hop criu-direct: hop {j} FAILED: {err}")
                break
            at = 1 - at
            if j % 5 == 4:
                progress(f"  criu-direct: {j + 1} hops done")
    except Exception as exc:  # noqa: BLE001
        errors.append(f"criu-direct: {type(exc).__name__}: {exc}")
        progress(f"hop criu-direct: FAILED {exc}")
    finally:
        h.stop()
    return rows


# -- scaling ---------------------------------------------------------------------------------


def _route_sweep(p: dict[str, Any]) -> list[dict[str, Any]]:
    k = p["route_namespaces"]
    names = [f"R{j:02d}" for j in range(k)]
    progress(f"route: {p['route_hops']} hops over {k} namespaces (+{p['warmup']} warm-up)")
    s = Session("route", p.get("backend", "kmod"))
    m = s.migrator(
        names,
        p["route_hops"],
        p["warmup"],
        tags={"sweep": "route", "x": 0},
        interleave=bool(p.get("interleave", True)),
    )
    plans = [NamespacePlan(names[0], 2, {1: m.start})] + [NamespacePlan(nm, 0) for nm in names[1:]]
    recs = s.run(plans, [m], p["timeout_per_hop"] * (p["route_hops"] + p["warmup"]) + 120)
    for r in recs:
        r["x"] = r["i"] + 1  # position on the route: hop number 1..route_hops
    return recs


def _reap_forever() -> None:
    """What a namespace init does here: reap its children and those migrated in, forever."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(0.05)
        except InterruptedError:
            continue


def _fork_ns(body: Callable[[], None], close: tuple[int, ...] = ()) -> int:
    """Create a PID namespace whose init (forked here) runs ``body``; return its pid as seen
    from here. The caller's own namespace for children is restored right after the fork.
    The child closes ``close`` first (fork copies every fd, inheritable or not)."""
    own = os.open("/proc/self/ns/pid", os.O_RDONLY)
    nsutil.unshare(nsutil.CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        os.close(own)
        for fd in close:
            try:
                os.close(fd)
            except OSError:
                pass
        code = 0
        try:
            nsutil.set_pdeathsig(signal.SIGKILL)  # the chain dies with its creator
            body()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        os._exit(code)
    nsutil.setns(own, nsutil.CLONE_NEWPID)
    os.close(own)
    return pid


def _nested_pair(depth: int, migrator: Migrator, info_w: int, gate_r: int, gate_w: int) -> int:
    """Namespaces A and B at nesting level ``depth`` (1 = children of the global one), siblings
    under a chain of ``depth - 1`` namespaces; the migrator is a child of A's init, waiting on
    the gate. Each init writes "A <global pid>" / "B <global pid>" to ``info_w``. Returns the
    pid of the top of the chain (killing it ends everything)."""

    def report(tag: str) -> None:
        os.write(info_w, f"{tag} {nsutil.self_info().global_pid}\n".encode())

    def ns_a() -> None:
        if os.fork() == 0:
            try:
                while os.read(gate_r, 64):
                    pass
                migrator.start()
                os._exit(0)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                os._exit(1)
        report("A")
        _reap_forever()

    def ns_b() -> None:
        report("B")
        _reap_forever()

    def level(k: int) -> None:  # init of chain level k; creates level k + 1
        if k == depth - 1:
            _fork_ns(ns_a)
            _fork_ns(ns_b)
        else:
            _fork_ns(lambda: level(k + 1))
        _reap_forever()

    if depth == 1:
        a = _fork_ns(ns_a, (gate_w,))
        _fork_ns(ns_b, (gate_w,))
        return a  # caller kills both (it gets B from the info pipe)
    return _fork_ns(lambda: level(1), (gate_w,))


def _depth_sweep(p: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    rounds = max(1, int(p.get("rounds", 1)))
    # Rounds over all depths, so that a drift of the host's load does not pass for a trend.
    points = [(r, d) for r in range(rounds) for d in p["depths"] if _split(p["n"], rounds, r)]
    for r, depth in points:
        n = _split(p["n"], rounds, r)
        s = Session(f"depth-{depth}", "kmod")
        m = s.migrator(
            ["A", "B"],
            n,
            p["warmup"],
            tags={"sweep": "depth", "x": depth},
            interleave=bool(p.get("interleave", True)),
        )
        info_r, info_w = os.pipe()
        gate_r, gate_w = os.pipe()
        # Children must not hold the gate's write end, or it would never close.
        top = _nested_pair(depth, m, info_w, gate_r, gate_w)
        os.close(info_w)
        os.close(gate_r)
        pids: dict[str, int] = {}
        manager = None
        try:
            with os.fdopen(info_r) as info:
                while len(pids) < 2:
                    line = info.readline()
                    if not line:
                        raise RuntimeError(f"depth {depth}: the chain died before reporting")
                    tag, pid = line.split()
                    pids[tag] = int(pid)
            from nsexp.backends import Namespace

            registry = {tag: Namespace.open(tag, pid) for tag, pid in pids.items()}
            levels = len(nsutil.proc_info(pids["A"]).nspids) - 1
            backend = get_backend("kmod")
            manager = Manager(s.socket, backend, registry, policy=None)
            manager.start()
            os.close(gate_w)
            gate_w = -1
            _wait_done([m.done], p["timeout_per_hop"] * (n + p["warmup"]) + 120, s.name)
            recs = _read_jsonl(s.records)
            for rec in recs:
                rec["levels"] = levels
            rows += recs
            progress(f"depth {depth} (round {r + 1}): {len(recs)} records (A at level {levels})")
        finally:
            if gate_w >= 0:
                os.close(gate_w)
            if manager is not None:
                manager.stop(timeout=2.0)
            for pid in {top, pids.get("B", top)}:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for pid in {top, pids.get("B", top)}:
                if pid == top or depth == 1:
                    try:
                        os.waitpid(pid, 0)
                    except ChildProcessError:
                        pass
            for ns in locals().get("registry", {}).values():
                ns.close()
    return rows


class Population:
    """Processes parked in a namespace by the C helper ``populate`` (setns + fork, pause)."""

    def __init__(self, binary: str, init_pid: int) -> None:
        self.binary = binary
        self.init_pid = init_pid
        self.procs: list[subprocess.Popen] = []
        self.count = 0

    def add(self, k: int) -> None:
        if k <= 0:
            return
        proc = subprocess.Popen(
            [self.binary, str(self.init_pid), str(k)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)  # even if it failed: close() collects it
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("ready"):
            raise RuntimeError(f"populate {k} failed: {line.strip()!r}")
        self.count += k

    def close(self) -> None:
        """After the namespace's init died (which killed the population): collect the helpers,
        which exit once they have reaped all their children."""
        for proc in self.procs:
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _population_sweep(p: dict[str, Any]) -> list[dict[str, Any]]:
    """One migrator hops A <-> B while B fills up, step by step, to each population."""
    rows: list[dict[str, Any]] = []
    pops = sorted(p["populations"])
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    need = max(pops) + 4096  # the population, plus the guest's own processes and headroom
    if pid_max < need:
        Path("/proc/sys/kernel/pid_max").write_text(str(max(need, 65536)))
        progress(f"population: raised kernel.pid_max {pid_max} -> {max(need, 65536)}")
    threads_max = int(Path("/proc/sys/kernel/threads-max").read_text())
    if threads_max < need:
        Path("/proc/sys/kernel/threads-max").write_text(str(need))
        progress(f"population: raised kernel.threads-max {threads_max} -> {need}")
    rounds = max(1, int(p.get("rounds", 1)))
    points = [(r, pop) for r in range(rounds) for pop in pops if _split(p["n"], rounds, r)]
    for r, pop in points:
        n = _split(p["n"], rounds, r)
        # A fresh tree per point: a long-lived migrator would see its own history.
        s = Session(f"population-{pop}", p.get("backend", "kmod"))
        m = s.migrator(
            ["A", "B"],
            n,
            p["warmup"],
            tags={"sweep": "population", "x": pop},
            interleave=bool(p.get("interleave", True)),
        )
        plans = [NamespacePlan("A", 2, {1: m.start}), NamespacePlan("B", 0)]
        holder: dict[str, Population] = {}

        def fill(h: Hierarchy, pop: int = pop, holder: dict[str, Population] = holder) -> None:
            pop_b = Population(p["populate_binary"], h.namespaces["B"].init_pid)
            holder["p"] = pop_b
            t0 = time.monotonic()
            pop_b.add(pop)
            in_b = len(nsutil.pids_in_namespaces({h.namespaces["B"].inode}))
            progress(f"population {pop}: B holds {in_b} processes ({time.monotonic() - t0:.1f} s)")

        try:
            recs = s.run(plans, [m], p["timeout_per_hop"] * (n + p["warmup"]) + 300, fill)
        finally:
            if "p" in holder:
                holder["p"].close()
        rows += recs
    return rows


def _clients_sweep(p: dict[str, Any]) -> list[dict[str, Any]]:
    """K migrators at once, each hopping A <-> B; the host derives migrations per second."""
    rows: list[dict[str, Any]] = []
    for k in p["clients"]:
        s = Session(f"clients-{k}", p.get("backend", "kmod"))
        warm = p.get("client_warmup", p["warmup"])
        ms = [
            s.migrator(["A", "B"], p["client_hops"], warm, k=j, tags={"sweep": "clients", "x": k})
            for j in range(k)
        ]
        plans = [NamespacePlan("A", k, {j: ms[j].start for j in range(k)}), NamespacePlan("B", 0)]
        t0 = time.monotonic()
        recs = s.run(plans, ms, p["timeout_per_hop"] * (p["client_hops"] + warm) * k + 120)
        progress(f"clients {k}: {len(recs)} records in {time.monotonic() - t0:.1f} s")
        rows += recs
    return rows


SWEEPS = {
    "route": _route_sweep,
    "depth": _depth_sweep,
    "population": _population_sweep,
    "clients": _clients_sweep,
}


def bench_scaling(p: dict[str, Any], errors: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in p["sweeps"]:
        t0 = time.monotonic()
        progress(f"scaling {name}: start")
        try:
            recs = SWEEPS[name](p)
        except Exception as exc:  # noqa: BLE001 - the other sweeps still run
            errors.append(f"scaling {name}: {type(exc).__name__}: {exc}")
            progress(f"scaling {name}: FAILED {exc}\n{traceback.format_exc()}")
            continue
        progress(f"scaling {name}: {len(recs)} records in {time.monotonic() - t0:.1f} s")
        rows += recs
    return rows


# -- main ------------------------------------------------------------------------------------


def guest_facts() -> dict[str, Any]:
    def read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "pid_max": read("/proc/sys/kernel/pid_max"),
        "threads_max": read("/proc/sys/kernel/threads-max"),
        "mem_total": (read("/proc/meminfo") or "").splitlines()[0:1],
        "criu": (
            subprocess.run(["criu", "--version"], capture_output=True, text=True).stdout.strip()
            if os.path.exists("/usr/sbin/criu") or os.path.exists("/usr/bin/criu")
            else None
        ),
    }


def main(argv: list[str] | None = None) -> int:
    global _progress_path
    ap = argparse.ArgumentParser(prog="python3 -m nsexp.benchguest")
    ap.add_argument("bench", choices=["hop", "scaling"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--params", required=True, help="JSON object of the benchmark's sizes")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _progress_path = out / "progress.log"
    params = json.loads(args.params)
    errors: list[str] = []
    facts = guest_facts()
    t0 = time.monotonic()
    fn = bench_hop if args.bench == "hop" else bench_scaling
    rows = fn(params, errors)
    facts.update(
        {
            "errors": errors,
            "params": params,
            "duration_s": round(time.monotonic() - t0, 1),
            "pid_max_after": Path("/proc/sys/kernel/pid_max").read_text().strip(),
        }
    )
    with open(out / f"{args.bench}-raw.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*RAW_COLUMNS, "levels"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    (out / f"{args.bench}-guest.json").write_text(json.dumps(facts, indent=1) + "\n")
    progress(f"{args.bench}: {len(rows)} rows, {len(errors)} error(s)")
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
