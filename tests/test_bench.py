"""The benchmarks: each one runs with tiny sizes and writes the table it promises.

Checked here: shapes, columns, the rows each sweep must produce, provenance; never timings
(they are measured, reported and compared in the notebooks, not asserted). The guest side runs
natively with the restart backend (root, seconds); every VM benchmark shares ONE boot
(module-scoped fixture), and notebooks 02 and 03 then run on its tables under papermill.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsexp import bench
from nsexp import notebooks as nb

ROOT = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates PID namespaces: needs root")


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- pure functions ----------------------------------------------------------------------------


def _row(**kw):
    base = {s: None for s in bench.STAMPS}
    base.update(status="ok", warmup=0, kind="hop", backend="kmod", sweep="hop", x=0, client=0)
    base.update(kw)
    return base


def test_phases_follow_time_order() -> None:
    # restart: the successor is spawned after the reply, so stamps are not in STAMPS order.
    r = _row(request_sent=0, manager_received=10, reply_sent=15, migrate_started=40, resumed=90)
    assert bench.phases(r) == [
        ("request to manager", 10),
        ("manager: peer + route + reply", 5),
        ("old process exits / closes", 25),
        ("successor forked + starts", 50),
    ]
    assert bench.total_ns(r) == 90
    assert bench.total_ns(_row(request_sent=5)) is None


def test_summary_and_ratios_use_measured_rows_only() -> None:
    rows = [_row(request_sent=0, resumed=100, i=i) for i in range(3)]
    rows += [_row(request_sent=0, resumed=10**9, warmup=1, i=-1)]  # warm-up: ignored
    rows += [_row(kind="round_trip", request_sent=0, resumed=50, i=i) for i in range(3)]
    rows += [_row(backend="restart", request_sent=0, resumed=2000, i=i) for i in range(3)]
    rows += [_row(backend="criu", status="failed", error="criu dump: ...", i=0)]
    rows += [_row(backend="criu-direct", request_sent=0, resumed=10**6, i=i) for i in range(2)]
    s = bench.hop_summary(rows)
    assert s["kmod hop"]["median_ns"] == 100 and s["kmod hop"]["n"] == 3
    assert s["criu failed"]["n"] == 1
    kernel = {"fork_wait": {"median_ns": 30.0}, "kernel_switch": {"median_ns": 3.0}}
    r = bench.hop_ratios(s, kernel)
    assert r == {
        "criu / kmod": 10**4,
        "restart / kmod": 20,
        "kmod / round_trip": 2,
        "fork_wait / kernel_switch": 10,
    }


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
    for k in (1, 2):
        rows += [
            _row(sweep="clients", x=k, client=c, request_sent=i * 10, resumed=i * 10 + 5, i=i)
            for c in range(k)
            for i in range(4)
        ]
    summary, ratios = bench.scaling_summary(rows)
    assert list(summary["route"]) == ["1-10", "11-100"]
    assert summary["depth"]["kernel_switch_median_ns"] == {1: 10, 2: 20, 3: 30}
    assert ratios["depth: kernel switch ns per level"] == pytest.approx(10)
    assert ratios["population: max/min per-hop median"] == 1
    assert summary["clients"][2]["migrations"] == 8
    assert [bench.route_bin(k) for k in (1, 10, 11, 100, 101, 1000)] == [
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
    meta = {k: "x" for k in bench.META_COLUMNS}
    table, summary, ratios = bench.write_depth_kernel(raw, meta, tmp_path)
    rows = _read(table)
    assert len(rows) == 18 and list(rows[0])[-4:] == ["depth", "i", "metric", "ns"]
    assert summary["kernel_switch"][2]["median_ns"] == 2001
    assert ratios["depth (C): kernel_switch ns per level"] == pytest.approx(1000)
    assert ratios["depth (C): kernel_switch r2"] == pytest.approx(1)
    assert json.loads((tmp_path / "bench-depth-kernel.provenance.json").read_text())["ratios"]


def test_cli_has_one_bench_command(capsys: pytest.CaptureFixture[str]) -> None:
    from nsexp import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("kernel", "hop", "scaling", "all", "--out", "--depths", "--populations"):
        assert name in out


def test_c_helpers_build() -> None:
    for name in ("kernel_bench", "populate", "depth_bench"):
        assert os.access(bench.build_c(name), os.X_OK)


# -- guest side, natively (restart backend: no module needed) -----------------------------------


def _guest(tmp_path: Path, which: str, params: dict) -> list[dict]:
    out = tmp_path / which
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nsexp.benchguest",
            which,
            "--out",
            str(out),
            "--params",
            json.dumps(params),
        ],
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
    return bench.read_raw(out / f"{which}-raw.csv")


@needs_root
def test_guest_hop_native_restart(tmp_path: Path) -> None:
    params = {
        **bench.HOP_DEFAULTS,
        "backends": ["restart"],
        "n": 3,
        "warmup": 1,
        "rounds": 2,  # 2 hops, then 1 in a second session
        "pings": 0,  # only the round trips interleaved with the hops
        "ping_warmup": 1,
        "criu_direct": False,
    }
    rows = _guest(tmp_path, "hop", params)
    hops = bench.measured(rows, kind="hop", backend="restart")
    rts = bench.measured(rows, kind="round_trip", backend="restart")
    assert len(hops) == 3 and len(rts) == 3
    assert all(bench.total_ns(r) > 0 for r in hops + rts)
    # A new process at each restart hop; the route alternates A, B.
    assert len({r["global_pid"] for r in hops}) == 3
    assert [r["ns"] for r in hops] == ["A", "B", "A"]
    meta = {k: "x" for k in bench.META_COLUMNS}
    table = bench.write_table(rows, meta, tmp_path / "t.csv")
    assert list(_read(table)[0]) == list(bench.TABLE_COLUMNS)


@needs_root
def test_guest_scaling_native_restart(tmp_path: Path) -> None:
    params = {
        **bench.SCALING_DEFAULTS,
        "backend": "restart",
        "sweeps": ["route", "population", "clients"],
        "n": 2,
        "warmup": 1,
        "route_hops": 6,
        "route_namespaces": 3,
        "populations": [0, 20],
        "clients": [1, 3],
        "client_hops": 2,
        "populate_binary": str(bench.build_c("populate")),
    }
    rows = _guest(tmp_path, "scaling", params)
    route = bench.measured(rows, sweep="route", kind="hop")
    assert [r["x"] for r in route] == list(range(1, 7))
    assert {r["x"] for r in bench.measured(rows, sweep="population", kind="hop")} == {0, 20}
    # The bare round trip interleaved before each hop.
    assert len(bench.measured(rows, sweep="route", kind="round_trip")) == len(route)
    clients = bench.measured(rows, sweep="clients")
    assert sorted({(r["x"], r["client"]) for r in clients}) == [(1, 0), (3, 0), (3, 1), (3, 2)]
    assert len(clients) == 2 * (1 + 3)


# -- the VM: every benchmark in one boot, then the notebooks on its tables ----------------------

TINY_HOP = {"n": 4, "warmup": 1, "rounds": 2, "ping_warmup": 1, "criu_n": 2, "criu_warmup": 0}
TINY_SCALING = {
    "n": 3,
    "warmup": 1,
    "route_hops": 6,
    "route_namespaces": 4,
    "depths": [1, 3],
    "populations": [0, 50],
    "clients": [1, 2],
    "client_hops": 2,
    "depth_kernel_n": 5,
    "depth_kernel_depths": [1, 3, 31],
}


@pytest.fixture(scope="module")
def vm_bench(vm_testbed, tmp_path_factory) -> tuple[Path, dict[str, bench.BenchResult]]:
    out = tmp_path_factory.mktemp("bench-data")
    results = bench.run_benchmarks(
        ["hop", "scaling"],
        vm_testbed,
        out_dir=out,
        hop=TINY_HOP,
        scaling=TINY_SCALING,
        kernel_n=20,
        kernel_warmup=2,
    )
    return out, results


@pytest.mark.vm
def test_vm_hop_table(vm_bench) -> None:
    out, results = vm_bench
    rows = _read(out / "bench-hop.csv")
    assert list(rows[0]) == list(bench.TABLE_COLUMNS)
    assert {r["testbed"] for r in rows} == {"vm"}
    by = {(r["backend"], r["kind"]) for r in rows}
    for b in ("kmod", "restart", "criu"):
        assert (b, "round_trip") in by
    ok = [r for r in rows if r["status"] == "ok" and r["warmup"] == "0" and r["kind"] == "hop"]
    assert sum(r["backend"] == "kmod" for r in ok) == 4
    assert sum(r["backend"] == "restart" for r in ok) == 4
    # kmod: one process per round (x) all along (same start time); restart: a new one per hop.
    kmod = [r for r in ok if r["backend"] == "kmod"]
    assert len({(r["x"], r["start_time"]) for r in kmod}) == len({r["x"] for r in kmod}) == 2
    assert all(r["kernel_done"] for r in kmod)
    restart = [r for r in ok if r["backend"] == "restart"]
    assert len({r["start_time"] + r["global_pid"] for r in restart}) == 4
    # criu: either hops or failures with CRIU's words: never a hop without its stamps.
    criu = [r for r in rows if r["backend"] in ("criu", "criu-direct") and r["kind"] == "hop"]
    assert criu and all(r["total_ns"] or r["error"] for r in criu)
    prov = json.loads((out / "bench-hop.provenance.json").read_text())
    assert prov["kernel"] == results["hop"].meta["kernel"] and prov["params"]["n"] == 4
    assert {"restart / kmod", "kmod / round_trip", "fork_wait / kernel_switch"} <= set(
        prov["ratios"]
    )
    assert not prov["kernel_log_problems"]
    krows = _read(out / "bench-kernel.csv")
    assert {r["metric"] for r in krows} == set(bench.KERNEL_METRICS)
    assert len(krows) == 20 * len(bench.KERNEL_METRICS)


@pytest.mark.vm
def test_vm_scaling_table(vm_bench) -> None:
    out, _ = vm_bench
    rows = bench.read_raw(out / "bench-scaling.csv")
    ok = bench.measured(rows, kind="hop")
    assert sorted({r["x"] for r in ok if r["sweep"] == "route"}) == list(range(1, 7))
    depth = [r for r in ok if r["sweep"] == "depth"]
    assert sorted({(r["x"], r["levels"]) for r in depth}) == [(1, 1), (3, 3)]
    assert all(r["kernel_done"] for r in depth)
    assert {r["x"] for r in ok if r["sweep"] == "population"} == {0, 50}
    assert sorted({(r["x"], r["client"]) for r in ok if r["sweep"] == "clients"}) == [
        (1, 0),
        (2, 0),
        (2, 1),
    ]
    prov = json.loads((out / "bench-scaling.provenance.json").read_text())
    assert prov["guest"]["errors"] == [] and not prov["kernel_log_problems"]
    assert "depth: kernel switch ns per level" in prov["ratios"]
    assert "depth (C): kernel_switch ns per level" in prov["ratios"]
    krows = _read(out / "bench-depth-kernel.csv")
    assert {(r["depth"], r["metric"]) for r in krows} == {
        (d, m) for d in ("1", "3", "31") for m in ("kernel_switch", "ioctl_round_trip")
    }
    assert len(krows) == 3 * 2 * 5 and {r["run_id"] for r in krows} == {prov["run_id"]}


@pytest.mark.vm
@pytest.mark.parametrize("notebook", ["02_hop_latency", "03_scaling"])
def test_vm_notebooks_on_the_tables(
    vm_bench, notebook: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Notebooks 02 and 03 under papermill on the boot's tables (run=False: no second boot)."""
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    out, _ = vm_bench
    figures = tmp_path / "figures"
    nb.execute_notebook(
        ROOT / "notebooks" / f"{notebook}.ipynb",
        tmp_path / f"{notebook}.ipynb",
        {"run": False, "data_dir": str(out), "figures_dir": str(figures)},
        progress=False,
    )
    stem = notebook.split("_", 1)[1]
    pngs = sorted(figures.glob(f"{stem}_*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    assert all(p.with_suffix(".pdf").exists() for p in pngs)
    assert sorted(out.glob(f"{stem}_*.provenance.json"))
