"""Tables and figures of the benchmarks (notebooks 02 and 03): pandas + matplotlib, host only.

Every function takes the tidy tables written by :mod:`nsexp.bench` (``bench-hop.csv``,
``bench-kernel.csv``, ``bench-scaling.csv``, read with :func:`read_bench`) and returns a DataFrame
or a :class:`matplotlib.figure.Figure`; save figures with :func:`nsexp.plotting.save_figures`.
Only measured rows count: status ``ok`` and not warm-up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from nsexp import (
    bench,
    plotting,  # noqa: F401 - selects a headless matplotlib backend when needed
)
from nsexp import io as nio

BACKEND_ORDER = ["kmod", "restart", "criu", "criu-direct"]
COLORS = {
    "kmod": "#d62728",
    "restart": "#1f77b4",
    "criu": "#7f7f7f",
    "criu-direct": "#8c564b",
    "round_trip": "#2ca02c",
}


def read_bench(data_dir: str | os.PathLike[str], name: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``data_dir/bench-<name>.csv`` and its provenance (numbers as numbers)."""
    path = Path(data_dir) / f"bench-{name}.csv"
    df = pd.read_csv(path, low_memory=False)
    side = nio.provenance_path(path)
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


def _ms(ns: pd.Series | float) -> Any:
    return ns / 1e6


def _order(values: Any) -> list[str]:
    vals = list(dict.fromkeys(values))
    return sorted(vals, key=lambda v: BACKEND_ORDER.index(v) if v in BACKEND_ORDER else 99)


def _footer(fig: Figure, prov: dict[str, Any] | None) -> None:
    if prov:
        fig.text(
            0.01,
            0.005,
            f"{prov.get('testbed')} testbed (QEMU/TCG), kernel {prov.get('kernel')}, run "
            f"{prov.get('run_id')}, code {prov.get('code_version')}: absolute times are "
            "emulated; compare ratios",
            fontsize=6.5,
            color="#555555",
        )


# -- hop ---------------------------------------------------------------------------------------


def hop_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Per backend and kind (hop / round_trip): n, failed, median and p90 in ms."""
    ok = measured(df)
    g = ok.groupby(["backend", "kind"])["total_ns"]
    out = pd.DataFrame(
        {
            "n": g.size(),
            "median_ms": _ms(g.median()),
            "p90_ms": _ms(g.quantile(0.9)),
            "min_ms": _ms(g.min()),
        }
    ).reset_index()
    failed = df[df["status"].astype(str) != "ok"].groupby(["backend", "kind"]).size()
    out["failed"] = [int(failed.get((b, k), 0)) for b, k in zip(out.backend, out.kind, strict=True)]
    # Backends that only failed still get a line: the failure is a result.
    for (b, k), nfail in failed.items():
        if not ((out.backend == b) & (out.kind == k)).any():
            out.loc[len(out)] = {"backend": b, "kind": k, "n": 0, "failed": int(nfail)}
    out["order"] = out["backend"].map(lambda b: _order([b, *BACKEND_ORDER]).index(b))
    return out.sort_values(["order", "kind"]).drop(columns="order").reset_index(drop=True)


def hop_phases(df: pd.DataFrame) -> pd.DataFrame:
    """Long table: backend, i, phase, ns (between consecutive stamps, in time order)."""
    rows = []
    for r in measured(df[df["kind"] == "hop"]).to_dict("records"):
        clean = {k: (None if pd.isna(v) else int(v)) for k, v in r.items() if k in bench.STAMPS}
        for order, (name, ns) in enumerate(bench.phases(clean)):
            rows.append(
                {"backend": r["backend"], "i": r["i"], "order": order, "phase": name, "ns": ns}
            )
    return pd.DataFrame(rows, columns=["backend", "i", "order", "phase", "ns"])


def phase_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Median and p90 (ms) of each phase per backend, in the order the phases happen."""
    ph = hop_phases(df)
    if ph.empty:
        return pd.DataFrame(columns=["backend", "phase", "median_ms", "p90_ms", "share"])
    g = ph.groupby(["backend", "phase"])
    out = pd.DataFrame(
        {
            "order": g["order"].median(),
            "median_ms": _ms(g["ns"].median()),
            "p90_ms": _ms(g["ns"].quantile(0.9)),
        }
    ).reset_index()
    out["share"] = out["median_ms"] / out.groupby("backend")["median_ms"].transform("sum")
    out["border"] = out["backend"].map(lambda b: _order([b, *BACKEND_ORDER]).index(b))
    out = out.sort_values(["border", "order"]).drop(columns=["border", "order"])
    return out.reset_index(drop=True)


def ratio_table(prov: dict[str, Any]) -> pd.DataFrame:
    """The ratios of a benchmark's provenance, with the target and whether it was met."""
    targets = prov.get("targets") or {}
    rows = [
        {"ratio": k, "value": v, "target": targets.get(k, "")}
        for k, v in (prov.get("ratios") or {}).items()
    ]
    rows += [
        {"ratio": k, "value": np.nan, "target": t}
        for k, t in targets.items()
        if k not in (prov.get("ratios") or {})
    ]
    return pd.DataFrame(rows, columns=["ratio", "value", "target"])


def plot_hop_distributions(
    df: pd.DataFrame, kernel: pd.DataFrame | None = None, prov: dict[str, Any] | None = None
) -> Figure:
    """End-to-end hop latency per backend beside the bare round trip (log scale), and the
    kernel's own numbers from the same boot."""
    ok = measured(df)
    series: list[tuple[str, pd.Series, str]] = []
    rt = ok[(ok["kind"] == "round_trip") & (ok["backend"] == "kmod")]
    if not rt.empty:
        series.append(("bare round trip\n(manager ping)", _ms(rt["total_ns"]), "round_trip"))
    for b in _order(ok["backend"]):
        h = ok[(ok["kind"] == "hop") & (ok["backend"] == b)]
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
            med = float(np.median(s[1]))
            ax.annotate(
                _fmt_ms(med),
                (x, med),
                xytext=(6, 0),
                textcoords="offset points",
                fontsize=7,
                va="center",
            )
        ax.set_xticks(range(1, len(series) + 1), [s[0] for s in series], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title("One hop, end to end (request sent -> resumed), one boot", fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.25)
    _footer(fig, prov)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def _fmt_ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms * 1000:.0f} us"


def plot_hop_phases(df: pd.DataFrame, prov: dict[str, Any] | None = None) -> Figure:
    """Where the time of a hop goes: median of each phase, one panel per backend."""
    st = phase_stats(df)
    backends = _order(st["backend"]) if not st.empty else []
    fig = Figure(figsize=(8.5, 1.0 + 1.5 * max(1, len(backends))))
    axes = fig.subplots(max(1, len(backends)), 1, squeeze=False)[:, 0]
    cmap = plotting.plt.get_cmap("tab20")
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
    return ok[(ok["sweep"] == sweep) & (ok["kind"] == "hop")].copy()


def route_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Per-hop cost by position on the route, in decades (1-10, 11-100, 101-1000 ...)."""
    h = _hops(df, "route")
    if h.empty:
        return pd.DataFrame(columns=["hops", "n", "median_ms", "p90_ms"])
    h["hops"] = h["x"].astype(int).map(bench.route_bin)
    h["lo"] = h["hops"].map(lambda s: int(s.split("-")[0]))
    g = h.groupby(["lo", "hops"])["total_ns"]
    out = pd.DataFrame(
        {"n": g.size(), "median_ms": _ms(g.median()), "p90_ms": _ms(g.quantile(0.9))}
    ).reset_index()
    out["vs_first"] = out["median_ms"] / out["median_ms"].iloc[0]
    return out.drop(columns="lo")


def _round_trips(df: pd.DataFrame, sweep: str) -> pd.Series:
    """Median bare round trip (ms) per x of a sweep (interleaved with its hops)."""
    ok = measured(df)
    rt = ok[(ok["sweep"] == sweep) & (ok["kind"] == "round_trip")]
    return _ms(rt.groupby("x")["total_ns"].median())


def depth_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Per nesting depth: median end-to-end hop, median kernel switch time, and the median
    bare round trip measured right before the hops (the floor, for comparison)."""
    h = _hops(df, "depth")
    if h.empty:
        return pd.DataFrame(columns=["depth", "n", "median_ms", "kernel_switch_us"])
    g = h.groupby("x")
    out = pd.DataFrame(
        {
            "n": g.size(),
            "median_ms": _ms(g["total_ns"].median()),
            "p90_ms": _ms(g["total_ns"].quantile(0.9)),
            "kernel_switch_us": g["kernel_switch_ns"].median() / 1e3,
            "kernel_switch_p90_us": g["kernel_switch_ns"].quantile(0.9) / 1e3,
            "round_trip_ms": _round_trips(df, "depth"),
        }
    )
    return out.reset_index(names="depth")


def depth_fit(stats: pd.DataFrame, column: str) -> dict[str, float]:
    """Least-squares line through ``column`` against depth: slope, intercept, R^2."""
    if len(stats) < 2:
        return {"slope": np.nan, "intercept": np.nan, "r2": np.nan}
    x, y = stats["depth"].astype(float).values, stats[column].astype(float).values
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss = ((y - y.mean()) ** 2).sum()
    r2 = 1 - ((y - pred) ** 2).sum() / ss if ss > 0 else np.nan
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2)}


def depth_kernel_stats(dk: pd.DataFrame | None) -> pd.DataFrame:
    """The C depth benchmark (``bench-depth-kernel.csv``): per depth, median and p90 (us) of the
    kernel switch and of the ioctl round trip."""
    if dk is None or dk.empty:
        return pd.DataFrame(columns=["depth", "kernel_switch_us", "ioctl_round_trip_us"])
    g = dk.groupby(["depth", "metric"])["ns"]
    med = g.median().unstack() / 1e3
    p90 = g.quantile(0.9).unstack() / 1e3
    out = pd.DataFrame(
        {
            "n": dk[dk["metric"] == "kernel_switch"].groupby("depth").size(),
            "kernel_switch_us": med["kernel_switch"],
            "kernel_switch_p90_us": p90["kernel_switch"],
            "ioctl_round_trip_us": med["ioctl_round_trip"],
            "ioctl_round_trip_p90_us": p90["ioctl_round_trip"],
        }
    )
    return out.reset_index()


def population_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Per number of processes already in the target: hops into it (median, p90)."""
    h = _hops(df, "population")
    h = h[h["ns"] == "B"]
    if h.empty:
        return pd.DataFrame(columns=["population", "n", "median_ms"])
    g = h.groupby("x")
    out = pd.DataFrame(
        {
            "n": g.size(),
            "median_ms": _ms(g["total_ns"].median()),
            "p90_ms": _ms(g["total_ns"].quantile(0.9)),
            "kernel_switch_us": g["kernel_switch_ns"].median() / 1e3,
            "round_trip_ms": _round_trips(df, "population"),
        }
    ).reset_index(names="population")
    out["vs_empty"] = out["median_ms"] / out["median_ms"].iloc[0]
    return out


def client_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Per number of concurrent clients: migrations per second and the median hop."""
    rows = [r for r in measured(df).to_dict("records") if r.get("sweep") == "clients"]
    for r in rows:
        for k in ("x", "request_sent", "resumed"):
            r[k] = int(r[k])
    thr = bench.throughput(rows)
    out = pd.DataFrame(
        [
            {
                "clients": k,
                "migrations": v["migrations"],
                "span_s": v["span_s"],
                "per_s": v["per_s"],
                "median_hop_ms": v["median_hop_ns"] / 1e6,
            }
            for k, v in thr.items()
        ],
        columns=["clients", "migrations", "span_s", "per_s", "median_hop_ms"],
    )
    if not out.empty:
        out["vs_one"] = out["per_s"] / out["per_s"].iloc[0]
    return out


def plot_scaling(
    df: pd.DataFrame, prov: dict[str, Any] | None = None, depth_kernel: pd.DataFrame | None = None
) -> Figure:
    """The four sweeps: route length, nesting depth, target population, concurrent clients.
    With ``depth_kernel`` (``bench-depth-kernel.csv``) the depth panel shows the C benchmark's
    kernel switch (precise) instead of the one seen by the Python migrator."""
    fig = Figure(figsize=(11, 8))
    (a, b), (c, d) = fig.subplots(2, 2)
    cpus = ((prov or {}).get("guest") or {}).get("cpus")

    h = _hops(df, "route")
    if not h.empty:
        a.scatter(h["x"], _ms(h["total_ns"]), s=3, alpha=0.35, color=COLORS["kmod"])
        roll = _ms(h.sort_values("x")["total_ns"]).rolling(25, min_periods=5, center=True)
        a.plot(h.sort_values("x")["x"], roll.median(), color="black", lw=1, label="rolling median")
        ok = measured(df)
        rt = ok[(ok["sweep"] == "route") & (ok["kind"] == "round_trip")].sort_values("x")
        if not rt.empty:
            a.plot(
                rt["x"],
                _ms(rt["total_ns"]).rolling(25, min_periods=5, center=True).median(),
                color=COLORS["round_trip"],
                lw=1,
                ls=":",
                label="bare round trip before each hop (rolling median)",
            )
        med = float(_ms(h["total_ns"]).median())
        a.axhspan(med / 1.2, med * 1.2, color="#2ca02c", alpha=0.12, label="median ±20%")
        a.set_xscale("log")
        a.set_yscale("log")
        a.legend(fontsize=7)
    nns = ((prov or {}).get("params") or {}).get("route_namespaces")
    a.set_title(f"Route length: hop k of one route over {nns or '?'} namespaces", fontsize=9)
    a.set_xlabel("hop number on the route")
    a.set_ylabel("hop, end to end (ms)")

    st = depth_stats(df)
    if not st.empty:
        b.plot(st["depth"], st["median_ms"], "o-", color=COLORS["kmod"], label="hop, end to end")
        if st["round_trip_ms"].notna().any():
            b.plot(
                st["depth"],
                st["round_trip_ms"],
                ".:",
                color=COLORS["round_trip"],
                label="bare round trip (floor)",
            )
        b.set_ylabel("hop median (ms)")
        b2 = b.twinx()
        kst = depth_kernel_stats(depth_kernel)
        label = "kernel switch (Python migrator)"
        if not kst.empty:
            st = kst
            label = "kernel switch (C subject, depth_bench)"
        b2.plot(st["depth"], st["kernel_switch_us"], "s-", color="#9467bd", label=label)
        fit = depth_fit(st, "kernel_switch_us")
        b2.plot(
            st["depth"],
            fit["slope"] * st["depth"] + fit["intercept"],
            "--",
            color="#9467bd",
            lw=0.8,
            label=f"fit: {fit['slope']:.2f} us/level, R²={fit['r2']:.2f}",
        )
        b2.set_ylabel("kernel switch median (us)")
        lines = b.get_legend_handles_labels()
        lines2 = b2.get_legend_handles_labels()
        b.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper left")
    b.set_title("Nesting depth of the namespaces (levels under the global one)", fontsize=9)
    b.set_xlabel("depth")

    st = population_stats(df)
    if not st.empty:
        x = st["population"].clip(lower=1)
        c.errorbar(
            x,
            st["median_ms"],
            yerr=[np.zeros(len(st)), st["p90_ms"] - st["median_ms"]],
            fmt="o-",
            color=COLORS["kmod"],
            capsize=3,
            label="median (bar: p90)",
        )
        if st["round_trip_ms"].notna().any():
            c.plot(x, st["round_trip_ms"], ".:", color=COLORS["round_trip"], label="round trip")
        base = float(st["median_ms"].iloc[0])
        c.axhspan(base / 1.2, base * 1.2, color="#2ca02c", alpha=0.12, label="empty target ±20%")
        c.set_xscale("log")
        c.legend(fontsize=7)
    c.set_title("Processes already in the target (0 plotted at 1)", fontsize=9)
    c.set_xlabel("processes in the target namespace")
    c.set_ylabel("hop into the target (ms)")

    st = client_stats(df)
    if not st.empty:
        d.plot(st["clients"], st["per_s"], "o-", color=COLORS["kmod"])
        if cpus:
            d.axvline(cpus, color="#555555", ls=":", lw=1)
            d.text(cpus, d.get_ylim()[1], f" {cpus} CPUs", fontsize=7, va="top")
        d.set_xscale("log", base=2)
    d.set_title("Concurrent migrating clients: manager throughput", fontsize=9)
    d.set_xlabel("clients")
    d.set_ylabel("migrations per second")
    for ax in (a, b, c, d):
        ax.grid(alpha=0.25, which="both")
    _footer(fig, prov)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def above_floor(df: pd.DataFrame) -> pd.DataFrame:
    """Per backend: median hop, median bare round trip of the same sessions (the floor), the
    part of the hop above the floor, and the mechanism's own span (kmod: ioctl start -> switch
    done; restart: reply sent -> successor runs; criu: dump start -> restore done), each with
    its ratio to kmod's. Explains ratios that the floor compresses."""
    ok = measured(df)
    rows = []
    for b in _order(ok["backend"]):
        h = ok[(ok["backend"] == b) & (ok["kind"] == "hop")]
        if h.empty:
            continue
        rt = ok[(ok["backend"] == b) & (ok["kind"] == "round_trip")]["total_ns"]
        if b == "kmod":
            mech = h["kernel_done"] - h["migrate_started"]
        elif b == "restart":
            mech = h["resumed"] - h["reply_sent"]
        else:
            mech = h["resumed"] - h["request_sent"]
        hop_ms = float(_ms(h["total_ns"].median()))
        floor = float(_ms(rt.median())) if not rt.empty else np.nan
        rows.append(
            {
                "backend": b,
                "hop_ms": hop_ms,
                "floor_ms": floor,
                "hop_minus_floor_ms": hop_ms - floor if not np.isnan(floor) else np.nan,
                "mechanism_ms": float(_ms(mech.median())),
            }
        )
    out = pd.DataFrame(
        rows, columns=["backend", "hop_ms", "floor_ms", "hop_minus_floor_ms", "mechanism_ms"]
    )
    if not out.empty and (out["backend"] == "kmod").any():
        k = out[out["backend"] == "kmod"].iloc[0]
        out["hop_vs_kmod"] = out["hop_ms"] / k["hop_ms"]
        out["mechanism_vs_kmod"] = out["mechanism_ms"] / k["mechanism_ms"]
    return out


def _boot_median_ratio(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n: int) -> tuple:
    """Bootstrap percentile interval (95 %) of median(a) / median(b), resampling both."""
    ia = rng.integers(0, len(a), size=(n, len(a)))
    ib = rng.integers(0, len(b), size=(n, len(b)))
    r = np.median(a[ia], axis=1) / np.median(b[ib], axis=1)
    return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def ratio_intervals(
    hop: pd.DataFrame,
    kernel: pd.DataFrame | None = None,
    prov: dict[str, Any] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """The ratios of issue 6 with a bootstrap 95 % interval (medians resampled, fixed seed),
    and the target with whether the measured ratio meets it."""
    ok = measured(hop)
    rng = np.random.default_rng(seed)

    def sample(backend: str, kind: str) -> np.ndarray:
        s = ok[(ok["backend"] == backend) & (ok["kind"] == kind)]["total_ns"]
        return s.dropna().to_numpy(dtype=float)

    kmod = sample("kmod", "hop")
    criu = sample("criu", "hop")
    criu_label = "criu / kmod"
    if len(criu) == 0:
        criu = sample("criu-direct", "hop")
    pairs = [
        (criu_label, criu, kmod),
        ("restart / kmod", sample("restart", "hop"), kmod),
        ("kmod / round_trip", kmod, sample("kmod", "round_trip")),
    ]
    if kernel is not None and not kernel.empty:
        k = kernel.groupby("metric")["ns"]
        pairs.append(
            (
                "fork_wait / kernel_switch",
                k.get_group("fork_wait").to_numpy(dtype=float),
                k.get_group("kernel_switch").to_numpy(dtype=float),
            )
        )
    targets = (prov or {}).get("targets") or {}
    rows = []
    for name, a, b in pairs:
        if len(a) == 0 or len(b) == 0:
            continue
        lo, hi = _boot_median_ratio(a, b, rng, n_boot)
        rows.append(
            {
                "ratio": name,
                "value": float(np.median(a) / np.median(b)),
                "ci95_low": lo,
                "ci95_high": hi,
                "n_num": len(a),
                "n_den": len(b),
                "target": targets.get(name, ""),
            }
        )
    return pd.DataFrame(
        rows, columns=["ratio", "value", "ci95_low", "ci95_high", "n_num", "n_den", "target"]
    )
