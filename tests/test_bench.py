"""The benchmarks: each runs with tiny sizes and writes the tables it promises; statistics and
verdicts follow the data.

Checked here: shapes, columns, the rows each sweep must produce, provenance, verdicts computed
from given numbers; never timings (they are measured, reported and compared, not asserted). The
guest side runs natively with the restart backend (root, seconds); every VM benchmark shares ONE
boot (module-scoped fixture), and notebooks 02 and 03 then run on its tables under papermill.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nsexp.bench import host, report, results
from nsexp.bench import summary as sm
from nsexp.records import STAMPS

ROOT = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates PID namespaces: needs root")


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _row(**kw):
    base = {s: None for s in STAMPS}
    base.update(status="ok", warmup=0, kind="hop", backend="kmod", sweep="hop", x=0, client=0)
    base.update(kw)
    return base


# -- statistics and verdicts ---------------------------------------------------------------------


def test_phases_follow_time_order() -> None:
    # restart: the successor is spawned after the reply, so stamps are not in STAMPS order.
    r = _row(request_sent=0, manager_received=10, reply_sent=15, migrate_started=40, resumed=90)
    assert sm.phases(r) == [
        ("request to manager", 10),
        ("manager: peer + route + reply", 5),
        ("old process exits / closes", 25),
        ("successor forked + starts", 50),
    ]
    assert sm.total_ns(r) == 90
    assert sm.total_ns(_row(request_sent=5)) is None


def test_quantiles_and_summary() -> None:
    s = sm.summarize(list(range(101)))
    assert (s["n"], s["median_ns"], s["p90_ns"], s["p99_ns"]) == (101, 50, 90, 99)
    assert math.isnan(sm.summarize([])["median_ns"])


def test_bootstrap_interval_brackets_the_ratio() -> None:
    a = [100 + (i % 7) for i in range(60)]
    b = [10 + (i % 3) for i in range(60)]
    r = sm.ratio(a, b)
    assert r["ci95_low"] <= r["value"] <= r["ci95_high"]
    assert r["ci95_high"] - r["ci95_low"] < 2 and (r["n_num"], r["n_den"]) == (60, 60)
    assert sm.ratio(a, b) == r  # a fixed seed: the same data give the same interval


def test_hop_ratios_use_measured_rows_and_both_floors() -> None:
    rows = [_row(request_sent=0, resumed=100, i=i) for i in range(5)]
    rows += [_row(request_sent=0, resumed=10**9, warmup=1, i=-1)]  # warm-up: ignored
    rows += [_row(kind="manager_ping", request_sent=0, resumed=80, i=i) for i in range(5)]
    rows += [
        _row(backend="floor", kind="minimal_rtt", request_sent=0, resumed=40, i=i) for i in range(5)
    ]
    rows += [_row(backend="restart", request_sent=0, resumed=2000, i=i) for i in range(5)]
    rows += [_row(backend="criu", status="failed", error="criu restore: File exists", i=0)]
    s = sm.hop_summary(rows)
    assert s["kmod hop"]["median_ns"] == 100 and s["kmod hop"]["n"] == 5
    assert s["criu failed"] == {"n": 1, "first_error": "criu restore: File exists"}
    kernel = {"fork_wait": [30] * 3, "kernel_switch": [3] * 3}
    r = sm.hop_ratios(rows, kernel)
    values = {k: v["value"] for k, v in r.items()}
    assert values == {
        "kmod hop / minimal floor": 2.5,
        "kmod hop / manager ping": 1.25,
        "manager ping / minimal floor": 2,
        "restart / kmod": 20,
        "fork_wait / kernel_switch": 10,
    }  # no criu hop made it: no criu ratio, the failure row says why


def test_verdicts_from_data_and_the_phase_that_holds_back() -> None:
    rows = [
        _row(request_sent=0, manager_received=70, migrate_started=71, kernel_done=72, resumed=100)
        for _ in range(3)
    ]
    why = sm.holdback(rows, floor_ns=20)
    assert why["phase"] == "request to manager" and why["above_floor_ns"] == 80
    ratios = {"kmod hop / minimal floor": {"value": 5.0}, "restart / kmod": {"value": 12.0}}
    v = sm.verdicts(ratios, {"kmod hop / minimal floor": why, "restart / kmod": why})
    assert v["kmod hop / minimal floor"]["verdict"] == "missed"
    assert v["kmod hop / minimal floor"]["held_back_by"]["phase"] == "request to manager"
    assert v["restart / kmod"]["verdict"] == "met" and "held_back_by" not in v["restart / kmod"]
    assert v["criu / kmod"]["verdict"] == "no data"
    assert sm.verdict("route: max/min per-hop median", 1.1) == "flat"
    assert sm.verdict("population: max/min per-hop median", 1.3) == "not flat"
    assert sm.verdict("depth (C): kernel switch r2 of a line", 0.99) == "linear"
    assert "kmod hop / minimal floor" in sm.missed(v) and "restart / kmod" not in sm.missed(v)


def test_scaling_summary_shapes() -> None:
    rows = [
        _row(sweep="route", x=k, i=k - 1, request_sent=0, resumed=100 + k) for k in range(1, 31)
    ]
    for d in (1, 2, 3):
        rows += [
            _row(
                sweep="depth",
                x=d,
                request_sent=0,
                resumed=1000,
                kernel_switch_started=0,
                kernel_done=10 * d,
                i=i,
            )
            for i in range(3)
        ]
    for p in (0, 100):
        rows += [
            _row(sweep="population", x=p, ns="B", request_sent=0, resumed=500, i=i)
            for i in range(3)
        ]
    for path, step in (("new", 10), ("legacy", 50)):
        for k in (1, 16):
            rows += [
                _row(
                    sweep="clients",
                    path=path,
                    x=k,
                    client=c,
                    request_sent=i * step,
                    resumed=i * step + 5,
                    i=i,
                )
                for c in range(k)
                for i in range(4)
            ]
    summary, ratios = sm.scaling_summary(rows)
    assert list(summary["route"]["median_ns"]) == ["1-10", "11-100"]
    assert summary["depth"]["kernel_switch_median_ns"] == {1: 10, 2: 20, 3: 30}
    assert summary["depth"]["fit kernel switch"]["ns_per_level"] == pytest.approx(10)
    assert ratios["population: max/min per-hop median"]["value"] == 1
    assert summary["clients"]["new"][16]["migrations"] == 64
    assert ratios["throughput 16 clients: new / legacy"]["value"] == pytest.approx(
        (4 * 16 / 35e-9) / (4 * 16 / 155e-9)
    )
    assert [sm.route_bin(k) for k in (1, 10, 11, 100, 101, 1000)] == [
        "1-10",
        "1-10",
        "11-100",
        "11-100",
        "101-1000",
        "101-1000",
    ]


def test_depth_kernel_table_and_fit(tmp_path: Path) -> None:
    raw = tmp_path / "raw.csv"
    lines = [
        f"{d},{i},{m},{(1000 * d if m == 'kernel_switch' else 5000) + i}"
        for d in (1, 2, 3)
        for i in range(3)
        for m in ("ioctl_round_trip", "kernel_switch")
    ]
    raw.write_text("\n".join(lines) + "\n")
    meta = {k: "x" for k in results.META_COLUMNS}
    table, summary, ratios = results.write_depth_kernel(raw, meta, tmp_path)
    rows = _read(table)
    assert len(rows) == 18 and list(rows[0])[-4:] == ["depth", "i", "metric", "ns"]
    assert summary["kernel_switch"][2]["median_ns"] == 2001
    assert ratios["depth (C): kernel switch ns per level"]["value"] == pytest.approx(1000)
    assert (
        sm.verdict(
            "depth (C): kernel switch r2 of a line",
            ratios["depth (C): kernel switch r2 of a line"]["value"],
        )
        == "linear"
    )
    assert json.loads((tmp_path / "bench-depth-kernel.provenance.json").read_text())["ratios"]


def test_committed_results_need_a_clean_commit(tmp_path: Path) -> None:
    with pytest.raises(host.tb.TestbedError, match="commit first"):
        host.check_destination(host.DATA, "0" * 40 + "-dirty-0123456789abcdef")
    host.check_destination(host.DATA, "0123456789abcdef" * 2 + "01234567")
    host.check_destination(tmp_path, "unknown")  # anywhere else: exploratory runs are fine


def test_cli_has_one_bench_command(capsys: pytest.CaptureFixture[str]) -> None:
    from nsexp import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("kernel", "hop", "scaling", "all", "--out", "--depths", "--reps", "--floor-n"):
        assert name in out


def test_c_helpers_build() -> None:
    folder = host.build_c()
    for name in ("kernel_bench", "populate", "depth_bench"):
        assert os.access(folder / name, os.X_OK)


def test_docs_results_section_is_what_the_committed_data_gives() -> None:
    """docs/performance.md's Results section equals what `nsexp bench report` writes from the
    committed provenance; the hand-written rest quotes no measured time and no verdict."""
    doc = (ROOT / "docs" / "performance.md").read_text()
    section = report.render(ROOT / "data", host.HOP_DEFAULTS, host.SCALING_DEFAULTS)
    assert report.splice(doc, section) == doc, "stale: run `nsexp bench report` and commit"
    head, rest = doc.split(report.BEGIN, 1)
    prose = head + rest.split(report.END, 1)[1]
    assert not re.search(r"\d\s?(ms|us|µs)\b|\d+(\.\d+)?\s?s\b", prose)
    assert not re.search(r"\b(met|missed|flat|linear)\*\*", prose)


def test_report_labels_reduced_runs_and_shows_verdicts(tmp_path: Path) -> None:
    prov = {
        "run_id": "r1",
        "kernel": "6.12",
        "testbed": "vm",
        "code_version": "a" * 40,
        "params": {"hop": {**host.HOP_DEFAULTS, "n": 30}},
        "guest": {"errors": ["hop criu: 1 failed hop(s): criu restore: File exists"]},
        "summary": {
            "kmod hop": sm.summarize([2e6, 3e6]),
            "criu failed": {"n": 1, "first_error": "x"},
        },
        "ratios": {"kmod hop / minimal floor": sm.ratio([3e6, 2e6], [1e6, 1e6])},
        "verdicts": sm.verdicts({"kmod hop / minimal floor": {"value": 2.5}}),
    }
    (tmp_path / "bench-hop.provenance.json").write_text(json.dumps(prov))
    text = report.render(tmp_path, host.HOP_DEFAULTS, host.SCALING_DEFAULTS)
    assert "**REDUCED** (n 30 (full: 300))" in text
    assert "| kmod hop / minimal floor | <= 2 | 2.5 |" in text and "**missed**" in text
    assert "failures: hop criu: 1 failed hop(s)" in text
    assert "| criu / kmod | >= 1000 | - | - | **no data** |" in text


# -- guest side, natively (restart backend: no module needed) -----------------------------------


def _guest(tmp_path: Path, which: str, params: dict) -> list[dict]:
    out = tmp_path / which
    proc = subprocess.run(
        [sys.executable, "-m", "nsexp.bench.guest", which, "--out", str(out)]
        + ["--params", json.dumps(params)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads((out / f"{which}-guest.json").read_text())
    assert facts["errors"] == [], facts["errors"]
    assert (out / "progress.log").read_text()
    return results.read_raw(out / f"{which}-raw.csv")


@needs_root
def test_guest_hop_native_restart(tmp_path: Path) -> None:
    params = {
        **host.HOP_DEFAULTS,
        "backends": ["restart"],
        "n": 3,
        "warmup": 1,
        "rounds": 2,  # 2 hops, then 1 in a second session
        "floor_n": 4,
        "criu_n": 0,
    }
    rows = _guest(tmp_path, "hop", params)
    hops = sm.measured(rows, kind="hop", backend="restart")
    pings = sm.measured(rows, kind="manager_ping", backend="restart")
    floor = sm.measured(rows, kind="minimal_rtt", backend="floor")
    assert len(hops) == 3 and len(pings) == 3 and len(floor) == 4
    assert all(sm.total_ns(r) > 0 for r in hops + pings + floor)
    # A new process at each restart hop; the route alternates B, A in each session.
    assert len({r["global_pid"] for r in hops}) == 3
    assert [r["ns"] for r in hops] == ["A", "B", "A"]
    meta = {k: "x" for k in results.META_COLUMNS}
    table = results.write_table(rows, meta, tmp_path / "t.csv")
    assert list(_read(table)[0]) == list(results.TABLE_COLUMNS)


@needs_root
def test_guest_scaling_native_restart(tmp_path: Path) -> None:
    params = {
        **host.SCALING_DEFAULTS,
        "backend": "restart",
        "sweeps": ["route", "population", "clients"],
        "reps": 2,
        "n": 4,
        "warmup": 1,
        "route_hops": 6,
        "route_namespaces": 3,
        "populations": [0, 20],
        "clients": [1, 3],
        "client_hops": 2,
        "client_warmup": 1,
        "populate_binary": str(host.build_c() / "populate"),
    }
    rows = _guest(tmp_path, "scaling", params)
    route = sm.measured(rows, sweep="route", kind="hop")
    assert sorted(r["x"] for r in route) == sorted(list(range(1, 7)) * 2)  # two repetitions
    assert {r["rep"] for r in route} == {0, 1}
    pop = sm.measured(rows, sweep="population", kind="hop")
    assert sorted((r["x"], r["rep"]) for r in pop) == sorted([(0, 0), (0, 1), (20, 0), (20, 1)] * 2)
    # The manager's ping right before each hop.
    assert len(sm.measured(rows, sweep="route", kind="manager_ping")) == len(route)
    clients = sm.measured(rows, sweep="clients", kind="hop")
    assert {(r["path"], r["x"], r["client"]) for r in clients} == {
        (p, k, c) for p in ("new", "legacy") for k in (1, 3) for c in range(k)
    }
    assert len(clients) == 2 * 2 * (1 + 3) * 2  # paths x repetitions x clients x hops


# -- the VM: every benchmark in one boot, then the notebooks on its tables ----------------------

TINY_HOP = {"n": 4, "warmup": 1, "rounds": 2, "floor_n": 6, "criu_n": 2, "criu_warmup": 0}
TINY_SCALING = {
    "reps": 2,
    "n": 4,
    "warmup": 1,
    "route_hops": 6,
    "route_namespaces": 4,
    "depths": [1, 3],
    "populations": [0, 50],
    "clients": [1, 2],
    "client_hops": 2,
    "client_warmup": 1,
    "depth_kernel_n": 5,
    "depth_kernel_depths": [1, 3, 31],
}


@pytest.fixture(scope="module")
def vm_bench(vm_testbed, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-data")
    res = host.run_benchmarks(
        ["hop", "scaling"],
        vm_testbed,
        out_dir=out,
        hop=TINY_HOP,
        scaling=TINY_SCALING,
        kernel_n=20,
        kernel_warmup=2,
    )
    return out, res


@pytest.mark.vm
def test_vm_hop_table(vm_bench) -> None:
    out, res = vm_bench
    assert res["hop"].errors == [], res["hop"].errors
    rows = results.read_raw(out / "bench-hop.csv")
    assert list(_read(out / "bench-hop.csv")[0]) == list(results.TABLE_COLUMNS)
    ok = sm.measured(rows, kind="hop")
    assert sum(r["backend"] == "kmod" for r in ok) == 4
    assert sum(r["backend"] == "restart" for r in ok) == 4
    assert len(sm.measured(rows, kind="minimal_rtt", backend="floor")) == 6
    assert len(sm.measured(rows, kind="manager_ping", backend="kmod")) == 4
    # kmod: one process per round all along (same start time); restart: a new one per hop.
    kmod = [r for r in ok if r["backend"] == "kmod"]
    assert len({(r["x"], r["start_time"]) for r in kmod}) == len({r["x"] for r in kmod}) == 2
    assert all(r["kernel_done"] for r in kmod)
    restart = [r for r in ok if r["backend"] == "restart"]
    assert len({(r["start_time"], r["global_pid"]) for r in restart}) == 4
    # criu, the experiment's own backend: its hops where the PID is free, and in the paper's
    # layout (PID taken in the target) one failed row in CRIU's own words.
    criu = [r for r in rows if r["backend"] == "criu" and r["kind"] == "hop"]
    assert sum(r["status"] == "ok" and not r["warmup"] for r in criu) == 2
    paper = [r for r in criu if r["x"] == -1]
    assert paper and paper[-1]["status"] == "failed" and "criu" in paper[-1]["error"]
    prov = json.loads((out / "bench-hop.provenance.json").read_text())
    assert prov["kernel"] == res["hop"].meta["kernel"] and prov["params"]["hop"]["n"] == 4
    assert {"kmod hop / minimal floor", "restart / kmod", "criu / kmod"} <= set(prov["verdicts"])
    assert all("ci95_low" in prov["ratios"][k] for k in ("restart / kmod", "criu / kmod"))
    assert not prov["kernel_log_problems"]
    krows = _read(out / "bench-kernel.csv")
    assert {r["metric"] for r in krows} == set(results.KERNEL_METRICS)
    assert len(krows) == 20 * len(results.KERNEL_METRICS)


@pytest.mark.vm
def test_vm_scaling_table(vm_bench) -> None:
    out, res = vm_bench
    assert res["scaling"].errors == [], res["scaling"].errors
    rows = results.read_raw(out / "bench-scaling.csv")
    ok = sm.measured(rows, kind="hop")
    assert sorted({r["x"] for r in ok if r["sweep"] == "route"}) == list(range(1, 7))
    depth = [r for r in ok if r["sweep"] == "depth"]
    assert sorted({(r["x"], r["levels"]) for r in depth}) == [(1, 1), (3, 3)]
    assert all(r["kernel_done"] for r in depth)
    assert {r["x"] for r in ok if r["sweep"] == "population"} == {0, 50}
    assert {(r["path"], r["x"], r["client"]) for r in ok if r["sweep"] == "clients"} == {
        (p, k, c) for p in ("new", "legacy") for k in (1, 2) for c in range(k)
    }
    prov = json.loads((out / "bench-scaling.provenance.json").read_text())
    assert prov["guest"]["errors"] == [] and not prov["kernel_log_problems"]
    assert "throughput 2 clients / 1" in prov["ratios"]
    assert prov["verdicts"]["depth (C): kernel switch r2 of a line"]["verdict"] != "no data"
    krows = _read(out / "bench-depth-kernel.csv")
    assert {(r["depth"], r["metric"]) for r in krows} == {
        (d, m) for d in ("1", "3", "31") for m in ("kernel_switch", "ioctl_round_trip")
    }
    assert len(krows) == 3 * 2 * 5 and {r["run_id"] for r in krows} == {prov["run_id"]}


@pytest.mark.vm
@pytest.mark.parametrize("notebook", ["02_hop_latency", "03_scaling"])
def test_vm_notebooks_on_the_tables(vm_bench, notebook: str, tmp_path: Path) -> None:
    """Notebooks 02 and 03 under papermill on the boot's tables (run=False: no second boot)."""
    from nsexp import notebooks as nb

    out, _ = vm_bench
    figures = tmp_path / "figures"
    nb.execute_notebook(
        ROOT / "notebooks" / f"{notebook}.ipynb",
        tmp_path / f"{notebook}.ipynb",
        {"run": False, "bench_dir": str(out), "data_dir": str(out), "figures_dir": str(figures)},
        progress=False,
    )
    stem = notebook.split("_", 1)[1]
    pngs = sorted(figures.glob(f"{stem}_*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    assert all(p.with_suffix(".pdf").exists() for p in pngs)
    assert sorted(out.glob(f"{stem}_*.provenance.json"))
