"""The kernel-log scan: which lines of a guest's ``dmesg`` report a problem.

Covers the stock kernels' reports (BUG, WARNING, Oops, refcount, list corruption, panics) and
the debug kernel's checkers (KASAN, UBSAN, KFENCE, lockdep, kmemleak, debugobjects, SLUB
poisoning). Runs on the host; imported inside the guest too: standard library only.
"""

from __future__ import annotations

import re

_PROBLEM_PATTERNS = [
    re.compile(p)
    for p in (
        r"BUG:",  # includes "BUG: KASAN:", "BUG: KFENCE:", "BUG: sleeping function called"
        r"\bBUG \S+ \(",  # SLUB: "BUG kmalloc-64 (Tainted: ...): Poison overwritten"
        r"WARNING:",  # includes lockdep's "WARNING: possible circular locking dependency"
        r"\bOops\b",
        r"refcount_t",
        r"(?i)\bleak",  # kmemleak: "2 new suspected memory leaks"
        r"unreferenced object",  # kmemleak's report of one object
        r"possible circular locking",
        r"possible recursive locking",
        r"suspicious RCU usage",
        r"DEBUG_LOCKS_WARN_ON",
        r"INFO: ",  # hung tasks, lockdep's "INFO: lockdep is turned off"
        r"(?i)\bcorrupt",  # "list_add corruption", "list_del corruption", "slab corrupt"
        r"general protection fault",
        r"Call Trace",
        r"Kernel panic",
        r"UBSAN:",
        r"KASAN:",
        r"KFENCE:",
        r"ODEBUG:",  # debugobjects: a timer/work/rcu_head freed while active
        r"Redzone overwritten",
        r"Poison overwritten",
        r"soft lockup",
        r"rcu_\w+ detected stall",
    )
]

#: Lines a healthy boot prints that match a pattern above but are not problems.
_BENIGN_PATTERNS = [
    re.compile(p)
    for p in (
        r"kmemleak: Kernel memory leak detector (disabled|initialized)",
        r"RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable",
        r"MDS CPU bug present and SMT on, data leak possible",
        r"MMIO Stale Data CPU bug present and SMT on, data leak possible",
        r"TAA CPU bug present and SMT on, data leak possible",
        r"Spectre V2 : WARNING: Unprivileged eBPF is enabled",
        # debug kernel boot banners
        r"kmemleak: Automatic memory scanning thread (ended|started)",
        r"\*\* +(This system shows unhashed kernel memory addresses|NOTICE NOTICE)",
    )
]


def kernel_log_problems(dmesg: str) -> list[str]:
    """Lines of a kernel log that report a problem: BUG, WARNING, Oops, refcount, leaks,
    lockdep, KASAN, UBSAN, KFENCE and debugobjects reports, list corruption, general protection
    faults, call traces, stalls, panics."""
    problems = []
    for line in dmesg.splitlines():
        if any(p.search(line) for p in _PROBLEM_PATTERNS) and not any(
            b.search(line) for b in _BENIGN_PATTERNS
        ):
            problems.append(line.strip())
    return problems
