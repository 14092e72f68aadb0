"""The experiment on a testbed: ``nsexp run`` and the one :func:`run_batch` the notebooks use.

On the ``native`` testbed a run happens in this process (:func:`nsexp.experiment.guest.run_here`).
On the ``vm`` testbed every run of a batch happens in one boot (a boot costs about a minute under
TCG, and guest timings compare only within one boot): each is one
``python3 -m nsexp.experiment.guest`` in the guest, and the host adds the boot's facts to its
run.json. The code version and the command are taken here, before anything runs, and handed to
the guest, which may have no git and never knows what a person typed.

Host side (the testbed package is imported only for a VM run).
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nsexp import records
from nsexp.backends import BACKENDS
from nsexp.experiment.guest import RunResult, add_guest_arguments, read_records, run_here
from nsexp.experiment.layout import LayoutError, LayoutSpec, spec_from_args

TESTBEDS = ("vm", "native")


def guest_command(
    spec: LayoutSpec,
    backend: str,
    out: Path | str,
    *,
    timeout: float,
    code_version: str,
    command: str,
    echo: bool = True,
) -> str:
    """The shell command that makes one run inside the guest, recorded as testbed "vm"."""
    words = ["python3", "-m", "nsexp.experiment.guest", "--backend", backend]
    words += ["--record-testbed", "vm", "--out", str(out), "--timeout", f"{timeout:g}"]
    words += ["--code-version", code_version, "--command", command]
    words += [] if echo else ["--quiet"]
    return shlex.join([*words, *spec.cli_args()])


def run(
    spec: LayoutSpec,
    backend: str,
    testbed: Any,
    out: str | Path,
    *,
    timeout: float | None = None,
    kernel: str | None = None,
    echo: bool = True,
    command: str | None = None,
) -> RunResult:
    """Run the experiment once into the folder ``out`` (see :func:`run_batch`)."""
    dirs = [Path(out).resolve()]
    (result,) = _run_dirs(spec, backend, testbed, dirs, timeout, kernel, echo, command)
    return result


def run_batch(
    spec: LayoutSpec,
    backend: str,
    testbed: Any,
    run_dir: str | Path,
    repeats: int = 1,
    *,
    timeout: float | None = None,
    kernel: str | None = None,
    echo: bool = True,
    command: str | None = None,
) -> list[RunResult]:
    """Run the experiment ``repeats`` times into ``run_dir/000``, ``001``, ...

    ``testbed`` is "native", "vm" or a Testbed object; ``kernel`` the VM's kernel release;
    ``timeout`` bounds each run (default: the layout's). ``command`` is what a person ran
    (default :func:`nsexp.records.command_line`). A failed run is kept (its rows and run.json
    say why) and returned like the others.
    """
    base = Path(run_dir).resolve()
    dirs = [base / f"{i:03d}" for i in range(repeats)]
    return _run_dirs(spec, backend, testbed, dirs, timeout, kernel, echo, command)


def _run_dirs(
    spec: LayoutSpec,
    backend: str,
    testbed: Any,
    dirs: Sequence[Path],
    timeout: float | None,
    kernel: str | None,
    echo: bool,
    command: str | None,
) -> list[RunResult]:
    # Before anything runs: the code and the command this batch is made with.
    version = records.code_version()
    command = command or records.command_line()
    spec.validate()
    if backend not in BACKENDS:
        raise LayoutError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    name = testbed if isinstance(testbed, str) else getattr(testbed, "name", "")
    if name == "native":
        return [
            run_here(
                spec,
                backend,
                d,
                timeout=timeout,
                echo=echo,
                command=command,
                code_version=version,
            )
            for d in dirs
        ]
    if name == "vm":
        from nsexp import testbed as tb

        bed = tb.get_testbed("vm", kernel=kernel) if isinstance(testbed, str) else testbed
        inner = timeout if timeout is not None else spec.guest_timeout(backend)
        commands = [
            guest_command(
                spec,
                backend,
                records.clear_run_dir(d),
                timeout=inner,
                code_version=version,
                command=command,
                echo=echo,
            )
            for d in dirs
        ]
        identity = {"code_version": version, "command": command}
        return _run_vm(bed, backend, dirs, commands, inner, echo, identity)
    raise LayoutError(f"unknown testbed {testbed!r} (choose from {', '.join(TESTBEDS)})")


def _run_vm(
    bed: Any,
    backend: str,
    dirs: Sequence[Path],
    commands: Sequence[str],
    inner: float,
    echo: bool,
    identity: dict[str, str],
) -> list[RunResult]:
    """The guest ``commands`` (one run each, into ``dirs``) in one boot of ``bed``; the boot's
    facts go into each run.json. ``inner`` bounds each run in the guest."""
    base = dirs[0] if len(dirs) == 1 else dirs[0].parent
    print(f"booting the VM ({bed.kernel_release()}) for {len(dirs)} run(s) ...", flush=True)
    batch = bed.run_batch(
        commands,
        out_dir=base,
        timeout=600 + len(dirs) * (inner + 30),
        command_timeout=inner + 30,
        load_module=backend == "kmod",
    )
    (base / records.DMESG_FILE).write_text(batch.dmesg or "")
    results = []
    for i, (d, res) in enumerate(zip(dirs, batch.results, strict=True)):
        if echo:  # the worker's own lines, as printed inside the guest
            for line in res.stdout.splitlines():
                if line.startswith("hop ") and line[4:5].isdigit():
                    print(f"[guest] {line}")
        facts = {
            "kernel_release": batch.kernel_release,
            "accel": batch.accel,
            "module_loaded": batch.module_loaded,
            "module_unloaded": batch.module_unloaded,
            "kernel_log_problems": batch.kernel_log_problems(),
            "returncode": res.returncode,
            "timed_out": res.timed_out,
            "duration_s": round(res.duration_s, 3),
            "boot": str(base),
            "batch_index": i,
            "batch_size": len(dirs),
        }
        results.append(_vm_result(d, backend, facts, res.stderr, identity))
    return results


def _vm_result(
    out: Path, backend: str, facts: dict[str, Any], stderr: str, identity: dict[str, str]
) -> RunResult:
    """Read back one guest run, add the boot's facts and the host's verdict to its run.json."""
    path = out / records.RUN_FILE
    meta: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    meta["vm"] = facts
    meta["accel"] = facts["accel"]  # KVM or TCG emulation: timings differ by an order of magnitude
    error = meta.get("error")
    if not meta.get("run_id"):
        error = f"the guest run wrote no run.json (exit {facts['returncode']}): {stderr[-2000:]}"
        meta.update(
            run_id=f"{out.parent.name}-{out.name}-failed",
            backend=backend,
            testbed="vm",
            kernel=facts["kernel_release"],
            **identity,
        )
    if backend == "kmod" and not facts["module_loaded"]:
        error = error or "the nsmigrate module could not be loaded in the guest"
    meta["ok"] = bool(meta.get("ok")) and error is None
    meta["error"] = error
    path.write_text(json.dumps(meta, indent=2) + "\n")
    if not (out / records.HOPS_FILE).exists():
        # Keep the folder readable: an empty hop table, the run's failure in run.json.
        records.write_csv(out / records.HOPS_FILE, records.HOP_COLUMNS, [])
    processes: list[dict[str, Any]] = []
    if (out / records.PROCESSES_FILE).exists():
        with (out / records.PROCESSES_FILE).open() as f:
            processes = list(csv.DictReader(f))
    return RunResult(
        run_id=str(meta["run_id"]),
        backend=backend,
        testbed="vm",
        out=out,
        hops=read_records(out),
        ok=meta["ok"],
        error=error,
        processes=processes,
        meta=meta,
    )


def cmd_run(args: argparse.Namespace) -> int:
    """``nsexp run``: run once, print the hop table, exit 0 only if every hop happened."""
    spec = spec_from_args(args)
    result = run(
        spec,
        args.backend,
        args.testbed,
        args.out,
        timeout=args.timeout,
        kernel=args.kernel,
        echo=not args.quiet,
    )
    print(f"run {result.run_id} ({result.backend} on {result.testbed}) -> {result.out}")
    print(result.table())
    if not result.ok:
        print(f"nsexp run: {result.error}", file=sys.stderr)
    if args.figures:
        from nsexp.experiment.figures import figures_for_run

        for path in figures_for_run(result.out, args.figures):
            print(f"figure {path}")
    return 0 if result.ok else 1


def register_cli(subparsers: Any) -> None:
    """Add ``nsexp run``."""
    p = subparsers.add_parser("run", help="run the chained-execution experiment once")
    add_guest_arguments(p)
    p.add_argument("--testbed", choices=TESTBEDS, default="vm")
    p.add_argument("--kernel", help="VM kernel release (default: the testbed's)")
    p.add_argument(
        "--figures",
        type=Path,
        help="also draw the run's hop table, process trees and phases into this folder",
    )
    p.set_defaults(func=cmd_run)
