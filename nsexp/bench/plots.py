"""Tables and figures of the benchmarks (notebooks 02 and 03): pandas + matplotlib, host only.

Every function takes the tidy tables the benchmarks wrote (``bench-hop.csv``, ``bench-kernel.csv``,
``bench-scaling.csv``, ``bench-depth-kernel.csv``: :func:`read_bench`) or their provenance, and
returns a DataFrame or a :class:`matplotlib.figure.Figure`. Statistics that the verdicts rest on
(phases, throughput, ratios with intervals, fits) come from :mod:`nsexp.bench.summary`, the one
definition; here they are only arranged and drawn. Only measured rows count: status ``ok``, not
warm-up.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from nsexp.bench import summary as sm
from nsexp.records import STAMPS, sidecar_path

BACKEND_ORDER = ["floor", "kmod", "restart", "criu"]
COLORS = {
    "kmod": "#d62728",
    "restart": "#1f77b4",
    "criu": "#7f7f7f",
    "floor": "#2ca02c",
    "manager_ping": "#98df8a",
    "kernel": "#9467bd",
    "new": "#d62728",
    "legacy": "#7f7f7f",
}


def read_bench(data_dir: str | os.PathLike[str], name: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``data_dir/bench-<name>.csv`` and its provenance (numbers as numbers)."""
    path = Path(data_dir) / f"bench-{name}.csv"
    df = pd.read_csv(path, low_memory=False)
    side = sidecar_path(path)
    prov = json.loads(side.read_text()) if side.exists() else {}
    df.attrs["provenance"] = prov
    return df, prov


def measured(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that count: ok and not warm-up (tables without those columns are returned as is)."""
    keep = pd.Series(True, index=df.index)
    if "status" in df:
        keep &= df["status"].astype(str) == "ok"
    if "warmup" in df:
        keep &= df["warmup"].fillna(0).astype(int) == 0
    return df[keep]


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts with Python ints (NaN -> None), as nsexp.bench.summary expects them."""
    out = []
    for r in df.to_dict("records"):
        out.append(
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        )
    for r in out:
        for k in (*STAMPS, "x", "rep", "client", "i", "warmup"):
            if r.get(k) is not None:
                r[k] = int(r[k])
    return out


def _ms(ns: Any) -> Any:
    return ns / 1e6


def _fmt_ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms * 1000:.0f} us"


def _order(values: Any) -> list[str]:
    vals = list(dict.fromkeys(values))
    return sorted(vals, key=lambda v: BACKEND_ORDER.index(v) if v in BACKEND_ORDER else 99)


def _footer(fig: Figure, prov: dict[str, Any] | None) -> None:
    if prov:
        code = str(prov.get("code_version", ""))[:12]
        fig.text(
            0.01,
            0.005,
            f"{prov.get('testbed')} testbed, kernel {prov.get('kernel')}, run "
            f"{prov.get('run_id')}, code {code}: absolute times are emulated (TCG); compare ratios",
            fontsize=6.5,
            color="#555555",
        )


# -- hop ---------------------------------------------------------------------------------------


def hop_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Per backend and kind (hop, manager_ping, minimal_rtt): n, failed, median, p90, p99 (ms)."""
    ok = measured(df)
    g = ok.groupby(["backend", "kind"])["total_ns"]
    out = pd.DataFrame(
        {
            "n": g.size(),
            "median_ms": _ms(g.median()),
            "p90_ms": _ms(g.quantile(0.9)),
            "p99_ms": _ms(g.quantile(0.99)),
        }
    ).reset_index()
    bad = df[df["status"].astype(str) != "ok"]
    failed = bad.groupby(["backend", "kind"]).size()
    out["failed"] = [int(failed.get((b, k), 0)) for b, k in zip(out.backend, out.kind, strict=True)]
    # Backends that only failed still get a line, with the first error: the failure is a result.
    for (b, k), nfail in failed.items():
        if not ((out.backend == b) & (out.kind == k)).any():
            out.loc[len(out)] = {"backend": b, "kind": k, "n": 0, "failed": int(nfail)}
    out["first_error"] = [
        str(bad[(bad.backend == b) & (bad.kind == k)]["error"].iloc[0])[:300]
        if failed.get((b, k), 0)
        else ""
        for b, k in zip(out.backend, out.kind, strict=True)
    ]
    out["order"] = out["backend"].map(lambda b: _order([b, *BACKEND_ORDER]).index(b))
    return out.sort_values(["order", "kind"]).drop(columns="order").reset_index(drop=True)


def phase_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Median, p90, p99 (ms) of each phase per backend, in the order the phases happen."""
    rows = []
    ok = measured(df[df["kind"] == sm.HOP])
    for b in _order(ok["backend"]):
        hops = _records(ok[ok["backend"] == b])
        med = sm.phase_medians(hops)
        total = sum(med.values())
        for name, m in med.items():
            vals = [ns for r in hops for ph, ns in sm.phases(r) if ph == name]
            rows.append(
                {
                    "backend": b,
                    "phase": name,
                    "n": len(vals),
                    "median_ms": m / 1e6,
                    "p90_ms": sm.quantile(vals, 0.9) / 1e6,
                    "p99_ms": sm.quantile(vals, 0.99) / 1e6,
                    "share": m / total if total else np.nan,
                }
            )
    cols = ["backend", "phase", "n", "median_ms", "p90_ms", "p99_ms", "share"]
    return pd.DataFrame(rows, columns=cols)


def ratio_table(prov: dict[str, Any]) -> pd.DataFrame:
    """The ratios of a run's provenance with their 95 % intervals (computed by the benchmark)."""
    rows = [{"ratio": k, **v} for k, v in (prov.get("ratios") or {}).items()]
    cols = ["ratio", "value", "ci95_low", "ci95_high", "n_num", "n_den"]
    return pd.DataFrame(rows).reindex(columns=cols)


def verdict_table(prov: dict[str, Any]) -> pd.DataFrame:
    """Each target of the run: value, interval, verdict, and for a missed one the phase that
    holds it back (its median and share of the hop), as the benchmark computed them."""
    rows = []
    got = prov.get("verdicts") or {}
    for name in sorted(got, key=lambda n: list(sm.TARGETS).index(n) if n in sm.TARGETS else 99):
        v = got[name]
        held = v.get("held_back_by") or {}
        rows.append(
            {
                "target": name,
                "bound": v["target"],
                "value": v["value"],
                "ci95_low": v.get("ci95_low"),
                "ci95_high": v.get("ci95_high"),
                "verdict": v["verdict"],
                "held_back_by": held.get("phase", ""),
                "phase_median_ms": held.get("phase_median_ns", np.nan) / 1e6,
                "phase_share": held.get("share", np.nan),
            }
        )
    cols = ["target", "bound", "value", "ci95_low", "ci95_high", "verdict", "held_back_by"]
    return pd.DataFrame(rows).reindex(columns=[*cols, "phase_median_ms", "phase_share"])


def above_floor(df: pd.DataFrame) -> pd.DataFrame:
    """Per backend: median hop, the minimal floor and the manager's ping of the same boot, the
    part of the hop above the minimal floor, and the mechanism's own span (kmod: ioctl start ->
    switch done; restart: reply sent -> successor runs; criu: request -> resumed), with its
    ratio to kmod's."""
    ok = measured(df)
    floor = ok[ok["kind"] == sm.MINIMAL_RTT]["total_ns"].median()
    rows = []
    for b in _order(ok["backend"]):
        h = ok[(ok["backend"] == b) & (ok["kind"] == sm.HOP)]
        if h.empty:
            continue
        ping = ok[(ok["backend"] == b) & (ok["kind"] == sm.MANAGER_PING)]["total_ns"].median()
        if b == "kmod":
            mech = h["kernel_done"] - h["migrate_started"]
        elif b == "restart":
            mech = h["resumed"] - h["reply_sent"]
        else:
            mech = h["resumed"] - h["request_sent"]
        hop_ms = float(_ms(h["total_ns"].median()))
        rows.append(
            {
                "backend": b,
                "hop_ms": hop_ms,
                "minimal_floor_ms": float(_ms(floor)),
                "manager_ping_ms": float(_ms(ping)),
                "hop_minus_floor_ms": hop_ms - float(_ms(floor)),
                "mechanism_ms": float(_ms(mech.median())),
            }
        )
    out = pd.DataFrame(rows)
    if not out.empty and (out["backend"] == "kmod").any():
        k = out[out["backend"] == "kmod"].iloc[0]
        out["mechanism_vs_kmod"] = out["mechanism_ms"] / k["mechanism_ms"]
    return out


def plot_hop_distributions(
    df: pd.DataFrame, kernel: pd.DataFrame | None = None, prov: dict[str, Any] | None = None
) -> Figure:
    """End-to-end hop latency per backend beside the two floors (log scale), and the kernel's
    own numbers from the same boot."""
    ok = measured(df)
    series: list[tuple[str, pd.Series, str]] = []
    fl = ok[ok["kind"] == sm.MINIMAL_RTT]
    if not fl.empty:
        series.append(("minimal floor\n(2 Python procs)", _ms(fl["total_ns"]), "floor"))
    ping = ok[(ok["kind"] == sm.MANAGER_PING) & (ok["backend"] == "kmod")]
    if not ping.empty:
        series.append(("manager ping\n(persistent conn.)", _ms(ping["total_ns"]), "manager_ping"))
    for b in _order(ok["backend"]):
        h = ok[(ok["kind"] == sm.HOP) & (ok["backend"] == b)]
        if not h.empty:
            series.append((f"{b} hop", _ms(h["total_ns"]), b))
    if kernel is not None and not kernel.empty:
        for metric, label in (
            ("kernel_switch", "kernel switch\n(C bench)"),
            ("ioctl_round_trip", "ioctl round trip\n(C bench)"),
            ("fork_wait", "fork+waitpid\n(C bench)"),
        ):
            k = kernel[kernel["metric"] == metric]
            if not k.empty:
                series.append((label, _ms(k["ns"]), "kernel"))
    fig = Figure(figsize=(max(6.0, 1.25 * len(series)), 4.2))
    ax = fig.subplots()
    if series:
        parts = ax.violinplot([s[1].values for s in series], showmedians=True, widths=0.8)
        for body, s in zip(parts["bodies"], series, strict=True):
            body.set_facecolor(COLORS.get(s[2], "#9467bd"))
            body.set_alpha(0.55)
        for x, s in enumerate(series, 1):
            med, p99 = float(np.median(s[1])), float(np.quantile(s[1], 0.99))
            ax.annotate(
                _fmt_ms(med),
                (x, med),
                xytext=(6, 0),
                textcoords="offset points",
                fontsize=7,
                va="center",
            )
            ax.plot([x - 0.15, x + 0.15], [p99, p99], color="black", lw=0.8)
        ax.set_xticks(range(1, len(series) + 1), [s[0] for s in series], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms, log scale; bar: p99)")
    ax.set_title("One hop, end to end (request sent -> resumed), one boot", fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.25)
    _footer(fig, prov)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def plot_hop_phases(df: pd.DataFrame, prov: dict[str, Any] | None = None) -> Figure:
    """Where the time of a hop goes: median of each phase, one panel per backend."""
    st = phase_stats(df)
    backends = _order(st["backend"]) if not st.empty else []
    fig = Figure(figsize=(8.5, 1.0 + 1.5 * max(1, len(backends))))
    axes = fig.subplots(max(1, len(backends)), 1, squeeze=False)[:, 0]
    cmap = matplotlib.colormaps["tab20"]
    for ax, b in zip(axes, backends, strict=False):
        sub = st[st["backend"] == b]
        left = 0.0
        for j, r in enumerate(sub.itertuples()):
            ax.barh(0, r.median_ms, left=left, color=cmap(j % 20), edgecolor="white")
            if r.share > 0.06:
                ax.text(
                    left + r.median_ms / 2,
                    0,
                    f"{r.phase}\n{_fmt_ms(r.median_ms)}",
                    ha="center",
                    va="center",
                    fontsize=6.5,
                )
            left += r.median_ms
        small = [f"{r.phase} {_fmt_ms(r.median_ms)}" for r in sub.itertuples() if r.share <= 0.06]
        ax.set_yticks([])
        ax.set_title(
            f"{b}: sum of phase medians {_fmt_ms(left)}"
            + (f"   (small: {'; '.join(small)})" if small else ""),
            fontsize=7.5,
            loc="left",
        )
        ax.set_xlim(0, left * 1.01 if left > 0 else 1)
        ax.set_xlabel("ms", fontsize=7)
        ax.tick_params(labelsize=7)
    _footer(fig, prov)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


# -- scaling -----------------------------------------------------------------------------------


def _hops(df: pd.DataFrame, sweep: str) -> pd.DataFrame:
    ok = measured(df)
    return ok[(ok["sweep"] == sweep) & (ok["kind"] == sm.HOP)].copy()


def _per_x(h: pd.DataFrame, key: str) -> pd.DataFrame:
    g = h.groupby(key)["total_ns"]
    return pd.DataFrame(
        {
            "n": g.size(),
            "median_ms": _ms(g.median()),
            "p90_ms": _ms(g.quantile(0.9)),
            "p99_ms": _ms(g.quantile(0.99)),
        }
    )


def _pings(df: pd.DataFrame, sweep: str) -> pd.Series:
    """Median manager ping (ms) per x of a sweep (each right before a hop)."""
    ok = measured(df)
    rt = ok[(ok["sweep"] == sweep) & (ok["kind"] == sm.MANAGER_PING)]
    return _ms(rt.groupby("x")["total_ns"].median())


def route_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Per-hop cost by position on the route, in decades (1-10, 11-100, 101-1000 ...)."""
    h = _hops(df, "route")
    if h.empty:
        return pd.DataFrame(columns=["hops", "n", "median_ms", "p90_ms", "p99_ms", "vs_first"])
    h["lo"] = h["x"].astype(int).map(lambda k: int(sm.route_bin(k).split("-")[0]))
    out = _per_x(h, "lo").reset_index()
    out.insert(0, "hops", out["lo"].map(sm.route_bin))
    out["vs_first"] = out["median_ms"] / out["median_ms"].iloc[0]
    return out.drop(columns="lo")


def depth_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Per nesting depth: the hop end to end (median, p99), the kernel switch it saw, and the
    manager ping right before each hop."""
    h = _hops(df, "depth")
    if h.empty:
        return pd.DataFrame(columns=["depth", "n", "median_ms", "kernel_switch_us"])
    out = _per_x(h, "x")
    g = h.groupby("x")["kernel_switch_ns"]
    out["kernel_switch_us"] = g.median() / 1e3
    out["kernel_switch_p99_us"] = g.quantile(0.99) / 1e3
    out["manager_ping_ms"] = _pings(df, "depth")
    return out.reset_index(names="depth")


def depth_fit(stats: pd.DataFrame, column: str) -> dict[str, float]:
    """Least-squares line through ``column`` against depth (slope, intercept, R^2)."""
    if len(stats) < 2:
        return {"ns_per_level": np.nan, "intercept_ns": np.nan, "r2": np.nan}
    series = dict(zip(stats["depth"].astype(int), stats[column].astype(float), strict=True))
    return sm.line_fit(series)


def depth_kernel_stats(dk: pd.DataFrame | None) -> pd.DataFrame:
    """The C depth benchmark: per depth, median and p99 (us) of the kernel switch and of the
    ioctl round trip."""
    if dk is None or dk.empty:
        return pd.DataFrame(columns=["depth", "kernel_switch_us", "ioctl_round_trip_us"])
    g = dk.groupby(["depth", "metric"])["ns"]
    med = g.median().unstack() / 1e3
    p99 = g.quantile(0.99).unstack() / 1e3
    out = pd.DataFrame(
        {
            "n": dk[dk["metric"] == "kernel_switch"].groupby("depth").size(),
            "kernel_switch_us": med["kernel_switch"],
            "kernel_switch_p99_us": p99["kernel_switch"],
            "ioctl_round_trip_us": med["ioctl_round_trip"],
            "ioctl_round_trip_p99_us": p99["ioctl_round_trip"],
        }
    )
    return out.reset_index()


def population_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Per number of processes already in the target: hops into it (median, p90, p99)."""
    h = _hops(df, "population")
    h = h[h["ns"] == "B"]
    if h.empty:
        return pd.DataFrame(columns=["population", "n", "median_ms", "p99_ms", "vs_empty"])
    out = _per_x(h, "x")
    out["kernel_switch_us"] = h.groupby("x")["kernel_switch_ns"].median() / 1e3
    out["manager_ping_ms"] = _pings(df, "population")
    out = out.reset_index(names="population")
    out["vs_empty"] = out["median_ms"] / out["median_ms"].iloc[0]
    return out


def client_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Per manager path and number of concurrent clients: migrations per second, the hop's
    median and p99 (from nsexp.bench.summary.throughput)."""
    thr = sm.throughput(_records(df[df["sweep"] == "clients"]))
    rows = [
        {
            "path": path,
            "clients": k,
            "migrations": v["migrations"],
            "span_s": v["span_s"],
            "per_s": v["per_s"],
            "median_hop_ms": v["median_hop_ns"] / 1e6,
            "p99_hop_ms": v["p99_hop_ns"] / 1e6,
        }
        for path, per in thr.items()
        for k, v in per.items()
    ]
    cols = ["path", "clients", "migrations", "span_s", "per_s", "median_hop_ms", "p99_hop_ms"]
    out = pd.DataFrame(rows, columns=cols)
    if not out.empty:
        one = out[out["clients"] == out["clients"].min()].set_index("path")["per_s"]
        out["vs_one"] = out["per_s"] / out["path"].map(one)
    return out


def plot_scaling(
    df: pd.DataFrame, prov: dict[str, Any] | None = None, depth_kernel: pd.DataFrame | None = None
) -> Figure:
    """The four sweeps: route length, nesting depth, target population, concurrent clients
    (new and legacy manager path). With ``depth_kernel`` the depth panel shows the C
    benchmark's kernel switch (precise) instead of the one seen by the Python worker."""
    fig = Figure(figsize=(11, 8))
    (a, b), (c, d) = fig.subplots(2, 2)

    h = _hops(df, "route").sort_values("x")
    if not h.empty:
        a.scatter(h["x"], _ms(h["total_ns"]), s=3, alpha=0.35, color=COLORS["kmod"])
        roll = _ms(h["total_ns"]).rolling(25, min_periods=5, center=True)
        a.plot(h["x"], roll.median(), color="black", lw=1, label="rolling median")
        med = float(_ms(h["total_ns"]).median())
        a.axhspan(med / 1.2, med * 1.2, color="#2ca02c", alpha=0.12, label="median ±20%")
        a.set_xscale("log")
        a.set_yscale("log")
        a.legend(fontsize=7)
    nns = (((prov or {}).get("params") or {}).get("scaling") or {}).get("route_namespaces")
    a.set_title(f"Route length: hop k of a route over {nns or '?'} namespaces", fontsize=9)
    a.set_xlabel("hop number on the route")
    a.set_ylabel("hop, end to end (ms)")

    st = depth_stats(df)
    if not st.empty:
        b.plot(st["depth"], st["median_ms"], "o-", color=COLORS["kmod"], label="hop, end to end")
        b.plot(st["depth"], st["p99_ms"], ".:", color=COLORS["kmod"], label="hop p99")
        b.set_ylabel("hop (ms)")
        b2 = b.twinx()
        kst = depth_kernel_stats(depth_kernel)
        label = "kernel switch (Python worker)"
        if not kst.empty:
            st, label = kst, "kernel switch (C subject, depth_bench)"
        b2.plot(st["depth"], st["kernel_switch_us"], "s-", color=COLORS["kernel"], label=label)
        fit = depth_fit(st, "kernel_switch_us")
        b2.plot(
            st["depth"],
            fit["ns_per_level"] * st["depth"] + fit["intercept_ns"],
            "--",
            color=COLORS["kernel"],
            lw=0.8,
            label=f"line: {fit['ns_per_level']:.2f} us/level, R²={fit['r2']:.2f}",
        )
        b2.set_ylabel("kernel switch median (us)")
        la, lb = b.get_legend_handles_labels(), b2.get_legend_handles_labels()
        b.legend(la[0] + lb[0], la[1] + lb[1], fontsize=7, loc="upper left")
    b.set_title("Nesting depth of the namespaces (levels under the global one)", fontsize=9)
    b.set_xlabel("depth")

    st = population_stats(df)
    if not st.empty:
        x = st["population"].clip(lower=1)
        c.errorbar(
            x,
            st["median_ms"],
            yerr=[np.zeros(len(st)), st["p99_ms"] - st["median_ms"]],
            fmt="o-",
            color=COLORS["kmod"],
            capsize=3,
            label="median (bar: p99)",
        )
        base = float(st["median_ms"].iloc[0])
        c.axhspan(base / 1.2, base * 1.2, color="#2ca02c", alpha=0.12, label="empty target ±20%")
        c.set_xscale("log")
        c.legend(fontsize=7)
    c.set_title("Processes already in the target (0 plotted at 1)", fontsize=9)
    c.set_xlabel("processes in the target namespace")
    c.set_ylabel("hop into the target (ms)")

    st = client_stats(df)
    for path, sub in st.groupby("path"):
        d.plot(sub["clients"], sub["per_s"], "o-", color=COLORS.get(str(path)), label=str(path))
    if not st.empty:
        d.set_xscale("log", base=2)
        d.legend(fontsize=7, title="manager path", title_fontsize=7)
    d.set_title("Concurrent migrating clients: manager throughput", fontsize=9)
    d.set_xlabel("clients")
    d.set_ylabel("migrations per second")
    for ax in (a, b, c, d):
        ax.grid(alpha=0.25, which="both")
    _footer(fig, prov)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig
