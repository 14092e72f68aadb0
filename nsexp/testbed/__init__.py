"""Testbeds: where nsexp runs commands next to the kernel module.

Two testbeds share one interface (:class:`Testbed`, in :mod:`.interface`):

* ``vm`` (:class:`VMTestbed`, :mod:`.vm`): boots a guest kernel in QEMU through virtme-ng (KVM
  where a KVM boot works, else TCG: :mod:`.accel`) with the host filesystem shared
  copy-on-write and one output folder shared writable. The guest kernel is a Debian release
  under /boot or the cached debug kernel (``--kernel debug``; :mod:`.kernels`,
  :mod:`.debug_kernel`). The module built for it is loaded, a batch of commands runs in one
  boot, and each command's exit status, output and files come back through that folder,
  together with the kernel log of the boot (scanned by :mod:`.kernel_log`).
* ``native`` (:class:`NativeTestbed`, :mod:`.native`): the same interface on this host, for a
  machine where the module is loaded (``/dev/nsmigrate`` exists, for example through DKMS).

This package is imported inside the guest too: standard library only.
"""

from __future__ import annotations

import argparse
import os

from nsexp.testbed import debug_kernel, vm
from nsexp.testbed.interface import (
    BUILD_DIR,
    DEVICE_PATH,
    KMOD_DIR,
    META_DIR,
    MODULE_NAME,
    REPO_ROOT,
    VM_RUNS_DIR,
    BatchResult,
    CommandResult,
    Testbed,
    TestbedError,
)
from nsexp.testbed.kernel_log import kernel_log_problems
from nsexp.testbed.kernels import (
    DEBUG_KERNEL_NAME,
    SUPPORTED_SERIES,
    GuestKernel,
    available_kernels,
    build_module,
    default_kernel,
    ensure_module,
    kernel_headers_dir,
    module_is_stale,
    module_path,
    resolve_kernel,
    supported_releases,
)
from nsexp.testbed.native import NativeTestbed
from nsexp.testbed.vm import GUEST_PATH, VMTestbed, find_vng, vm_processes

__all__ = [
    "BUILD_DIR",
    "DEBUG_KERNEL_NAME",
    "SUPPORTED_SERIES",
    "DEVICE_PATH",
    "GUEST_PATH",
    "KMOD_DIR",
    "META_DIR",
    "MODULE_NAME",
    "REPO_ROOT",
    "TESTBEDS",
    "VM_RUNS_DIR",
    "BatchResult",
    "CommandResult",
    "GuestKernel",
    "NativeTestbed",
    "Testbed",
    "TestbedError",
    "VMTestbed",
    "available_kernels",
    "build_module",
    "default_kernel",
    "ensure_module",
    "find_vng",
    "get_testbed",
    "kernel_headers_dir",
    "kernel_log_problems",
    "module_is_stale",
    "module_path",
    "resolve_kernel",
    "supported_releases",
    "vm_processes",
]

TESTBEDS: dict[str, type[Testbed]] = {"vm": VMTestbed, "native": NativeTestbed}


def get_testbed(name: str, **kwargs) -> Testbed:
    """``get_testbed("vm", kernel=...)`` or ``get_testbed("native")``."""
    try:
        cls = TESTBEDS[name]
    except KeyError:
        raise TestbedError(
            f"unknown testbed {name!r}: choose one of {', '.join(TESTBEDS)}"
        ) from None
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# CLI: `nsexp testbed-check` (and, from the submodules, `vm-shell` and `debug-kernel`)
# ---------------------------------------------------------------------------------------------


def cmd_testbed_check(args: argparse.Namespace) -> int:
    if args.testbed == "vm":
        tb: Testbed = vm.testbed_from_args(args)
    else:
        tb = NativeTestbed()
    if args.module == "auto":
        load = tb.name == "vm" or os.path.exists(DEVICE_PATH)
    else:
        load = args.module == "yes"
    print(f"testbed: {tb.name}, kernel {tb.kernel_release()}, module: {'load' if load else 'no'}")
    probe = (
        "python3 -c 'import os, platform, sys; "
        'open(os.path.join(os.environ["NSEXP_OUT"], "check.txt"), "w")'
        ".write(platform.release()); print(sys.version.split()[0])'"
    )
    res = tb.run_batch(
        [probe, f"test -e {DEVICE_PATH} && ls -l {DEVICE_PATH} || true"],
        timeout=args.timeout,
        load_module=load,
    )
    r = res.results[0]
    check_file = res.out_dir / "check.txt"
    written = check_file.read_text() if check_file.exists() else ""
    print(f"kernel release (uname -r): {res.kernel_release}")
    if res.accel:
        print(f"accelerator: {res.accel}")
    print(f"command exit status: {r.returncode} (python {r.stdout.strip() or '?'})")
    print(f"file written inside: {'yes: ' + written if written else 'NO'}")
    if load:
        print(f"module loaded: {res.module_loaded}; unloaded: {res.module_unloaded}")
        if res.results[1].stdout.strip():
            print(f"device: {res.results[1].stdout.strip()}")
    problems = res.kernel_log_problems()
    print(f"kernel log problems: {len(problems)}")
    for line in problems:
        print(f"  {line}")
    print(f"boot + batch: {res.duration_s:.1f} s; files in {res.out_dir}")
    ok = r.returncode == 0 and bool(written) and not problems and (res.module_loaded or not load)
    return 0 if ok else 1


def register_cli(subparsers) -> None:
    """``nsexp testbed-check``, ``nsexp vm-shell`` and ``nsexp debug-kernel``."""
    vm.register_cli(subparsers)
    debug_kernel.register_cli(subparsers)
    p = subparsers.add_parser(
        "testbed-check",
        help="boot the testbed, run a trivial command, report exit status and kernel-log problems",
    )
    p.add_argument("--testbed", choices=sorted(TESTBEDS), default="vm")
    vm.add_vm_arguments(p)
    p.add_argument(
        "--module",
        choices=["auto", "yes", "no"],
        default="auto",
        help="load the module (auto: always for vm; if loaded, for native)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole boot")
    p.set_defaults(func=cmd_testbed_check)
