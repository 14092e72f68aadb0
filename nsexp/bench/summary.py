"""Statistics of the benchmarks: phases, summaries, ratios with 95 % intervals, targets, verdicts.

Pure functions over rows (dicts with the columns of :data:`nsexp.bench.results.TABLE_COLUMNS`,
numbers parsed). Standard library only, so that the host's tables, the notebooks (through
:mod:`nsexp.bench.plots`) and the tests share one definition of each number. Every verdict
("met", "missed", "flat", "linear") is computed here from the data against :data:`TARGETS`;
nothing downstream writes one by hand. Targets and their reasons: docs/performance.md.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from nsexp.records import STAMPS

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

#: Kinds of measured rows: a migration, the manager's own ``ping`` on the worker's persistent
#: connection, and the minimal request/reply between two Python processes (no manager logic).
HOP, MANAGER_PING, MINIMAL_RTT = "hop", "manager_ping", "minimal_rtt"

#: The targets (issue 11): name -> (comparison, bound). Ratios are of medians in one boot.
TARGETS: dict[str, tuple[str, float]] = {
    "kmod hop / minimal floor": ("<=", 2.0),
    "restart / kmod": (">=", 10.0),
    "criu / kmod": (">=", 1000.0),
    "throughput 2 clients / 1": (">=", 1.0),
    "throughput 4 clients / 1": (">=", 1.0),
    "throughput 16 clients / 1": (">=", 1.0),
    "throughput 64 clients / 1": (">=", 1.0),
    "throughput 16 clients: new / legacy": (">=", 5.0),
    "route: max/min per-hop median": ("<=", 1.2),
    "population: max/min per-hop median": ("<=", 1.2),
    "depth (C): kernel switch r2 of a line": (">=", 0.9),
}
#: What each verdict word means for a target of that kind.
VERDICT_WORDS = {"route": "flat", "population": "flat", "depth": "linear"}


# -- one sample --------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of a sample, linear between order statistics (NaN if empty)."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """n, median, 90th and 99th percentile of a sample (ns in, ns out)."""
    return {
        "n": len(values),
        "median_ns": statistics.median(values) if values else math.nan,
        "p90_ns": quantile(values, 0.9),
        "p99_ns": quantile(values, 0.99),
    }


def bootstrap_ratio(
    num: Sequence[float], den: Sequence[float], n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of median(num) / median(den), resampling both."""
    if not num or not den:
        return math.nan, math.nan
    rng = random.Random(seed)
    ratios = []
    for _ in range(n_boot):
        a = statistics.median(rng.choices(num, k=len(num)))
        b = statistics.median(rng.choices(den, k=len(den)))
        ratios.append(a / b if b else math.inf)
    return quantile(ratios, 0.025), quantile(ratios, 0.975)


def ratio(num: Sequence[float], den: Sequence[float], **kw: Any) -> dict[str, float]:
    """median(num) / median(den) with its bootstrap 95 % interval and the sample sizes."""
    lo, hi = bootstrap_ratio(num, den, **kw)
    value = statistics.median(num) / statistics.median(den) if num and den else math.nan
    return {"value": value, "ci95_low": lo, "ci95_high": hi, "n_num": len(num), "n_den": len(den)}


# -- rows ----------------------------------------------------------------------------------------


def measured(rows: Iterable[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    """Rows that count: status ok, not warm-up, and matching ``match`` (column=value)."""
    return [
        r
        for r in rows
        if r.get("status") == "ok"
        and not r.get("warmup")
        and all(r.get(k) == v for k, v in match.items())
    ]


def total_ns(row: dict[str, Any]) -> int | None:
    """End-to-end time: request sent -> resumed (None if the row lacks either stamp)."""
    if row.get("request_sent") is None or row.get("resumed") is None:
        return None
    return row["resumed"] - row["request_sent"]


def totals(rows: Iterable[dict[str, Any]]) -> list[int]:
    """End-to-end times of the rows that have both stamps."""
    return [t for t in map(total_ns, rows) if t is not None]


def kernel_switch(row: dict[str, Any]) -> int | None:
    """The module's own switch time of a kmod hop (None if the row lacks it)."""
    ks, kd = row.get("kernel_switch_started"), row.get("kernel_done")
    return kd - ks if ks is not None and kd is not None else None


def phases(row: dict[str, Any]) -> list[tuple[str, int]]:
    """(phase name, ns) between consecutive stamps the hop has, in time order (a backend's
    stamps need not follow STAMPS: restart spawns the successor after the reply)."""
    have = sorted((s for s in STAMPS if row.get(s) is not None), key=lambda s: row[s])
    return [
        (PHASE_NAMES.get((a, b), f"{a}->{b}"), row[b] - row[a])
        for a, b in zip(have, have[1:], strict=False)
    ]


def phase_medians(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Median of each phase over ``rows``, in the order the phases happen."""
    per: dict[str, list[int]] = defaultdict(list)
    order: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        for k, (name, ns) in enumerate(phases(r)):
            per[name].append(ns)
            order[name].append(k)
    names = sorted(per, key=lambda n: statistics.median(order[n]))
    return {n: statistics.median(per[n]) for n in names}


def holdback(rows: Iterable[dict[str, Any]], floor_ns: float | None = None) -> dict[str, Any]:
    """Which phase of these hops holds them back: the largest phase median, its share of the
    sum of phase medians, and (with ``floor_ns``) how much of the hop lies above the floor."""
    rows = list(rows)
    med = phase_medians(rows)
    if not med:
        return {}
    name = max(med, key=lambda n: med[n])
    out: dict[str, Any] = {
        "phase": name,
        "phase_median_ns": med[name],
        "share": med[name] / sum(med.values()),
        "phases_ns": med,
    }
    hop = totals(rows)
    if floor_ns and hop:
        out["hop_median_ns"] = statistics.median(hop)
        out["above_floor_ns"] = statistics.median(hop) - floor_ns
    return out


def route_bin(hop_number: int) -> str:
    """Decade of a hop's position on the route: "1-10", "11-100", "101-1000", ..."""
    hi = 10
    while hop_number > hi:
        hi *= 10
    return f"{hi // 10 + 1 if hi > 10 else 1}-{hi}"


def _group(rows: Iterable[dict[str, Any]], key: Callable, value: Callable) -> dict[Any, list]:
    groups: dict[Any, list] = defaultdict(list)
    for r in rows:
        v = value(r)
        if v is not None:
            groups[key(r)].append(v)
    return dict(sorted(groups.items()))


def _medians(groups: dict[Any, list]) -> dict[Any, float]:
    return {k: statistics.median(v) for k, v in groups.items()}


# -- hop ---------------------------------------------------------------------------------------


def hop_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per backend and kind: n, median, p90, p99 (ns); each phase of the hops; failures."""
    out: dict[str, dict[str, float]] = {}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        for kind in (HOP, MANAGER_PING, MINIMAL_RTT):
            vals = totals(measured(rows, backend=backend, kind=kind))
            if vals:
                out[f"{backend} {kind}"] = summarize(vals)
        hops = measured(rows, backend=backend, kind=HOP)
        for k, name in enumerate(phase_medians(hops)):  # in the order the phases happen
            vals = [ns for r in hops for ph, ns in phases(r) if ph == name]
            out[f"{backend} phase: {name}"] = {**summarize(vals), "order": k}
        failed = [r for r in rows if r["backend"] == backend and r.get("status") != "ok"]
        if failed:
            out[f"{backend} failed"] = {"n": len(failed), "first_error": failed[0].get("error")}
    return out


def hop_ratios(
    rows: list[dict[str, Any]], kernel: dict[str, list[int]] | None = None
) -> dict[str, dict[str, float]]:
    """The ratios of the hop benchmark, each with its bootstrap 95 % interval."""

    def sample(backend: str, kind: str = HOP) -> list[int]:
        return totals(measured(rows, backend=backend, kind=kind))

    kmod = sample("kmod")
    floor = sample("floor", MINIMAL_RTT)
    ping = sample("kmod", MANAGER_PING)
    pairs = {
        "kmod hop / minimal floor": (kmod, floor),
        "kmod hop / manager ping": (kmod, ping),
        "manager ping / minimal floor": (ping, floor),
        "restart / kmod": (sample("restart"), kmod),
        "criu / kmod": (sample("criu"), kmod),
    }
    if kernel and kernel.get("fork_wait") and kernel.get("kernel_switch"):
        pairs["fork_wait / kernel_switch"] = (kernel["fork_wait"], kernel["kernel_switch"])
    return {name: ratio(a, b) for name, (a, b) in pairs.items() if a and b}


# -- scaling -----------------------------------------------------------------------------------


def throughput(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """Per manager path and number of clients: measured migrations / span from the first
    measured request to the last resume (all clients of a repetition together), per second;
    repetitions add their migrations and spans."""
    out: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    hops = measured(rows, sweep="clients", kind=HOP)
    for (path, k), group in _group(
        hops, lambda r: (r.get("path") or "new", r["x"]), lambda r: r
    ).items():
        spans = []
        for rep in _group(group, lambda r: r.get("rep") or 0, lambda r: r).values():
            spans.append(max(r["resumed"] for r in rep) - min(r["request_sent"] for r in rep))
        span = sum(spans)
        out[path][k] = {
            "migrations": len(group),
            "span_s": span / 1e9,
            "per_s": len(group) / (span / 1e9) if span > 0 else math.nan,
            "median_hop_ns": statistics.median(totals(group)),
            "p99_hop_ns": quantile(totals(group), 0.99),
        }
    return dict(out)


def line_fit(series: dict[int, float]) -> dict[str, float]:
    """Least-squares line through {x: y}: slope per unit of x, intercept, and R^2."""
    xs, ys = list(series), list(series.values())
    slope, intercept = statistics.linear_regression(xs, ys)
    r = statistics.correlation(xs, ys) if len(set(ys)) > 1 else math.nan
    return {"ns_per_level": slope, "intercept_ns": intercept, "r2": r * r}


def _flatness(per_x: dict[Any, list[int]]) -> dict[str, Any]:
    med = _medians(per_x)
    p99 = {k: quantile(v, 0.99) for k, v in per_x.items()}
    lo, hi = min(med, key=med.get), max(med, key=med.get)
    return {
        "median_ns": med,
        "p99_ns": p99,
        "max/min": ratio(per_x[hi], per_x[lo]),
    }


def scaling_summary(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, dict]]:
    """Per sweep: medians and p99 by x, fits and flatness ratios (with 95 % intervals)."""
    s: dict[str, Any] = {}
    ratios: dict[str, dict] = {}
    route = measured(rows, sweep="route", kind=HOP)
    if route:
        bins = _group(route, lambda r: int(route_bin(r["x"]).split("-")[0]), total_ns)
        flat = _flatness({route_bin(b): v for b, v in bins.items()})
        s["route"] = flat
        if len(bins) >= 2:
            ratios["route: max/min per-hop median"] = flat["max/min"]
    depth = measured(rows, sweep="depth", kind=HOP)
    if depth:
        e2e = _medians(_group(depth, lambda r: r["x"], total_ns))
        kern = _medians(_group(depth, lambda r: r["x"], kernel_switch))
        s["depth"] = {"total_median_ns": e2e, "kernel_switch_median_ns": kern}
        if len(kern) >= 2:
            s["depth"]["fit kernel switch"] = line_fit(kern)
    pop = measured(rows, sweep="population", kind=HOP, ns="B")
    if pop:
        per = _group(pop, lambda r: r["x"], total_ns)
        flat = _flatness(per)
        flat["kernel_switch_median_ns"] = _medians(_group(pop, lambda r: r["x"], kernel_switch))
        s["population"] = flat
        if len(per) >= 2:
            ratios["population: max/min per-hop median"] = flat["max/min"]
    thr = throughput(rows)
    if thr:
        s["clients"] = thr
        new = thr.get("new", {})
        if 1 in new:
            for k in sorted(new):
                if k > 1:
                    ratios[f"throughput {k} clients / 1"] = {
                        "value": new[k]["per_s"] / new[1]["per_s"],
                        "n_num": new[k]["migrations"],
                        "n_den": new[1]["migrations"],
                    }
        for k, leg in (thr.get("legacy") or {}).items():
            if k in new:
                # A rate of a whole run has no bootstrap interval of its own (one span per
                # repetition); the hop times behind it are in the summary, with their p99.
                ratios[f"throughput {k} clients: new / legacy"] = {
                    "value": new[k]["per_s"] / leg["per_s"],
                    "n_num": new[k]["migrations"],
                    "n_den": leg["migrations"],
                }
    return s, ratios


def depth_kernel_summary(samples: dict[tuple[int, str], list[int]]) -> tuple[dict, dict]:
    """The C depth benchmark's samples by (depth, metric) -> per-metric summaries by depth and
    the least-squares line of each metric's medians against depth."""
    summary = {
        metric: {d: summarize(v) for (d, m), v in sorted(samples.items()) if m == metric}
        for metric in ("kernel_switch", "ioctl_round_trip")
    }
    ratios = {}
    for metric, per in summary.items():
        if len(per) >= 2:
            fit = line_fit({d: v["median_ns"] for d, v in per.items()})
            label = metric.replace("_", " ")
            ratios[f"depth (C): {label} ns per level"] = {"value": fit["ns_per_level"]}
            ratios[f"depth (C): {label} r2 of a line"] = {"value": fit["r2"]}
    return summary, ratios


# -- verdicts ----------------------------------------------------------------------------------


def verdict(name: str, value: float) -> str:
    """ "met" / "missed" (or "flat"/"not flat", "linear"/"not linear") against TARGETS[name]."""
    op, bound = TARGETS[name]
    ok = {"<=": value <= bound, ">=": value >= bound}[op] if value == value else None
    word = next((w for k, w in VERDICT_WORDS.items() if name.startswith(k)), None)
    if ok is None:
        return "no data"
    if word:
        return word if ok else f"not {word}"
    return "met" if ok else "missed"


def verdicts(ratios: dict[str, dict], holdbacks: dict[str, dict] | None = None) -> dict[str, dict]:
    """Every target: the measured value, its interval, the verdict, and for a missed target the
    phase that holds it back (from ``holdbacks``, keyed by target name). A target without data
    is listed as such: the absence is a result too."""
    out = {}
    for name, (op, bound) in TARGETS.items():
        r = ratios.get(name)
        value = r["value"] if r else math.nan
        v = verdict(name, value)
        row = {"target": f"{op} {bound:g}", "value": value, "verdict": v}
        if r:
            row.update({k: r[k] for k in ("ci95_low", "ci95_high") if k in r})
        if holdbacks and name in holdbacks and v not in ("met", "flat", "linear", "no data"):
            row["held_back_by"] = holdbacks[name]
        out[name] = row
    return out


def missed(verdict_table: dict[str, dict]) -> list[str]:
    """Names of the targets not met (no data counts as not met)."""
    return [n for n, v in verdict_table.items() if v["verdict"] not in ("met", "flat", "linear")]
