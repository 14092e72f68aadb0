"""The interactive explorer of notebook 00: ipywidgets controls over the experiment's runs.

Host-side only (ipywidgets, IPython, matplotlib, imported lazily in the methods that need them).
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsexp.notebooks import run_repeats

if TYPE_CHECKING:
    import pandas as pd

    from nsexp.experiment.tables import Runs

#: Layouts offered by the explorer (name -> the layout parameters of notebook 01, those of
#: nsexp.experiment.LayoutSpec.make).
LAYOUTS: dict[str, dict[str, Any]] = {
    "paper": {"namespaces": 4, "children": [2, 3, 4, 5], "increments": 100},
    "8-namespaces": {"namespaces": 8, "children": [2, 3, 4, 5, 2, 3, 4, 5], "increments": 100},
    "10-hops-cycling": {"namespaces": 4, "children": [2, 3, 4, 5], "increments": 100, "hops": 10},
    "quick": {"namespaces": 2, "children": [2, 2], "increments": 10},
}
LAYOUT_LABELS = {
    "paper": "paper: NS2..NS5, children 2/3/4/5, 3 hops",
    "8-namespaces": "8 namespaces, one pass (7 hops)",
    "10-hops-cycling": "paper layout, 10 hops cycling",
    "quick": "2 namespaces, 1 hop",
}

#: What a Run costs on each testbed, shown next to the button before it is pressed.
TESTBED_COST = {
    "vm": "vm: every Run first boots a QEMU VM with the module (about a minute under emulation, "
    "more on a busy machine)",
    "native": "native: runs on this machine in seconds (kmod needs /dev/nsmigrate here; "
    "restart and criu need root)",
}


def same_process_note(hops: pd.DataFrame) -> str:
    """What the start times of a run's hops say: one process that travelled, or new ones.

    A start time is a count of clock ticks, so a process started within the tick of the
    one before looks alike: the note counts the hops where the start time changed, and says so
    when that is not every hop, instead of counting distinct start times.
    """
    from nsexp.experiment import tables

    ok = hops[tables.ok_mask(hops)]
    if "start_time" not in ok.columns or ok["start_time"].isna().all():
        return "no start times recorded"
    runs = [g for _, g in ok.groupby("run_id")] if "run_id" in ok else [ok]
    stops = max(len(g) for g in runs)
    changed = max(_start_time_changes(g) for g in runs)
    if changed == 0:
        return f"one process: the same start time at all {stops} stops (it travelled)"
    if changed == stops - 1:
        return (
            f"{stops} processes: a new start time at each of the {stops} stops "
            "(a new process per hop)"
        )
    tick_ms = 1000 // os.sysconf("SC_CLK_TCK")
    return (
        f"a new start time at {changed} of the {stops - 1} hops (a new process there; start "
        f"times count {tick_ms} ms ticks, so a process started in the tick of the one before "
        "looks alike)"
    )


def _start_time_changes(run: pd.DataFrame) -> int:
    starts = run.sort_values("hop")["start_time"].dropna().tolist()
    return sum(a != b for a, b in itertools.pairwise(starts))


class Explorer:
    """The interactive explorer of notebook 00: choose a layout and a backend, run, see results.

    ``widget`` holds the controls (layout, backend, testbed, repeats, Run button), a line that
    says what a Run costs on the chosen testbed, a status line and an output area that shows
    the hop table and the process trees of the last run. :meth:`run` does what the button
    does, so the explorer also works headless (papermill) without any click.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        backend: str = "kmod",
        testbed: str = "vm",
        layout: str | None = None,
        repeats: int = 1,
    ) -> None:
        import ipywidgets as w

        self.run_dir = Path(run_dir)
        self.runs: Runs | None = None
        # "initial": the description takes the width it needs; the dropdowns are wide enough
        # for their longest option, so no label is cut.
        style = {"description_width": "initial"}
        self.layout = w.Dropdown(
            options=[(LAYOUT_LABELS.get(k, k), k) for k in LAYOUTS],
            value=layout or next(iter(LAYOUTS)),
            description="layout",
            style=style,
            layout=w.Layout(width="max-content", min_width="24em"),
        )
        self.backend = w.Dropdown(
            options=["kmod", "restart", "criu"],
            value=backend,
            description="backend",
            style=style,
            layout=w.Layout(width="max-content", min_width="12em"),
        )
        self.testbed = w.Dropdown(
            options=["vm", "native"],
            value=testbed,
            description="testbed",
            style=style,
            layout=w.Layout(width="max-content", min_width="12em"),
        )
        self.repeats = w.BoundedIntText(
            value=repeats,
            min=1,
            max=100,
            description="repeats",
            style=style,
            layout=w.Layout(width="12em"),
        )
        self.button = w.Button(description="Run", button_style="primary", icon="play")
        self.cost = w.HTML()
        self.status = w.HTML("ready")
        self.output = w.Output()
        self.button.on_click(lambda _b: self.run())
        self.testbed.observe(lambda _c: self._show_cost(), names="value")
        self._show_cost()
        self.widget = w.VBox(
            [
                w.HBox([self.layout, self.backend]),
                w.HBox([self.testbed, self.repeats, self.button]),
                self.cost,
                self.status,
                self.output,
            ]
        )

    def _show_cost(self) -> None:
        self.cost.value = f"<i>{TESTBED_COST.get(self.testbed.value, '')}</i>"

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def run(self) -> Runs | None:
        """Run the chosen experiment into a fresh folder under ``run_dir``, then show it.

        The run's progress lines appear in the output area (a button's callback has no cell
        of its own to print into); then the hop table and the trees replace them, and only
        after they are displayed does the status say "done".
        """
        from IPython.display import display

        from nsexp.experiment import tables

        backend, testbed = self.backend.value, self.testbed.value
        stamp = time.strftime("%Y%m%dT%H%M%S")
        folder = self.run_dir / f"{stamp}-{backend}-{testbed}"
        self.button.disabled = True
        booting = " (booting a VM first: about a minute)" if testbed == "vm" else ""
        self.status.value = f"running {backend} on {testbed}{booting} ..."
        t0 = time.monotonic()
        with self.output:
            self.output.clear_output()
            try:
                runs = run_repeats(
                    backend,
                    testbed,
                    folder,
                    repeats=self.repeats.value,
                    **LAYOUTS[self.layout.value],
                )
                ok = int(tables.ok_mask(runs.hops).sum())
                self.status.value = f"drawing {ok}/{len(runs.hops)} stops ..."
                self.output.clear_output(wait=True)
                show_runs(runs, display)
            except Exception as exc:  # shown in the widget; the kernel stays usable
                self.status.value = f"<b>failed</b>: {type(exc).__name__}: {exc}"
                return None
            finally:
                self.button.disabled = False
        self.runs = runs
        took = time.monotonic() - t0
        self.status.value = (
            f"done in {took:.1f} s: {ok}/{len(runs.hops)} stops ok, in {folder}; "
            f"{same_process_note(runs.hops)}"
        )
        return runs


def show_runs(runs: Runs, display: Any = None) -> None:
    """Display the hop table (with each stop's global PID and start time), what the start
    times say, the process trees and (if recorded) the phase timings."""
    from IPython.display import HTML

    from nsexp.experiment import figures, tables

    if display is None:
        from IPython.display import display
    display(HTML("<h4>Hop table</h4>"))
    display(tables.hop_table(runs.hops))
    display(HTML(f"<p>{same_process_note(runs.hops)}</p>"))
    trees = _png(figures.plot_process_trees, runs.processes, runs.hops)
    if trees is not None:
        display(HTML("<h4>Process trees, after each stop</h4>"))
        display(trees)
    phases = _png(figures.plot_phase_timings, runs.hops)
    if phases is not None:
        display(HTML("<h4>Phase timings</h4>"))
        display(phases)


def _png(plot: Any, *args: Any) -> Any:
    """The figure ``plot(*args)`` draws, as a PNG image to display (None if it drew none).

    The figure never stays in pyplot's registry: under JupyterLab, ipykernel runs requests
    of other subshells in other threads, and matplotlib-inline's post-execute hook there shows
    and closes every registered figure, which raced with this drawing (blank images).
    """
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image

    with plt.ioff():  # no "draw me" flag for that hook
        fig = plot(*args)
        if fig is None:
            return None
        plt.close(fig)  # out of the registry; the figure itself can still be saved
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return Image(data=buf.getvalue(), format="png")
