"""Figures of the chained-execution experiment, drawn with matplotlib.

Every function takes the tidy tables of :mod:`nsexp.experiment.tables` and returns a
:class:`matplotlib.figure.Figure` (save them with :func:`nsexp.publish.save_figures`).
Host-side only (pandas, matplotlib). Without a display matplotlib draws with Agg by itself;
in Jupyter the kernel's inline backend is kept.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from nsexp import publish
from nsexp.experiment import tables

ROLE_COLORS = {
    "worker": "#d62728",
    "init": "#1f77b4",
    "parent": "#7f7f7f",
    "manager": "#9467bd",
    "spawner": "#17becf",
    "child": "#2ca02c",
}
_DEFAULT_COLOR = "#8c564b"


def _title(hops: pd.DataFrame, what: str) -> str:
    parts = []
    for col in ("backend", "testbed", "kernel"):
        if col in hops.columns:
            vals = sorted({str(v) for v in hops[col].dropna()})
            if vals:
                parts.append("/".join(vals))
    nruns = hops["run_id"].nunique() if "run_id" in hops.columns else 1
    runs = f", {nruns} runs" if nruns > 1 else ""
    return f"{what}\n({', '.join(parts)}{runs})" if parts else what


def plot_hop_table(hops: pd.DataFrame, title: str | None = None) -> Figure:
    """The paper's table: namespace, value and PID at each hop, with global PID and start time.

    The start time (clock ticks since boot) tells the mechanisms apart: one process that travels
    keeps it at every hop (kmod, criu), a new process per hop gets a new one (restart), though
    the values and PIDs are the same. Over repeats each row shows the most common (ns, value,
    pid), how many runs agree, and the global PID and start time of the first run that agrees.
    Hops that failed (e.g. CRIU could not restore) are shown as such, with their error below.
    """
    table = tables.hop_table(hops)
    nruns = hops["run_id"].nunique() if "run_id" in hops.columns else 1
    many = nruns > 1
    failures = bool(len(table)) and int(table["failed"].fillna(0).max()) > 0
    header = ["Hop", "Namespace", "Value", "PID", "Global PID", "Start time"]
    header += ["Runs agreeing"] if many else []
    header += ["Failed"] if failures else []
    cells, errors = [], []
    for _, r in table.iterrows():
        row = [str(r["hop"]), str(r["ns"])]
        row += [_fmt(r[c]) or "-" for c in ("value", "pid", "global_pid", "start_time")]
        if many:
            row.append(f"{r['agree']}/{nruns}")
        if failures:
            failed = int(r["failed"]) if pd.notna(r["failed"]) else 0
            if failed and pd.notna(r["error"]):
                errors.append(str(r["error"]))
                row.append(f"{failed}/{nruns} [{len(errors)}]")
            else:
                row.append(f"{failed}/{nruns}" if failed else "")
        cells.append(row)
    height = 0.45 * (len(cells) + 1) + 0.9 + 0.3 * len(errors)
    fig, ax = plt.subplots(figsize=(1.3 * len(header) + 1, height))
    ax.axis("off")
    if cells:
        tbl = ax.table(cellText=cells, colLabels=header, loc="center", cellLoc="center")
        tbl.auto_set_font_size(False)
        tbl.set_fontsize(11)
        tbl.scale(1, 1.4)
        for (row, _col), cell in tbl.get_celld().items():
            if row == 0:
                cell.set_text_props(weight="bold")
                cell.set_facecolor("#e8e8e8")
            elif failures and cells[row - 1][-1]:
                cell.set_facecolor("#fde0dd")  # a hop that failed in some run
    else:
        ax.text(0.5, 0.5, "no hop recorded", ha="center", va="center")
    if errors:
        notes = "\n".join(_error_note(i, e) for i, e in enumerate(errors, 1))
        fig.text(0.02, 0.01, notes, ha="left", va="bottom", fontsize=7, color="#a50f15")
    ax.set_title(title or _title(hops, "Chained execution"), fontsize=11)
    fig.tight_layout(rect=(0, min(0.5, 0.08 * len(errors)), 1, 1))
    return fig


def _error_note(i: int, error: str) -> str:
    """A short footnote for an error: its code and its last two parts (tools such as CRIU log
    the real cause just before the final "FAILED"); the tables keep the whole message."""
    parts = [p.strip() for p in error.split(" | ") if p.strip()]
    code = error.split(":", 1)[0] if ":" in error else ""
    text = " | ".join(parts[-2:]) if len(parts) > 1 else error
    if code and not text.startswith(code):
        text = f"{code}: ... {text}"
    lines = textwrap.wrap(f"[{i}] {text}", width=120)
    return "\n".join(lines[:2]) + (" ..." if len(lines) > 2 else "")


def _fmt(v: object) -> str:
    return "" if pd.isna(v) else str(v)


def _ns_order(processes: pd.DataFrame, hops: pd.DataFrame | None) -> list[str]:
    """Namespaces in a natural order: NS1, NS2, ... NS10 (numbers compared as numbers)."""
    names = {str(n) for n in processes["ns"].dropna()}
    if hops is not None and "ns" in hops.columns:
        names |= {str(n) for n in hops["ns"].dropna()}

    def key(name: str) -> tuple:
        digits = "".join(ch for ch in name if ch.isdigit())
        return (name.rstrip("0123456789"), int(digits) if digits else -1, name)

    return sorted(names, key=key)


def plot_process_trees(
    processes: pd.DataFrame,
    hops: pd.DataFrame | None = None,
    run_id: str | None = None,
    title: str | None = None,
) -> Figure:
    """The process hierarchy at every snapshot: one panel per hop, namespaces as columns.

    Each process is a labelled node (role, PID in its namespace, global PID) inside its
    namespace's box; the worker is highlighted. With several runs, only ``run_id`` (default:
    the first) is drawn, since the trees of repeats are meant to be identical.
    """
    procs = processes
    if "run_id" in procs.columns and procs["run_id"].notna().any():
        run_id = run_id or str(procs["run_id"].dropna().iloc[0])
        procs = procs[procs["run_id"] == run_id]
        if hops is not None and "run_id" in hops.columns:
            hops = hops[hops["run_id"] == run_id]
    snapshots = sorted(int(s) for s in procs["snapshot"].dropna().unique())
    namespaces = _ns_order(procs, hops)
    if not snapshots:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no process snapshot recorded", ha="center", va="center")
        return fig
    # One spare row for the ghost of the worker's previous place.
    max_rows = 1 + max(
        int(procs[procs["snapshot"] == s].groupby("ns").size().max()) for s in snapshots
    )
    # Wide layouts (many namespaces) get one panel per row so that labels stay readable.
    ncols = 1 if len(snapshots) == 1 or len(namespaces) > 5 else 2
    nrows = (len(snapshots) + ncols - 1) // ncols
    panel_w = 1.5 * len(namespaces) + 0.4
    panel_h = 0.55 * max_rows + 1.2
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_w * ncols, panel_h * nrows + 0.6), squeeze=False
    )
    for ax in axes.flat[len(snapshots) :]:
        ax.axis("off")
    for ax, snap in zip(axes.flat, snapshots, strict=False):
        came_from = _previous_stop(snap, hops)
        _draw_snapshot(ax, procs[procs["snapshot"] == snap], namespaces, max_rows, came_from)
        ax.set_title(_snapshot_title(snap, hops), fontsize=10)
    handles = [
        plt.Line2D([], [], marker="s", ls="", color=c, label=r)
        for r, c in ROLE_COLORS.items()
        if r in set(procs["role"].dropna())
    ]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    base = _title(hops, "Process tree per hop") if hops is not None else "Process tree per hop"
    fig.suptitle(title or base, fontsize=11)
    fig.tight_layout(rect=(0, 0.05 if handles else 0, 1, 0.96))
    return fig


def _snapshot_title(snap: int, hops: pd.DataFrame | None) -> str:
    if hops is None or "hop" not in hops.columns:
        return f"snapshot {snap}"
    row = hops[hops["hop"] == snap]
    if row.empty:
        return f"snapshot {snap}"
    r = row.iloc[0]
    # The start time tells one process (kmod) from a successor per hop (restart, criu).
    start = f", start {_fmt(r['start_time'])}" if pd.notna(r.get("start_time")) else ""
    return (
        f"hop {snap}: worker in {r['ns']} (value {_fmt(r['value'])}, PID {_fmt(r['pid'])}{start})"
    )


def _previous_stop(snap: int, hops: pd.DataFrame | None) -> tuple[str, str] | None:
    """(namespace, PID) of the worker at the hop before ``snap``, if recorded."""
    if hops is None or snap == 0 or "hop" not in hops.columns:
        return None
    prev = hops[hops["hop"] == snap - 1]
    if prev.empty or pd.isna(prev.iloc[0]["ns"]):
        return None
    return str(prev.iloc[0]["ns"]), _fmt(prev.iloc[0]["pid"])


def _draw_snapshot(
    ax,
    procs: pd.DataFrame,
    namespaces: list[str],
    max_rows: int,
    came_from: tuple[str, str] | None = None,
) -> None:
    """One panel: a box per namespace, processes stacked inside (init first, worker last).

    ``came_from`` (namespace, PID) draws a dashed ghost where the worker was before this hop,
    with an arrow to where it is now.
    """
    worker_at = None
    ghost_at = None
    order = {"parent": 0, "manager": 1, "init": 2, "spawner": 3, "child": 4, "worker": 5}
    ax.set_xlim(-0.05, len(namespaces) + 0.05)
    ax.set_ylim(-(max_rows + 0.3), 0.75)
    ax.axis("off")
    for i, ns in enumerate(namespaces):
        box = FancyBboxPatch(
            (i + 0.05, -(max_rows + 0.15)),
            0.9,
            max_rows + 0.6,
            boxstyle="round,pad=0.02",
            fc="#f4f4f4",
            ec="#999999",
        )
        ax.add_patch(box)
        ax.text(i + 0.5, 0.25, ns, ha="center", va="center", fontsize=9, weight="bold")
        members = procs[procs["ns"] == ns].copy()
        members["_order"] = members["role"].map(order).fillna(4)
        members = members.sort_values(["_order", "pid"], na_position="last")
        for j, (_, p) in enumerate(members.iterrows()):
            role = str(p["role"]) if pd.notna(p["role"]) else "?"
            color = ROLE_COLORS.get(role, _DEFAULT_COLOR)
            label = f"{p['name'] if 'name' in p and pd.notna(p['name']) else role} {_fmt(p['pid'])}"
            gpid = f" (g{_fmt(p['global_pid'])})" if pd.notna(p["global_pid"]) else ""
            state = p.get("state")
            if isinstance(state, str) and state not in ("S", "R", ""):
                gpid += f" [{state}]"  # e.g. a predecessor still exiting (D) or a zombie (Z)
            is_worker = role == "worker"
            if is_worker:
                worker_at = (i + 0.5, -(j + 0.5))
            ax.text(
                i + 0.5,
                -(j + 0.5),
                label + gpid,
                ha="center",
                va="center",
                fontsize=7,
                color="white" if is_worker else "black",
                weight="bold" if is_worker else "normal",
                bbox={
                    "boxstyle": "round,pad=0.25",
                    "fc": color if is_worker else "white",
                    "ec": color,
                    "lw": 2 if is_worker else 1,
                },
            )
        if came_from is not None and came_from[0] == ns:
            ghost_at = (i + 0.5, -(len(members) + 0.5))
            ax.text(
                *ghost_at,
                f"worker was {came_from[1]}",
                ha="center",
                va="center",
                fontsize=7,
                color="#777777",
                style="italic",
                bbox={"boxstyle": "round,pad=0.25", "fc": "none", "ec": "#999999", "ls": "--"},
            )
    if worker_at is not None and ghost_at is not None and worker_at[0] != ghost_at[0]:
        side = 0.32 if worker_at[0] > ghost_at[0] else -0.32  # leave and enter facing sides
        ax.annotate(
            "",
            xy=(worker_at[0] - side, worker_at[1]),
            xytext=(ghost_at[0] + side, ghost_at[1]),
            arrowprops={"arrowstyle": "->", "color": ROLE_COLORS["worker"], "lw": 1.2},
        )


def plot_phase_timings(hops: pd.DataFrame, title: str | None = None) -> Figure | None:
    """Per hop, the median duration of each phase (ms) as stacked bars; None if no timings."""
    d = tables.phase_durations(hops)
    if d.empty:
        return None
    phases = list(dict.fromkeys(d["phase"]))
    med = d.groupby(["hop", "phase"], sort=False)["ms"].median().unstack("phase")
    med = med.reindex(columns=phases).sort_index()
    ns = d.groupby("hop")["ns"].first().reindex(med.index)
    labels = [f"{h}\n{n}" for h, n in zip(med.index, ns, strict=True)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(med) + 3.5), 4))
    bottom = pd.Series(0.0, index=med.index)
    cmap = plt.get_cmap("tab10")
    for k, phase in enumerate(phases):
        vals = med[phase].fillna(0.0)
        ax.bar(labels, vals, bottom=bottom, label=phase, color=cmap(k % 10))
        bottom += vals
    for x, total in enumerate(bottom):
        ax.text(x, total, f"{total:.2f}", ha="center", va="bottom", fontsize=8)
    nruns = d["run_id"].nunique()
    ax.set_ylabel("median duration (ms)" if nruns > 1 else "duration (ms)")
    ax.set_xlabel("hop (the migration into that namespace)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or _title(hops, "Migration phases per hop"), fontsize=11)
    fig.tight_layout()
    return fig


def figures_for_run(
    run_dir: str | os.PathLike[str], figures_dir: str | os.PathLike[str], prefix: str = "run"
) -> list[Path]:
    """Draw one run folder's hop table, process trees and phase timings into ``figures_dir``.

    This is what ``nsexp run --figures DIR`` (and so ``make run``) draws after a run.
    """
    run = tables.read_run(run_dir)
    prov = publish.provenance([run.meta], run_dir=str(run_dir))
    return publish.save_figures(
        {
            "hop_table": plot_hop_table(run.hops),
            "process_trees": plot_process_trees(run.processes, run.hops),
            "phases": plot_phase_timings(run.hops),
        },
        figures_dir,
        prefix,
        provenance=prov,
    )
