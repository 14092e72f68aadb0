"""Guest side of ``nsexp bench hop`` and ``nsexp bench scaling``: standard library only.

Run in the testbed as ``python3 -m nsexp.bench.guest {hop,scaling} --out DIR --params JSON``.
Every hop goes through the experiment's own pieces: the process tree and its manager
(:meth:`nsexp.hierarchy.Hierarchy.serving`), the backends, and the experiment's worker
(:class:`nsexp.experiment.worker.Worker`; :class:`BenchWorker` adds one hook: a ``ping`` to the
manager right before each hop, on the worker's persistent connection). The worker writes its own
records (``records.jsonl``); this module tags them with the point they measure and writes
``<bench>-raw.csv`` (one row per hop or round trip, every CLOCK_MONOTONIC stamp),
``<bench>-guest.json`` (the guest's facts and the errors of whatever failed) and
``progress.log`` (tailed by the host). One Python interpreter runs every session: an interpreter
costs about a second under TCG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from nsexp import nsutil, protocol, records
from nsexp.backends import WorkerSide
from nsexp.bench import scenes
from nsexp.bench.results import RAW_COLUMNS
from nsexp.experiment.worker import Worker, WorkerConfig

GUEST_DIR = "/run/nsexp-bench"  # sockets and records: the guest's tmpfs, never 9p
PINGS_FILE = "pings.jsonl"

_progress_path: Path | None = None


def progress(msg: str) -> None:
    """One line to the host (``progress.log`` in the shared folder) and to stderr."""
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, file=sys.stderr, flush=True)
    if _progress_path is not None:
        with open(_progress_path, "a") as f:
            f.write(line + "\n")


def split(total: int, parts: int, k: int) -> int:
    """Part ``k`` of ``total`` split in ``parts`` near-equal parts."""
    return total // parts + (1 if k < total % parts else 0)


# -- the migrating process -----------------------------------------------------------------------


class BenchWorker(Worker):
    """The experiment's worker, plus one hook: a ``ping`` to the manager right before each hop.

    Ping and hop see the same conditions (the host's load drifts; under TCG that matters more
    than anything), so the ping is the floor of the hop that follows it. Settings travel in
    ``cfg.extra`` ("ping", "reconnect"), so that a worker that re-executes itself (criu)
    rebuilds this class with them (``cfg.factory``).
    """

    def __init__(self, cfg: WorkerConfig, side: WorkerSide | None = None) -> None:
        super().__init__(cfg, side)
        # The manager's legacy path takes the caller from the connection: one per request.
        self.client.reconnect = bool(cfg.extra.get("reconnect"))

    def before_hop(self, hop: int, target: str) -> None:
        if not self.cfg.extra.get("ping"):
            return
        t0 = self.now()
        self.client.ping()
        t1 = self.now()
        pings = Path(self.cfg.out_dir) / PINGS_FILE
        records.append_jsonl(pings, {"hop": hop, "request_sent": t0, "resumed": t1})


def bench_worker(
    out: str,
    backend: str,
    socket_path: str,
    route: list[str],
    *,
    ping: bool = True,
    reconnect: bool = False,
    entry: str = "worker",
) -> BenchWorker:
    """A worker that makes ``len(route) - 1`` hops along ``route``, recording into ``out``."""
    os.makedirs(out, exist_ok=True)
    for name in (records.RECORDS_FILE, PINGS_FILE, scenes.DONE_FILE):
        Path(out, name).unlink(missing_ok=True)
    cfg = WorkerConfig(
        run_id=os.path.basename(out),
        backend=backend,
        testbed="bench",
        kernel=platform.release(),
        socket_path=socket_path,
        out_dir=out,
        route=route,
        increments=0,
        echo=False,
        own_proc=backend == "criu",  # the hierarchy gives criu's namespaces their own /proc
        done_path=str(Path(out) / scenes.DONE_FILE),
        report=False,
        entry=entry,
        timeout=600.0,
        factory="nsexp.bench.guest:BenchWorker",
        extra={"ping": ping, "reconnect": reconnect},
    )
    return BenchWorker(cfg)


def alternate(names: list[str], hops: int) -> list[str]:
    """A route of ``hops`` hops cycling through ``names`` (starting in the first)."""
    return [names[j % len(names)] for j in range(hops + 1)]


def bench_rows(out: str, warmup: int, tags: dict[str, Any]) -> list[dict[str, Any]]:
    """The worker's records in ``out`` as benchmark rows: hop k (k >= 1) is measured repetition
    k - 1 - warmup (warm-up ones are negative); its ping, if any, gets the same index."""
    rows = []
    for rec in records.read_jsonl(Path(out) / records.RECORDS_FILE):
        k = int(rec["hop"])
        if k == 0:
            continue  # the start, no hop before it
        row = {c: rec.get(c) for c in RAW_COLUMNS if c in rec}
        row.update(tags, kind="hop", i=k - 1 - warmup, warmup=int(k <= warmup))
        rows.append(row)
    for p in records.read_jsonl(Path(out) / PINGS_FILE):
        k = int(p["hop"])
        rows.append(
            {
                **tags,
                "kind": "manager_ping",
                "i": k - 1 - warmup,
                "warmup": int(k <= warmup),
                "status": "ok",
                "request_sent": p["request_sent"],
                "resumed": p["resumed"],
            }
        )
    return rows


def serve(
    plans: list[Any],
    workers: list[Worker],
    tags: list[dict[str, Any]],
    warmup: int,
    timeout: float,
    **kw: Any,
) -> list[dict[str, Any]]:
    """Serve ``plans`` until ``workers`` are done; their rows (tagged), plus one failed row per
    hop the manager reported lost (the worker died: CRIU's restore failed after the dump)."""
    backend = workers[0].cfg.backend
    if backend == "restart":
        kw["entries"] = {w.cfg.entry: w.resume for w in workers}
    sock = workers[0].cfg.socket_path
    outs = [w.cfg.out_dir for w in workers]
    lost = scenes.run(plans, backend, sock, outs, timeout, own_proc=backend == "criu", **kw)
    rows = []
    for w, tag in zip(workers, tags, strict=True):
        rows += bench_rows(w.cfg.out_dir, warmup, {**tag, "backend": backend})
    rows += [{**tags[0], "backend": backend, "kind": "hop", "warmup": 0, **f} for f in lost]
    for w, tag in zip(workers, tags, strict=True):
        end = scenes.outcome(w.cfg.out_dir)
        if not end["ok"] and not lost and not any(r.get("status") == "failed" for r in rows):
            # Ended by an exception, not a failed hop: a row says so, the run is not clean.
            rows.append(
                {
                    **tag,
                    "backend": backend,
                    "kind": "hop",
                    "status": "failed",
                    "error": end["error"],
                }
            )
    return rows


# -- the minimal floor: request/reply between two Python processes -------------------------------


def _echo_server(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    listener.close()
    receiver = protocol.Receiver()
    while True:
        try:
            msg = receiver.recv(conn)
        except (protocol.ProtocolError, OSError):
            os._exit(0)
        protocol.send_msg(conn, {"ok": True, "id": msg.get("id")})


def minimal_floor(n: int, warmup: int, tags: dict[str, Any]) -> list[dict[str, Any]]:
    """``warmup + n`` request/reply round trips between this process and a forked one over a
    connected Unix socket, with the manager's framing (nsexp.protocol) and no manager logic.
    Both sides read as the client and the manager do (one recv per frame, protocol.Receiver)."""
    path = f"{GUEST_DIR}/floor.sock"
    Path(path).unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    pid = os.fork()
    if pid == 0:
        try:
            _echo_server(listener)
        finally:
            os._exit(0)
    listener.close()
    rows = []
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    receiver = protocol.Receiver()
    try:
        sock.connect(path)
        for j in range(warmup + n):
            t0 = time.monotonic_ns()
            protocol.send_msg(sock, {"op": "ping", "id": j})
            receiver.recv(sock)
            t1 = time.monotonic_ns()
            i = j - warmup
            rows.append(
                {**tags, "kind": "minimal_rtt", "i": i, "warmup": int(i < 0), "status": "ok"}
                | {"request_sent": t0, "resumed": t1}
            )
    finally:
        sock.close()
        os.waitpid(pid, 0)
        Path(path).unlink(missing_ok=True)
    return rows


# -- hop: end-to-end latency per backend, beside the two floors ----------------------------------


def hop_session(
    backend: str, n: int, warmup: int, tags: dict[str, Any], p: dict[str, Any], layout: str = "free"
) -> list[dict[str, Any]]:
    """One worker hopping A <-> B ``warmup + n`` times with ``backend``.

    Layout "free": A holds init + 2 children (the worker is PID 3), B its init and a child that
    makes B hand out PIDs from 1000 on, so the PID the worker carries is free in B for CRIU's
    restore. Layout "paper": B holds init + 2 idle children, so PID 3 is taken in B, as in the
    paper's hierarchy: CRIU's restore fails there, and that failure, in CRIU's words, is the row.
    """
    name = f"hop-{backend}-{layout}-{tags.get('x', 0)}"
    criu = backend == "criu"
    route = alternate(["A", "B"], warmup + n)
    w = bench_worker(f"{GUEST_DIR}/{name}", backend, f"{GUEST_DIR}/{name}.sock", route)
    plans = scenes.pair(w.start, b_children=2 if layout == "paper" else 0)
    timeout = p["timeout_per_hop"] * (n + warmup) * (60 if criu else 1) + 120
    return serve(plans, [w], [tags], warmup, timeout)


def bench_hop(p: dict[str, Any], errors: list[str]) -> list[dict[str, Any]]:
    """Rounds in which the backends and the minimal floor take turns in a shuffled order (a
    drift of the host's load hits them alike); the manager's ping precedes each kmod and
    restart hop. With ``criu_paper_layout``, one criu hop in the paper's layout first."""
    rows: list[dict[str, Any]] = []
    rounds = max(1, int(p["rounds"]))
    rng = random.Random(p.get("seed", 1))
    if "criu" in p["backends"] and p.get("criu_paper_layout"):
        rows += _guarded(
            errors,
            "hop criu (paper layout)",
            hop_session,
            "criu",
            1,
            0,
            {"sweep": "hop", "x": -1, "rep": -1},
            p,
            "paper",
        )
    for r in range(rounds):
        order = [*p["backends"], "floor"]
        rng.shuffle(order)
        progress(f"hop round {r + 1}/{rounds}: {', '.join(order)}")
        for what in order:
            tags = {"sweep": "hop", "x": r, "rep": r}
            if what == "floor":
                n = split(p["floor_n"], rounds, r)
                rows += minimal_floor(n, p["warmup"], {**tags, "backend": "floor"})
                continue
            criu = what == "criu"
            n = split(p["criu_n"] if criu else p["n"], rounds, r)
            if n:
                warm = p["criu_warmup"] if criu else p["warmup"]
                rows += _guarded(errors, f"hop {what}", hop_session, what, n, warm, tags, p)
    return rows


def _guarded(errors: list[str], label: str, fn: Any, *args: Any) -> list[dict[str, Any]]:
    """Run one session; a failure is recorded (errors + progress) and the benchmark goes on.
    A session whose rows include failed hops is named too: the host exits non-zero for it."""
    t0 = time.monotonic()
    progress(f"{label}: start")
    try:
        rows = fn(*args)
    except Exception as exc:  # noqa: BLE001 - the other sessions still run
        errors.append(f"{label}: {type(exc).__name__}: {exc}")
        progress(f"{label}: FAILED {exc}\n{traceback.format_exc()}")
        return []
    bad = [r for r in rows if r.get("status") != "ok"]
    expected = "paper layout" in label  # the failure is the result there
    if bad and not expected:
        errors.append(f"{label}: {len(bad)} failed hop(s): {str(bad[0].get('error'))[:300]}")
    progress(f"{label}: {len(rows)} rows, {len(bad)} failed, {time.monotonic() - t0:.1f} s")
    return rows


# -- scaling: points of every sweep, in a shuffled order, repeated -------------------------------


def scaling_points(p: dict[str, Any]) -> list[tuple[int, str, Any]]:
    """(repetition, sweep, x) of every point, each repetition in its own shuffled order."""
    rng = random.Random(p.get("seed", 1))
    out = []
    for rep in range(max(1, int(p["reps"]))):
        pts: list[tuple[str, Any]] = []
        for sweep in p["sweeps"]:
            if sweep == "route":
                pts.append(("route", 0))
            elif sweep == "clients":
                pts += [("clients", (path, k)) for path in p["paths"] for k in p["clients"]]
            else:
                pts += [
                    (sweep, x) for x in p[{"depth": "depths", "population": "populations"}[sweep]]
                ]
        rng.shuffle(pts)
        out += [(rep, s, x) for s, x in pts]
    return out


def route_point(p: dict[str, Any], rep: int) -> list[dict[str, Any]]:
    names = [f"R{j:02d}" for j in range(p["route_namespaces"])]
    route = alternate(names, p["warmup"] + p["route_hops"])
    out = f"{GUEST_DIR}/route-{rep}"
    w = bench_worker(out, p["backend"], f"{GUEST_DIR}/route.sock", route)
    timeout = p["timeout_per_hop"] * (p["route_hops"] + p["warmup"]) + 120
    tags = {"sweep": "route", "rep": rep}
    rows = serve(scenes.chain(names, w.start), [w], [tags], p["warmup"], timeout, watch=progress)
    for r in rows:
        if r.get("i") is not None:
            r["x"] = r["i"] + 1  # position on the route: hop number 1..route_hops
    return rows


def depth_point(p: dict[str, Any], rep: int, depth: int) -> list[dict[str, Any]]:
    n = split(p["n"], p["reps"], rep)
    out = f"{GUEST_DIR}/depth-{depth}-{rep}"
    sock = f"{GUEST_DIR}/depth.sock"
    w = bench_worker(out, "kmod", sock, alternate(["A", "B"], p["warmup"] + n))
    levels = scenes.nested_pair(
        depth, w.start, sock, out, p["timeout_per_hop"] * (n + p["warmup"]) + 120
    )
    tags = {"sweep": "depth", "backend": "kmod", "rep": rep, "x": depth, "levels": levels}
    return bench_rows(out, p["warmup"], tags)


def population_point(p: dict[str, Any], rep: int, pop: int) -> list[dict[str, Any]]:
    n = split(p["n"], p["reps"], rep)
    out = f"{GUEST_DIR}/population-{pop}-{rep}"
    route = alternate(["A", "B"], p["warmup"] + n)
    w = bench_worker(out, p["backend"], f"{GUEST_DIR}/population.sock", route)
    filler = scenes.Population(p["populate_binary"], pop, progress)
    timeout = p["timeout_per_hop"] * (n + p["warmup"]) + 300
    tags = {"sweep": "population", "rep": rep, "x": pop}
    try:
        return serve(scenes.pair(w.start), [w], [tags], p["warmup"], timeout, before_go=filler.fill)
    finally:
        filler.close()


def clients_point(p: dict[str, Any], rep: int, path: str, k: int) -> list[dict[str, Any]]:
    """K workers at once, each hopping A <-> B, on the manager's ``path`` (new or legacy)."""
    hops, warm = p["client_hops"], p["client_warmup"]
    sock = f"{GUEST_DIR}/clients.sock"
    route = alternate(["A", "B"], warm + hops)
    legacy = path == "legacy"
    ws = [
        bench_worker(
            f"{GUEST_DIR}/clients-{path}-{k}-{rep}/{j}",
            p["backend"],
            sock,
            route,
            ping=False,
            reconnect=legacy,
            entry=f"worker-{j}",
        )
        for j in range(k)
    ]
    tags = [{"sweep": "clients", "path": path, "rep": rep, "x": k, "client": j} for j in range(k)]
    timeout = p["timeout_per_hop"] * (hops + warm) * k + 120
    return serve(scenes.pair(*(w.start for w in ws)), ws, tags, warm, timeout, legacy=legacy)


def bench_scaling(p: dict[str, Any], errors: list[str]) -> list[dict[str, Any]]:
    """Every point of every sweep, in shuffled order, ``reps`` times; progress as it goes."""
    rows: list[dict[str, Any]] = []
    if "population" in p["sweeps"]:
        scenes.raise_pid_limits(max(p["populations"]) + 4096, progress)
    points = scaling_points(p)
    t0 = time.monotonic()
    for j, (rep, sweep, x) in enumerate(points):
        progress(
            f"scaling {j + 1}/{len(points)} ({time.monotonic() - t0:.0f} s): rep {rep} {sweep} {x}"
        )
        if sweep == "route":
            rows += _guarded(errors, f"scaling route rep {rep}", route_point, p, rep)
        elif sweep == "depth":
            rows += _guarded(errors, f"scaling depth {x} rep {rep}", depth_point, p, rep, x)
        elif sweep == "population":
            rows += _guarded(
                errors, f"scaling population {x} rep {rep}", population_point, p, rep, x
            )
        else:
            rows += _guarded(
                errors, f"scaling clients {x[1]} ({x[0]}) rep {rep}", clients_point, p, rep, *x
            )
    return rows


# -- main ----------------------------------------------------------------------------------------


def guest_facts() -> dict[str, Any]:
    """What the guest is: kernel, CPUs, Python, limits, memory, CRIU's version."""

    def read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    criu = None
    try:
        criu = subprocess.run(["criu", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "pid_max": read("/proc/sys/kernel/pid_max"),
        "threads_max": read("/proc/sys/kernel/threads-max"),
        "mem_total": (read("/proc/meminfo") or "").splitlines()[0:1],
        "criu": criu,
    }


def main(argv: list[str] | None = None) -> int:
    global _progress_path
    ap = argparse.ArgumentParser(prog="python3 -m nsexp.bench.guest")
    ap.add_argument("bench", choices=["hop", "scaling"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--params", required=True, help="JSON object of the benchmark's sizes")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.makedirs(GUEST_DIR, exist_ok=True)
    _progress_path = out / "progress.log"
    nsutil.set_comm(f"nsexp-bench-{args.bench}")
    params = json.loads(args.params)
    errors: list[str] = []
    facts = guest_facts()
    t0 = time.monotonic()
    rows = (bench_hop if args.bench == "hop" else bench_scaling)(params, errors)
    facts.update(errors=errors, params=params, duration_s=round(time.monotonic() - t0, 1))
    records.write_csv(out / f"{args.bench}-raw.csv", RAW_COLUMNS, rows)
    (out / f"{args.bench}-guest.json").write_text(json.dumps(facts, indent=1) + "\n")
    progress(f"{args.bench}: {len(rows)} rows, {len(errors)} error(s)")
    return 0 if rows and not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
