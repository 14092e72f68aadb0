"""Testbeds: where nsexp runs commands next to the kernel module.

Two testbeds share one interface (:class:`Testbed`):

* ``vm`` (:class:`VMTestbed`): boots a Debian kernel from ``/boot`` in QEMU through virtme-ng,
  under TCG (``--disable-kvm``), with the host filesystem shared copy-on-write and one output
  folder shared writable (``--rwdir``). The module built for that kernel
  (``build/kmod/<release>/nsmigrate.ko``) is loaded, a batch of commands runs in one boot, and
  each command's exit status, output and the files it wrote come back through that folder,
  together with the kernel log of the boot. The guest console is not trusted for results.
* ``native`` (:class:`NativeTestbed`): the same interface on this host, for a machine where the
  module is loaded (``/dev/nsmigrate`` exists, for example installed through DKMS).

This module is imported inside the guest too: standard library only.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
KMOD_DIR = REPO_ROOT / "kmod"
BUILD_DIR = REPO_ROOT / "build"
VM_RUNS_DIR = BUILD_DIR / "vm-runs"
MODULE_NAME = "nsmigrate"
DEVICE_PATH = "/dev/nsmigrate"

#: PATH in the guest: the distribution's tools and its plain ``python3`` (standard library).
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Subfolder of the output folder where the testbed keeps its own files (script, per-command
#: output, exit statuses, kernel logs). Commands write their results to ``$NSEXP_OUT`` itself.
META_DIR = "testbed"


class TestbedError(RuntimeError):
    """A testbed could not do what was asked; the message names the fix.

    ``result`` carries what was collected before the failure, when there is any (for example the
    output of the commands that finished before the guest crashed).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, message: str, *, result: BatchResult | None = None):
        super().__init__(message)
        self.result = result


@dataclass
class CommandResult:
    """One command of a batch. ``returncode`` is None if the command never finished."""

    command: str
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass
class BatchResult:
    """What one batch (one boot, for the VM) produced."""

    testbed: str
    kernel_release: str
    out_dir: Path
    results: list[CommandResult]
    #: kernel log of the whole boot, read after the commands and after ``rmmod``
    dmesg: str
    module_loaded: bool
    #: ``rmmod`` succeeded; None if no module was loaded (or, natively, never unloaded)
    module_unloaded: bool | None
    boot_log: str
    duration_s: float = field(default=0.0)

    def kernel_log_problems(self) -> list[str]:
        return kernel_log_problems(self.dmesg)

    def __iter__(self):
        return iter(self.results)

    def __getitem__(self, i: int) -> CommandResult:
        return self.results[i]


# ---------------------------------------------------------------------------------------------
# Kernel log
# ---------------------------------------------------------------------------------------------

_PROBLEM_PATTERNS = [
    re.compile(p)
    for p in (
        r"BUG:",
        r"\bBUG \S+ \(",  # SLUB: "BUG kmalloc-64 (Tainted: ...): ..."
        r"WARNING:",
        r"\bOops\b",
        r"refcount_t",
        r"(?i)\bleak",
        r"possible circular locking",
        r"possible recursive locking",
        r"INFO: ",
        r"list_add corruption",
        r"list_del corruption",
        r"general protection fault",
        r"Call Trace",
        r"Kernel panic",
        r"UBSAN:",
        r"KASAN:",
        r"unreferenced object",
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
    )
]


def kernel_log_problems(dmesg: str) -> list[str]:
    """Lines of a kernel log that report a problem: BUG, WARNING, Oops, refcount, leaks,
    lockdep reports, list corruption, general protection faults, call traces, panics."""
    problems = []
    for line in dmesg.splitlines():
        if any(p.search(line) for p in _PROBLEM_PATTERNS) and not any(
            b.search(line) for b in _BENIGN_PATTERNS
        ):
            problems.append(line.strip())
    return problems


# ---------------------------------------------------------------------------------------------
# Kernels and the module
# ---------------------------------------------------------------------------------------------


def _version_key(release: str) -> tuple:
    """Sort key for kernel releases: '6.12.117+deb12-amd64' > '6.1.0-56-amd64'."""
    return tuple(int(n) for n in re.findall(r"\d+", release))


def kernel_headers_dir(release: str) -> Path | None:
    """The kbuild directory for ``release``, or None if its headers are not installed."""
    for d in (Path(f"/lib/modules/{release}/build"), Path(f"/usr/src/linux-headers-{release}")):
        if (d / "Makefile").exists():
            return d
    return None


def available_kernels() -> list[str]:
    """Releases with both ``/boot/vmlinuz-R`` and headers installed, oldest first."""
    releases = []
    for img in Path("/boot").glob("vmlinuz-*"):
        rel = img.name[len("vmlinuz-") :]
        if kernel_headers_dir(rel) is not None:
            releases.append(rel)
    return sorted(releases, key=_version_key)


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


def module_path(release: str) -> Path:
    """Where :func:`build_module` puts the module built for ``release``."""
    return BUILD_DIR / "kmod" / release / f"{MODULE_NAME}.ko"


def _module_sources() -> list[Path]:
    return [f for f in KMOD_DIR.iterdir() if f.is_file() and f.suffix in (".c", ".h", "")]


def module_is_stale(release: str) -> bool:
    """True if the module for ``release`` is missing or older than a source file in kmod/."""
    ko = module_path(release)
    if not ko.exists():
        return True
    built = ko.stat().st_mtime
    return any(f.stat().st_mtime > built for f in _module_sources())


def ensure_module(release: str) -> Path:
    """The module for ``release``, (re)built if it is missing or older than its sources."""
    if module_is_stale(release):
        return build_module(release)
    return module_path(release)


def build_module(release: str) -> Path:
    """Build the module for ``release`` (``make -C kmod release KREL=<release>``) and return
    ``build/kmod/<release>/nsmigrate.ko``. Builds for one release are serialized by a lock."""
    if kernel_headers_dir(release) is None:
        raise TestbedError(
            f"cannot build the module for {release}: its headers are not installed: "
            f"apt-get install linux-headers-{release} (or run `make setup`)"
        )
    if not (KMOD_DIR / "Makefile").exists():
        raise TestbedError(
            f"cannot build the module: {KMOD_DIR}/Makefile does not exist yet "
            "(the kernel module is not in this tree)"
        )
    if shutil.which("make") is None or shutil.which("gcc") is None:
        raise TestbedError("cannot build the module: make/gcc missing: run `make setup`")
    cmd = ["make", "-C", str(KMOD_DIR), "release", f"KREL={release}"]
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


def find_vng() -> str:
    """Path of virtme-ng's ``vng``: next to this interpreter (the venv) first, then PATH."""
    here = Path(sys.executable).parent / "vng"
    if here.exists():
        return str(here)
    found = shutil.which("vng")
    if found:
        return found
    raise TestbedError(
        "virtme-ng (`vng`) is not installed: run `make setup` "
        "(or pip install virtme-ng into the environment that runs nsexp)"
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def vm_processes(marker: str) -> list[int]:
    """PIDs of vng/virtme/qemu processes whose command line contains ``marker``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        cmdline = b" ".join(argv).decode(errors="replace")
        if marker in cmdline and any(k in cmdline for k in ("qemu-system", "vng", "virtme")):
            pids.append(int(d.name))
    return pids


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ---------------------------------------------------------------------------------------------
# Testbeds
# ---------------------------------------------------------------------------------------------


class Testbed(ABC):
    """Runs a batch of shell commands next to the kernel module and returns their results.

    Commands run with ``bash -c`` in the repository root with ``PYTHONPATH`` set to it,
    ``NSEXP_OUT`` set to the output folder (write result files there) and ``NSEXP_TESTBED`` set
    to the testbed's name.
    """

    __test__ = False
    name: str = ""

    @abstractmethod
    def kernel_release(self) -> str: ...

    @abstractmethod
    def run_batch(
        self,
        commands: Sequence[str],
        *,
        out_dir: Path | None = None,
        timeout: float = 900,
        command_timeout: float | None = None,
        load_module: bool = True,
        env: Mapping[str, str] | None = None,
        kernel_args: Sequence[str] = (),
    ) -> BatchResult:
        """Run ``commands`` in one batch; ``kernel_args`` are extra kernel command line
        arguments for this boot (VM only; the native testbed refuses them)."""

    def run(self, command: str, **kwargs) -> CommandResult:
        """Run one command (one boot for the VM)."""
        return self.run_batch([command], **kwargs).results[0]

    @staticmethod
    def _prepare_out_dir(out_dir: Path | None) -> Path:
        if out_dir is None:
            VM_RUNS_DIR.mkdir(parents=True, exist_ok=True)
            out_dir = Path(
                tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=VM_RUNS_DIR)
            )
        out_dir = Path(out_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = out_dir / META_DIR
        if meta.exists():
            shutil.rmtree(meta)  # results of an earlier batch must not be read as this one's
        meta.mkdir()
        return out_dir

    @staticmethod
    def _check_env(env: Mapping[str, str] | None) -> dict[str, str]:
        env = dict(env or {})
        for k in env:
            if not _ENV_NAME.match(k):
                raise TestbedError(f"invalid environment variable name {k!r}")
        return env


class VMTestbed(Testbed):
    """A Debian kernel booted in QEMU (TCG) through virtme-ng; one boot per batch."""

    name = "vm"

    def __init__(
        self,
        kernel: str | None = None,
        *,
        memory: str = "2G",
        cpus: int = 2,
        kernel_args: Sequence[str] = (),
    ):
        self.kernel = kernel or os.environ.get("NSEXP_KERNEL") or default_kernel()
        self.memory = memory
        self.cpus = cpus
        #: extra kernel command line arguments for every boot (vng --append)
        self.kernel_args = list(kernel_args)
        self.image = Path(f"/boot/vmlinuz-{self.kernel}")
        if not self.image.exists():
            have = ", ".join(available_kernels()) or "none"
            raise TestbedError(
                f"no kernel image {self.image} for release {self.kernel!r}: "
                f"apt-get install linux-image-{self.kernel} (kernels with headers here: {have})"
            )

    def __repr__(self) -> str:
        extra = f", kernel_args={self.kernel_args!r}" if self.kernel_args else ""
        return f"VMTestbed(kernel={self.kernel!r}, memory={self.memory!r}, cpus={self.cpus}{extra})"

    def kernel_release(self) -> str:
        return self.kernel

    def check(self, *, load_module: bool = True) -> str:
        """Raise TestbedError naming the fix if something the VM needs is missing; return the
        path of ``vng``."""
        if shutil.which("qemu-system-x86_64") is None:
            raise TestbedError(
                "qemu-system-x86_64 is not installed: run `make setup` "
                "(or apt-get install qemu-system-x86)"
            )
        vng = find_vng()
        if not os.access(self.image, os.R_OK):
            raise TestbedError(
                f"cannot read {self.image} (Debian installs kernel images mode 0600): "
                "run as root, or chmod a+r it"
            )
        if (
            not Path(f"/lib/modules/{self.kernel}/modules.dep").exists()
            and not Path(f"/lib/modules/{self.kernel}/kernel").is_dir()
        ):
            raise TestbedError(
                f"/lib/modules/{self.kernel} is missing (the guest needs its virtio/9p modules): "
                f"apt-get install --reinstall linux-image-{self.kernel}"
            )
        if load_module and kernel_headers_dir(self.kernel) is None:
            raise TestbedError(
                f"headers for {self.kernel} are not installed, so the module cannot be built: "
                f"apt-get install linux-headers-{self.kernel} (or run `make setup`)"
            )
        return vng

    def vng_command(
        self,
        vng: str,
        *,
        rwdirs: Sequence[Path] = (),
        exec_: str | None = None,
        kernel_args: Sequence[str] = (),
    ):
        cmd = [
            vng,
            "--run",
            str(self.image),
            "--disable-kvm",
            "--cpus",
            str(self.cpus),
            "--memory",
            self.memory,
        ]
        for d in rwdirs:
            cmd += ["--rwdir", str(d)]
        for arg in [*self.kernel_args, *kernel_args]:
            cmd += ["--append", arg]
        if exec_ is not None:
            cmd += ["--exec", exec_]
        return cmd

    def _vng_env(self, vng: str) -> dict[str, str]:
        env = dict(os.environ)
        # vng execs virtme-run, which lives next to it
        env["PATH"] = str(Path(vng).parent) + os.pathsep + env.get("PATH", "")
        return env

    def _guest_script(
        self,
        commands: Sequence[str],
        out_dir: Path,
        *,
        command_timeout: float | None,
        load_module: bool,
        env: Mapping[str, str],
    ) -> str:
        q = shlex.quote
        meta = out_dir / META_DIR
        ko = module_path(self.kernel)
        lines = [
            "#!/bin/bash",
            "# Generated by nsexp.testbed.VMTestbed: runs one batch inside the guest.",
            f"M={q(str(meta))}",
            'echo started > "$M/started"',
            f"export PATH={q(GUEST_PATH)}",
            f"export PYTHONPATH={q(str(REPO_ROOT))}",
            f"export NSEXP_OUT={q(str(out_dir))}",
            "export NSEXP_TESTBED=vm",
            "export PYTHONDONTWRITEBYTECODE=1",
        ]
        lines += [f"export {k}={q(v)}" for k, v in env.items()]
        lines += [
            f'cd {q(str(REPO_ROOT))} || echo "cannot cd to the repository" >> "$M/errors"',
            'uname -r > "$M/uname"',
        ]
        if load_module:
            lines += [
                f'insmod {q(str(ko))} > "$M/insmod.out" 2>&1',
                'echo $? > "$M/insmod.rc"',
            ]
        for i, command in enumerate(commands):
            p = f'"$M/cmd-{i:03d}'
            run = f"bash -c {q(command)}"
            if command_timeout is not None:
                run = f"timeout --kill-after=10 {command_timeout:.3f} {run}"
            lines += [
                f'date +%s.%N > {p}.start"',
                f'{run} < /dev/null > {p}.out" 2> {p}.err"',
                f'echo $? > {p}.rc"',
                f'date +%s.%N > {p}.end"',
            ]
        lines += ['dmesg > "$M/dmesg-before-rmmod.txt" 2>&1']
        if load_module:
            lines += [
                'if [ "$(cat "$M/insmod.rc")" = 0 ]; then',
                f'  rmmod {MODULE_NAME} > "$M/rmmod.out" 2>&1',
                '  echo $? > "$M/rmmod.rc"',
                "fi",
            ]
        lines += [
            'dmesg > "$M/dmesg.txt" 2>&1',
            "sync",
            'echo done > "$M/done"',
            "exit 0",
        ]
        return "\n".join(lines) + "\n"

    def run_batch(
        self,
        commands: Sequence[str],
        *,
        out_dir: Path | None = None,
        timeout: float = 900,
        command_timeout: float | None = None,
        load_module: bool = True,
        env: Mapping[str, str] | None = None,
        kernel_args: Sequence[str] = (),
    ) -> BatchResult:
        commands = list(commands)
        env = self._check_env(env)
        vng = self.check(load_module=load_module)
        if load_module:
            ensure_module(self.kernel)
        out_dir = self._prepare_out_dir(out_dir)
        meta = out_dir / META_DIR
        script = meta / "guest.sh"
        script.write_text(
            self._guest_script(
                commands, out_dir, command_timeout=command_timeout, load_module=load_module, env=env
            )
        )
        cmd = self.vng_command(
            vng,
            rwdirs=[out_dir],
            exec_=f"bash {shlex.quote(str(script))}",
            kernel_args=kernel_args,
        )
        (meta / "vng-command").write_text(shlex.join(cmd) + "\n")
        console_path = out_dir / "console.log"

        t0 = time.monotonic()
        for attempt in (1, 2):
            with open(console_path, "wb") as console:
                proc = subprocess.Popen(
                    cmd,
                    cwd=REPO_ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    env=self._vng_env(vng),
                    start_new_session=True,
                )
                timed_out = False
                try:
                    try:
                        vng_rc = proc.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        timed_out = True
                finally:
                    _kill_vm(proc, str(out_dir))
            boot_log = _read(console_path) or ""
            # Seen on a loaded host: vng exits (255) at once, printing nothing, before QEMU
            # boots. Nothing ran, so one more boot is safe; anything else is reported as is.
            never_booted = not boot_log.strip() and _read(meta / "started") is None
            if timed_out or not never_booted or attempt == 2:
                break
            (meta / "retried").write_text(f"vng exited {vng_rc} with no output; booted again\n")
        duration = time.monotonic() - t0
        if timed_out:
            raise TestbedError(
                f"the VM ({self.kernel}) timed out after {timeout:g} s and was killed; "
                f"raise the timeout or look at {console_path}",
                result=self._collect(
                    commands, out_dir, load_module, boot_log, duration, cmd_to=None
                ),
            )
        result = self._collect(
            commands, out_dir, load_module, boot_log, duration, cmd_to=command_timeout
        )
        if _read(meta / "started") is None:
            raise TestbedError(
                f"the VM ({self.kernel}) did not run the batch script (vng exited {vng_rc}); "
                f"see {console_path}:\n{_tail(boot_log)}",
                result=result,
            )
        if _read(meta / "done") is None:
            raise TestbedError(
                f"the VM ({self.kernel}) stopped before the batch finished (vng exited {vng_rc}: "
                f"kernel panic or crash?); see {console_path}:\n{_tail(boot_log)}",
                result=result,
            )
        return result

    def _collect(
        self,
        commands: Sequence[str],
        out_dir: Path,
        load_module: bool,
        boot_log: str,
        duration: float,
        cmd_to: float | None,
    ) -> BatchResult:
        meta = out_dir / META_DIR
        results = []
        for i, command in enumerate(commands):
            p = meta / f"cmd-{i:03d}"
            rc = _read_int(p.with_suffix(".rc"))
            try:
                start = float((_read(p.with_suffix(".start")) or "").strip())
                end = float((_read(p.with_suffix(".end")) or "").strip())
                dur = max(0.0, end - start)
            except ValueError:
                dur = 0.0
            timed_out = cmd_to is not None and rc in (124, 137) and dur >= 0.9 * cmd_to
            results.append(
                CommandResult(
                    command=command,
                    returncode=rc,
                    stdout=_read(p.with_suffix(".out")) or "",
                    stderr=_read(p.with_suffix(".err")) or "",
                    timed_out=timed_out,
                    duration_s=dur,
                )
            )
        dmesg = _read(meta / "dmesg.txt") or _read(meta / "dmesg-before-rmmod.txt")
        if dmesg is None:
            dmesg = boot_log  # the guest died before reading its log: the console is all we have
        module_loaded = load_module and _read_int(meta / "insmod.rc") == 0
        rmmod_rc = _read_int(meta / "rmmod.rc")
        module_unloaded = None if not module_loaded else rmmod_rc == 0
        log = boot_log
        for name in ("insmod.out", "rmmod.out", "errors"):
            text = _read(meta / name)
            if text:
                log += f"\n--- {name} ---\n{text}"
        return BatchResult(
            testbed=self.name,
            kernel_release=(_read(meta / "uname") or self.kernel).strip(),
            out_dir=out_dir,
            results=results,
            dmesg=dmesg,
            module_loaded=module_loaded,
            module_unloaded=module_unloaded,
            boot_log=log,
            duration_s=duration,
        )

    def shell(self, *, load_module: bool = True, kernel_args: Sequence[str] = ()) -> int:
        """An interactive shell in the VM (with the module loaded); returns vng's exit status.

        vng's own interactive console (a real tty with job control) runs a wrapper given as the
        user's shell: it loads the module, then execs bash with a small rc file."""
        vng = self.check(load_module=load_module)
        ko = ensure_module(self.kernel) if load_module else None
        d = BUILD_DIR / "vm-shell" / self.kernel
        d.mkdir(parents=True, exist_ok=True)
        q = shlex.quote
        rcfile = d / "bashrc"
        rcfile.write_text(
            "\n".join(
                [
                    f"export PATH={q(GUEST_PATH)}",
                    f"export PYTHONPATH={q(str(REPO_ROOT))}",
                    "export NSEXP_TESTBED=vm",
                    f"cd {q(str(REPO_ROOT))}",
                    f"PS1='[nsexp-vm {self.kernel}] \\w# '",
                ]
            )
            + "\n"
        )
        wrapper = d / "shell.sh"
        lines = ["#!/bin/bash"]
        if ko is not None:
            lines += [
                f"if insmod {q(str(ko))}; then",
                f"  echo 'nsexp: {MODULE_NAME} loaded ({DEVICE_PATH}); "
                f"rmmod {MODULE_NAME} unloads it'",
                "else",
                f"  echo 'nsexp: insmod {ko.name} failed (see dmesg)'",
                "fi",
            ]
        lines += [f"exec /bin/bash --rcfile {q(str(rcfile))} -i"]
        wrapper.write_text("\n".join(lines) + "\n")
        wrapper.chmod(0o755)
        cmd = self.vng_command(vng, kernel_args=kernel_args) + ["--shell", str(wrapper)]
        try:
            return subprocess.call(cmd, cwd=REPO_ROOT, env=self._vng_env(vng))
        except KeyboardInterrupt:
            return 130


def _tail(text: str, n: int = 30) -> str:
    return "\n".join(text.splitlines()[-n:])


def _kill_vm(proc: subprocess.Popen, marker: str) -> None:
    """Make sure nothing of a VM boot survives: its process group (vng, virtme-run, qemu) and
    any stray process whose command line names the run's folder."""
    if proc.poll() is None:
        for sig, grace in ((signal.SIGINT, 5.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    # the group itself may hold processes even when its leader (vng) has exited
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in vm_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait()


class NativeTestbed(Testbed):
    """This host, with the module loaded here (``/dev/nsmigrate`` exists)."""

    name = "native"

    def __init__(self, *, device: str = DEVICE_PATH):
        self.device = device

    def __repr__(self) -> str:
        return f"NativeTestbed(device={self.device!r})"

    def kernel_release(self) -> str:
        return os.uname().release

    def run_batch(
        self,
        commands: Sequence[str],
        *,
        out_dir: Path | None = None,
        timeout: float = 900,
        command_timeout: float | None = None,
        load_module: bool = True,
        env: Mapping[str, str] | None = None,
        kernel_args: Sequence[str] = (),
    ) -> BatchResult:
        commands = list(commands)
        extra = self._check_env(env)
        if kernel_args:
            raise TestbedError(
                f"the native testbed cannot change its kernel's command line ({kernel_args}); "
                "use --testbed vm"
            )
        if load_module and not os.path.exists(self.device):
            raise TestbedError(
                f"the module is not loaded on this host ({self.device} does not exist); "
                "use --testbed vm, or install it with DKMS (kmod/dkms.conf)"
            )
        out_dir = self._prepare_out_dir(out_dir)
        run_env = dict(os.environ)
        pythonpath = run_env.get("PYTHONPATH")
        run_env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pythonpath if pythonpath else "")
        run_env.update(NSEXP_OUT=str(out_dir), NSEXP_TESTBED=self.name, **extra)
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        results: list[CommandResult] = []

        def partial() -> BatchResult:
            return BatchResult(
                self.name, self.kernel_release(), out_dir, list(results), "", load_module, None, ""
            )

        for command in commands:
            remaining = deadline - time.monotonic()
            at_deadline = command_timeout is None or remaining <= command_timeout
            if remaining <= 0:
                raise TestbedError(
                    f"the native batch timed out after {timeout:g} s", result=partial()
                )
            limit = remaining if at_deadline else command_timeout
            results.append(_run_native(command, run_env, limit))
            if results[-1].timed_out and at_deadline:
                raise TestbedError(
                    f"the native batch timed out after {timeout:g} s (in {command!r})",
                    result=partial(),
                )
        dmesg = ""
        try:
            proc = subprocess.run(
                ["dmesg"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30
            )
            if proc.returncode == 0:
                dmesg = proc.stdout
        except (OSError, subprocess.TimeoutExpired):
            pass
        return BatchResult(
            testbed=self.name,
            kernel_release=self.kernel_release(),
            out_dir=out_dir,
            results=results,
            dmesg=dmesg,
            module_loaded=load_module,
            module_unloaded=None,
            boot_log="",
            duration_s=time.monotonic() - t0,
        )


def _run_native(command: str, env: Mapping[str, str], limit: float) -> CommandResult:
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["bash", "-c", command],
        cwd=REPO_ROOT,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
        errors="replace",
    )
    timed_out = False
    try:
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return CommandResult(
        command=command,
        returncode=None if timed_out else proc.returncode,
        stdout=out,
        stderr=err,
        timed_out=timed_out,
        duration_s=time.monotonic() - t0,
    )


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
# CLI: `nsexp vm-shell`, `nsexp testbed-check`
# ---------------------------------------------------------------------------------------------


def _cmd_vm_shell(args: argparse.Namespace) -> int:
    tb = VMTestbed(args.kernel, memory=args.memory, cpus=args.cpus, kernel_args=args.append)
    print(f"nsexp: booting {tb.kernel} under TCG (about a minute); `exit` leaves the VM")
    return tb.shell(load_module=not args.no_module)


def _cmd_testbed_check(args: argparse.Namespace) -> int:
    if args.testbed == "vm":
        tb: Testbed = VMTestbed(
            args.kernel, memory=args.memory, cpus=args.cpus, kernel_args=args.append
        )
    else:
        tb = NativeTestbed()
    if args.module == "auto":
        load = (KMOD_DIR / "Makefile").exists() if tb.name == "vm" else os.path.exists(DEVICE_PATH)
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
    written = _read(res.out_dir / "check.txt")
    print(f"kernel release (uname -r): {res.kernel_release}")
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
    p = subparsers.add_parser(
        "vm-shell", help="interactive shell in the VM testbed with the module loaded"
    )
    p.add_argument("--kernel", help="kernel release under /boot (default: newest with headers)")
    p.add_argument("--memory", default="2G")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--no-module", action="store_true", help="do not build/load the module")
    _add_append(p)
    p.set_defaults(func=_cmd_vm_shell)

    p = subparsers.add_parser(
        "testbed-check",
        help="boot the testbed, run a trivial command, report exit status and kernel-log problems",
    )
    p.add_argument("--testbed", choices=sorted(TESTBEDS), default="vm")
    p.add_argument("--kernel", help="kernel release under /boot (default: newest with headers)")
    p.add_argument("--memory", default="2G")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument(
        "--module",
        choices=["auto", "yes", "no"],
        default="auto",
        help="load the module (auto: if kmod/ has a Makefile, for vm; if loaded, for native)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole boot")
    _add_append(p)
    p.set_defaults(func=_cmd_testbed_check)


def _add_append(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--append",
        action="append",
        default=[],
        metavar="ARG",
        help="extra kernel command line argument for the VM (repeatable), "
        "e.g. --append slub_debug=FZPU --append kfence.sample_interval=1",
    )
