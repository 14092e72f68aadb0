"""The interactive explorer of notebook 00: ipywidgets controls over the experiment's runs.

Host-side only (ipywidgets, IPython, matplotlib, imported lazily in the methods that need them).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsexp.notebooks import run_batch

if TYPE_CHECKING:
    from nsexp.io import Runs

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


class Explorer:
    """The interactive explorer of notebook 00: choose a layout and a backend, run, see results.

    ``widget`` holds the controls (layout, backend, testbed, repeats, Run button) and an output
    area that shows the hop table and the process trees of the last run. :meth:`run` does what
    the button does, so the explorer also works headless (papermill) without any click.
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
        self.layout = w.Dropdown(
            options=[(LAYOUT_LABELS.get(k, k), k) for k in LAYOUTS],
            value=layout or next(iter(LAYOUTS)),
            description="layout",
        )
        self.backend = w.Dropdown(
            options=["kmod", "restart", "criu"], value=backend, description="backend"
        )
        self.testbed = w.Dropdown(options=["vm", "native"], value=testbed, description="testbed")
        self.repeats = w.BoundedIntText(value=repeats, min=1, max=100, description="repeats")
        self.button = w.Button(description="Run", button_style="primary", icon="play")
        self.status = w.HTML("ready")
        self.output = w.Output()
        self.button.on_click(lambda _b: self.run())
        self.widget = w.VBox(
            [
                w.HBox([self.layout, self.backend]),
                w.HBox([self.testbed, self.repeats, self.button]),
                self.status,
                self.output,
            ]
        )

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def run(self) -> Runs | None:
        """Run the chosen experiment into a fresh folder under ``run_dir``, then show it.

        The run's progress lines appear in the output area (a button's callback has no cell
        of its own to print into), then the hop table and the trees replace them.
        """
        from IPython.display import display

        from nsexp import io as nio

        stamp = time.strftime("%Y%m%dT%H%M%S")
        folder = self.run_dir / f"{stamp}-{self.backend.value}-{self.testbed.value}"
        self.button.disabled = True
        self.status.value = f"running {self.backend.value} on {self.testbed.value} ..."
        t0 = time.monotonic()
        with self.output:
            self.output.clear_output()
            try:
                runs = run_batch(
                    self.backend.value,
                    self.testbed.value,
                    folder,
                    repeats=self.repeats.value,
                    **LAYOUTS[self.layout.value],
                )
            except Exception as exc:  # shown in the widget; the kernel stays usable
                self.status.value = f"<b>failed</b>: {type(exc).__name__}: {exc}"
                return None
            finally:
                self.button.disabled = False
            self.runs = runs
            ok = int(nio.ok_mask(runs.hops).sum())
            took = time.monotonic() - t0
            self.status.value = f"done in {took:.1f} s: {ok}/{len(runs.hops)} stops ok, in {folder}"
            self.output.clear_output(wait=True)
            show_runs(runs, display)
        return runs


def show_runs(runs: Runs, display: Any = None) -> None:
    """Display the hop table, the process trees and (if recorded) the phase timings."""
    import matplotlib.pyplot as plt

    from nsexp import io as nio
    from nsexp import plotting

    if display is None:
        from IPython.display import display
    display(nio.hop_table(runs.hops))
    for fig in (
        plotting.plot_process_trees(runs.processes, runs.hops),
        plotting.plot_phase_timings(runs.hops),
    ):
        if fig is not None:
            display(fig)
            plt.close(fig)
