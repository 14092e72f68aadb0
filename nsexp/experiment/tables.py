"""The experiment's tables: run folders read into tidy pandas tables, the hop table, phases.

A run folder (``nsexp run --out DIR``) holds ``hops.csv`` (one row per hop), ``processes.csv``
(the tree before the first hop and after each) and ``run.json`` (metadata); the names and
columns are :mod:`nsexp.records`'. Reading it gives a :class:`Run`; several runs (repeats)
concatenate into tidy tables in which every row carries its ``run_id`` and ``repeat``, with the
remaining metadata in a side table of one row per run (:func:`runs_table`).

Host-side only (pandas): the guest never imports it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from nsexp import publish
from nsexp.publish import meta_value
from nsexp.publish import read_csv as _read_csv
from nsexp.records import (
    HOP_COLUMNS,
    HOPS_FILE,
    PROCESS_COLUMNS,
    PROCESSES_FILE,
    RUN_FILE,
    STAMPS,
)

#: Columns of the paper's hop table (see :func:`hop_table`).
HOP_TABLE_COLUMNS: tuple[str, ...] = (
    "hop",
    "ns",
    "value",
    "pid",
    "global_pid",
    "start_time",
    "runs",
    "agree",
    "failed",
    "error",
)

_INT_COLUMNS = (
    "hop",
    "value",
    "pid",
    "global_pid",
    "ppid",
    "snapshot",
    "repeat",
    "runs",
    "agree",
    "failed",
    "expected_value",
    "expected_pid",
    *STAMPS,
)
_STR_COLUMNS = (
    "run_id",
    "backend",
    "testbed",
    "kernel",
    "ns",
    "expected_ns",
    "status",
    "error",
    "role",
    "state",
)


@dataclass
class Run:
    """One run folder: its hops, its process snapshots and its metadata."""

    run_id: str
    hops: pd.DataFrame
    processes: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


@dataclass
class Runs:
    """Several runs (repeats) as tidy tables: hops, processes and the ``runs`` side table."""

    hops: pd.DataFrame
    processes: pd.DataFrame
    runs: pd.DataFrame
    meta: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run_ids(self) -> list[str]:
        """Run ids in repeat order."""
        return [str(r) for r in self.runs["run_id"]] if "run_id" in self.runs else []


def _coerce(df: pd.DataFrame) -> pd.DataFrame:
    """Give known columns stable dtypes: nullable integers and strings (empty cells stay NA)."""
    df = df.copy()
    for col in _INT_COLUMNS:
        if col in df.columns:
            num = pd.to_numeric(df[col], errors="coerce")
            nonnull = num.dropna()
            # Keep integers exact (ns timestamps exceed float precision); fall back to float
            # only if a backend really wrote fractional values.
            if len(nonnull) == 0 or (nonnull == nonnull.round()).all():
                df[col] = num.astype("Int64")
            else:
                df[col] = num
    if "start_time" in df.columns:
        num = pd.to_numeric(df["start_time"], errors="coerce")
        if num.notna().sum() == df["start_time"].notna().sum():
            nonnull = num.dropna()
            if len(nonnull) == 0 or (nonnull == nonnull.round()).all():
                num = num.astype("Int64")
            df["start_time"] = num
    for col in _STR_COLUMNS:
        if col in df.columns:
            df[col] = df[col].astype("string")
    return df


def _ensure_columns(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Add missing contract columns as empty ones, and put contract columns first."""
    df = df.copy()
    for col in columns:
        if col not in df.columns:
            df[col] = pd.NA
    rest = [c for c in df.columns if c not in columns]
    return df[[*columns, *rest]]


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``run.json`` of a run folder (an empty dict if there is none)."""
    p = Path(path) / RUN_FILE
    if not p.exists():
        return {}
    with p.open() as f:
        meta = json.load(f)
    return meta if isinstance(meta, dict) else {"meta": meta}


def read_run(path: str | os.PathLike[str]) -> Run:
    """Read one run folder into a :class:`Run`.

    Both tables get the run metadata in ``DataFrame.attrs["run"]``; the hop table also gets the
    run's identity columns (run_id, backend, testbed, kernel) filled from ``run.json`` where the
    CSV lacks them.
    """
    folder = Path(path)
    hops_path = folder / HOPS_FILE
    if not hops_path.exists():
        raise FileNotFoundError(f"no {HOPS_FILE} in run folder {folder}")
    meta = read_meta(folder)
    hops = _read_csv(hops_path)
    run_id = str(
        meta.get("run_id")
        or (hops["run_id"].dropna().iloc[0] if _has(hops, "run_id") else folder.name)
    )
    for col in ("run_id", "backend", "testbed", "kernel"):
        default = run_id if col == "run_id" else meta_value(meta, col)
        if col not in hops.columns:
            hops[col] = default
        elif default is not None:
            hops[col] = hops[col].fillna(default)
    hops = _coerce(_ensure_columns(hops, HOP_COLUMNS))
    proc_path = folder / PROCESSES_FILE
    if proc_path.exists() and proc_path.stat().st_size > 0:
        processes = _read_csv(proc_path)
    else:
        processes = pd.DataFrame(columns=list(PROCESS_COLUMNS))
    if "run_id" not in processes.columns:
        processes.insert(0, "run_id", run_id)
    processes = _coerce(_ensure_columns(processes, PROCESS_COLUMNS))
    hops.attrs["run"] = meta
    processes.attrs["run"] = meta
    return Run(run_id=run_id, hops=hops, processes=processes, meta=meta, path=folder)


def _has(df: pd.DataFrame, col: str) -> bool:
    return col in df.columns and df[col].notna().any()


def _scalar(value: Any) -> Any:
    """A value fit for one table cell: nested structures become JSON text."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def runs_table(metas: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The side table: one row per run, metadata flattened (``spec.x`` for nested keys)."""
    rows = []
    for i, meta in enumerate(metas):
        flat = pd.json_normalize(dict(meta), sep=".").to_dict("records")[0] if meta else {}
        row = {"repeat": i, **{k: _scalar(v) for k, v in flat.items()}}
        for key in ("kernel", "code_version"):
            if key not in row and meta_value(meta, key) is not None:
                row[key] = _scalar(meta_value(meta, key))
        rows.append(row)
    df = pd.DataFrame(rows)
    front = [c for c in ("repeat", "run_id", "backend", "testbed", "kernel") if c in df.columns]
    return _coerce(df[front + [c for c in df.columns if c not in front]])


def concat_runs(runs: Sequence[Run]) -> Runs:
    """Concatenate runs (repeats) into tidy tables; ``repeat`` numbers them in the given order."""
    if not runs:
        raise ValueError("no runs to concatenate")
    hops, procs = [], []
    for i, run in enumerate(runs):
        h = run.hops.copy()
        h.insert(0, "repeat", i)
        hops.append(h)
        p = run.processes.copy()
        p.insert(0, "repeat", i)
        procs.append(p)
    metas = [dict(r.meta, run_id=r.run_id) for r in runs]
    all_hops = _coerce(pd.concat(hops, ignore_index=True))
    all_procs = _coerce(pd.concat(procs, ignore_index=True))
    # pandas keeps attrs on concat only when they agree; store the list of run metadata instead.
    all_hops.attrs = {"runs": metas}
    all_procs.attrs = {"runs": metas}
    return Runs(hops=all_hops, processes=all_procs, runs=runs_table(metas), meta=metas)


def read_runs(paths: Iterable[str | os.PathLike[str]]) -> Runs:
    """Read several run folders and concatenate them (see :func:`concat_runs`)."""
    return concat_runs([read_run(p) for p in paths])


def find_run_dirs(root: str | os.PathLike[str]) -> list[Path]:
    """Run folders (those holding ``hops.csv``) at or below ``root``, sorted by path."""
    root = Path(root)
    if (root / HOPS_FILE).exists():
        return [root]
    return sorted(p.parent for p in root.rglob(HOPS_FILE))


def ok_mask(hops: pd.DataFrame) -> pd.Series:
    """True for the rows of hops that happened: status ok (or none) and no error."""
    ok = pd.Series(True, index=hops.index)
    if "status" in hops.columns:
        status = hops["status"].astype("string").str.lower()
        ok &= status.isna() | status.isin(["ok", "success", "done"])
    if "error" in hops.columns:
        ok &= hops["error"].isna() | (hops["error"].astype("string") == "")
    return ok.astype(bool)


def hop_table(hops: pd.DataFrame) -> pd.DataFrame:
    """The paper's hop table: per hop the namespace, value and PID.

    Over several repeats each cell is the most common value among the runs that made the hop;
    ``runs`` counts those runs and ``agree`` those whose (ns, value, pid) equal the row's.
    A hop that failed in some runs (e.g. CRIU could not restore) counts them in ``failed`` with
    the most common ``error``; if it failed in every run, value and PID stay empty.
    ``global_pid`` and ``start_time`` are those of the first run that agrees: the start time
    tells one process that travels (the same at every hop) from a new process per hop.
    """
    ok = ok_mask(hops)
    rows = []
    for hop, g in hops.groupby("hop", sort=True, dropna=True):
        good, bad = g[ok.loc[g.index]], g[~ok.loc[g.index]]
        row: dict[str, Any] = {"hop": hop, "value": pd.NA, "pid": pd.NA, "agree": 0}
        row.update(global_pid=pd.NA, start_time=pd.NA)
        if len(good):
            key = good[["ns", "value", "pid"]].astype("string").fillna("").apply(tuple, axis=1)
            mode = key.value_counts().index[0]
            first = good[key == mode].iloc[0]
            row.update({c: first.get(c, pd.NA) for c in ("ns", "value", "pid")})
            row.update({c: first.get(c, pd.NA) for c in ("global_pid", "start_time")})
            row["agree"] = int((key == mode).sum())
        else:
            row["ns"] = bad["ns"].mode().iloc[0] if bad["ns"].notna().any() else pd.NA
        row["runs"] = _count_runs(good)
        row["failed"] = _count_runs(bad)
        errors = bad["error"].dropna() if "error" in bad.columns else pd.Series(dtype="string")
        errors = errors[errors != ""]
        row["error"] = errors.mode().iloc[0] if len(errors) else pd.NA
        rows.append(row)
    return _coerce(pd.DataFrame(rows, columns=list(HOP_TABLE_COLUMNS)))


def _count_runs(g: pd.DataFrame) -> int:
    return int(g["run_id"].nunique()) if "run_id" in g.columns else len(g)


def compare_expected(runs: Runs) -> pd.DataFrame:
    """The hop table beside the run's prediction (``run.json`` "expected": values and PIDs by
    the rule "next free PID in the target namespace"); ``match`` says whether they agree."""
    table = hop_table(runs.hops)
    meta = runs.meta[0] if runs.meta else {}
    expected = meta.get("expected") or {}
    route = (meta.get("spec") or {}).get("route") or []
    pids, values = expected.get("pids") or [], expected.get("values") or []
    n = max(len(pids), len(values), len(route))
    exp = pd.DataFrame(
        {
            "hop": range(n),
            "expected_ns": [route[i] if i < len(route) else pd.NA for i in range(n)],
            "expected_value": [values[i] if i < len(values) else pd.NA for i in range(n)],
            "expected_pid": [pids[i] if i < len(pids) else pd.NA for i in range(n)],
        }
    )
    out = exp.merge(table, on="hop", how="outer").sort_values("hop", ignore_index=True)
    same = (
        (out["ns"].astype("string") == out["expected_ns"].astype("string"))
        & (out["value"].astype("Int64") == out["expected_value"].astype("Int64"))
        & (out["pid"].astype("Int64") == out["expected_pid"].astype("Int64"))
    )
    out["match"] = same.fillna(False).astype(bool)
    cols = ["hop", "ns", "value", "pid", "expected_ns", "expected_value", "expected_pid", "match"]
    return _coerce(out[cols + [c for c in out.columns if c not in cols]])


def phase_durations(hops: pd.DataFrame) -> pd.DataFrame:
    """Per hop, the duration (ms) between consecutive recorded phases, in long form.

    Columns: run_id, hop, ns, phase (``"a -> b"``), start, end, ms. Phases a backend lacks are
    skipped, and phases are taken in the order their timestamps say (a backend may, e.g., reply
    before the successor starts), so every duration runs from one timestamp to the next.
    """
    cols = [c for c in STAMPS if c in hops.columns]
    rows = []
    for _, row in hops.iterrows():
        present = sorted((c for c in cols if pd.notna(row[c])), key=lambda c: int(row[c]))
        for a, b in zip(present, present[1:], strict=False):
            rows.append(
                {
                    "run_id": row.get("run_id"),
                    "hop": row["hop"],
                    "ns": row.get("ns"),
                    "phase": f"{a} -> {b}",
                    "start": a,
                    "end": b,
                    "ms": (int(row[b]) - int(row[a])) / 1e6,
                }
            )
    return pd.DataFrame(rows, columns=["run_id", "hop", "ns", "phase", "start", "end", "ms"])


def write_runs(
    runs: Runs,
    directory: str | os.PathLike[str],
    prefix: str,
    prov: Mapping[str, Any] | None = None,
    replace: bool = False,
    **extra: Any,
) -> dict[str, Path]:
    """Write a batch's tidy tables: ``<prefix>_hops``, ``_hop_table``, ``_processes``, ``_runs``
    and, where the runs carry a prediction, ``_expected`` (see :func:`compare_expected`).

    Every table gets the provenance ``prov`` (default: :func:`nsexp.publish.provenance` of the
    runs with ``extra``, for example the notebook and its parameters). Tables of another backend
    or testbed are not replaced unless ``replace`` (see :func:`nsexp.publish.check_replace`).
    """
    if prov is None:
        prov = publish.provenance(runs, **extra)
    tables = {
        "hops": runs.hops,
        "hop_table": hop_table(runs.hops),
        "processes": runs.processes,
        "runs": runs.runs,
    }
    if any(m.get("expected") for m in runs.meta):
        tables["expected"] = compare_expected(runs)
    for k in tables:  # all or nothing: check every file before writing the first
        publish.check_replace(Path(directory) / f"{prefix}_{k}.csv", prov, replace)
    return {
        k: publish.write_table(v, directory, f"{prefix}_{k}", prov, replace=replace)
        for k, v in tables.items()
    }
