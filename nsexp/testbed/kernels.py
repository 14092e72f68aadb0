"""Guest kernels and the module built for each.

A guest kernel is named either by a Debian release installed under /boot (with its headers), or
``debug``: the debug kernel built by ``make debug-kernel`` into the cache (see
:mod:`nsexp.testbed.debug_kernel`). The module is built with kbuild against the kernel's headers
(for the debug kernel: its build tree) into ``build/kmod/<release>/nsmigrate.ko``.

Runs on the host (imported inside the guest too: standard library only).
"""

from __future__ import annotations

import fcntl
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nsexp.testbed import debug_kernel
from nsexp.testbed.interface import BUILD_DIR, KMOD_DIR, MODULE_NAME, REPO_ROOT, TestbedError

#: The name that selects the debug kernel (``--kernel debug``, ``NSEXP_KERNEL=debug``).
DEBUG_KERNEL_NAME = "debug"
#: The kernel series the module is built and tested on (kmod/README.md), as release prefixes.
SUPPORTED_SERIES = ("6.1.", "6.12.")


@dataclass(frozen=True)
class GuestKernel:
    """A kernel the VM can boot: its release, image, kbuild tree and modules folder."""

    name: str
    release: str
    image: Path
    #: kbuild directory to build the module against (None: headers not installed)
    headers: Path | None
    #: /lib/modules/<release> for a Debian kernel (its virtio/9p modules); None when the
    #: kernel has everything the guest needs built in (the debug kernel)
    modules_dir: Path | None
    #: on the command line of every boot of this kernel (before a run's own arguments)
    boot_args: tuple[str, ...] = ()

    @property
    def is_debug(self) -> bool:
        return self.name == DEBUG_KERNEL_NAME


def _version_key(release: str) -> tuple:
    """Sort key for kernel releases: '6.12.117+deb12-amd64' > '6.1.0-56-amd64'."""
    return tuple(int(n) for n in re.findall(r"\d+", release))


def kernel_headers_dir(release: str) -> Path | None:
    """The kbuild directory for ``release`` (the debug kernel's build tree for its release),
    or None if its headers are not installed."""
    for d in (Path(f"/lib/modules/{release}/build"), Path(f"/usr/src/linux-headers-{release}")):
        if (d / "Makefile").exists():
            return d
    built = debug_kernel.built()
    if built is not None and built.release == release:
        return built.build_dir
    return None


def available_kernels() -> list[str]:
    """Releases with both ``/boot/vmlinuz-R`` and headers installed, oldest first."""
    releases = []
    for img in Path("/boot").glob("vmlinuz-*"):
        rel = img.name[len("vmlinuz-") :]
        if kernel_headers_dir(rel) is not None:
            releases.append(rel)
    return sorted(releases, key=_version_key)


def supported_releases() -> list[str]:
    """The newest installed release (image and headers) of each of :data:`SUPPORTED_SERIES`."""
    kernels = available_kernels()
    out = []
    for series in SUPPORTED_SERIES:
        found = [k for k in kernels if k.startswith(series)]
        if not found:
            raise TestbedError(f"no {series}x kernel with headers installed: run `make setup`")
        out.append(found[-1])
    return out


def default_kernel() -> str:
    """The newest kernel under /boot with matching headers (see :func:`available_kernels`)."""
    kernels = available_kernels()
    if not kernels:
        raise TestbedError(
            "no kernel under /boot has its headers installed (need /boot/vmlinuz-R and "
            "/usr/src/linux-headers-R): run `make setup` "
            "(or apt-get install linux-image-amd64 linux-headers-amd64)"
        )
    return kernels[-1]


def resolve_kernel(name: str) -> GuestKernel:
    """The guest kernel called ``name``: ``debug`` or a release under /boot."""
    if name == DEBUG_KERNEL_NAME:
        built = debug_kernel.built()
        if built is None:
            raise TestbedError(
                f"the debug kernel is not built (no complete build in "
                f"{debug_kernel.cache_dir()}): run `make debug-kernel` "
                "(about 12 min on an idle 2-core machine)"
            )
        return GuestKernel(
            name, built.release, built.image, built.build_dir, None, debug_kernel.BOOT_ARGS
        )
    image = Path(f"/boot/vmlinuz-{name}")
    if not image.exists():
        have = ", ".join(available_kernels()) or "none"
        raise TestbedError(
            f"no kernel image {image} for release {name!r}: "
            f"apt-get install linux-image-{name} (kernels with headers here: {have}; "
            f"or `--kernel {DEBUG_KERNEL_NAME}` after `make debug-kernel`)"
        )
    return GuestKernel(name, name, image, kernel_headers_dir(name), Path(f"/lib/modules/{name}"))


def module_path(release: str) -> Path:
    """Where :func:`build_module` puts the module built for ``release``."""
    return BUILD_DIR / "kmod" / release / f"{MODULE_NAME}.ko"


def _module_sources() -> list[Path]:
    return [f for f in KMOD_DIR.iterdir() if f.is_file() and f.suffix in (".c", ".h", "")]


def module_is_stale(release: str) -> bool:
    """True if the module for ``release`` is missing, older than a source file in kmod/, or
    older than the kernel tree it is built against (a rebuilt debug kernel keeps its release)."""
    ko = module_path(release)
    if not ko.exists():
        return True
    built = ko.stat().st_mtime
    inputs = _module_sources()
    headers = kernel_headers_dir(release)
    if headers is not None:
        inputs += [p for p in (headers / "Module.symvers", headers / ".config") if p.exists()]
    return any(f.stat().st_mtime > built for f in inputs)


def ensure_module(release: str) -> Path:
    """The module for ``release``, (re)built if it is missing or older than its inputs."""
    if module_is_stale(release):
        return build_module(release)
    return module_path(release)


def build_module(release: str) -> Path:
    """Build the module for ``release`` (``make -C kmod release KREL=<release> KDIR=<headers>``)
    and return ``build/kmod/<release>/nsmigrate.ko``. Builds for one release are serialized."""
    kdir = kernel_headers_dir(release)
    if kdir is None:
        raise TestbedError(
            f"cannot build the module for {release}: its headers are not installed: "
            f"apt-get install linux-headers-{release} (or run `make setup`)"
        )
    if shutil.which("make") is None or shutil.which("gcc") is None:
        raise TestbedError("cannot build the module: make/gcc missing: run `make setup`")
    cmd = ["make", "-C", str(KMOD_DIR), "release", f"KREL={release}", f"KDIR={kdir}"]
    ko = module_path(release)
    (BUILD_DIR / "kmod").mkdir(parents=True, exist_ok=True)
    with open(BUILD_DIR / "kmod" / f".lock-{release}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
    if proc.returncode != 0 or not ko.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise TestbedError(
            f"building the module for {release} failed (`{shlex.join(cmd)}` exited "
            f"{proc.returncode}{'' if ko.exists() else f', no {ko}'}):\n{tail}"
        )
    ko.touch()  # kbuild may leave an up-to-date .ko untouched: mark it as checked now
    return ko
