"""Raw guest files -> tidy tables in data/ (one row per measurement) with their provenance.

Runs on the host after the boot. Input: the guest's ``<bench>-raw.csv`` and ``<bench>-guest.json``
(:mod:`nsexp.bench.guest`), and the C programs' CSV output. Output: ``bench-hop.csv``,
``bench-kernel.csv``, ``bench-scaling.csv``, ``bench-depth-kernel.csv``, each with a
``.provenance.json`` sidecar holding the run's metadata (code version taken before the run),
summary, ratios with 95 % intervals and the verdicts against the targets. Standard library only.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsexp.bench import summary as sm
from nsexp.records import STAMPS, write_sidecar

KERNEL_METRICS = (
    "ioctl_round_trip",
    "kernel_switch",
    "kernel_queue_to_done",
    "fork_wait",
    "getpid",
)
META_COLUMNS = ("run_id", "benchmark", "testbed", "kernel", "code_version", "timestamp")
INT_COLUMNS = ("x", "client", "i", "warmup", "rep", "pid", "global_pid", "start_time", "levels")
#: Columns of the raw tables the guest writes (nsexp.bench.guest); the host adds the metadata.
RAW_COLUMNS = (
    "sweep",
    "backend",
    "path",
    "kind",
    "rep",
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
)
TABLE_COLUMNS = (*META_COLUMNS, *RAW_COLUMNS, "total_ns", "kernel_switch_ns")


@dataclass
class BenchResult:
    """A benchmark's tables, summary, ratios (with intervals), verdicts and metadata."""

    table: Path
    summary: dict[str, Any]
    ratios: dict[str, dict]
    meta: dict[str, Any]
    tables: list[Path] = field(default_factory=list)
    verdicts: dict[str, dict] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _num(v: str | None) -> int | None:
    return int(v) if v not in ("", None) else None


def read_raw(path: Path) -> list[dict[str, Any]]:
    """Rows of a guest ``*-raw.csv`` or a ``bench-*.csv`` table, numbers parsed."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = dict(r)
            for k in (*INT_COLUMNS, *STAMPS):
                row[k] = _num(r.get(k))
            rows.append(row)
    return rows


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
            full["total_ns"] = sm.total_ns(r)
            full["kernel_switch_ns"] = sm.kernel_switch(r)
            w.writerow({k: "" if full.get(k) is None else full[k] for k in TABLE_COLUMNS})
    tmp.replace(path)
    return path


def _meta_rows(meta: dict[str, Any]) -> list[Any]:
    return [meta.get(k) for k in META_COLUMNS]


def write_kernel_table(
    raw: Path, meta: dict[str, Any], out_dir: Path
) -> tuple[Path, dict[str, list[int]]]:
    """kernel_bench's "metric,i,ns" rows -> ``bench-kernel.csv``; returns it and the samples."""
    samples: dict[str, list[int]] = {m: [] for m in KERNEL_METRICS}
    table = out_dir / "bench-kernel.csv"
    with open(raw) as f, open(table, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow([*META_COLUMNS, "metric", "i", "ns"])
        for metric, i, ns in csv.reader(f):
            samples[metric].append(int(ns))
            w.writerow([*_meta_rows(meta), metric, i, ns])
    summary = {m: sm.summarize(v) for m, v in samples.items() if v}
    write_sidecar(
        table,
        {**meta, "benchmark": "kernel", "file": table.name, "summary": summary},
    )
    return table, samples


def write_depth_kernel(raw: Path, meta: dict[str, Any], out_dir: Path) -> tuple[Path, dict, dict]:
    """depth_bench's "depth,i,metric,ns" rows -> ``bench-depth-kernel.csv`` (+ provenance)."""
    samples: dict[tuple[int, str], list[int]] = defaultdict(list)
    table = out_dir / "bench-depth-kernel.csv"
    with open(raw) as f, open(table, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow([*META_COLUMNS, "depth", "i", "metric", "ns"])
        for depth, i, metric, ns in csv.reader(f):
            samples[(int(depth), metric)].append(int(ns))
            w.writerow([*_meta_rows(meta), depth, i, metric, ns])
    summary, ratios = sm.depth_kernel_summary(samples)
    write_sidecar(
        table,
        {
            **meta,
            "benchmark": "scaling/depth-kernel",
            "file": table.name,
            "summary": summary,
            "ratios": ratios,
        },
    )
    return table, summary, ratios


def _guest(work: Path, bench: str) -> dict[str, Any]:
    path = work / f"{bench}-guest.json"
    return json.loads(path.read_text()) if path.exists() else {"errors": [f"no {path.name}"]}


def finish_hop(work: Path, meta: dict[str, Any], out_dir: Path, kernel_raw: Path | None):
    """The hop benchmark's tables (and the kernel one of the same boot) with their verdicts."""
    guest = _guest(work, "hop")
    meta = {**meta, "benchmark": "hop", "guest": guest}
    rows = read_raw(work / "hop-raw.csv") if (work / "hop-raw.csv").exists() else []
    table = write_table(rows, meta, out_dir / "bench-hop.csv")
    tables = [table]
    kernel = None
    if kernel_raw is not None and kernel_raw.exists():
        ktable, kernel = write_kernel_table(kernel_raw, meta, out_dir)
        tables.append(ktable)
    summary = sm.hop_summary(rows)
    if kernel:
        summary.update({f"C {m}": sm.summarize(v) for m, v in kernel.items() if v})
    ratios = sm.hop_ratios(rows, kernel)
    floor = sm.totals(sm.measured(rows, backend="floor", kind=sm.MINIMAL_RTT))
    kmod = sm.measured(rows, backend="kmod", kind=sm.HOP)
    why = sm.holdback(kmod, statistics.median(floor) if floor else None)
    holdbacks = {k: why for k in ("kmod hop / minimal floor", "restart / kmod", "criu / kmod")}
    verdicts = {
        k: v
        for k, v in sm.verdicts(ratios, holdbacks).items()
        if k in ("kmod hop / minimal floor", "restart / kmod", "criu / kmod")
    }
    write_sidecar(
        table,
        {
            **meta,
            "file": table.name,
            "summary": summary,
            "ratios": ratios,
            "verdicts": verdicts,
        },
    )
    return BenchResult(table, summary, ratios, meta, tables, verdicts, list(guest["errors"]))


def finish_scaling(work: Path, meta: dict[str, Any], out_dir: Path, depth_kernel: Path | None):
    """The scaling tables (and the C depth benchmark of the same boot) with their verdicts."""
    guest = _guest(work, "scaling")
    meta = {**meta, "benchmark": "scaling", "guest": guest}
    rows = read_raw(work / "scaling-raw.csv") if (work / "scaling-raw.csv").exists() else []
    table = write_table(rows, meta, out_dir / "bench-scaling.csv")
    summary, ratios = sm.scaling_summary(rows)
    tables = [table]
    if depth_kernel is not None and depth_kernel.exists():
        dk_table, dk_summary, dk_ratios = write_depth_kernel(depth_kernel, meta, out_dir)
        summary["depth (C)"] = dk_summary
        ratios.update(dk_ratios)
        tables.append(dk_table)
    holdbacks = _scaling_holdbacks(rows)
    verdicts = {
        k: v
        for k, v in sm.verdicts(ratios, holdbacks).items()
        if k.startswith(("throughput", "route", "population", "depth"))
    }
    write_sidecar(
        table,
        {**meta, "file": table.name, "summary": summary, "ratios": ratios, "verdicts": verdicts},
    )
    return BenchResult(table, summary, ratios, meta, tables, verdicts, list(guest["errors"]))


def _scaling_holdbacks(rows: list[dict[str, Any]]) -> dict[str, dict]:
    """For each scaling target: the phases of the hops at the point that decides it."""
    out = {}
    hops = sm.measured(rows, kind=sm.HOP)
    for k in (2, 4, 16, 64):
        at = [r for r in hops if r["sweep"] == "clients" and r["x"] == k]
        new = [r for r in at if (r.get("path") or "new") == "new"]
        if new:
            out[f"throughput {k} clients / 1"] = sm.holdback(new)
            if k == 16:
                out["throughput 16 clients: new / legacy"] = sm.holdback(new)
    for sweep, key in (("route", "route: max/min per-hop median"),):
        sel = [r for r in hops if r["sweep"] == sweep]
        if sel:
            out[key] = sm.holdback(sel)
    pop = [r for r in hops if r["sweep"] == "population" and r.get("ns") == "B"]
    if pop:
        top = max(r["x"] for r in pop)
        out["population: max/min per-hop median"] = sm.holdback(r for r in pop if r["x"] == top)
    return out
