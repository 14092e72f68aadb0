"""The debug guest kernel: built once from Debian's linux-source-6.12, cached outside the clone.

``make debug-kernel`` (``nsexp debug-kernel``) extracts /usr/src/linux-source-6.12.tar.xz, then
configures it as virtme-ng does for a guest (``virtme-configkernel --defconfig``:
x86_64_defconfig + virtme-ng's guest options) with the repository's fragment
tools/debug-kernel.config on top (KASAN, lockdep, kmemleak, UBSAN, KFENCE, fault injection),
and builds it out of tree. The build folder doubles as the kbuild tree the module is built
against (``make -C <build> M=...``). Everything lives under
``~/.cache/nsexp/kernels/<source version>-<config hash>/``; the hash covers the fragment,
virtme-ng's configuration step and the base config, so a change of any rebuilds, and a second
``make test`` reuses the build. A build prints a progress line every 30 s.

Runs on the host (the guest imports this file through nsexp.testbed: standard library only).
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nsexp.testbed.interface import REPO_ROOT, TestbedError

SOURCE_PACKAGE = "linux-source-6.12"
SOURCE_TARBALL = Path(f"/usr/src/{SOURCE_PACKAGE}.tar.xz")
FRAGMENT = REPO_ROOT / "tools" / "debug-kernel.config"
#: virtme-configkernel's mode: x86_64_defconfig + virtme-ng's options (see README, "The debug
#: kernel", for why not tinyconfig)
BASE_CONFIG = "defconfig"
#: bump when the build steps change in a way that changes the result
RECIPE_VERSION = "1"
#: the stamp written when a build has finished; its absence means "not built"
COMPLETE = "complete.json"
PROGRESS_EVERY_S = 30.0
#: on every boot of the debug kernel. ``no5lvl``: 6.12's identify_cpu() clears the boot CPU's
#: feature bits for a moment, LA57 among them, and with 5-level paging (QEMU's TCG CPU has it)
#: KASAN then takes a direct-map address for a wild one in an interrupt that lands in that
#: window. Seen once at boot: "BUG: KASAN: wild-memory-access in do_raw_spin_lock", which
#: turned lockdep off and, KASAN reporting only its first bug, silenced KASAN for the rest of
#: the boot. ``kasan_multi_shot``: every KASAN report is printed, not only the first.
BOOT_ARGS = ("no5lvl", "kasan_multi_shot")

_OBJECT_LINE = re.compile(r"^\s+(CC|AS|LD|AR|OBJCOPY)(\s\[M\])?\s+(\S+)")


@dataclass(frozen=True)
class DebugKernel:
    """A finished debug kernel build in the cache."""

    dir: Path
    release: str
    build_seconds: float

    @property
    def build_dir(self) -> Path:
        """The kbuild output tree: ``make -C <build_dir> M=<module dir> modules``."""
        return self.dir / "build"

    @property
    def image(self) -> Path:
        """A copy of the build's bzImage outside the build tree: given the image inside it,
        vng would treat the tree as a kernel source folder and prepare its modules."""
        return self.dir / "bzImage"

    @property
    def built_image(self) -> Path:
        return self.build_dir / "arch" / "x86" / "boot" / "bzImage"


def cache_root() -> Path:
    """``$NSEXP_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/nsexp/kernels`` (~/.cache/...)."""
    if os.environ.get("NSEXP_KERNEL_CACHE"):
        return Path(os.environ["NSEXP_KERNEL_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "nsexp" / "kernels"


@functools.lru_cache(maxsize=1)
def source_version() -> str:
    """Debian's version of the source package (``6.12.95-1~bpo12+1``), or the tarball's size
    and mtime when dpkg cannot tell."""
    try:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", SOURCE_PACKAGE],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    if SOURCE_TARBALL.exists():
        st = SOURCE_TARBALL.stat()
        return f"tar{st.st_size}-{int(st.st_mtime)}"
    return "none"


def _configkernel_script() -> Path | None:
    """virtme-ng's configuration step (its source is part of the cache key)."""
    try:
        spec = importlib.util.find_spec("virtme.commands.configkernel")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        return Path(spec.origin)
    return None


_NOT_SET = re.compile(r"^# CONFIG_\w+ is not set$")


def _fragment_settings() -> list[str]:
    """The fragment's lines that set something (``# CONFIG_X is not set`` included): editing
    a comment does not change the cache key, so it does not cost a rebuild."""
    lines = (line.strip() for line in FRAGMENT.read_text().splitlines())
    return [line for line in lines if line and (not line.startswith("#") or _NOT_SET.match(line))]


@functools.lru_cache(maxsize=1)
def config_hash() -> str:
    """12 hex digits over everything that decides the .config: recipe, base, fragment and
    virtme-ng's configuration step."""
    h = hashlib.sha256(f"nsexp-debug-kernel/{RECIPE_VERSION}\0{BASE_CONFIG}\0".encode())
    h.update("\n".join(_fragment_settings()).encode() + b"\0")
    script = _configkernel_script()
    h.update(script.read_bytes() if script else b"no virtme-ng")
    return h.hexdigest()[:12]


def cache_dir() -> Path:
    """``<cache root>/<source version>-<config hash>``: where this tree's debug kernel lives."""
    return cache_root() / f"{source_version()}-{config_hash()}"


def built() -> DebugKernel | None:
    """The finished build for this tree's config, or None."""
    d = cache_dir()
    try:
        info = json.loads((d / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    kernel = DebugKernel(d, info["release"], float(info.get("build_seconds", 0)))
    if not kernel.built_image.exists():
        return None
    if (
        not kernel.image.exists()
        or kernel.image.stat().st_mtime < kernel.built_image.stat().st_mtime
    ):
        tmp = kernel.image.with_suffix(f".tmp{os.getpid()}")
        shutil.copy2(kernel.built_image, tmp)
        tmp.replace(kernel.image)
    return kernel


def _log(msg: str) -> None:
    print(f"debug-kernel: {msg}", file=sys.stderr, flush=True)


def _source_tree() -> Path:
    """The extracted source (shared by every config of one source version)."""
    tree = cache_root() / "src" / source_version() / SOURCE_PACKAGE
    if (tree / "Makefile").exists():
        return tree
    if not SOURCE_TARBALL.exists():
        raise TestbedError(
            f"{SOURCE_TARBALL} is missing: apt-get install {SOURCE_PACKAGE} (or run `make setup`)"
        )
    tmp = tree.parent / f".extract-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _log(f"extracting {SOURCE_TARBALL} (about 15 s)")
    subprocess.run(["tar", "-xJf", str(SOURCE_TARBALL), "-C", str(tmp)], check=True)
    (tmp / SOURCE_PACKAGE).rename(tree)
    tmp.rmdir()
    return tree


def _virtme_configkernel() -> str:
    here = Path(sys.executable).parent / "virtme-configkernel"
    found = str(here) if here.exists() else shutil.which("virtme-configkernel")
    if not found:
        raise TestbedError(
            "virtme-ng's virtme-configkernel is not installed: run `make setup` "
            "(pip install virtme-ng)"
        )
    return found


def _wanted_options() -> dict[str, str]:
    """The fragment's options: {"CONFIG_X": "y" | "n" | value}."""
    wanted = {}
    for line in FRAGMENT.read_text().splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line) or re.match(r"^# (CONFIG_\w+) is not set", line)
        if m:
            wanted[m.group(1)] = m.group(2) if m.lastindex == 2 else "n"
    return wanted


def config_mismatches(dot_config: str) -> list[str]:
    """Options of the fragment that `make olddefconfig` did not keep (unmet dependencies)."""
    have = {}
    for line in dot_config.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            have[m.group(1)] = m.group(2)
    bad = []
    for name, value in _wanted_options().items():
        got = have.get(name, "n")
        if got != value:
            bad.append(f"{name}: wanted {value}, got {got}")
    return bad


def _configure(src: Path, build: Path) -> None:
    build.mkdir(parents=True, exist_ok=True)
    cmd = [_virtme_configkernel(), "--defconfig", "--custom", str(FRAGMENT), f"O={build}"]
    proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    (build.parent / "configure.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise TestbedError(
            f"configuring the debug kernel failed ({' '.join(cmd)}); see "
            f"{build.parent / 'configure.log'}:\n{_tail(proc.stdout + proc.stderr)}"
        )
    bad = config_mismatches((build / ".config").read_text())
    if bad:
        raise TestbedError(
            f"the debug kernel's config lost options of {FRAGMENT} (unmet dependencies: fix "
            "the fragment):\n  " + "\n  ".join(bad)
        )


def _tail(text: str, n: int = 30) -> str:
    return "\n".join(text.splitlines()[-n:])


def _reference_objects() -> int | None:
    """Objects compiled by an earlier build of any config (for a rough percentage)."""
    counts = []
    for stamp in cache_root().glob(f"*/{COMPLETE}"):
        try:
            counts.append(int(json.loads(stamp.read_text()).get("objects", 0)))
        except (OSError, ValueError):
            pass
    counts = [c for c in counts if c > 0]
    return max(counts) if counts else None


def _make(src: Path, build: Path, jobs: int) -> int:
    """Run the build, printing progress every 30 s; return the number of objects built."""
    log_path = build.parent / "build.log"
    cmd = ["nice", "-n", "19", "make", f"O={build}", f"-j{jobs}", "all"]
    total = _reference_objects()
    t0 = time.monotonic()
    count, last, next_report = 0, "", t0 + PROGRESS_EVERY_S
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=src,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            m = _OBJECT_LINE.match(line)
            if m:
                count += 1
                last = m.group(3)
            now = time.monotonic()
            if now >= next_report:
                done = f"{count}/~{total}" if total else str(count)
                _log(f"{_mmss(now - t0)} elapsed, {done} objects built (last: {last})")
                next_report = now + PROGRESS_EVERY_S
        rc = proc.wait()
    if rc != 0:
        raise TestbedError(
            f"building the debug kernel failed (`{' '.join(cmd)}` in {src} exited {rc}); "
            f"see {log_path}:\n{_tail(log_path.read_text())}"
        )
    return count


def _children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _mmss(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def ensure(*, jobs: int | None = None) -> DebugKernel:
    """The debug kernel, built first if the cache has no finished build for this config.
    Concurrent callers wait for one build (a lock in the cache root)."""
    found = built()
    if found is not None:
        return found
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    d = cache_dir()
    with open(root / f".lock-{d.name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = built()
        if found is not None:
            return found
        jobs = jobs or os.cpu_count() or 1
        t0 = time.monotonic()
        cpu0 = _children_cpu_seconds()
        # an interrupted build goes on where it stopped: say so in the record
        resumed = (d / "build" / ".config").exists()
        _log(f"building into {d} with {jobs} jobs (cold: about 12 min on an idle 2-core machine)")
        src = _source_tree()
        _configure(src, d / "build")
        objects = _make(src, d / "build", jobs)
        seconds = time.monotonic() - t0
        release = (d / "build" / "include" / "config" / "kernel.release").read_text().strip()
        info = {
            "release": release,
            "source_package": SOURCE_PACKAGE,
            "source_version": source_version(),
            "config_hash": config_hash(),
            "base_config": BASE_CONFIG,
            "build_seconds": round(seconds, 1),
            "cpu_seconds": round(_children_cpu_seconds() - cpu0, 1),
            "resumed": resumed,
            "objects": objects,
            "jobs": jobs,
            "cpus": os.cpu_count(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (d / COMPLETE).write_text(json.dumps(info, indent=2) + "\n")
        _log(f"built {release} in {_mmss(seconds)} ({objects} objects): {d}")
    found = built()
    assert found is not None
    return found


# ---------------------------------------------------------------------------------------------
# CLI: `nsexp debug-kernel`
# ---------------------------------------------------------------------------------------------


def cmd_debug_kernel(args: argparse.Namespace) -> int:
    if args.status:
        found = built()
        print(f"{found.release} {found.dir}" if found else f"not built ({cache_dir()})")
        return 0 if found else 1
    kernel = ensure(jobs=args.jobs)
    print(
        f"debug kernel {kernel.release}: {kernel.image} "
        f"(built in {_mmss(kernel.build_seconds)}); boot it with --kernel debug"
    )
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "debug-kernel",
        help="build (or reuse from the cache) the debug guest kernel: KASAN, lockdep, kmemleak",
    )
    p.add_argument("--jobs", "-j", type=int, default=None, help="make -j (default: all CPUs)")
    p.add_argument(
        "--status", action="store_true", help="only say whether it is built (exit 1 if not)"
    )
    p.set_defaults(func=cmd_debug_kernel)
