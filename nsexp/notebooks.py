"""Execute the notebooks with papermill (``nsexp figures``) and the helpers their cells call.

``nsexp figures`` runs every notebook in ``notebooks/`` with papermill, keeps the executed copies
under ``build/notebooks/`` (the sources stay free of outputs) and, with the notebooks' default
parameters, regenerates ``data/`` and ``figures/`` from real runs.

Host-side only. papermill, pandas and matplotlib are imported lazily, so that ``nsexp --help`` and
the other subcommands do not pay for them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nsexp.experiment import LayoutSpec
    from nsexp.io import Runs

#: Jupyter kernel the notebooks declare and papermill is told to use.
KERNEL_NAME = "python3"

#: Set while ``nsexp figures`` runs, so that a notebook records the command in its provenance.
COMMAND_ENV = "NSEXP_COMMAND"


def repo_root() -> Path:
    """The source tree this package lives in (holds notebooks/, data/, figures/)."""
    return Path(__file__).resolve().parent.parent


def list_notebooks(
    directory: str | os.PathLike[str] | None = None, select: Sequence[str] | None = None
) -> list[Path]:
    """Notebooks in ``directory`` (default ``notebooks/``), sorted by name.

    ``select`` keeps those whose file name or stem equals, or starts with, one of its entries
    (``01``, ``01_chained_execution``, ``01_chained_execution.ipynb``).
    """
    folder = Path(directory) if directory else repo_root() / "notebooks"
    found = sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))
    if not select:
        return found
    chosen = []
    for want in select:
        name = Path(want).name
        hits = [p for p in found if p.name == name or p.stem == name or p.name.startswith(name)]
        if not hits:
            names = ", ".join(p.name for p in found) or "none"
            raise FileNotFoundError(f"no notebook matches {want!r} in {folder} (have: {names})")
        chosen += [p for p in hits if p not in chosen]
    return chosen


def default_parameters(notebook: Path, root: Path | None = None) -> dict[str, Any]:
    """Parameters ``nsexp figures`` gives a notebook: absolute output paths under the repo.

    Everything else keeps the notebook's own defaults (the paper's experiment: kmod in the VM).
    """
    import papermill as pm

    root = root or repo_root()
    stem = notebook.stem.split("_", 1)[-1]  # 01_chained_execution -> chained_execution
    paths = {
        "data_dir": str(root / "data"),
        "figures_dir": str(root / "figures"),
        "run_dir": str(root / "build" / "runs" / stem),
    }
    # Only those the notebook declares (papermill warns about the others).
    declared = pm.inspect_notebook(str(notebook))
    return {k: v for k, v in paths.items() if k in declared}


def execute_notebook(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    parameters: Mapping[str, Any] | None = None,
    kernel_name: str = KERNEL_NAME,
    progress: bool = True,
    log_output: bool = False,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
) -> Path:
    """Execute one notebook with papermill into ``output``; return the output path.

    The kernel runs in ``cwd`` (default: the notebook's folder, as in JupyterLab) and finds this
    package even when it is not installed (its source tree is put on PYTHONPATH).
    """
    import papermill as pm

    src, out = Path(source), Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    _warn_foreign_kernel(kernel_name)
    root = str(repo_root())
    pythonpath = os.environ.get("PYTHONPATH", "")
    if root not in pythonpath.split(os.pathsep):
        # The kernel inherits our environment; this makes `import nsexp` find this tree.
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, pythonpath) if p)
    pm.execute_notebook(
        str(src),
        str(out),
        parameters=dict(parameters or {}),
        kernel_name=kernel_name,
        progress_bar=progress,
        log_output=log_output,
        cwd=str(cwd or src.parent),
        execution_timeout=timeout,
    )
    return out


def _warn_foreign_kernel(kernel_name: str) -> None:
    """Warn if the kernel would run another interpreter than this one (e.g. a user-level
    ``python3`` kernelspec shadowing the venv's), which may lack pandas or matplotlib."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv = KernelSpecManager().get_kernel_spec(kernel_name).argv
    except NoSuchKernel:
        return  # papermill reports it with the list of kernels
    exe = Path(argv[0]) if argv else None
    if exe is not None and exe.is_absolute() and exe.resolve() != Path(sys.executable).resolve():
        print(
            f"warning: Jupyter kernel {kernel_name!r} runs {exe}, not {sys.executable}; "
            f"register this one with `{sys.executable} -m ipykernel install --sys-prefix "
            f"--name {kernel_name}` or pass --kernel",
            file=sys.stderr,
        )


def run_notebooks(
    select: Sequence[str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    notebooks_dir: str | os.PathLike[str] | None = None,
    build_dir: str | os.PathLike[str] | None = None,
    kernel_name: str = KERNEL_NAME,
    progress: bool = True,
    log_output: bool = False,
    command: str | None = None,
) -> list[Path]:
    """Execute the chosen notebooks in order, each with its defaults overridden by ``parameters``.

    Executed copies go to ``build_dir`` (default ``build/notebooks/``). Stops at the first
    notebook that fails (papermill's error names the cell); returns the executed copies.
    """
    notebooks = list_notebooks(notebooks_dir, select)
    out_dir = Path(build_dir) if build_dir else repo_root() / "build" / "notebooks"
    if command is not None:
        os.environ[COMMAND_ENV] = command
    done = []
    for i, nb in enumerate(notebooks, 1):
        params = {**default_parameters(nb), **dict(parameters or {})}
        out = out_dir / nb.name
        shown = " ".join(f"{k}={v!r}" for k, v in sorted(params.items()))
        print(f"[{i}/{len(notebooks)}] {nb.name} -> {out}\n    parameters: {shown}", flush=True)
        t0 = time.monotonic()
        execute_notebook(nb, out, params, kernel_name, progress=progress, log_output=log_output)
        print(f"[{i}/{len(notebooks)}] {nb.name} done in {time.monotonic() - t0:.1f} s", flush=True)
        done.append(out)
    return done


def command_line() -> str:
    """The command that produced this notebook's results, for provenance records."""
    return os.environ.get(COMMAND_ENV) or " ".join(shlex.quote(a) for a in sys.argv)


# --- helpers the notebooks' cells call -----------------------------------------------------


def make_spec(
    namespaces: int | Sequence[str] | None = None,
    children: Sequence[int] | None = None,
    increments: int = 100,
    route: Sequence[str] | None = None,
    hops: int | None = None,
) -> LayoutSpec:
    """The experiment's layout from the notebook's parameters (None: the paper's pattern)."""
    from nsexp.experiment import LayoutSpec

    return LayoutSpec.make(
        namespaces=namespaces, children=children, increments=increments, route=route, hops=hops
    )


def run_batch(
    backend: str,
    testbed: str,
    run_dir: str | os.PathLike[str],
    repeats: int = 1,
    echo: bool = False,
    kernel: str | None = None,
    **layout: Any,
) -> Runs:
    """Run the experiment ``repeats`` times into ``run_dir/<i>/`` and read the runs back.

    Natively each repeat is one ``nsexp.experiment.run``. On the VM all repeats share one boot
    (a boot costs about a minute under TCG, and guest timings are comparable only within one
    boot). A failed run is kept (its rows and run.json say why), reported, and shown.
    """
    from nsexp import experiment
    from nsexp import io as nio

    spec = make_spec(**layout)
    # run.json records the command; in a kernel sys.argv is only the kernel launcher.
    command = shlex.split(os.environ[COMMAND_ENV]) if os.environ.get(COMMAND_ENV) else None
    base = Path(run_dir).resolve()
    dirs = [base / f"{i:03d}" for i in range(repeats)]
    t0 = time.monotonic()
    if testbed == "vm" and repeats > 1:
        outcomes = _run_vm_batch(spec, backend, base, dirs, kernel=kernel)
    else:
        outcomes = []
        for d in dirs:
            result = experiment.run(
                spec, backend, testbed, d, echo=echo, command=command, kernel=kernel
            )
            outcomes.append((result.run_id, result.ok, result.error))
    for i, (run_id, ok, error) in enumerate(outcomes):
        print(
            f"run {i + 1}/{repeats} {run_id}: {'ok' if ok else f'FAILED: {error}'}",
            file=sys.stdout if ok else sys.stderr,
            flush=True,
        )
    print(f"{repeats} run(s) of {backend} on {testbed} in {time.monotonic() - t0:.1f} s")
    return nio.read_runs(dirs)


def _run_vm_batch(
    spec: LayoutSpec,
    backend: str,
    base: Path,
    dirs: Sequence[Path],
    kernel: str | None = None,
) -> list[tuple[str, bool, str | None]]:
    """All repeats in one VM boot; returns (run_id, ok, error) per run.

    Each repeat is the guest-side ``nsexp.experiment run --testbed native``, exactly as
    ``nsexp.experiment.run`` does for one run on the VM; the boot's facts go into each run.json.
    """
    from nsexp import experiment as ex
    from nsexp import io as nio
    from nsexp import testbed as tb

    bed = tb.get_testbed("vm", kernel=kernel)
    inner = 60.0 + (30.0 if backend == "criu" else 10.0) * spec.hops
    commands = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        for stale in ("records.jsonl", ex.HOPS_FILE, ex.PROCESSES_FILE, ex.RUN_FILE):
            (d / stale).unlink(missing_ok=True)
        guest = ["python3", "-m", "nsexp.experiment", "run", "--backend", backend]
        guest += ["--testbed", "native", "--record-testbed", "vm", "--out", str(d)]
        guest += ["--timeout", f"{inner:g}", "--quiet", *spec.cli_args()]
        commands.append(shlex.join(guest))
    print(f"booting the VM ({bed.kernel_release()}) for {len(dirs)} runs ...", flush=True)
    batch = bed.run_batch(
        commands,
        out_dir=base,
        timeout=600 + len(dirs) * (inner + 30),
        command_timeout=inner + 30,
        load_module=backend == "kmod",
    )
    (base / "dmesg.txt").write_text(batch.dmesg or "")
    outcomes = []
    for i, (d, res) in enumerate(zip(dirs, batch.results, strict=True)):
        path = d / ex.RUN_FILE
        meta: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        meta["vm"] = {
            "kernel_release": batch.kernel_release,
            "module_loaded": batch.module_loaded,
            "module_unloaded": batch.module_unloaded,
            "kernel_log_problems": batch.kernel_log_problems(),
            "returncode": res.returncode,
            "timed_out": res.timed_out,
            "duration_s": round(res.duration_s, 3),
            "boot": str(base),
            "batch_index": i,
            "batch_size": len(dirs),
            "host_command": os.environ.get(COMMAND_ENV) or shlex.join(sys.argv),
        }
        error = meta.get("error")
        if not meta.get("run_id"):
            error = f"the guest run wrote no run.json (exit {res.returncode}): {res.stderr[-2000:]}"
            meta.update(
                run_id=f"{base.name}-{i:03d}-failed",
                backend=backend,
                testbed="vm",
                kernel=batch.kernel_release,
            )
        if backend == "kmod" and not batch.module_loaded:
            error = error or "the nsmigrate module could not be loaded in the guest"
        meta["ok"] = bool(meta.get("ok")) and error is None
        meta["error"] = error
        path.write_text(json.dumps(meta, indent=2) + "\n")
        if not (d / ex.HOPS_FILE).exists():
            # Keep the folder readable: an empty hop table with the run's failure in run.json.
            (d / ex.HOPS_FILE).write_text(",".join(nio.HOP_COLUMNS) + "\n")
        outcomes.append((str(meta["run_id"]), meta["ok"], error))
    return outcomes


# --- CLI -----------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    """A -p value: JSON where it parses (numbers, lists, null, true), else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _figures(args: argparse.Namespace) -> int:
    params = iter_parameters(args.parameter or [])
    try:
        notebooks = list_notebooks(args.notebooks_dir, args.notebook)
    except FileNotFoundError as exc:
        print(f"nsexp figures: {exc}", file=sys.stderr)
        return 2
    if not notebooks:
        print("nsexp figures: no notebook found", file=sys.stderr)
        return 2
    if args.list:
        for nb in notebooks:
            print(nb)
        return 0
    # Rebuilt from the parsed options: sys.argv is not ours when main() is called in-process.
    words = ["nsexp", "figures"]
    for name in args.notebook or []:
        words += ["-n", name]
    for key, value in args.parameter or []:
        words += ["-p", key, value]
    command = shlex.join(words)
    if args.log_output:
        # papermill logs each cell's output through the "papermill" logger at INFO.
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_notebooks(
            select=[str(nb) for nb in notebooks],
            parameters=params,
            notebooks_dir=args.notebooks_dir,
            build_dir=args.build_dir,
            kernel_name=args.kernel,
            progress=not args.no_progress,
            log_output=args.log_output,
            command=command,
        )
    except Exception as exc:  # papermill's PapermillExecutionError names the failing cell
        print(f"nsexp figures: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``nsexp figures``."""
    p = subparsers.add_parser(
        "figures",
        help="execute the notebooks with papermill: regenerate data/ and figures/",
        description=(
            "Execute every notebook in notebooks/ with papermill (executed copies in "
            "build/notebooks/). With the notebooks' default parameters this runs the paper's "
            "experiment and regenerates data/ and figures/."
        ),
    )
    p.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        metavar=("KEY", "VALUE"),
        help="notebook parameter (VALUE as JSON if it parses, else text); repeatable",
    )
    p.add_argument(
        "-n",
        "--notebook",
        action="append",
        metavar="NAME",
        help="only this notebook (name, stem or prefix such as 01); repeatable",
    )
    p.add_argument("--notebooks-dir", type=Path, default=None, help="default: notebooks/")
    p.add_argument("--build-dir", type=Path, default=None, help="default: build/notebooks/")
    p.add_argument("--kernel", default=KERNEL_NAME, help=f"Jupyter kernel (default {KERNEL_NAME})")
    p.add_argument("--log-output", action="store_true", help="stream the cells' output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the notebooks and exit")
    p.set_defaults(func=_figures)


def iter_parameters(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """``-p KEY VALUE`` pairs as a parameter dict (values parsed as in the CLI)."""
    return {k: _parse_value(v) for k, v in pairs}
