"""``nsexp bench``: build the C helpers, compose ONE boot of every benchmark asked, write tables.

Runs on the host. ``kernel`` (C, nsexp/bench/csrc/kernel_bench.c: the module's ioctl and switch
beside fork+waitpid and getpid), ``hop`` (one hop end to end per backend beside the two floors:
the manager's ``ping`` and a minimal Python request/reply; the kernel benchmark in the same boot)
and ``scaling`` (route length, nesting depth, processes in the target, concurrent clients on the
manager's new and legacy paths) run in one boot; ``all`` is hop + scaling. The code version is
taken before the boot; a tree with uncommitted edits cannot write to data/ (exploratory runs go
to build/). Exit status 1 names every command, sweep or backend that failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nsexp import records
from nsexp import testbed as tb
from nsexp.bench import report, results, summary
from nsexp.bench.results import BenchResult

REPO = Path(__file__).resolve().parents[2]
CSRC = Path(__file__).resolve().parent / "csrc"
BENCH_BUILD = REPO / "build" / "bench"
DATA = REPO / "data"
EXPLORE = REPO / "build" / "bench-data"  # default output: never the committed tables

#: Sizes of the full runs (what data/ holds); the tests use tiny ones.
HOP_DEFAULTS: dict[str, Any] = {
    "backends": ["kmod", "restart", "criu"],
    "n": 300,  # measured hops per backend (kmod, restart), over all rounds
    "warmup": 10,  # per session
    "rounds": 3,  # backends and floors take turns, in a shuffled order per round
    "floor_n": 300,  # minimal request/reply round trips, over all rounds
    "criu_n": 21,
    "criu_warmup": 1,
    "criu_paper_layout": True,  # one criu hop in the paper's layout (PID taken): CRIU's error
    "timeout_per_hop": 5.0,
    "seed": 1,
}
SCALING_DEFAULTS: dict[str, Any] = {
    "sweeps": ["route", "depth", "population", "clients"],
    "backend": "kmod",  # restart: the native tests (no module there)
    "reps": 2,  # every sweep point is visited reps times, in a shuffled order each time
    "n": 60,  # measured hops per depth / population point, over all repetitions
    "warmup": 10,
    "route_hops": 1000,  # per repetition
    "route_namespaces": 32,
    "depths": [1, 2, 4, 8, 16, 31],
    "populations": [0, 10, 100, 1000, 10000],
    "clients": [1, 2, 4, 16, 64],
    "paths": ["new", "legacy"],
    "client_hops": 10,
    "client_warmup": 2,
    "depth_kernel_n": 300,  # C: migrations per depth (kernel side of the depth sweep), 0: skip
    "depth_kernel_depths": list(range(1, 32)),
    "timeout_per_hop": 5.0,
    "seed": 1,
}


def build_c() -> Path:
    """Build the C helpers (nsexp/bench/csrc/Makefile) into build/bench; returns that folder."""
    BENCH_BUILD.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["make", "-s", "-C", str(CSRC), f"OUT={BENCH_BUILD}", f"KMOD={REPO / 'kmod'}"],
            check=True,
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        raise tb.TestbedError("no make: apt-get install make gcc (or run `make setup`)") from None
    except subprocess.CalledProcessError as exc:
        raise tb.TestbedError(f"building the C helpers failed:\n{exc.stderr}") from None
    return BENCH_BUILD


def _meta(bed: tb.Testbed, code: str, params: dict[str, Any], command: str) -> dict[str, Any]:
    return {
        "run_id": uuid.uuid4().hex[:12],
        "testbed": bed.name,
        "kernel": bed.kernel_release(),
        "code_version": code,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "testbed_repr": repr(bed),
        "params": params,
        "note": "absolute times under QEMU/TCG emulation are far slower than on hardware; "
        "compare ratios measured side by side in one boot",
    }


def _run_with_progress(bed: tb.Testbed, commands: list[str], out_dir: Path, **kw: Any):
    """run_batch while a thread prints the guest's progress.log as it grows.

    run_batch keeps the main thread, so that Ctrl-C reaches the testbed, which stops the VM.
    """
    log = out_dir / "progress.log"
    log.unlink(missing_ok=True)
    done = threading.Event()
    t0 = time.monotonic()

    def tail() -> None:
        seen = 0
        while not done.wait(2.0) or seen < _lines(log):
            lines = log.read_text().splitlines() if log.exists() else []
            for line in lines[seen:]:
                print(f"  [{time.monotonic() - t0:5.0f}s] {line}", flush=True)
            seen = max(seen, len(lines))

    printer = threading.Thread(target=tail, daemon=True)
    printer.start()
    try:
        return bed.run_batch(commands, out_dir=out_dir, **kw)
    finally:
        done.set()
        printer.join(5.0)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _guest_command(bench: str, work: Path, params: dict[str, Any]) -> str:
    return shlex.join(
        ["python3", "-m", "nsexp.bench.guest", bench, "--out", str(work)]
        + ["--params", json.dumps(params)]
    )


def _hop_budget(p: dict[str, Any]) -> float:
    hops = 2 * (p["n"] + p["warmup"] * p["rounds"]) + 40 * (p["criu_n"] + p["criu_warmup"])
    return p["timeout_per_hop"] * hops + 600


def _scaling_budget(p: dict[str, Any]) -> float:
    per_rep = (
        p["route_hops"]
        + len(p["depths"]) * (p["n"] + p["warmup"] + 20)
        + len(p["populations"]) * (p["n"] + p["warmup"] + 20)
        + len(p["paths"]) * sum(k * (p["client_hops"] + p["client_warmup"]) for k in p["clients"])
    )
    return p["timeout_per_hop"] * per_rep * p["reps"] + 1200


def check_destination(out_dir: Path, code: str) -> None:
    """Committed results come from committed code: refuse data/ from a tree with local edits."""
    if out_dir.resolve() == DATA.resolve() and not records.is_clean(code):
        raise tb.TestbedError(
            f"code version {code} is not a clean commit: commit first, or write elsewhere "
            f"(--out {EXPLORE.relative_to(REPO)})"
        )


def run_benchmarks(
    benchmarks: Sequence[str],
    testbed: str | tb.Testbed = "vm",
    *,
    out_dir: Path = EXPLORE,
    kernel: str | None = None,
    hop: dict[str, Any] | None = None,
    scaling: dict[str, Any] | None = None,
    kernel_n: int = 1000,
    kernel_warmup: int = 100,
    memory: str | None = None,
    command: str | None = None,
) -> dict[str, BenchResult]:
    """Run "kernel", "hop" and/or "scaling" in ONE boot; write their tables to ``out_dir``.

    ``hop`` and ``scaling`` override :data:`HOP_DEFAULTS` and :data:`SCALING_DEFAULTS`. The
    kernel benchmark runs with "hop" unless ``kernel_n`` is 0. Returns {name: BenchResult}; a
    result's ``errors`` lists what failed (empty when everything ran). ``command``: what a
    person ran, for the provenance (default: :func:`nsexp.records.command_line`).
    """
    unknown = set(benchmarks) - {"kernel", "hop", "scaling"}
    if unknown:
        raise ValueError(f"unknown benchmark(s) {sorted(unknown)}")
    code = records.code_version()  # before anything runs: the code that is about to run
    out_dir = Path(out_dir)
    check_destination(out_dir, code)
    ph = {**HOP_DEFAULTS, **{k: v for k, v in (hop or {}).items() if v is not None}}
    ps = {**SCALING_DEFAULTS, **{k: v for k, v in (scaling or {}).items() if v is not None}}
    if isinstance(testbed, str):
        # 10,000 parked processes need memory (kernel stacks, page tables): a bigger guest.
        mem = memory or ("3G" if "scaling" in benchmarks else "2G")
        bed = tb.VMTestbed(kernel, memory=mem) if testbed == "vm" else tb.get_testbed(testbed)
    else:
        bed = testbed
    build = build_c()
    work = tb.Testbed.new_out_dir()
    cmds: dict[str, str] = {}
    budget = 600.0
    with_kernel = "kernel" in benchmarks or ("hop" in benchmarks and kernel_n > 0)
    if with_kernel:
        cmds["kernel"] = (
            f"{build / 'kernel_bench'} {kernel_n or 1000} {kernel_warmup}"
            ' > "$NSEXP_OUT/kernel_bench.csv"'
        )
        budget += 600
    if "hop" in benchmarks:
        cmds["hop"] = _guest_command("hop", work, ph)
        budget += _hop_budget(ph)
    if "scaling" in benchmarks:
        ps["populate_binary"] = str(build / "populate")
        if ps.get("depth_kernel_n") and "depth" in ps["sweeps"]:
            depths = " ".join(str(d) for d in ps["depth_kernel_depths"])
            cmds["depth_kernel"] = (
                f"{build / 'depth_bench'} {ps['depth_kernel_n']} {max(1, ps['warmup'])} {depths}"
                ' > "$NSEXP_OUT/depth_kernel.csv"'
            )
            budget += 900
        cmds["scaling"] = _guest_command("scaling", work, ps)
        budget += _scaling_budget(ps)
    print(f"nsexp bench {' + '.join(cmds)}: one boot of {bed!r}; code {code}", flush=True)
    print(f"raw files in {work}; time limit {budget:.0f} s", flush=True)
    params = {"hop": ph, "scaling": ps, "kernel_n": kernel_n, "kernel_warmup": kernel_warmup}
    params = {k: v for k, v in params.items() if k in benchmarks or "kernel" in k}
    meta = _meta(bed, code, params, command or records.command_line())
    load_before = os.getloadavg()[0]
    if load_before > (os.cpu_count() or 1):
        print(
            f"note: host load {load_before:.1f} on {os.cpu_count()} CPUs: TCG timings swing "
            "(the ratios of one boot still compare like with like)",
            flush=True,
        )
    batch = _run_with_progress(bed, list(cmds.values()), work, timeout=budget)
    meta["host_load"] = {
        "before": load_before,
        "after": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    meta.update(
        kernel=batch.kernel_release,
        accel=batch.accel,
        boot_and_batch_s=round(batch.duration_s, 1),
        kernel_log_problems=batch.kernel_log_problems(),
        raw_dir=str(work),
    )
    failed = {
        name: res for name, res in zip(cmds, batch.results, strict=False) if res.returncode != 0
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, BenchResult] = {}
    kraw = work / "kernel_bench.csv" if with_kernel and "kernel" not in failed else None
    if "hop" in benchmarks:
        out["hop"] = results.finish_hop(work, meta, out_dir, kraw)
    elif kraw is not None:
        table, kernel_samples = results.write_kernel_table(kraw, meta, out_dir)
        stats = {m: summary.summarize(v) for m, v in kernel_samples.items() if v}
        out["kernel"] = BenchResult(table, stats, {}, meta, [table])
    if "scaling" in benchmarks:
        dk = work / "depth_kernel.csv" if "depth_kernel" in cmds else None
        out["scaling"] = results.finish_scaling(work, meta, out_dir, dk)
    for name, res in failed.items():
        owner = out.get(name) or out.get("scaling" if name == "depth_kernel" else "hop")
        msg = f"{name} exited {res.returncode}: {res.stderr.strip()[-1500:]}"
        if owner is not None:
            owner.errors.append(msg)
        else:
            raise tb.TestbedError(msg, result=batch)
    return out


# -- CLI ---------------------------------------------------------------------------------------


def _fmt_ns(ns: float) -> str:
    if ns != ns:  # NaN
        return "-"
    if ns >= 1e9:
        return f"{ns / 1e9:.2f}s"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f}ms"
    return f"{ns / 1e3:.1f}us"


def _print_summary(label: str, s: Any) -> None:
    """One line per sample (n, median, p90, p99); nested summaries (per x) indented."""
    if isinstance(s, dict) and "median_ns" in s and not isinstance(s["median_ns"], dict):
        cells = (_fmt_ns(s[k]) for k in ("median_ns", "p90_ns", "p99_ns") if k in s)
        print(f"{label:<48} {s.get('n', ''):>6} " + " ".join(f"{c:>10}" for c in cells))
    elif isinstance(s, dict) and "first_error" in s:
        print(f"{label:<48} {s['n']:>6}  {str(s['first_error'])[:120]}")
    elif isinstance(s, dict) and "per_s" in s:
        print(
            f"{label:<48} {s['migrations']:>6} {s['per_s']:>9.1f}/s"
            f"  hop {_fmt_ns(s['median_hop_ns'])}"
        )
    elif isinstance(s, dict) and "median_ns" in s:
        for x, med in s["median_ns"].items():
            p99 = _fmt_ns(s.get("p99_ns", {}).get(x, float("nan")))
            print(f"{label + ' ' + str(x):<48} {'':>6} {_fmt_ns(med):>10} {'':>10} {p99:>10}")
    elif isinstance(s, dict):
        for k, v in s.items():
            if isinstance(v, dict | int | float):
                _print_summary(f"{label} {k}", v)


def print_result(name: str, r: BenchResult) -> None:
    """The summary (median, p90, p99), the ratios with intervals, and the verdicts."""
    print(f"== {name}: kernel {r.meta['kernel']} on {r.meta['testbed']}, table {r.table} ==")
    print(f"{'metric':<48} {'n':>6} {'median':>10} {'p90':>10} {'p99':>10}")
    for m, s in r.summary.items():
        _print_summary(m, s)
    for k, v in r.ratios.items():
        iv = ""
        if not math.isnan(v.get("ci95_low", math.nan)):
            iv = f" (95% {v['ci95_low']:.3g}-{v['ci95_high']:.3g})"
        print(f"ratio {k} = {v['value']:.3g}{iv}")
    for k, v in r.verdicts.items():
        line = f"target {k} {v['target']}: {v['verdict']}"
        held = v.get("held_back_by")
        if held:
            line += f"; largest phase: {held['phase']} ({_fmt_ns(held['phase_median_ns'])}, "
            line += f"{held['share']:.0%} of the hop)"
        print(line)
    for e in r.errors:
        print(f"FAILED: {e}")
    if r.meta.get("kernel_log_problems"):
        print(f"FAILED: kernel log: {r.meta['kernel_log_problems']}")


def _ints(text: str | None) -> list[int] | None:
    return [int(v) for v in text.split(",") if v.strip()] if text else None


def _words(text: str | None) -> list[str] | None:
    return text.split(",") if text else None


DOCS = REPO / "docs" / "performance.md"


def write_report(data: Path, docs: Path = DOCS) -> int:
    """Rewrite the generated section of ``docs`` from the tables' provenance in ``data``."""
    section = report.render(data, HOP_DEFAULTS, SCALING_DEFAULTS)
    docs.write_text(report.splice(docs.read_text(), section))
    print(f"{docs}: results section rewritten from {data}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``nsexp bench``: exit 1 if any command, sweep or backend failed (and say which)."""
    hop = {
        "n": args.n,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "floor_n": args.floor_n,
        "criu_n": args.criu_n,
        "backends": _words(args.backends),
    }
    scaling = {
        "n": args.point_n if args.point_n is not None else args.n,
        "warmup": args.warmup,
        "reps": args.reps,
        "sweeps": _words(args.sweeps),
        "route_hops": args.route_hops,
        "route_namespaces": args.route_namespaces,
        "depths": _ints(args.depths),
        "populations": _ints(args.populations),
        "clients": _ints(args.clients),
        "client_hops": args.client_hops,
        "depth_kernel_n": args.depth_kernel_n,
    }
    if args.benchmark == "report":
        return write_report(Path(args.out if args.out != str(EXPLORE) else DATA))
    names = ["hop", "scaling"] if args.benchmark == "all" else [args.benchmark]
    try:
        out = run_benchmarks(
            names,
            args.testbed,
            out_dir=Path(args.out),
            kernel=args.kernel,
            hop=hop,
            scaling=scaling,
            kernel_n=1000 if args.kernel_n is None else args.kernel_n,
            command=shlex.join(["nsexp", *sys.argv[1:]]),
        )
    except tb.TestbedError as exc:
        print(f"nsexp bench: {exc}")
        return 1
    failed = []
    for name, r in out.items():
        print_result(name, r)
        failed += [f"{name}: {e.splitlines()[0]}" for e in r.errors]
        if r.meta.get("kernel_log_problems"):
            failed.append(f"{name}: kernel log problems")
    for line in dict.fromkeys(failed):
        print(f"nsexp bench: FAILED {line}")
    return 1 if failed else 0


def register_cli(subparsers: Any) -> None:
    """Add ``nsexp bench`` to the CLI."""
    p = subparsers.add_parser(
        "bench",
        help="run benchmarks (kernel, hop, scaling, all) in one boot and write their tables",
        description="Benchmarks run many repetitions in one boot after a warm-up; tables go "
        "to --out with a .provenance.json beside each. Defaults are the full sizes.",
    )
    p.add_argument(
        "benchmark",
        choices=["kernel", "hop", "scaling", "all", "report"],
        help="all: hop (with kernel) and scaling in one boot; report: rewrite the results "
        "section of docs/performance.md from the tables in --out (default data/)",
    )
    p.add_argument("--testbed", default="vm", choices=["vm", "native"])
    p.add_argument("--kernel", default=None, help="kernel release for the vm testbed")
    p.add_argument("--n", type=int, help="measured repetitions (per backend or point)")
    p.add_argument("--warmup", type=int, help="warm-up repetitions (per session)")
    p.add_argument(
        "--out",
        default=str(EXPLORE),
        help="output folder (default build/bench-data; data/ needs a clean commit)",
    )
    g = p.add_argument_group("hop")
    g.add_argument("--backends", help="comma-separated, default kmod,restart,criu")
    g.add_argument("--rounds", type=int, help="rounds over backends and floors")
    g.add_argument("--floor-n", type=int, help="minimal request/reply round trips")
    g.add_argument("--criu-n", type=int, help="criu hops (each takes seconds)")
    g.add_argument("--kernel-n", type=int, help="kernel benchmark in the same boot (0: skip)")
    g = p.add_argument_group("scaling")
    g.add_argument("--sweeps", help="comma-separated subset of route,depth,population,clients")
    g.add_argument("--reps", type=int, help="repetitions of every sweep (shuffled order)")
    g.add_argument("--point-n", type=int, help="hops per depth / population point (default --n)")
    g.add_argument("--route-hops", type=int)
    g.add_argument("--route-namespaces", type=int)
    g.add_argument("--depths", help="e.g. 1,2,4,8,16,31")
    g.add_argument("--populations", help="e.g. 0,100,1000,10000")
    g.add_argument("--clients", help="e.g. 1,2,4,16,64")
    g.add_argument("--client-hops", type=int, help="measured hops per client")
    g.add_argument("--depth-kernel-n", type=int, help="C migrations per depth (0: skip)")
    p.set_defaults(func=cmd_bench)
