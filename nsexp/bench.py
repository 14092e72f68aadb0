"""Benchmarks: measurements with their baselines taken in the same run, written as tidy tables.

``nsexp bench kernel``: the module's ioctl round trip and its own switch time, beside
fork()+waitpid() and getpid(), all from one C program in one boot (nsexp/csrc/kernel_bench.c).

``nsexp bench hop``: end-to-end hop latency (request sent -> process resumed in the target) and
its phases for the kmod, restart and criu backends, beside the bare request/reply round trip to
the manager over the same socket (op ``ping``), all in one boot; the kernel benchmark runs in the
same boot too (``--kernel-n 0`` skips it). Guest side: :mod:`nsexp.benchguest`.

``nsexp bench scaling``: per-hop cost of kmod migrations as the work grows: route length (hops
over many namespaces), nesting depth, processes already in the target, concurrent clients
(manager throughput), all in one boot.

Every table is written with a ``<name>.provenance.json`` beside it (run metadata, parameters,
the guest's facts, summary, ratios, targets). Results are ratios measured side by side; absolute
times under QEMU's emulation (TCG) are far slower than on hardware. Host side: standard library
only (the notebooks' pandas/matplotlib code is in :mod:`nsexp.benchplots`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsexp import testbed as tb
from nsexp.benchguest import STAMPS

REPO = Path(__file__).resolve().parent.parent
CSRC = Path(__file__).resolve().parent / "csrc"
BENCH_BUILD = REPO / "build" / "bench"
DATA = REPO / "data"

KERNEL_METRICS = (
    "ioctl_round_trip",
    "kernel_switch",
    "kernel_queue_to_done",
    "fork_wait",
    "getpid",
)
META_COLUMNS = ("run_id", "benchmark", "testbed", "kernel", "code_version", "timestamp")


#: Phase between two consecutive stamps -> a readable name (the rest are "a->b").
PHASE_NAMES = {
    ("request_sent", "manager_received"): "request to manager",
    ("manager_received", "migrate_started"): "manager: peer + route",
    ("migrate_started", "kernel_queued"): "ioctl entry",
    ("kernel_queued", "kernel_switch_started"): "wait for safe point",
    ("kernel_switch_started", "kernel_done"): "kernel switch",
    ("kernel_done", "reply_sent"): "ioctl return + reply",
    ("reply_sent", "resumed"): "reply to process",
    ("manager_received", "reply_sent"): "manager: peer + route + reply",
    ("reply_sent", "migrate_started"): "old process exits / closes",
    ("migrate_started", "resumed"): "successor forked + starts",
    ("migrate_started", "dump_done"): "criu dump",
    ("dump_done", "restore_done"): "criu restore",
    ("restore_done", "resumed"): "restored process notices",
    ("request_sent", "dump_done"): "criu dump",
    ("dump_done", "resumed"): "criu restore",
}

#: Sizes of the full runs (what data/ holds); the tests use tiny ones.
HOP_DEFAULTS: dict[str, Any] = {
    "backends": ["kmod", "restart", "criu"],
    "n": 300,  # measured hops per backend, over all rounds
    "warmup": 10,  # per session
    "rounds": 3,  # the backends take turns: load drift on the host hits them alike
    "interleave": True,  # a bare round trip right before each hop
    "pings": 0,  # extra round trips before the first hop (beyond the interleaved ones)
    "ping_warmup": 10,
    "criu_n": 21,
    "criu_warmup": 1,
    "criu_direct": True,
    "timeout_per_hop": 5.0,
}
SCALING_DEFAULTS: dict[str, Any] = {
    "sweeps": ["route", "depth", "population", "clients"],
    "n": 60,  # measured hops per depth / population point, over all rounds
    "warmup": 10,
    "route_hops": 1000,
    "route_namespaces": 32,
    # 1..31 sampled at 12 depths: every depth costs a fresh chain of namespaces under TCG.
    "depths": [1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 28, 31],
    "populations": [0, 10, 100, 1000, 3000, 10000],
    "rounds": 2,  # depth and population points are visited in 2 rounds (load drift)
    "interleave": True,  # a bare round trip before each hop (route, depth, population)
    "clients": [1, 2, 4, 8, 16, 32, 64],
    "client_hops": 10,
    "client_warmup": 2,
    "depth_kernel_n": 300,  # C: migrations per depth (kernel side of the depth sweep), 0: skip
    "depth_kernel_depths": list(range(1, 32)),
    "timeout_per_hop": 5.0,
}

#: Targets of issue 6: reported (met or not), never asserted.
TARGETS = {
    "criu / kmod": (">=", 500.0),
    "restart / kmod": (">=", 10.0),
    "kmod / round_trip": ("<=", 3.0),
    "fork_wait / kernel_switch": (">", 1.0),
    "route: max/min per-hop median": ("<=", 1.2),
    "population: max/min per-hop median": ("<=", 1.2),
    "population: max/min kernel switch median": ("<=", 1.2),
    "population: max/min hop/round-trip": ("<=", 1.2),
}


def build_c(name: str) -> Path:
    """Compile nsexp/csrc/<name>.c into build/bench/<name> (the guest shares this path)."""
    src = CSRC / f"{name}.c"
    out = BENCH_BUILD / name
    if out.exists() and out.stat().st_mtime >= max(
        src.stat().st_mtime, (REPO / "kmod" / "nsmigrate.h").stat().st_mtime
    ):
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise tb.TestbedError("no C compiler: apt-get install gcc (or run `make setup`)")
    BENCH_BUILD.mkdir(parents=True, exist_ok=True)
    subprocess.run([cc, "-O2", "-Wall", "-Werror", "-o", str(out), str(src)], check=True)
    return out


def summarize(values: Sequence[float]) -> dict[str, float]:
    """n, median and 90th percentile of a sample (nanoseconds in, nanoseconds out)."""
    if len(values) < 2:
        v = float(values[0]) if values else math.nan
        return {"n": len(values), "median_ns": v, "p90_ns": v}
    qs = statistics.quantiles(values, n=10, method="inclusive")
    return {"n": len(values), "median_ns": statistics.median(values), "p90_ns": qs[8]}


@dataclass
class BenchResult:
    """A benchmark's tables, summary (per metric: n, median_ns, p90_ns), ratios and metadata."""

    table: Path
    summary: dict[str, dict[str, float]]
    ratios: dict[str, float]
    meta: dict
    tables: list[Path] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def code_version() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _bed(testbed: str | tb.Testbed, kernel: str | None, **kw: Any) -> tb.Testbed:
    if not isinstance(testbed, str):
        return testbed
    if testbed == "vm":
        return tb.VMTestbed(kernel, **kw)
    return tb.get_testbed(testbed)


def _meta(benchmark: str, bed: tb.Testbed, batch: tb.BatchResult, **extra: Any) -> dict[str, Any]:
    return {
        "run_id": uuid.uuid4().hex[:12],
        "benchmark": benchmark,
        "testbed": bed.name,
        "kernel": batch.kernel_release,
        "code_version": code_version(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "testbed_repr": repr(bed),
        "command": shlex.join(["nsexp", *sys.argv[1:]]) if sys.argv else "",
        "boot_and_batch_s": round(batch.duration_s, 1),
        "kernel_log_problems": batch.kernel_log_problems(),
        "note": "absolute times under QEMU/TCG emulation are far slower than on hardware; "
        "compare ratios measured side by side in one boot",
        **extra,
    }


def _check(batch: tb.BatchResult, i: int, what: str) -> None:
    res = batch.results[i]
    if res.returncode != 0:
        raise tb.TestbedError(
            f"{what} failed ({res.returncode}): {res.stderr[-3000:]}", result=batch
        )


def _write_provenance(table: Path, info: dict[str, Any]) -> Path:
    side = table.with_name(table.name.split(".")[0] + ".provenance.json")
    side.write_text(json.dumps(info, indent=1, default=str) + "\n")
    return side


def _run_with_progress(
    bed: tb.Testbed, commands: list[str], out_dir: Path, label: str, **kw: Any
) -> tb.BatchResult:
    """run_batch in a thread while this one prints the guest's progress.log as it grows."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["batch"] = bed.run_batch(commands, out_dir=out_dir, **kw)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    log = out_dir / "progress.log"
    log.unlink(missing_ok=True)
    t = threading.Thread(target=target, daemon=True)
    t0 = time.monotonic()
    t.start()
    seen = 0
    while t.is_alive():
        t.join(2.0)
        try:
            lines = log.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines[seen:]:
            print(f"  [{label} {time.monotonic() - t0:5.0f}s] {line}", flush=True)
        seen = max(seen, len(lines))
    if "error" in box:
        raise box["error"]
    return box["batch"]


# -- kernel ----------------------------------------------------------------------------------


def kernel_command(n: int, warmup: int, out_name: str = "kernel_bench.csv") -> str:
    """The guest command of the kernel benchmark (the C program built on the host)."""
    binary = build_c("kernel_bench")
    return f'{binary} {n} {warmup} > "$NSEXP_OUT/{out_name}"'


def write_kernel_table(
    raw: Path, meta: dict[str, Any], out_dir: Path, extra: dict[str, Any] | None = None
) -> BenchResult:
    """Turn kernel_bench's "metric,i,ns" rows into ``out_dir/bench-kernel.csv`` + provenance."""
    samples: dict[str, list[int]] = {m: [] for m in KERNEL_METRICS}
    with open(raw) as f:
        for metric, _, ns in csv.reader(f):
            samples[metric].append(int(ns))
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "bench-kernel.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*META_COLUMNS, "metric", "i", "ns"])
        for metric, values in samples.items():
            for i, v in enumerate(values):
                w.writerow(
                    [
                        meta["run_id"],
                        "kernel",
                        meta["testbed"],
                        meta["kernel"],
                        meta["code_version"],
                        meta["timestamp"],
                        metric,
                        i,
                        v,
                    ]
                )
    summary = {m: summarize(v) for m, v in samples.items() if v}
    med = {m: s["median_ns"] for m, s in summary.items()}
    ratios = {
        "fork_wait / ioctl_round_trip": med["fork_wait"] / med["ioctl_round_trip"],
        "fork_wait / kernel_switch": med["fork_wait"] / med["kernel_switch"],
        "ioctl_round_trip / getpid": med["ioctl_round_trip"] / med["getpid"],
    }
    _write_provenance(
        table, {**meta, **(extra or {}), "file": table.name, "summary": summary, "ratios": ratios}
    )
    return BenchResult(table, summary, ratios, meta, [table])


def run_kernel(
    testbed: str | tb.Testbed = "vm",
    *,
    n: int = 1000,
    warmup: int = 100,
    out_dir: Path = DATA,
    kernel: str | None = None,
) -> BenchResult:
    """Run the kernel benchmark on a testbed and write ``out_dir/bench-kernel.csv``."""
    bed = _bed(testbed, kernel)
    cmd = kernel_command(n, warmup)
    print(f"bench kernel: {n} migrations (+{warmup} warm-up) on {bed!r} ...", flush=True)
    batch = bed.run_batch([cmd], timeout=1800, command_timeout=1500)
    _check(batch, 0, "kernel_bench")
    meta = _meta("kernel", bed, batch, n=n, warmup=warmup)
    return write_kernel_table(batch.out_dir / "kernel_bench.csv", meta, Path(out_dir))


# -- tables of the Python benchmarks ---------------------------------------------------------


def _num(v: str) -> int | None:
    return int(v) if v not in ("", None) else None


def read_raw(path: Path) -> list[dict[str, Any]]:
    """Rows of a guest ``*-raw.csv`` with numbers parsed."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = dict(r)
            for k in ("x", "client", "i", "warmup", "pid", "global_pid", "start_time", "levels"):
                row[k] = _num(r.get(k, ""))
            for k in STAMPS:
                row[k] = _num(r.get(k, ""))
            rows.append(row)
    return rows


def total_ns(row: dict[str, Any]) -> int | None:
    """End-to-end time of a hop or round trip: request sent -> resumed (None if incomplete)."""
    if row.get("request_sent") is None or row.get("resumed") is None:
        return None
    return row["resumed"] - row["request_sent"]


def phases(row: dict[str, Any]) -> list[tuple[str, int]]:
    """(phase name, ns) between consecutive stamps the hop has, in time order (a backend's
    stamps need not follow STAMPS: restart spawns the successor after the reply)."""
    have = sorted((s for s in STAMPS if row.get(s) is not None), key=lambda s: row[s])
    out = []
    for a, b in zip(have, have[1:], strict=False):
        out.append((PHASE_NAMES.get((a, b), f"{a}->{b}"), row[b] - row[a]))
    return out


TABLE_COLUMNS = (
    *META_COLUMNS,
    "sweep",
    "backend",
    "kind",
    "x",
    "levels",
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
    "total_ns",
    "kernel_switch_ns",
)


def write_table(rows: Iterable[dict[str, Any]], meta: dict[str, Any], path: Path) -> Path:
    """One row per measurement with the run's metadata on every row (tidy CSV)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(TABLE_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            full = {k: meta.get(k) for k in META_COLUMNS}
            full.update(r)
            full["total_ns"] = total_ns(r)
            ks, kd = r.get("kernel_switch_started"), r.get("kernel_done")
            full["kernel_switch_ns"] = kd - ks if ks is not None and kd is not None else None
            w.writerow({k: "" if full.get(k) is None else full[k] for k in TABLE_COLUMNS})
    tmp.replace(path)
    return path


def measured(rows: Iterable[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    """Rows that count: status ok, not warm-up, and matching ``match`` (column=value)."""
    return [
        r
        for r in rows
        if r.get("status") == "ok"
        and not r.get("warmup")
        and all(r.get(k) == v for k, v in match.items())
    ]


def _target(name: str, value: float) -> str:
    op, bound = TARGETS[name]
    ok = {"<=": value <= bound, ">=": value >= bound, ">": value > bound}[op]
    return f"{'met' if ok else 'MISSED'} (target {op} {bound:g})"


# -- hop -------------------------------------------------------------------------------------


def hop_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per backend: end-to-end hop and bare round trip (median, p90), and each phase."""
    out: dict[str, dict[str, float]] = {}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        hops = measured(rows, backend=backend, kind="hop")
        rts = measured(rows, backend=backend, kind="round_trip")
        vals = [t for t in map(total_ns, hops) if t is not None]
        if vals:
            out[f"{backend} hop"] = summarize(vals)
        vals = [t for t in map(total_ns, rts) if t is not None]
        if vals:
            out[f"{backend} round_trip"] = summarize(vals)
        per_phase: dict[str, list[int]] = defaultdict(list)
        for r in hops:
            for name, ns in phases(r):
                per_phase[name].append(ns)
        for name, vals in per_phase.items():
            out[f"{backend} phase: {name}"] = summarize(vals)
        failed = [r for r in rows if r["backend"] == backend and r.get("status") != "ok"]
        if failed:
            out[f"{backend} failed"] = {"n": len(failed), "median_ns": math.nan, "p90_ns": math.nan}
    return out


def hop_ratios(
    summary: dict[str, dict[str, float]], kernel: dict[str, dict[str, float]] | None = None
) -> dict[str, float]:
    """The ratios of issue 6, from medians measured in the same boot."""
    med = {k: v["median_ns"] for k, v in summary.items()}
    ratios = {}
    kmod = med.get("kmod hop")
    if kmod:
        # The criu backend's own hops if it made them, else this benchmark's direct
        # dump+restore between the same two namespaces (see nsexp.benchguest).
        criu = med.get("criu hop") or med.get("criu-direct hop")
        if criu:
            ratios["criu / kmod"] = criu / kmod
        if "restart hop" in med:
            ratios["restart / kmod"] = med["restart hop"] / kmod
        if med.get("kmod round_trip"):
            ratios["kmod / round_trip"] = kmod / med["kmod round_trip"]
    if kernel and "fork_wait" in kernel and "kernel_switch" in kernel:
        ratios["fork_wait / kernel_switch"] = (
            kernel["fork_wait"]["median_ns"] / kernel["kernel_switch"]["median_ns"]
        )
    return ratios


# -- scaling ---------------------------------------------------------------------------------


def _medians_by(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any], value: str):
    groups: dict[Any, list[int]] = defaultdict(list)
    for r in rows:
        v = total_ns(r) if value == "total" else r.get(value)
        if v is not None:
            groups[key(r)].append(v)
    return {k: statistics.median(v) for k, v in sorted(groups.items())}


def route_bin(hop_number: int) -> str:
    """Decade of a hop's position on the route: "1-10", "11-100", "101-1000", ..."""
    hi = 10
    while hop_number > hi:
        hi *= 10
    return f"{hi // 10 + 1 if hi > 10 else 1}-{hi}"


def kernel_switch(r: dict[str, Any]) -> int | None:
    ks, kd = r.get("kernel_switch_started"), r.get("kernel_done")
    return kd - ks if ks is not None and kd is not None else None


def throughput(rows: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per number of clients: measured migrations / span from the first measured request to the
    last resume (all clients together), in migrations per second."""
    out = {}
    for k in sorted({r["x"] for r in rows}):
        hops = measured(rows, sweep="clients", x=k, kind="hop")
        if not hops:
            continue
        span = max(r["resumed"] for r in hops) - min(r["request_sent"] for r in hops)
        out[k] = {
            "migrations": len(hops),
            "span_s": span / 1e9,
            "per_s": len(hops) / (span / 1e9) if span > 0 else math.nan,
            "median_hop_ns": statistics.median(t for t in map(total_ns, hops) if t is not None),
        }
    return out


def scaling_summary(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, float]]:
    """Per sweep: medians by x (end-to-end and kernel switch), fits, flatness ratios."""
    s: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    route = measured(rows, sweep="route", kind="hop")
    if route:
        # Keyed by the bin's first hop number, so that the bins sort in route order.
        bins = _medians_by(route, lambda r: int(route_bin(r["x"]).split("-")[0]), "total")
        s["route"] = {route_bin(b): v for b, v in bins.items()}
        vals = list(bins.values())
        ratios["route: max/min per-hop median"] = max(vals) / min(vals)
        first, last = vals[0], vals[-1]
        ratios["route: last/first bin"] = last / first
    depth = measured(rows, sweep="depth", kind="hop")
    if depth:
        e2e = _medians_by(depth, lambda r: r["x"], "total")
        kern = {
            x: statistics.median(v)
            for x, v in _group(depth, lambda r: r["x"], kernel_switch).items()
        }
        s["depth"] = {"total_median_ns": e2e, "kernel_switch_median_ns": kern}
        for label, series in (("total", e2e), ("kernel switch", kern)):
            if len(series) >= 2:
                xs, ys = list(series), list(series.values())
                slope, intercept = statistics.linear_regression(xs, ys)
                r = statistics.correlation(xs, ys) if len(set(ys)) > 1 else math.nan
                s["depth"][f"fit {label}"] = {
                    "ns_per_level": slope,
                    "intercept_ns": intercept,
                    "r2": r * r,
                }
                ratios[f"depth: {label} ns per level"] = slope
                ratios[f"depth: {label} r2"] = r * r
    pop = measured(rows, sweep="population", kind="hop", ns="B")
    if pop:
        e2e = _medians_by(pop, lambda r: r["x"], "total")
        kern = {
            x: statistics.median(v) for x, v in _group(pop, lambda r: r["x"], kernel_switch).items()
        }
        s["population"] = {"total_median_ns": e2e, "kernel_switch_median_ns": kern}
        ratios["population: max/min per-hop median"] = max(e2e.values()) / min(e2e.values())
        ratios["population: last/first"] = list(e2e.values())[-1] / list(e2e.values())[0]
        if kern:
            ratios["population: max/min kernel switch median"] = max(kern.values()) / min(
                kern.values()
            )
        # The hop over the bare round trip measured right before it: the host's load drift
        # moves both, their ratio much less.
        rts = _medians_by(
            [
                r
                for r in rows
                if r.get("sweep") == "population"
                and r.get("kind") == "round_trip"
                and r.get("status") == "ok"
                and not r.get("warmup")
            ],
            lambda r: r["x"],
            "total",
        )
        norm = [e2e[x] / rts[x] for x in e2e if rts.get(x)]
        if norm:
            ratios["population: max/min hop/round-trip"] = max(norm) / min(norm)
    clients = [r for r in rows if r.get("sweep") == "clients"]
    if clients:
        thr = throughput(clients)
        s["clients"] = thr
        if thr:
            k1 = min(thr)
            for k, v in thr.items():
                ratios[f"clients: throughput {k} / {k1}"] = v["per_s"] / thr[k1]["per_s"]
    return s, ratios


def _group(rows, key, fn) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = defaultdict(list)
    for r in rows:
        v = fn(r)
        if v is not None:
            groups[key(r)].append(v)
    return dict(sorted(groups.items()))


def _hop_finish(
    batch: tb.BatchResult,
    bed: tb.Testbed,
    work: Path,
    out_dir: Path,
    p: dict[str, Any],
    kernel_n: int,
    kernel_warmup: int,
    kernel_raw: Path | None,
) -> BenchResult:
    guest = json.loads((work / "hop-guest.json").read_text())
    meta = _meta("hop", bed, batch, params=p, guest=guest, raw_dir=str(work))
    rows = read_raw(work / "hop-raw.csv")
    table = write_table(rows, meta, out_dir / "bench-hop.csv")
    summary = hop_summary(rows)
    kres = None
    if kernel_raw is not None:
        kmeta = {**meta, "benchmark": "kernel", "n": kernel_n, "warmup": kernel_warmup}
        kmeta.pop("params", None)
        kres = write_kernel_table(kernel_raw, kmeta, out_dir, {"same_boot_as": "bench-hop.csv"})
    ratios = hop_ratios(summary, kres.summary if kres else None)
    targets = {k: _target(k, v) for k, v in ratios.items() if k in TARGETS}
    criu_note = None
    if "criu hop" not in summary and "criu-direct hop" in summary:
        criu_note = (
            "criu / kmod uses criu-direct: the criu backend made no hop in this guest (see the "
            "failed criu rows for CRIU's message); criu-direct is CRIU dump in A + restore in B "
            "of an exec'd Python process of the migrator's kind, driven by the benchmark"
        )
    _write_provenance(
        table,
        {
            **meta,
            "file": table.name,
            "summary": summary,
            "ratios": ratios,
            "targets": targets,
            "criu_note": criu_note,
        },
    )
    tables = [table] + ([kres.table] if kres else [])
    return BenchResult(
        table,
        summary,
        ratios,
        meta,
        tables,
        {"targets": targets, "kernel": kres, "criu_note": criu_note},
    )


def write_depth_kernel(raw: Path, meta: dict[str, Any], out_dir: Path) -> tuple[Path, dict, dict]:
    """depth_bench's "depth,i,metric,ns" rows -> ``bench-depth-kernel.csv`` (+ provenance):
    per depth the medians, and a least-squares line of the kernel switch against depth."""
    samples: dict[tuple[int, str], list[int]] = defaultdict(list)
    table = out_dir / "bench-depth-kernel.csv"
    with open(raw) as f, open(table, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow([*META_COLUMNS, "depth", "i", "metric", "ns"])
        for depth, i, metric, ns in csv.reader(f):
            samples[(int(depth), metric)].append(int(ns))
            w.writerow([meta[k] for k in META_COLUMNS] + [depth, i, metric, ns])
    summary = {
        metric: {d: summarize(v) for (d, m), v in sorted(samples.items()) if m == metric}
        for metric in ("kernel_switch", "ioctl_round_trip")
    }
    ratios = {}
    for metric, per in summary.items():
        if len(per) >= 2:
            xs = list(per)
            ys = [per[d]["median_ns"] for d in xs]
            slope, intercept = statistics.linear_regression(xs, ys)
            r = statistics.correlation(xs, ys) if len(set(ys)) > 1 else math.nan
            ratios[f"depth (C): {metric} ns per level"] = slope
            ratios[f"depth (C): {metric} intercept ns"] = intercept
            ratios[f"depth (C): {metric} r2"] = r * r
    _write_provenance(
        table,
        {
            **meta,
            "benchmark": "scaling/depth-kernel",
            "file": table.name,
            "summary": summary,
            "ratios": ratios,
            "same_boot_as": "bench-scaling.csv",
        },
    )
    return table, summary, ratios


def _scaling_finish(
    batch: tb.BatchResult,
    bed: tb.Testbed,
    work: Path,
    out_dir: Path,
    p: dict[str, Any],
    depth_kernel: bool = False,
) -> BenchResult:
    guest = json.loads((work / "scaling-guest.json").read_text())
    meta = _meta("scaling", bed, batch, params=p, guest=guest, raw_dir=str(work))
    rows = read_raw(work / "scaling-raw.csv")
    table = write_table(rows, meta, out_dir / "bench-scaling.csv")
    summary, ratios = scaling_summary(rows)
    tables = [table]
    if depth_kernel:
        dk_table, dk_summary, dk_ratios = write_depth_kernel(
            work / "depth_kernel.csv", meta, out_dir
        )
        summary["depth (C)"] = dk_summary
        ratios.update(dk_ratios)
        tables.append(dk_table)
    targets = {k: _target(k, v) for k, v in ratios.items() if k in TARGETS}
    cpus = guest.get("cpus") or 1
    thr = summary.get("clients") or {}
    upto = sorted(k for k in thr if k <= cpus)
    if len(upto) >= 2:
        rising = all(
            thr[a]["per_s"] < thr[b]["per_s"] for a, b in zip(upto, upto[1:], strict=False)
        )
        targets["clients: throughput rising up to the CPUs"] = (
            f"{'met' if rising else 'MISSED'} ({cpus} CPUs)"
        )
    _write_provenance(
        table,
        {**meta, "file": table.name, "summary": summary, "ratios": ratios, "targets": targets},
    )
    return BenchResult(table, {}, ratios, meta, tables, {"summary": summary, "targets": targets})


def run_benchmarks(
    benchmarks: Sequence[str],
    testbed: str | tb.Testbed = "vm",
    *,
    out_dir: Path = DATA,
    kernel: str | None = None,
    hop: dict[str, Any] | None = None,
    scaling: dict[str, Any] | None = None,
    kernel_n: int = 1000,
    kernel_warmup: int = 100,
    memory: str | None = None,
) -> dict[str, BenchResult]:
    """Run several benchmarks ("kernel", "hop", "scaling") in ONE boot; write their tables.

    ``hop`` and ``scaling`` override the sizes of :data:`HOP_DEFAULTS` and
    :data:`SCALING_DEFAULTS`. With "hop", the kernel benchmark runs too unless ``kernel_n`` is 0.
    Returns {"kernel"|"hop"|"scaling": BenchResult}.
    """
    unknown = set(benchmarks) - {"kernel", "hop", "scaling"}
    if unknown:
        raise ValueError(f"unknown benchmark(s) {sorted(unknown)}")
    out_dir = Path(out_dir)
    ph = {**HOP_DEFAULTS, **{k: v for k, v in (hop or {}).items() if v is not None}}
    ps = {**SCALING_DEFAULTS, **{k: v for k, v in (scaling or {}).items() if v is not None}}
    if memory is None:
        # 10,000 parked processes need memory (kernel stacks, page tables): a bigger guest.
        memory = "3G" if "scaling" in benchmarks else "2G"
    bed = _bed(testbed, kernel, memory=memory) if testbed == "vm" else _bed(testbed, kernel)
    work = tb.Testbed._prepare_out_dir(None)
    cmds: list[str] = []
    index: dict[str, int] = {}
    budget = 600.0
    with_kernel = "kernel" in benchmarks or ("hop" in benchmarks and kernel_n > 0)
    if with_kernel:
        index["kernel"] = len(cmds)
        cmds.append(kernel_command(kernel_n or 1000, kernel_warmup))
        budget += 600
    if "hop" in benchmarks:
        index["hop"] = len(cmds)
        cmds.append(_guest_command("hop", work, ph))
        per_hop = {"kmod": 1, "restart": 1, "criu": 40}
        budget += sum(
            per_hop[b] * ph["timeout_per_hop"] * (ph["criu_n"] if b == "criu" else ph["n"])
            for b in ph["backends"]
        ) + (40 * ph["timeout_per_hop"] * ph["criu_n"] if ph.get("criu_direct") else 0)
        print(
            f"bench hop: backends {', '.join(ph['backends'])}"
            f"{' + criu-direct' if ph.get('criu_direct') else ''}; kmod/restart {ph['n']} hops, "
            f"criu {ph['criu_n']}; {ph['pings']} round trips; kernel {kernel_n}",
            flush=True,
        )
    if "scaling" in benchmarks:
        ps["populate_binary"] = str(build_c("populate"))
        if ps.get("depth_kernel_n") and "depth" in ps["sweeps"]:
            index["depth_kernel"] = len(cmds)
            depths = " ".join(str(d) for d in ps["depth_kernel_depths"])
            cmds.append(
                f"{build_c('depth_bench')} {ps['depth_kernel_n']} {max(1, ps['warmup'])} {depths}"
                ' > "$NSEXP_OUT/depth_kernel.csv"'
            )
            budget += 900
        index["scaling"] = len(cmds)
        cmds.append(_guest_command("scaling", work, ps))
        hops = (
            ps["route_hops"]
            + len(ps["depths"]) * (ps["n"] + ps["warmup"] + 20)
            + len(ps["populations"]) * (ps["n"] + ps["warmup"] + 20)
            + sum(k * (ps["client_hops"] + ps["client_warmup"]) for k in ps["clients"])
        )
        budget += ps["timeout_per_hop"] * hops + 1200
        print(f"bench scaling: sweeps {', '.join(ps['sweeps'])} (~{hops} hops)", flush=True)
    print(f"one boot of {bed!r}; raw files in {work}", flush=True)
    batch = _run_with_progress(bed, cmds, work, "/".join(benchmarks), timeout=budget)
    for name, i in index.items():
        _check(batch, i, name)
    results: dict[str, BenchResult] = {}
    kraw = work / "kernel_bench.csv" if with_kernel else None
    if "hop" in benchmarks:
        results["hop"] = _hop_finish(batch, bed, work, out_dir, ph, kernel_n, kernel_warmup, kraw)
        if with_kernel:
            results["kernel"] = results["hop"].extra["kernel"]
    elif with_kernel and kraw is not None:
        meta = _meta("kernel", bed, batch, n=kernel_n, warmup=kernel_warmup)
        results["kernel"] = write_kernel_table(kraw, meta, out_dir)
    if "scaling" in benchmarks:
        results["scaling"] = _scaling_finish(batch, bed, work, out_dir, ps, "depth_kernel" in index)
    return results


def _guest_command(bench: str, work: Path, params: dict[str, Any]) -> str:
    return shlex.join(
        [
            "python3",
            "-m",
            "nsexp.benchguest",
            bench,
            "--out",
            str(work),
            "--params",
            json.dumps(params),
        ]
    )


def run_hop(
    testbed: str | tb.Testbed = "vm",
    *,
    out_dir: Path = DATA,
    kernel: str | None = None,
    kernel_n: int = 1000,
    kernel_warmup: int = 100,
    **params: Any,
) -> BenchResult:
    """Run the hop benchmark (and the kernel one, same boot); write ``bench-hop.csv``."""
    return run_benchmarks(
        ["hop"],
        testbed,
        out_dir=out_dir,
        kernel=kernel,
        hop=params,
        kernel_n=kernel_n,
        kernel_warmup=kernel_warmup,
    )["hop"]


def run_scaling(
    testbed: str | tb.Testbed = "vm",
    *,
    out_dir: Path = DATA,
    kernel: str | None = None,
    memory: str = "3G",
    **params: Any,
) -> BenchResult:
    """Run the scaling sweeps in one boot; write ``bench-scaling.csv`` (one row per hop)."""
    return run_benchmarks(
        ["scaling"], testbed, out_dir=out_dir, kernel=kernel, scaling=params, memory=memory
    )["scaling"]


# -- CLI -------------------------------------------------------------------------------------


def print_result(r: BenchResult) -> None:
    if r.summary:
        print(f"{'metric':<44} {'n':>6} {'median':>12} {'p90':>12}")
        for m, s in r.summary.items():
            print(f"{m:<44} {s['n']:>6} {_fmt_ns(s['median_ns']):>12} {_fmt_ns(s['p90_ns']):>12}")
    kres = r.extra.get("kernel")
    if kres is not None:
        print_result(kres)
    targets = r.extra.get("targets", {})
    for name, value in r.ratios.items():
        tail = f"  {targets[name]}" if name in targets else ""
        print(f"ratio {name} = {value:.3g}{tail}")
    for name, t in targets.items():
        if name not in r.ratios:
            print(f"target {name}: {t}")
    if r.extra.get("criu_note"):
        print(f"note: {r.extra['criu_note']}")
    print(f"kernel {r.meta['kernel']} on {r.meta['testbed']}; table {r.table}")


def _fmt_ns(ns: float) -> str:
    if ns != ns:  # NaN
        return "-"
    if ns >= 1e9:
        return f"{ns / 1e9:.2f}s"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f}ms"
    return f"{ns / 1e3:.1f}us"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _cmd_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.benchmark == "kernel":
        r = run_kernel(
            args.testbed,
            n=args.n or 1000,
            warmup=args.warmup or 100,
            out_dir=out,
            kernel=args.kernel,
        )
        print_result(r)
        return 0 if not r.meta["kernel_log_problems"] else 1
    hop = {
        "n": args.n,
        "warmup": args.warmup,
        "pings": args.pings,
        "criu_n": args.criu_n,
        "backends": args.backends.split(",") if args.backends else None,
        "criu_direct": False if args.no_criu_direct else None,
    }
    scaling = {
        "n": args.n,
        "warmup": args.warmup,
        "sweeps": args.sweeps.split(",") if args.sweeps else None,
        "route_hops": args.route_hops,
        "route_namespaces": args.route_namespaces,
        "depths": _ints(args.depths) if args.depths else None,
        "populations": _ints(args.populations) if args.populations else None,
        "clients": _ints(args.clients) if args.clients else None,
        "client_hops": args.client_hops,
        "depth_kernel_n": args.depth_kernel_n,
    }
    names = ["hop", "scaling"] if args.benchmark == "all" else [args.benchmark]
    results = run_benchmarks(
        names,
        args.testbed,
        out_dir=out,
        kernel=args.kernel,
        hop=hop,
        scaling=scaling,
        kernel_n=1000 if args.kernel_n is None else args.kernel_n,
    )
    problems = False
    for name in names:
        print(f"== {name} ==")
        print_result(results[name])
        problems |= bool(results[name].meta["kernel_log_problems"])
    return 1 if problems else 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="run a benchmark (kernel, hop, scaling) and write its table to data/",
        description="Benchmarks run many repetitions in one boot after a warm-up; tables go to "
        "--out with a .provenance.json beside each. Defaults are the full sizes.",
    )
    p.add_argument(
        "benchmark",
        choices=["kernel", "hop", "scaling", "all"],
        help="all: hop (with kernel) and scaling in one boot",
    )
    p.add_argument("--testbed", default="vm", choices=["vm", "native"])
    p.add_argument("--kernel", default=None, help="kernel release for the vm testbed")
    p.add_argument("--n", type=int, default=None, help="measured repetitions (per point)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up repetitions (per point)")
    p.add_argument("--out", default=str(DATA), help="output folder (default data/)")
    g = p.add_argument_group("hop")
    g.add_argument("--backends", help="comma-separated, default kmod,restart,criu")
    g.add_argument("--pings", type=int, help="bare round trips per backend session")
    g.add_argument("--criu-n", type=int, help="criu hops (each takes seconds)")
    g.add_argument("--kernel-n", type=int, help="kernel benchmark in the same boot (0: skip)")
    g.add_argument(
        "--no-criu-direct",
        action="store_true",
        help="skip the direct CRIU dump+restore between the two namespaces",
    )
    g = p.add_argument_group("scaling")
    g.add_argument("--sweeps", help="comma-separated subset of route,depth,population,clients")
    g.add_argument("--route-hops", type=int)
    g.add_argument("--route-namespaces", type=int)
    g.add_argument("--depths", help="e.g. 1,2,4,8,16,31")
    g.add_argument("--populations", help="e.g. 0,100,1000,10000")
    g.add_argument("--clients", help="e.g. 1,2,4,8,16,32,64")
    g.add_argument("--client-hops", type=int, help="measured hops per client")
    g.add_argument(
        "--depth-kernel-n", type=int, help="C migrations per depth 1..31 (kernel side; 0: skip)"
    )
    p.set_defaults(func=_cmd_bench)
