"""The paper's chained-execution experiment.

Where each part is:

* :mod:`.layout`: the hierarchy and the worker's route (:class:`LayoutSpec`), the prediction;
* :mod:`.worker`: the process that hops (also the base of the benchmarks' migrating process);
* :mod:`.guest`: one run in this kernel, and the guest's entry point
  (``python3 -m nsexp.experiment.guest``); standard library only;
* :mod:`.host`: :func:`run` and :func:`run_batch` on a testbed (one VM boot per batch), and
  ``nsexp run``;
* :mod:`.tables` and :mod:`.figures`: the run folders as tidy tables, the hop table, the
  figures (host side: pandas, matplotlib).

The faces imported here are standard library only (the host module loads the testbed only for
a VM run), so the guest may import this package.
"""

from __future__ import annotations

from nsexp.experiment.guest import RunResult
from nsexp.experiment.host import run, run_batch
from nsexp.experiment.layout import LayoutError, LayoutSpec, predict_pids, predict_values

__all__ = [
    "LayoutError",
    "LayoutSpec",
    "RunResult",
    "predict_pids",
    "predict_values",
    "run",
    "run_batch",
]
