"""Execute the notebooks with papermill (``nsexp figures``) and the helpers their cells call.

``nsexp figures`` (``make figures``) runs every notebook in ``notebooks/`` with papermill, keeps the
executed copies under ``build/notebooks/`` (the sources stay free of outputs) and, with the
notebooks' default parameters and ``publish=True``, regenerates ``data/`` and ``figures/`` from
real runs. A notebook run any other way writes under ``build/`` (:func:`output_dirs`).

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

from nsexp import records

if TYPE_CHECKING:
    from nsexp.experiment.tables import Runs

#: Jupyter kernel the notebooks declare and papermill is told to use.
KERNEL_NAME = "python3"


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
    """Parameters ``nsexp figures`` gives a notebook: publish (write data/ and figures/), and
    its run folder under the repository's build/.

    Everything else keeps the notebook's own defaults (the paper's experiment: kmod in the VM).
    """
    import papermill as pm

    root = root or repo_root()
    stem = notebook.stem.split("_", 1)[-1]  # 01_chained_execution -> chained_execution
    wanted = {"publish": True, "run_dir": str(root / "build" / "runs" / stem)}
    # Only those the notebook declares (papermill warns about the others).
    declared = pm.inspect_notebook(str(notebook))
    return {k: v for k, v in wanted.items() if k in declared}


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
    # The kernels inherit it (records.command_line); only while these notebooks run.
    previous = os.environ.get(records.COMMAND_ENV)
    if command is not None:
        os.environ[records.COMMAND_ENV] = command
    done = []
    try:
        for i, nb in enumerate(notebooks, 1):
            params = {**default_parameters(nb), **dict(parameters or {})}
            out = out_dir / nb.name
            shown = " ".join(f"{k}={v!r}" for k, v in sorted(params.items()))
            print(f"[{i}/{len(notebooks)}] {nb.name} -> {out}\n    parameters: {shown}", flush=True)
            t0 = time.monotonic()
            execute_notebook(nb, out, params, kernel_name, progress=progress, log_output=log_output)
            took = time.monotonic() - t0
            print(f"[{i}/{len(notebooks)}] {nb.name} done in {took:.1f} s", flush=True)
            done.append(out)
    finally:
        if previous is None:
            os.environ.pop(records.COMMAND_ENV, None)
        else:
            os.environ[records.COMMAND_ENV] = previous
    return done


# --- helpers the notebooks' cells call -----------------------------------------------------


def output_dirs(
    name: str,
    publish: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
    figures_dir: str | os.PathLike[str] | None = None,
    tag: str | None = None,
) -> tuple[Path, Path]:
    """Where a notebook writes its tables and figures.

    Published (``publish=True``, what ``make figures`` does): the repository's ``data/`` and
    ``figures/``. Otherwise under ``build/results/<name>[-<tag>]/``, so that a run with other
    parameters never replaces the committed results. Explicit folders win over both.
    """
    root = repo_root()
    scratch = root / "build" / "results" / (f"{name}-{tag}" if tag else name)
    data = Path(data_dir) if data_dir else (root / "data" if publish else scratch / "data")
    figures = (
        Path(figures_dir) if figures_dir else (root / "figures" if publish else scratch / "figures")
    )
    return data, figures


def run_repeats(
    backend: str,
    testbed: str,
    run_dir: str | os.PathLike[str],
    repeats: int = 1,
    kernel: str | None = None,
    echo: bool = False,
    command: str | None = None,
    **layout: Any,
) -> Runs:
    """Run the experiment ``repeats`` times (:func:`nsexp.experiment.run_batch`), report each
    run, and read them back as tidy tables. ``layout`` are :meth:`LayoutSpec.make`'s options."""
    from nsexp import experiment
    from nsexp.experiment import tables

    spec = experiment.LayoutSpec.make(**layout)
    t0 = time.monotonic()
    results = experiment.run_batch(
        spec, backend, testbed, run_dir, repeats, kernel=kernel, echo=echo, command=command
    )
    for i, r in enumerate(results):
        print(
            f"run {i + 1}/{repeats} {r.run_id}: {'ok' if r.ok else f'FAILED: {r.error}'}",
            file=sys.stdout if r.ok else sys.stderr,
            flush=True,
        )
    print(f"{repeats} run(s) of {backend} on {testbed} in {time.monotonic() - t0:.1f} s")
    return tables.read_runs(r.out for r in results)


# --- CLI -----------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    """A -p value: JSON where it parses (numbers, lists, null, true), else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_figures(args: argparse.Namespace) -> int:
    """``nsexp figures``: execute the chosen notebooks; exit 1 naming the error if one fails."""
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
    p.set_defaults(func=cmd_figures)


def iter_parameters(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """``-p KEY VALUE`` pairs as a parameter dict (values parsed as in the CLI)."""
    return {k: _parse_value(v) for k, v in pairs}
