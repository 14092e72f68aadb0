"""The benchmarks: what a hop costs beside its baselines, and how the cost grows.

``guest`` (stdlib, in the testbed) measures through the experiment's own worker, tree and manager
(``scenes`` holds the stages); ``host`` builds the C helpers in ``csrc/`` and runs one boot
(``nsexp bench``); ``results`` turns the raw files into tidy tables with provenance; ``summary``
holds the statistics, targets and verdicts; ``plots`` the notebooks' tables and figures.
Targets and results: docs/performance.md.
"""

from __future__ import annotations

from typing import Any


def register_cli(subparsers: Any) -> None:
    """Add ``nsexp bench`` (imported here so that the guest never loads the host's code)."""
    from nsexp.bench import host

    host.register_cli(subparsers)
