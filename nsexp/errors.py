"""The base of the package's own errors.

Every error nsexp raises on purpose (a testbed that cannot boot, a backend that cannot run here,
a refused migration, a layout that cannot be built, a result that must not be replaced) derives
from :class:`NsexpError`; ``nsexp``'s command line reports any of them as one line naming the
fix, and exits 1. Standard library only.
"""

from __future__ import annotations


class NsexpError(Exception):
    """An error of nsexp itself; its message says what to do about it."""
