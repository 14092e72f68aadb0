"""The notebooks: committed clean, executable with papermill, writing what they promise.

The execution tests run the real experiment natively with the restart backend (root, seconds) on
small parameters; one VM test runs notebook 01 with the kernel module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from nsexp import explorer as ex
from nsexp import notebooks as nb
from nsexp import publish, records
from nsexp.experiment import tables as nio

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PAPER = [("NS2", 100, 3), ("NS3", 200, 5), ("NS4", 300, 6), ("NS5", 400, 7)]
TABLES = ("hops", "hop_table", "processes", "runs", "expected")

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the experiment creates PID namespaces: needs root"
)


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # nsexp.notebooks sets these for the kernels it starts; keep them out of other tests.
    for var in ("PYTHONPATH", records.COMMAND_ENV, "MPLBACKEND"):
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)


def test_notebooks_present() -> None:
    names = [p.name for p in NOTEBOOKS]
    assert "00_explore.ipynb" in names and "01_chained_execution.ipynb" in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_clean(path: Path) -> None:
    """Source notebooks: no outputs or execution counts, one parameters cell, kernel python3."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == nb.KERNEL_NAME
    dirty = [
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"


def test_parameters_cells_declare_outputs() -> None:
    cell = _parameters_source(ROOT / "notebooks" / "01_chained_execution.ipynb")
    for name in ("backend", "testbed", "namespaces", "children", "increments", "route", "hops"):
        assert f"{name} = " in cell
    for name in ("repeats", "publish", "replace", "data_dir", "figures_dir", "run_dir"):
        assert f"{name} = " in cell
    cell = _parameters_source(ROOT / "notebooks" / "00_explore.ipynb")
    for name in ("backend", "testbed", "layout", "run_dir", "autorun"):
        assert f"{name} = " in cell


def _parameters_source(path: Path) -> str:
    notebook = nbformat.read(path, as_version=4)
    return next(c.source for c in notebook.cells if "parameters" in c.metadata.get("tags", []))


def test_list_notebooks_select() -> None:
    assert nb.list_notebooks() == NOTEBOOKS
    assert [p.name for p in nb.list_notebooks(select=["01"])] == ["01_chained_execution.ipynb"]
    assert [p.name for p in nb.list_notebooks(select=["00_explore.ipynb", "01"])] == [
        "00_explore.ipynb",
        "01_chained_execution.ipynb",
    ]
    with pytest.raises(FileNotFoundError):
        nb.list_notebooks(select=["99"])


def test_parameter_values_parse() -> None:
    params = nb.iter_parameters(
        [("repeats", "2"), ("children", "[1, 2]"), ("route", "null"), ("backend", "restart")]
    )
    assert params == {"repeats": 2, "children": [1, 2], "route": None, "backend": "restart"}


def test_nsexp_figures_publishes() -> None:
    """`nsexp figures` (make figures) publishes; the notebook's own default does not."""
    params = nb.default_parameters(ROOT / "notebooks" / "01_chained_execution.ipynb")
    assert params["publish"] is True
    assert params["run_dir"].startswith(str(nb.repo_root() / "build"))
    assert "publish = False" in _parameters_source(
        ROOT / "notebooks" / "01_chained_execution.ipynb"
    )
    root = nb.repo_root()
    assert nb.output_dirs("x", True) == (root / "data", root / "figures")
    assert nb.output_dirs("x", False, tag="restart-native") == (
        root / "build" / "results" / "x-restart-native" / "data",
        root / "build" / "results" / "x-restart-native" / "figures",
    )
    # The explorer writes no tables or figures: it gets only a run folder.
    assert set(nb.default_parameters(ROOT / "notebooks" / "00_explore.ipynb")) == {"run_dir"}


def test_cli_figures_list(capsys: pytest.CaptureFixture[str]) -> None:
    from nsexp import cli

    assert cli.main(["figures", "--list"]) == 0
    assert "01_chained_execution.ipynb" in capsys.readouterr().out
    assert cli.main(["figures", "--list", "-n", "nope"]) == 2


def _small_params(tmp_path: Path, backend: str, testbed: str) -> dict[str, object]:
    return {
        "backend": backend,
        "testbed": testbed,
        "repeats": 1,
        "data_dir": str(tmp_path / "data"),
        "figures_dir": str(tmp_path / "figures"),
        "run_dir": str(tmp_path / "runs"),
        "name": "chained",
    }


def _check_chained_outputs(tmp_path: Path, backend: str) -> pd.DataFrame:
    """The tables and figures notebook 01 promises; returns the hop table."""
    data, figures = tmp_path / "data", tmp_path / "figures"
    expected_columns = {
        "hops": set(records.HOP_COLUMNS) | {"repeat"},
        "hop_table": set(nio.HOP_TABLE_COLUMNS),
        "processes": set(records.PROCESS_COLUMNS) | {"run_id", "repeat"},
        "runs": {"repeat", "run_id", "backend", "testbed"},
        "expected": {"hop", "ns", "value", "pid", "expected_value", "expected_pid", "match"},
    }
    for table in TABLES:
        path = data / f"chained_{table}.csv"
        assert path.exists() and path.stat().st_size > 0, path
        df, prov = publish.read_table(path)
        assert expected_columns[table] <= set(df.columns), (table, list(df.columns))
        assert len(df) > 0, table
        assert prov["backend"] == backend and prov["run_ids"]
        for key in ("command", "testbed", "kernel", "date", "code_version"):
            assert prov.get(key), (table, key)
    for fig in ("hop_table", "process_trees"):
        for ext in ("pdf", "png"):
            path = figures / f"chained_{fig}.{ext}"
            assert path.exists() and path.stat().st_size > 1000, path
        side = json.loads((figures / f"chained_{fig}.provenance.json").read_text())
        assert side["backend"] == backend and side["run_ids"]
    return publish.read_table(data / "chained_hop_table.csv")[0]


@needs_root
def test_notebook_01_restart_native(tmp_path: Path) -> None:
    """`nsexp figures -n 01` with the restart backend natively: paper values and PIDs."""
    from nsexp import cli

    args = ["figures", "-n", "01", "--build-dir", str(tmp_path / "build"), "--no-progress"]
    for key, value in _small_params(tmp_path, "restart", "native").items():
        args += ["-p", key, str(value)]
    assert cli.main(args) == 0
    executed = tmp_path / "build" / "01_chained_execution.ipynb"
    assert executed.exists()
    table = _check_chained_outputs(tmp_path, "restart")
    assert [tuple(r) for r in table[["ns", "value", "pid"]].itertuples(index=False)] == PAPER
    expected = publish.read_table(tmp_path / "data" / "chained_expected.csv")[0]
    assert expected["match"].all()
    prov = publish.read_table(tmp_path / "data" / "chained_hops.csv")[1]
    assert prov["command"].startswith("nsexp figures -n 01 -p backend restart")
    assert prov["parameters"]["repeats"] == 1 and prov["parameters"]["publish"] is True
    # The analysis code's version, and that of the run it read (taken before the run).
    # (Each a full commit hash, "-dirty-<diff hash>" in a tree with edits.)
    run = publish.read_table(tmp_path / "data" / "chained_runs.csv")[0]
    assert prov["run_code_versions"] == run["code_version"].tolist()
    for version in (prov["code_version"], *prov["run_code_versions"]):
        assert len(version.split("-")[0]) == 40, version
    assert run["command"].tolist() == [prov["command"]]  # what a person ran, not the kernel
    hops = publish.read_table(tmp_path / "data" / "chained_hops.csv")[0]
    # restart makes a new process at each hop: a new global PID each time, and start times
    # that move on (in clock ticks of 10 ms, so two quick hops may share one).
    assert hops["global_pid"].nunique() == len(hops)
    assert hops["start_time"].is_monotonic_increasing and hops["start_time"].nunique() > 1


def _published() -> dict[str, bytes]:
    return {
        str(p): p.read_bytes()
        for folder in (ROOT / "data", ROOT / "figures")
        for p in sorted(folder.rglob("chained_execution*"))
    }


@needs_root
def test_notebook_01_by_papermill_leaves_published_results_alone(tmp_path: Path) -> None:
    """Run with other parameters (restart, native) and no output folders, notebook 01 writes
    under build/results/, not data/ or figures/."""
    before = _published()
    assert before, "no published chained_execution results in data/ and figures/"
    out = tmp_path / "01.ipynb"
    params = {"backend": "restart", "testbed": "native", "repeats": 1}
    params["run_dir"] = str(tmp_path / "runs")
    nb.execute_notebook(ROOT / "notebooks" / "01_chained_execution.ipynb", out, params)
    assert _published() == before
    data, _ = nb.output_dirs("chained_execution", False, tag="restart-native")
    prov = publish.read_table(data / "chained_execution_hops.csv")[1]
    assert prov["backend"] == "restart" and prov["testbed"] == "native"
    assert prov["command"].startswith("papermill 01_chained_execution.ipynb")
    assert "-p backend restart" in prov["command"]


def test_publishing_another_backend_is_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nsexp figures` with restart/native would replace the module's published results:
    refused before anything runs, naming the way out."""
    from nsexp import cli

    before = _published()
    args = ["figures", "-n", "01", "--build-dir", str(tmp_path), "--no-progress"]
    args += ["-p", "backend", "restart", "-p", "testbed", "native"]
    args += ["-p", "run_dir", str(tmp_path / "runs")]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "backend=kmod" in err and "replace" in err
    assert _published() == before and not (tmp_path / "runs").exists()


@needs_root
def test_notebook_00_explore_headless(tmp_path: Path) -> None:
    """The explorer runs under papermill: widgets display, autorun writes a run folder."""
    out = tmp_path / "00_explore.ipynb"
    nb.execute_notebook(
        ROOT / "notebooks" / "00_explore.ipynb",
        out,
        {
            "backend": "restart",
            "testbed": "native",
            "run_dir": str(tmp_path / "runs"),
            "autorun": True,
        },
        progress=False,
    )
    executed = nbformat.read(out, as_version=4)
    mimes = {
        k
        for c in executed.cells
        if c.cell_type == "code"
        for o in c.outputs
        for k in o.get("data", {})
    }
    assert "application/vnd.jupyter.widget-view+json" in mimes
    assert "image/png" in mimes  # the static view of the last run
    runs = nio.find_run_dirs(tmp_path / "runs")
    assert runs, "autorun wrote no run folder"
    hops = nio.read_runs(runs).hops
    assert hops["value"].tolist() == [100, 200, 300, 400]


@needs_root
def test_notebook_00_explore_no_autorun(tmp_path: Path) -> None:
    """Headless without autorun the explorer only displays its controls and runs nothing."""
    out = tmp_path / "00_explore.ipynb"
    nb.execute_notebook(
        ROOT / "notebooks" / "00_explore.ipynb",
        out,
        {"run_dir": str(tmp_path / "runs")},
        progress=False,
    )
    assert out.exists() and not (tmp_path / "runs").exists()


@pytest.mark.vm
def test_notebook_01_kmod_vm(tmp_path: Path) -> None:
    """Notebook 01 with the kernel module in the VM: the paper's table, one process per run.

    Two repeats, so that the one-boot batch path runs too.
    """
    params = {**_small_params(tmp_path, "kmod", "vm"), "repeats": 2}
    nb.execute_notebook(
        ROOT / "notebooks" / "01_chained_execution.ipynb",
        tmp_path / "01_chained_execution.ipynb",
        params,
        progress=False,
    )
    table = _check_chained_outputs(tmp_path, "kmod")
    assert [tuple(r) for r in table[["ns", "value", "pid"]].itertuples(index=False)] == PAPER
    assert table["agree"].tolist() == [2] * 4
    hops = publish.read_table(tmp_path / "data" / "chained_hops.csv")[0]
    # The same process at every hop of a run: one start time per run.
    assert (hops.groupby("run_id")["start_time"].nunique() == 1).all()
    assert hops["kernel_done"].notna().sum() == 2 * 3  # the module's timings on every migration
    runs = publish.read_table(tmp_path / "data" / "chained_runs.csv")[0]
    assert runs["vm.batch_size"].tolist() == [2, 2]  # both repeats in one boot
    assert runs["vm.kernel_log_problems"].tolist() == ["[]", "[]"]
    for ext in ("pdf", "png"):
        assert (tmp_path / "figures" / f"chained_phase_timings.{ext}").stat().st_size > 1000


@needs_root
def test_run_repeats_native(tmp_path: Path) -> None:
    """run_repeats: one folder per repeat, read back as tidy tables numbered by repeat."""
    runs = nb.run_repeats("restart", "native", tmp_path, repeats=2, **ex.LAYOUTS["quick"])
    assert [p.name for p in nio.find_run_dirs(tmp_path)] == ["000", "001"]
    assert runs.hops["repeat"].tolist() == [0, 0, 1, 1]
    assert runs.hops["value"].tolist() == [10, 20, 10, 20]
    assert len(runs.runs) == 2 and runs.runs["ok"].all()


def test_cli_figures_failing_notebook(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A notebook that fails makes `nsexp figures` exit 1 and name the error."""
    from nsexp import cli

    args = ["figures", "-n", "01", "--build-dir", str(tmp_path), "--no-progress"]
    args += ["-p", "backend", "nope", "-p", "testbed", "native"]
    args += ["-p", "data_dir", str(tmp_path / "d"), "-p", "figures_dir", str(tmp_path / "f")]
    assert cli.main(args) == 1
    assert "unknown backend" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@needs_root
def test_explorer_button_runs(tmp_path: Path) -> None:
    """Pressing Run in the explorer runs the chosen layout and keeps the result."""
    explorer = ex.Explorer(tmp_path, backend="restart", testbed="native", layout="quick")
    assert explorer.status.value == "ready"
    explorer.button.click()
    assert explorer.runs is not None, explorer.status.value
    assert explorer.status.value.startswith("done")
    assert explorer.runs.hops["value"].tolist() == [10, 20]
    assert not explorer.button.disabled
    explorer.backend.value = (
        "criu"  # criu needs CRIU on this host: the failure is shown, not raised
    )
    explorer.testbed.value = "native"
    explorer.button.click()
    assert explorer.status.value.startswith(("<b>failed</b>", "done"))


def test_same_process_note_counts_changes_not_distinct_start_times() -> None:
    """Start times count clock ticks: a successor started in its predecessor's tick looks alike."""

    def hops(starts: list[int], run_ids: list[str] | None = None) -> pd.DataFrame:
        n = len(starts)
        return pd.DataFrame(
            {
                "run_id": run_ids or ["r"] * n,
                "hop": list(range(n)),
                "start_time": starts,
                "status": ["ok"] * n,
            }
        )

    assert ex.same_process_note(hops([7, 7, 7, 7])).startswith("one process: the same start")
    assert ex.same_process_note(hops([10, 18, 19, 20])).startswith("4 processes: a new start")
    # What CI saw with restart: the last two stops in one tick. Not "3 processes".
    tied = ex.same_process_note(hops([10, 18, 19, 19]))
    assert tied.startswith("a new start time at 2 of the 3 hops"), tied
    # Two runs: each counted on its own hops.
    two = hops([3, 3, 9, 9], run_ids=["a", "a", "b", "b"])
    two["hop"] = [0, 1, 0, 1]
    assert ex.same_process_note(two).startswith("one process: the same start time at all 2")
