"""KVM or TCG: which accelerator the VM testbed uses on this machine, decided once and cached.

A /dev/kvm that opens is not enough: on some hosts (nested or paravirtualized KVM) QEMU
initializes KVM and then cannot boot a guest. So the answer comes from a real boot (a probe run
by :class:`nsexp.testbed.vm.VMTestbed`): a guest that starts under KVM within
:data:`PROBE_TIMEOUT_S` means KVM, anything else means TCG. The answer is cached per machine in
``~/.cache/nsexp/accel.json`` (keyed by host name, machine id, host kernel and QEMU binary);
``NSEXP_ACCEL=kvm|tcg`` overrides it without probing.

Runs on the host (imported in the guest through nsexp.testbed: standard library only).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

KVM = "kvm"
TCG = "tcg"
PROBE_TIMEOUT_S = 60.0
KVM_DEVICE = Path("/dev/kvm")

_noticed = False


def cache_file() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "nsexp" / "accel.json"


def machine_key() -> str:
    """What the answer depends on: this host, its kernel, and the QEMU binary."""
    try:
        machine_id = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine_id = "?"
    qemu = shutil.which("qemu-system-x86_64") or "?"
    try:
        qemu_stamp = f"{qemu}@{int(Path(qemu).stat().st_mtime)}"
    except OSError:
        qemu_stamp = qemu
    u = os.uname()
    return f"{u.nodename}|{machine_id}|{u.release}|{qemu_stamp}"


def _load() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _store(answer: dict) -> None:
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(answer, indent=2) + "\n")
    tmp.replace(path)


def forget() -> None:
    """Drop the cached answer (the next boot probes again)."""
    cache_file().unlink(missing_ok=True)


def choose(probe_kvm: Callable[[], tuple[bool, str]]) -> tuple[str, str]:
    """``(accel, why)``: ``NSEXP_ACCEL``, else the cached answer for this machine, else
    :func:`probe_kvm` (called at most once per machine; returns ``(works, detail)``)."""
    forced = os.environ.get("NSEXP_ACCEL", "").strip().lower()
    if forced in (KVM, TCG):
        return forced, "NSEXP_ACCEL"
    if forced:
        raise ValueError(f"NSEXP_ACCEL={forced!r}: use kvm or tcg (or unset it to probe)")
    key = machine_key()
    cached = _load()
    if cached.get("key") == key and cached.get("accel") in (KVM, TCG):
        return cached["accel"], cached.get("why", "cached")
    if not KVM_DEVICE.exists():
        accel, why = TCG, f"{KVM_DEVICE} does not exist"
    elif not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        accel, why = TCG, f"{KVM_DEVICE} is not readable and writable by this user"
    else:
        works, detail = probe_kvm()
        accel = KVM if works else TCG
        why = f"a probe boot under KVM {'worked' if works else 'failed'}: {detail}"
    _store({"key": key, "accel": accel, "why": why})
    return accel, why


def notice(accel: str, why: str) -> None:
    """One line on stderr, once per process, when the VM falls back to emulation."""
    global _noticed
    if accel == TCG and not _noticed:
        _noticed = True
        print(
            f"nsexp: the VM runs under TCG emulation, not KVM ({why}; cached in "
            f"{cache_file()}, NSEXP_ACCEL=kvm|tcg overrides)",
            file=sys.stderr,
            flush=True,
        )
