"""The module on the debug kernel: KASAN, lockdep, kmemleak, UBSAN, KFENCE, fault injection.

One boot of the debug kernel (``make debug-kernel``; the Makefile's ``test`` target builds or
reuses it before pytest starts, and the fixture below builds it if pytest is run alone) runs,
in order: the module's whole VM suite (tests/vm/kmod_checks, counts scaled down), the
fault-injection paths (tests/vm/fault_injection.py), the concurrent ioctl fuzzer
(tests/vm/ioctl_fuzz.py), then two kmemleak scans. The suite's own assertions are those of
tests/test_kmod_vm.py, collected here against this boot; on top, any report of a checker in
the kernel log fails.

Run it alone: ``make test-debug``. ``make fuzz-debug`` boots it for the ioctl fuzzer alone at the
issue's 100,000 calls (``NSEXP_DEBUG_PARTS=fuzz``) and writes the run's record, with the commit
taken before the boot, to ``NSEXP_DEBUG_FUZZ_RECORD``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import json
import os
from pathlib import Path

import pytest
import test_kmod_vm as stock

from nsexp import records, testbed
from nsexp.testbed import debug_kernel

#: counts for the module's suite on the debug kernel (KASAN and lockdep under TCG are slow)
BACK_AND_FORTH = int(os.environ.get("NSEXP_DEBUG_BACK_AND_FORTH", "300"))
#: moves of the 8-thread process (the stock boots make 10,000)
THREADED_MOVES = int(os.environ.get("NSEXP_DEBUG_THREADED_MOVES", "300"))
FUZZ = int(os.environ.get("NSEXP_DEBUG_FUZZ", "3000"))
#: calls of the concurrent ioctl fuzzer: 20-50 calls/s on this kernel under TCG, so the issue's
#: 100,000 take about an hour on their own: `make fuzz-debug` (README, "The debug kernel")
IOCTL_FUZZ = int(os.environ.get("NSEXP_DEBUG_IOCTL_FUZZ", "4000"))
#: what the boot runs: the module's suite, the fault injection, the ioctl fuzzer (all by default)
PARTS = frozenset(os.environ.get("NSEXP_DEBUG_PARTS", "suite,faults,fuzz").split(","))
#: where to write the fuzzer's record with its provenance (none by default)
FUZZ_RECORD = os.environ.get("NSEXP_DEBUG_FUZZ_RECORD")
#: seconds for the fuzzer's command: it makes 20-50 calls/s here, allow 10
FUZZ_SECONDS = max(3000, IOCTL_FUZZ // 10 + 600)

pytestmark = [
    pytest.mark.vm,
    pytest.mark.debug,
    pytest.mark.slow,
    pytest.mark.timeout(5400 + FUZZ_SECONDS),
]

KMEMLEAK = "/sys/kernel/debug/kmemleak"
#: before the checks: forget what boot itself left unreferenced (not the module's doing)
KMEMLEAK_CLEAR = (
    f"echo scan > {KMEMLEAK} && cat {KMEMLEAK} > $NSEXP_OUT/kmemleak-boot.txt && "
    f"echo clear > {KMEMLEAK}"
)
#: after the checks: two scans (an object must look unreferenced twice), then the report
KMEMLEAK_SCAN = (
    f"echo scan > {KMEMLEAK} && sleep 5 && echo scan > {KMEMLEAK} && "
    f"cat {KMEMLEAK} > $NSEXP_OUT/kmemleak.txt"
)

PART_COMMANDS = {
    "suite": 'python3 tests/vm/kmod_checks "$NSEXP_OUT"',
    "faults": 'python3 tests/vm/fault_injection.py "$NSEXP_OUT"',
    "fuzz": 'python3 tests/vm/ioctl_fuzz.py "$NSEXP_OUT"',
}
if not PARTS <= PART_COMMANDS.keys():
    raise ValueError(f"NSEXP_DEBUG_PARTS: unknown {sorted(PARTS - PART_COMMANDS.keys())}")
COMMANDS = [KMEMLEAK_CLEAR, *(c for p, c in PART_COMMANDS.items() if p in PARTS), KMEMLEAK_SCAN]


def need(part: str) -> None:
    """Skip a test of a part this run did not select (NSEXP_DEBUG_PARTS), saying so."""
    if part not in PARTS:
        pytest.skip(f"NSEXP_DEBUG_PARTS={','.join(sorted(PARTS))} does not run {part!r}")


def write_fuzz_record(path: Path, result: dict, version: str, started: str, command: str) -> None:
    """The fuzzer's run as a published record: its totals and what the kernel reported."""
    batch, z = result["batch"], result["fuzz"]
    workers = z.get("workers_results", [])
    counts: dict[str, int] = {}
    for w in workers:
        for name, n in w.get("counts", {}).items():
            counts[name] = counts.get(name, 0) + n
    record = {
        "calls_wanted": IOCTL_FUZZ,
        "calls": z.get("calls"),
        "workers": z.get("workers"),
        "seconds": z.get("seconds"),
        "calls_per_second": z.get("calls_per_second"),
        "answers": dict(sorted(counts.items())),
        "migrations_done": sum(w.get("successes", 0) for w in workers),
        "unexpected_answers": sum(len(w.get("unexpected", [])) for w in workers),
        "bad_replies": sum(w.get("bad_replies", 0) for w in workers),
        "in_flight_after": z.get("stats_after", {}).get("in_flight"),
        "commands_ok": all(r.ok for r in batch.results),
        "kernel_log_problems": batch.kernel_log_problems(),
        "kmemleak_report": result["kmemleak"],
        "module_unloaded": batch.module_unloaded,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    records.write_sidecar(
        path,
        {
            "file": path.name,
            "code_version": version,
            "command": command,
            "kernel": batch.kernel_release,
            "accel": batch.accel,
            "parts": sorted(PARTS),
            "date": started,
        },
    )


@pytest.fixture(scope="module")
def debug_boot() -> dict:
    """Build or reuse the debug kernel, boot it once, run every guest program."""
    version = records.code_version()  # before the boot: the code that ran
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    stock.build_guest_programs()  # glibc and musl test programs (build/kmod-progs)
    try:
        debug_kernel.ensure()
        tb = testbed.VMTestbed(kernel=testbed.DEBUG_KERNEL_NAME)
    except testbed.TestbedError as e:
        pytest.fail(f"debug kernel unavailable: {e}", pytrace=False)
    batch = tb.run_batch(
        COMMANDS,
        env={
            "NSM_BACK_AND_FORTH": str(BACK_AND_FORTH),
            "NSM_STRESS_THREADED": str(THREADED_MOVES),
            "NSM_FUZZ": str(FUZZ),
            "NSM_CONCURRENT_EACH": "50",
            "NSM_HTTP_HOPS": "5",
            "NSM_CAT_BYTES": str(1 << 20),
            "NSM_IOCTL_FUZZ": str(IOCTL_FUZZ),
        },
        timeout=1800 + FUZZ_SECONDS,
        command_timeout=FUZZ_SECONDS,
        # every slab cache its own, so that fault injection can pick one (fault_injection.py)
        kernel_args=["slab_nomerge"],
    )
    out = batch.out_dir

    def load(name: str) -> dict:
        path = out / name
        return json.loads(path.read_text()) if path.exists() else {}

    result = {
        "batch": batch,
        "obs": load("kmod_checks.json"),
        "faults": load("fault_injection.json"),
        "fuzz": load("ioctl_fuzz.json"),
        "kmemleak": (out / "kmemleak.txt").read_text() if (out / "kmemleak.txt").exists() else None,
    }
    if FUZZ_RECORD and "fuzz" in PARTS:
        command = f"NSEXP_DEBUG_PARTS={','.join(sorted(PARTS))} NSEXP_DEBUG_IOCTL_FUZZ={IOCTL_FUZZ}"
        write_fuzz_record(Path(FUZZ_RECORD), result, version, started, command + " make fuzz-debug")
    return result


@pytest.fixture(scope="module")
def guest(debug_boot: dict) -> dict:
    """The module's suite on the debug kernel, shaped as tests/test_kmod_vm.py expects."""
    need("suite")
    assert debug_boot["obs"], (
        "the guest wrote no kmod_checks.json: " + (debug_boot["batch"].results[1].stderr[-3000:])
    )
    # the stock suite reads its own command as the batch's first result
    batch = dataclasses.replace(debug_boot["batch"], results=[debug_boot["batch"].results[1]])
    return {"batch": batch, "obs": debug_boot["obs"]}


# The stock suite's assertions, collected in this module, run against the debug boot (its
# ``guest`` fixture above). Those that compare with the stock counts are redone below.
_COUNTED = {
    "test_ten_thousand_migrations_back_and_forth",
    "test_ten_thousand_moves_of_an_eight_thread_process",
    "test_fuzz",
    "test_counters",
    "test_http_server_hammered_while_hopping",
}
#: stock boots only: the debug boot has its own arguments (slab_nomerge), and KASAN + KFENCE
_STOCK_ONLY = {"test_booted_with_slab_poisoning_and_kfence"}
for _name, _fn in vars(stock).items():
    if _name.startswith("test_") and callable(_fn) and _name not in _COUNTED | _STOCK_ONLY:
        globals()[_name] = _fn


def test_back_and_forth(guest: dict) -> None:
    d = stock.data(guest, "stress_back_and_forth")
    assert d["n"] == BACK_AND_FORTH and d["errors"] == 0
    assert d["state"]["starttime"] == d["start"] and d["state"]["gpid"] == d["gpid"]


def test_threaded_back_and_forth(guest: dict) -> None:
    d = stock.data(guest, "stress_threaded")
    assert d["n"] == THREADED_MOVES and d["error_count"] == 0
    assert all(d["progress"]) and d["threads"] == 9
    assert d["namespaces"] == [d["a_ns"]]
    for cache, before in d["slab_before"].items():
        assert d["slab_after"][cache] - before <= stock.slack(cache), (cache, d)


def test_http_server_hops_while_serving(guest: dict) -> None:
    """As the stock check, but KASAN and lockdep under TCG serve fewer requests per hop: at
    least one request answered while it hopped, and none failed."""
    d = stock.data(guest, "http_server")
    assert d["errors"] == [] and d["hops"] == d["wanted_hops"] >= 5
    assert min(d["threads_at_hops"]) >= 2
    assert d["client"]["failed"] == [] and d["client"]["ok"] >= 1
    assert d["idle_answer"].startswith("HTTP/1.0 200")


def test_random_fuzz(guest: dict) -> None:
    d = stock.data(guest, "fuzz")
    assert d["n"] == FUZZ and sum(d["counts"].values()) == FUZZ


def test_counters_on_debug(guest: dict) -> None:
    before, after = guest["obs"]["stats_before"], guest["obs"]["stats_after"]
    assert after["in_flight"] == 0
    assert after["migrations"] - before["migrations"] >= BACK_AND_FORTH


# ---------------------------------------------------------------------------------------------
# the debug kernel's own checks
# ---------------------------------------------------------------------------------------------


def test_booted_the_debug_kernel_with_its_checkers(debug_boot: dict) -> None:
    batch = debug_boot["batch"]
    assert batch.kernel_release == debug_kernel.built().release
    assert batch.kernel_release.endswith("-nsmdbg")
    dmesg = batch.dmesg
    # the checkers are really on in this boot (else "no reports" would mean nothing)
    assert "KernelAddressSanitizer initialized" in dmesg
    assert "Lock dependency validator" in dmesg
    assert "kmemleak: Kernel memory leak detector initialized" in dmesg
    # ... and stayed on: a report turns lockdep off for the rest of the boot
    assert "Disabling lock debugging" not in dmesg
    assert "no5lvl" in dmesg and "kasan_multi_shot" in dmesg  # debug_kernel.BOOT_ARGS
    assert debug_boot["kmemleak"] is not None, "the kmemleak scan did not run"


def test_every_command_ran(debug_boot: dict) -> None:
    for r in debug_boot["batch"].results:
        assert r.ok, (r.command, r.returncode, r.timed_out, r.stderr[-3000:])


def test_no_checker_reports(debug_boot: dict) -> None:
    """BUG, WARNING, lockdep, KASAN, UBSAN, KFENCE, refcount, list corruption: none."""
    assert debug_boot["batch"].kernel_log_problems() == []


def test_kmemleak_reports_nothing(debug_boot: dict) -> None:
    assert debug_boot["kmemleak"] == "", debug_boot["kmemleak"][:4000]


def test_module_unloads_on_debug(debug_boot: dict) -> None:
    assert debug_boot["batch"].module_unloaded is True


# --- fault injection --------------------------------------------------------------------------

#: allocation-failure paths every migration has (fault_injection.paths marks the others), and
#: the one a migration with NSMIGRATE_F_MNTNS adds (fault_injection.mntns_paths)
REQUIRED_PATHS = ("work", "nsproxy", "pid", "fs_struct")


def _faults(debug_boot: dict) -> dict:
    need("faults")
    f = debug_boot["faults"]
    assert f, "fault_injection.py wrote nothing"
    assert f["ok"], f.get("traceback")
    return f


def test_every_allocation_failure_path_is_taken(debug_boot: dict) -> None:
    paths = _faults(debug_boot)["paths"]
    for name in REQUIRED_PATHS:
        assert name in paths, f"{name} not attempted: an earlier path let the process move"
        hits = [a for a in paths[name]["attempts"] if a["injected"] > 0]
        assert hits, (name, paths[name])
        assert all(a["errno"] == errno.ENOMEM for a in hits), (name, hits)


def test_failed_allocation_leaves_the_process_as_it_was(debug_boot: dict) -> None:
    for name, rec in _faults(debug_boot)["paths"].items():
        for a in rec["attempts"]:
            if a["errno"] != 0:
                assert a["unchanged"], (name, a["changed"])
                assert a["counters_delta"]["migrations"] == 0, (name, a)
                refused = {k: v for k, v in a["counters_delta"].items() if k.startswith("refused_")}
                assert sum(refused.values()) == 1, (name, a)
                assert a["counters_delta"]["in_flight"] == 0, (name, a)


def test_process_moves_after_the_failures(debug_boot: dict) -> None:
    c = _faults(debug_boot)["clean_migration"]
    assert c["errno"] == 0 and c["counter_after"] == c["counter_before"] == 7
    assert c["pid_after"] > 1


def test_fault_injection_leaks_no_slab_objects(debug_boot: dict) -> None:
    f = _faults(debug_boot)
    for cache, start in f["slab_start"].items():
        assert f["slab_end"].get(cache, 0) - start <= 2, (cache, f["slab_start"], f["slab_end"])


# --- concurrent ioctl fuzzer ------------------------------------------------------------------


def test_ioctl_fuzz_under_churn(debug_boot: dict) -> None:
    need("fuzz")
    z = debug_boot["fuzz"]
    assert z, "ioctl_fuzz.py wrote nothing"
    assert z["worker_status"] == [0] * z["workers"], z
    assert z["calls"] == IOCTL_FUZZ, z
    for w in z["workers_results"]:
        assert w["unexpected"] == [], w["unexpected"]
        assert w["bad_replies"] == 0
    # the requests reached the migration itself, not only the argument checks
    assert sum(w["successes"] for w in z["workers_results"]) > 0
    assert z["stats_after"]["in_flight"] == 0
