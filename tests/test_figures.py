"""nsexp.experiment.figures draws non-empty figures from small hand-made tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from run_folders import make_failed_run, make_run

from nsexp import publish
from nsexp.experiment import figures
from nsexp.experiment import tables as nio


@pytest.fixture
def runs(tmp_path: Path) -> nio.Runs:
    return nio.read_runs([make_run(tmp_path / f"r{i}", f"r{i}") for i in range(2)])


def _check(paths: list[Path]) -> None:
    assert [p.suffix for p in paths] == [".pdf", ".png"]
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000


def test_save_figure_creates_dirs(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    _check(publish.save_figure(fig, tmp_path / "a" / "b" / "line"))
    plt.close(fig)


def test_hop_table_figure(tmp_path: Path, runs: nio.Runs) -> None:
    fig = figures.plot_hop_table(runs.hops)
    texts = {c.get_text().get_text() for c in fig.axes[0].tables[0].get_celld().values()}
    assert {"NS2", "100", "3", "NS5", "400", "7", "2/2"} <= texts
    _check(publish.save_figure(fig, tmp_path / "fig" / "hop_table"))
    plt.close(fig)


def test_process_trees_figure(tmp_path: Path, runs: nio.Runs) -> None:
    fig = figures.plot_process_trees(runs.processes, runs.hops)
    assert len([ax for ax in fig.axes if ax.get_title()]) == 4  # one panel per snapshot
    texts = " ".join(t.get_text() for t in fig.findobj(plt.Text))
    assert "worker 3" in texts and "worker 7" in texts
    _check(publish.save_figure(fig, tmp_path / "trees"))
    plt.close(fig)


def test_phase_timings_figure(tmp_path: Path, runs: nio.Runs) -> None:
    fig = figures.plot_phase_timings(runs.hops)
    assert fig is not None
    _check(publish.save_figure(fig, tmp_path / "phases"))
    plt.close(fig)


def test_phase_timings_absent(tmp_path: Path) -> None:
    run = nio.read_run(make_run(tmp_path / "n", phases=False))
    assert figures.plot_phase_timings(run.hops) is None


def test_empty_tables(tmp_path: Path) -> None:
    run = nio.read_run(make_run(tmp_path / "r"))
    fig = figures.plot_process_trees(run.processes.iloc[0:0])
    _check(publish.save_figure(fig, tmp_path / "empty_tree"))
    fig = figures.plot_hop_table(run.hops.iloc[0:0])
    _check(publish.save_figure(fig, tmp_path / "empty_table"))
    plt.close("all")


def test_hop_table_figure_shows_failures(tmp_path: Path) -> None:
    folder = make_failed_run(tmp_path / "c")
    fig = figures.plot_hop_table(nio.read_run(folder).hops)
    cells = {c.get_text().get_text() for c in fig.axes[0].tables[0].get_celld().values()}
    assert {"Failed", "1/1 [1]", "-"} <= cells
    assert any("File exists" in t.get_text() for t in fig.texts)
    _check(publish.save_figure(fig, tmp_path / "criu_table"))
    plt.close(fig)


def test_save_figures_with_provenance(tmp_path: Path, runs: nio.Runs) -> None:
    import json

    prov = publish.provenance(runs, command="test")
    figs = {"table": figures.plot_hop_table(runs.hops), "none": None}
    paths = publish.save_figures(figs, tmp_path, "x", provenance=prov)
    assert [p.name for p in paths] == ["x_table.pdf", "x_table.png"]
    side = json.loads((tmp_path / "x_table.provenance.json").read_text())
    assert side["files"] == ["x_table.pdf", "x_table.png"] and side["backend"] == "kmod"
    assert side["run_ids"] == ["r0", "r1"] and side["command"] == "test"
