"""Benchmarks: measurements with their baselines taken in the same run, written as tidy tables.

``nsexp bench kernel``: the module's ioctl round trip and its own switch time, beside
fork()+waitpid() and getpid(), all from one C program in one boot (nsexp/csrc/kernel_bench.c).
Results are ratios measured side by side; absolute times under QEMU's emulation (TCG) are far
slower than on hardware.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from nsexp import testbed as tb

REPO = Path(__file__).resolve().parent.parent
CSRC = Path(__file__).resolve().parent / "csrc"
BENCH_BUILD = REPO / "build" / "bench"

KERNEL_METRICS = (
    "ioctl_round_trip",
    "kernel_switch",
    "kernel_queue_to_done",
    "fork_wait",
    "getpid",
)


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


def summarize(values: list[int]) -> dict[str, float]:
    """Median and 90th percentile of a sample, in nanoseconds."""
    qs = statistics.quantiles(values, n=10, method="inclusive")
    return {"n": len(values), "median_ns": statistics.median(values), "p90_ns": qs[8]}


@dataclass
class BenchResult:
    table: Path
    summary: dict[str, dict[str, float]]
    ratios: dict[str, float]
    meta: dict


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


def run_kernel(
    testbed: str | tb.Testbed = "vm",
    *,
    n: int = 1000,
    warmup: int = 100,
    out_dir: Path = REPO / "data",
    kernel: str | None = None,
) -> BenchResult:
    """Run the kernel benchmark on a testbed and write ``out_dir/bench-kernel.csv``."""
    bed = (
        tb.get_testbed(testbed, **({"kernel": kernel} if kernel else {}))
        if isinstance(testbed, str)
        else testbed
    )
    binary = build_c("kernel_bench")
    print(f"bench kernel: {n} migrations (+{warmup} warm-up) on {bed!r} ...", flush=True)
    batch = bed.run_batch(
        [f'{binary} {n} {warmup} > "$NSEXP_OUT/kernel_bench.csv"'],
        timeout=1800,
        command_timeout=1500,
    )
    res = batch.results[0]
    if res.returncode != 0:
        raise tb.TestbedError(
            f"kernel_bench failed ({res.returncode}): {res.stderr[-2000:]}", result=batch
        )
    samples: dict[str, list[int]] = {m: [] for m in KERNEL_METRICS}
    with open(batch.out_dir / "kernel_bench.csv") as f:
        for metric, _, ns in csv.reader(f):
            samples[metric].append(int(ns))
    meta = {
        "run_id": uuid.uuid4().hex[:12],
        "benchmark": "kernel",
        "testbed": bed.name,
        "kernel": batch.kernel_release,
        "code_version": code_version(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n": n,
        "warmup": warmup,
        "kernel_log_problems": batch.kernel_log_problems(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "bench-kernel.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "run_id",
                "benchmark",
                "testbed",
                "kernel",
                "code_version",
                "timestamp",
                "metric",
                "i",
                "ns",
            ]
        )
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
    (out_dir / "bench-kernel.provenance.json").write_text(
        json.dumps({**meta, "summary": summary, "ratios": ratios}, indent=1) + "\n"
    )
    return BenchResult(table, summary, ratios, meta)


def print_result(r: BenchResult) -> None:
    print(f"{'metric':<22} {'n':>6} {'median':>12} {'p90':>12}")
    for m, s in r.summary.items():
        print(f"{m:<22} {s['n']:>6} {s['median_ns'] / 1e3:>10.1f}us {s['p90_ns'] / 1e3:>10.1f}us")
    for name, value in r.ratios.items():
        print(f"ratio {name} = {value:.2f}")
    print(f"kernel {r.meta['kernel']} on {r.meta['testbed']}; table {r.table}")


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.benchmark == "kernel":
        r = run_kernel(
            args.testbed, n=args.n, warmup=args.warmup, out_dir=Path(args.out), kernel=args.kernel
        )
        print_result(r)
        return 0 if not r.meta["kernel_log_problems"] else 1
    raise SystemExit(f"unknown benchmark {args.benchmark!r}")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark and write its table to data/")
    p.add_argument("benchmark", choices=["kernel"])
    p.add_argument("--testbed", default="vm", choices=["vm", "native"])
    p.add_argument("--kernel", default=None, help="kernel release for the vm testbed")
    p.add_argument("--n", type=int, default=1000, help="measured repetitions")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--out", default=str(REPO / "data"), help="output folder")
    p.set_defaults(func=_cmd_bench)
