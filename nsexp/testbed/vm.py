"""The VM testbed: a guest kernel booted in QEMU through virtme-ng, one boot per batch.

The guest kernel is a Debian release under /boot or the cached debug kernel (``debug``; see
:mod:`nsexp.testbed.kernels`). The host filesystem is shared copy-on-write and one output folder
writable (``--rwdir``). The module built for the kernel (``build/kmod/<release>/nsmigrate.ko``)
is loaded, a batch of commands runs in one boot, and each command's exit status, output and the
files it wrote come back through that folder, together with the kernel log of the boot. The
guest console is not trusted for results. QEMU uses KVM where a KVM boot works, else TCG
(:mod:`nsexp.testbed.accel`). A boot prints what it is doing on stderr every 10 s.

Runs on the host (imported inside the guest through nsexp.testbed: standard library only).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from nsexp.testbed import accel
from nsexp.testbed.interface import (
    BUILD_DIR,
    DEVICE_PATH,
    META_DIR,
    MODULE_NAME,
    REPO_ROOT,
    BatchResult,
    CommandResult,
    Testbed,
    TestbedError,
)
from nsexp.testbed.kernels import (
    DEBUG_KERNEL_NAME,
    default_kernel,
    ensure_module,
    module_path,
    resolve_kernel,
)

#: seconds between two progress lines of a boot on stderr (NSEXP_PROGRESS=0 silences them)
PROGRESS_EVERY_S = 10.0
#: where KVM probe boots keep their console when the probe fails
VM_PROBE_DIR = BUILD_DIR / "vm-probe"

#: PATH in the guest: the distribution's tools and its plain ``python3`` (standard library).
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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


class VMTestbed(Testbed):
    """A guest kernel booted in QEMU through virtme-ng; one boot per batch.

    ``kernel`` is a release under /boot or ``"debug"`` (default: ``$NSEXP_KERNEL``, else the
    newest Debian kernel with headers); ``kernel_args`` are added to every boot's command line.
    """

    name = "vm"

    def __init__(
        self,
        kernel: str | None = None,
        *,
        memory: str = "2G",
        cpus: int = 2,
        kernel_args: Sequence[str] = (),
    ):
        self.guest = resolve_kernel(kernel or os.environ.get("NSEXP_KERNEL") or default_kernel())
        #: the guest kernel's release (``uname -r`` inside)
        self.kernel = self.guest.release
        self.image = self.guest.image
        self.memory = memory
        self.cpus = cpus
        #: extra kernel command line arguments for every boot (vng --append): the kernel's own
        #: (the debug kernel has some), then the caller's
        self.kernel_args = [*self.guest.boot_args, *kernel_args]

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
        mods = self.guest.modules_dir
        if (
            mods is not None
            and not (mods / "modules.dep").exists()
            and not (mods / "kernel").is_dir()
        ):
            raise TestbedError(
                f"/lib/modules/{self.kernel} is missing (the guest needs its virtio/9p modules): "
                f"apt-get install --reinstall linux-image-{self.kernel}"
            )
        if load_module and self.guest.headers is None:
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
        use_kvm: bool = False,
    ) -> list[str]:
        """The vng command line of one boot (under TCG unless ``use_kvm``)."""
        cmd = [
            vng,
            "--run",
            str(self.image),
            *([] if use_kvm else ["--disable-kvm"]),
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
        out_dir = self.new_out_dir(out_dir)
        meta = out_dir / META_DIR
        script = meta / "guest.sh"
        script.write_text(
            self._guest_script(
                commands, out_dir, command_timeout=command_timeout, load_module=load_module, env=env
            )
        )
        use, why = self.accelerator()
        accel.notice(use, why)
        cmd = self.vng_command(
            vng,
            rwdirs=[out_dir],
            exec_=f"bash {shlex.quote(str(script))}",
            kernel_args=kernel_args,
            use_kvm=use == accel.KVM,
        )
        (meta / "vng-command").write_text(shlex.join(cmd) + "\n")
        (meta / "accel").write_text(f"{use}\n")
        console_path = out_dir / "console.log"

        t0 = time.monotonic()
        for attempt in (1, 2):
            vng_rc, timed_out = self._boot(
                cmd, vng, out_dir, timeout, f"{self.guest.name} ({use})", len(commands)
            )
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
                    commands, out_dir, load_module, boot_log, duration, None, kernel_args
                ),
            )
        result = self._collect(
            commands, out_dir, load_module, boot_log, duration, command_timeout, kernel_args
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

    def _boot(
        self, cmd: list[str], vng: str, out_dir: Path, timeout: float, label: str, n: int
    ) -> tuple[int | None, bool]:
        """One vng run with its console in out_dir/console.log, reporting progress every
        :data:`PROGRESS_EVERY_S` on stderr; return (vng's exit status, timed out)."""
        meta = out_dir / META_DIR
        t0 = time.monotonic()
        _progress(f"booting {label} for {n} command(s); timeout {timeout:g} s")
        next_report = t0 + PROGRESS_EVERY_S
        with open(out_dir / "console.log", "wb") as console:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=self._vng_env(vng),
                start_new_session=True,
            )
            try:
                while True:
                    try:
                        return proc.wait(timeout=1.0), False
                    except subprocess.TimeoutExpired:
                        pass
                    now = time.monotonic()
                    if now - t0 >= timeout:
                        return None, True
                    if now >= next_report:
                        _progress(f"{label}: {_guest_state(meta, n)}, {now - t0:.0f} s")
                        next_report = now + PROGRESS_EVERY_S
            finally:
                _kill_vm(proc, str(out_dir))

    def accelerator(self) -> tuple[str, str]:
        """("kvm" | "tcg", why): decided once per machine (see :mod:`nsexp.testbed.accel`)."""
        return accel.choose(self.probe_kvm)

    def probe_kvm(self) -> tuple[bool, str]:
        """Boot this kernel under KVM with a trivial command: (it ran, what happened)."""
        vng = find_vng()
        VM_PROBE_DIR.mkdir(parents=True, exist_ok=True)
        out_dir = Path(tempfile.mkdtemp(prefix="kvm-probe-", dir=VM_PROBE_DIR))
        (out_dir / META_DIR).mkdir()
        ok = out_dir / "ok"
        cmd = self.vng_command(
            vng, rwdirs=[out_dir], exec_=f"echo ok > {shlex.quote(str(ok))}", use_kvm=True
        )
        rc, timed_out = self._boot(cmd, vng, out_dir, accel.PROBE_TIMEOUT_S, "KVM probe", 1)
        if ok.exists():
            shutil.rmtree(out_dir, ignore_errors=True)
            return True, f"the guest ran a command ({self.kernel})"
        if timed_out:
            return False, f"no guest command within {accel.PROBE_TIMEOUT_S:g} s (see {out_dir})"
        tail = _tail(_read(out_dir / "console.log") or "", 1).strip()
        return False, f"vng exited {rc}: {tail[:160]} (see {out_dir})"

    def _collect(
        self,
        commands: Sequence[str],
        out_dir: Path,
        load_module: bool,
        boot_log: str,
        duration: float,
        cmd_to: float | None,
        kernel_args: Sequence[str] = (),
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
            accel=(_read(meta / "accel") or "").strip(),
            kernel_args=[*self.kernel_args, *kernel_args],
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
        use, why = self.accelerator()
        accel.notice(use, why)
        cmd = self.vng_command(vng, kernel_args=kernel_args, use_kvm=use == accel.KVM)
        cmd += ["--shell", str(wrapper)]
        try:
            return subprocess.call(cmd, cwd=REPO_ROOT, env=self._vng_env(vng))
        except KeyboardInterrupt:
            return 130


def _progress(msg: str) -> None:
    if os.environ.get("NSEXP_PROGRESS", "1") != "0":
        print(f"nsexp: vm: {msg}", file=sys.stderr, flush=True)


def _guest_state(meta: Path, n: int) -> str:
    """What the guest is doing, from the files its batch script has written so far."""
    if not (meta / "started").exists():
        return "booting (kernel and init)"
    if (meta / "done").exists():
        return "batch done, powering off"
    started = sum(1 for i in range(n) if (meta / f"cmd-{i:03d}.start").exists())
    ended = sum(1 for i in range(n) if (meta / f"cmd-{i:03d}.end").exists())
    if ended == n:
        return "commands done, unloading the module and reading the kernel log"
    if started == 0:
        return "loading the module"
    last = _last_line(meta / f"cmd-{started - 1:03d}.out")
    return f"running command {started}/{n}" + (f" ({last})" if last else "")


def _last_line(path: Path, limit: int = 4096) -> str:
    """The last non-empty line a guest command has printed so far ("" if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:120] if lines else ""


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


# ---------------------------------------------------------------------------------------------
# CLI: `nsexp vm-shell`
# ---------------------------------------------------------------------------------------------


def add_vm_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose and shape a VM boot (vm-shell, testbed-check)."""
    p.add_argument(
        "--kernel",
        help=f"kernel release under /boot, or {DEBUG_KERNEL_NAME!r} for the debug kernel "
        "(default: $NSEXP_KERNEL, else the newest release with headers)",
    )
    p.add_argument("--memory", default="2G")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument(
        "--append",
        action="append",
        default=[],
        metavar="ARG",
        help="extra kernel command line argument (repeatable), "
        "e.g. --append slub_debug=FZPU --append kfence.sample_interval=1",
    )


def testbed_from_args(args: argparse.Namespace) -> VMTestbed:
    return VMTestbed(args.kernel, memory=args.memory, cpus=args.cpus, kernel_args=args.append)


def cmd_vm_shell(args: argparse.Namespace) -> int:
    tb = testbed_from_args(args)
    print(f"nsexp: booting {tb.kernel} (about a minute under TCG); `exit` leaves the VM")
    return tb.shell(load_module=not args.no_module)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "vm-shell", help="interactive shell in the VM testbed with the module loaded"
    )
    add_vm_arguments(p)
    p.add_argument("--no-module", action="store_true", help="do not build/load the module")
    p.set_defaults(func=cmd_vm_shell)
