"""Guest side of the kernel-module suite: run the checks in one boot, record observations.

Run inside the VM testbed as root with the module loaded:
    python3 tests/vm/kmod_checks OUT_DIR [check ...]
Each check records what it observed (PIDs, errnos, states) into OUT_DIR/kmod_checks.json, one
record per check with ok/data (or error/traceback); tests/test_kmod_vm.py makes the assertions
on the host. Counts scale with NSM_BACK_AND_FORTH, NSM_FUZZ and NSM_STRESS_* (see stress.py).
Standard library only.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

# The areas register their checks in harness.CHECKS, in this order.
import fuzz  # noqa: F401
import hazards  # noqa: F401
import programs  # noqa: F401
import refusals  # noqa: F401
import semantics  # noqa: F401
import stress  # noqa: F401
import threads  # noqa: F401
from harness import CHECKS, SLAB_CACHES, WORK, settle, slab_objects, stats

ORDER = ("semantics", "refusals", "hazards", "threads", "programs", "stress", "fuzz")


def ordered_checks() -> list[str]:
    """Every registered check, area by area in ORDER (fuzz last: it is the longest)."""
    return sorted(CHECKS, key=lambda name: ORDER.index(CHECKS[name].__module__))


def main() -> int:
    out_dir = sys.argv[1]
    wanted = sys.argv[2:] or ordered_checks()
    unknown = [w for w in wanted if w not in CHECKS]
    if unknown:
        print(f"unknown checks {unknown}; known: {sorted(CHECKS)}", file=sys.stderr)
        return 2
    os.makedirs(WORK, exist_ok=True)
    results: dict = {"uname": os.uname().release}
    path = os.path.join(out_dir, "kmod_checks.json")
    results["stats_before"] = stats()
    results["slab_start"] = slab_objects(SLAB_CACHES)
    for name in wanted:
        t0 = time.monotonic()
        print(f"check {name} ...", flush=True)
        try:
            results[name] = {"ok": True, "data": CHECKS[name]()}
        except BaseException as e:  # record and go on: one boot runs every check
            results[name] = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            }
        results[name]["seconds"] = time.monotonic() - t0
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
    settle()
    results["stats_after"] = stats()
    results["slab_end"] = slab_objects(SLAB_CACHES)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
