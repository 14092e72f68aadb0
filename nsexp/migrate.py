"""``nsexp migrate``: move one running process into another PID namespace, from a shell.

The command-line face of :func:`nsexp.lib.migrate`, in the manner of util-linux's nsenter and
unshare: the process is named by PID (or by an inherited pidfd), the target by a namespace file,
by a process in it, or by an inherited file descriptor. Every refusal is the kernel's errno with
the library's reason in words, and exit status 1.
Standard library only: it runs inside the VM guest as well as on a host with the module loaded.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import Any

from nsexp import lib, uapi

DESCRIPTION = """\
Move the running process PID into another PID namespace, live, through the nsmigrate kernel
module (/dev/nsmigrate). The process keeps its memory, open files and start time; it gets the
next free PID in the target namespace, a parent there (the target's init unless --parent says
otherwise), and leads a new session. Its old PID is released.

The target namespace is given by exactly one of --into, --pid or --into-fd."""

EPILOG = """\
exit status:
  0  the process was moved; its new PIDs are printed
  1  the move was refused or failed: the kernel's errno (or why the process, the target or the
     device could not be opened) is printed with the reason in words; the process is left as
     it was
  2  wrong usage

examples:
  nsexp migrate 4242 --into /proc/77/ns/pid
      move process 4242 into the PID namespace of process 77
  nsexp migrate 4242 --pid 77 --parent 80 --timeout 2
      the same target named through process 77 (by a pidfd), with process 80 (in that
      namespace) as the new parent, waiting at most 2 s for 4242 to reach a safe point
  nsexp migrate 4242 --into /proc/77/ns/pid_for_children --json
      into the namespace where 77's children are born; the result as one JSON object
  nsexp migrate --pidfd 5 --into-fd 6
      the process and the target named by a pidfd and a namespace fd this command inherited
  nsexp migrate "$job" --into /proc/77/ns/pid --leave-parent -m /proc/77/ns/mnt
      move a shell's background job (its parent, the shell, will not see it exit) and let it
      join 77's mount namespace, so /proc/self works in the target

The module refuses, among others: a PID that does not exist (ESRCH); a kernel thread, a
namespace init, or a process already in the target (EINVAL); a caller without CAP_SYS_ADMIN over
both namespaces or without ptrace access to the process (EPERM); a process with children, a
vforked, ptraced or exec-ing thread or an io_uring worker, one whose parent is neither an init
nor this command (without --leave-parent), one on whose CPU clock another process has armed a
timer, or one that kept starting threads through every attempt (EBUSY); a target whose init has died
or that has no init yet (ENXIO); a process that does not reach a safe point in time (ETIMEDOUT).
See kmod/README.md."""


class Refused(Exception):
    """The move could not be made; ``errno`` is the kernel's (or the failed open's)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def _fd(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a file descriptor number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a file descriptor is >= 0, got {value}")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    limit = uapi.MAX_TIMEOUT_NS / 1e9
    if not 0 < value <= limit:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {limit:g} s")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``nsexp migrate``."""
    p.add_argument("pid", metavar="PID", type=_fd, help="the process to move (see --pidfd)")
    where = p.add_argument_group("target namespace (exactly one)")
    target = where.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--into",
        metavar="NSFILE",
        help="a PID-namespace file: /proc/Q/ns/pid (where Q is), "
        "/proc/Q/ns/pid_for_children (where Q's children are born), or a bind mount of one",
    )
    target.add_argument(
        "-t",
        "--pid",
        dest="target_pid",
        metavar="Q",
        type=_positive_int,
        help="the namespace process Q is in (named by a pidfd opened for Q)",
    )
    target.add_argument(
        "--into-fd",
        metavar="FD",
        type=_fd,
        help="an inherited open file descriptor: a namespace file or a pidfd of a process in "
        "the target",
    )
    p.add_argument(
        "--pidfd",
        action="store_true",
        help="PID is not a process ID but an inherited pidfd (pidfd_open(2)) naming the "
        "process: a PID recycled meanwhile cannot be hit",
    )
    p.add_argument(
        "--parent",
        metavar="P",
        type=_positive_int,
        help="make process P (a PID as this command sees it, in the target namespace) the new "
        "parent instead of the target's init",
    )
    p.add_argument(
        "--leave-parent",
        action="store_true",
        help="allow the move when the old parent is neither a namespace init nor this command: "
        "that parent then sees its child vanish with no exit status (refused with EBUSY "
        "otherwise)",
    )
    p.add_argument(
        "-m",
        "--mount-ns",
        metavar="NSFILE",
        help="also join this mount namespace (/proc/Q/ns/mnt) in the same step, as setns(2) "
        "would, so that /proc, ps and getpid agree in the target; root and cwd become that "
        "namespace's root; a process with more than one thread is refused (EINVAL), as setns(2) "
        "refuses it",
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_timeout,
        help=f"wait at most this long for the process to reach a safe point (default "
        f"{uapi.DEFAULT_TIMEOUT_NS / 1e9:g} s, at most {uapi.MAX_TIMEOUT_NS / 1e9:g} s)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the result (or the refusal) as one JSON object"
    )


def _open_target(args: argparse.Namespace) -> tuple[int, bool, str]:
    """(fd, owned, description) of the target namespace; raises Refused."""
    if args.into_fd is not None:
        return args.into_fd, False, f"fd {args.into_fd}"
    if args.target_pid is not None:
        try:
            return (
                os.pidfd_open(args.target_pid),
                True,
                f"the namespace of process {args.target_pid}",
            )
        except OSError as e:
            raise Refused(
                e.errno, f"cannot open a pidfd for target process {args.target_pid}: {e.strerror}"
            ) from None
    try:
        return os.open(args.into, os.O_RDONLY | os.O_CLOEXEC), True, args.into
    except OSError as e:
        hint = ""
        if e.errno == errno.ENOENT and args.into.endswith("pid_for_children"):
            hint = " (a namespace that has no init yet cannot be opened there)"
        raise Refused(e.errno, f"cannot open {args.into}: {e.strerror}{hint}") from None


def _namespace_name(fd: int) -> str | None:
    """pid:[inode] for a namespace file; for a pidfd, the namespace of the process it names."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    if link.startswith("pid:["):
        return link
    if link == "anon_inode:[pidfd]":
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                pid = next(int(line.split()[1]) for line in f if line.startswith("Pid:"))
            return os.readlink(f"/proc/{pid}/ns/pid")
        except (OSError, StopIteration, ValueError, IndexError):
            return None
    return None


def migrate_once(args: argparse.Namespace) -> dict[str, Any]:
    """Make the move the arguments describe; return the result; raise Refused."""
    fd, owned, described = _open_target(args)
    try:
        namespace = _namespace_name(fd)
        try:
            lib.abi_version()  # opens the device first: its own error names the fix
            m = lib.migrate(
                args.pid,
                fd,
                pidfd=args.pidfd,
                parent=args.parent,
                timeout=args.timeout,
                leave_parent=args.leave_parent,
                mntns=args.mount_ns,
            )
        except OSError as e:
            # lib's message carries the kernel's errno in words and the reason (lib._HINTS).
            message = e.strerror or str(e)
            if e.filename == uapi.DEVICE:  # the device itself (mode 0600) could not be opened
                message = f"cannot open {uapi.DEVICE}: {message} (run as root)"
            raise Refused(e.errno or errno.EIO, message) from None
    finally:
        if owned:
            os.close(fd)
    return {
        "ok": True,
        "process": {"pidfd" if args.pidfd else "pid": args.pid},
        "target": described,
        "namespace": namespace,
        "pid_in_target": m.pid,
        "pid_from_caller": m.global_pid,
        "switch_ns": m.switch_ns,
    }


def cmd_migrate(args: argparse.Namespace) -> int:
    """``nsexp migrate``: print the new PIDs, or the refusal with its errno; exit 0 or 1."""
    try:
        result = migrate_once(args)
    except Refused as e:
        name = errno.errorcode.get(e.errno, "?")
        if args.json:
            print(json.dumps({"ok": False, "errno": e.errno, "error": name, "message": e.message}))
        print(f"nsexp migrate: {e.message} [{name}, errno {e.errno}]", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        what = f"pidfd {args.pid}" if args.pidfd else f"process {args.pid}"
        print(
            f"moved {what} into {result['namespace'] or result['target']}: "
            f"PID {result['pid_in_target']} there, {result['pid_from_caller']} from here"
        )
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``nsexp migrate`` to the CLI."""
    p = subparsers.add_parser(
        "migrate",
        usage="%(prog)s [options] PID (--into NSFILE | --pid Q | --into-fd FD)",
        help="move a running process into another PID namespace",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=cmd_migrate)
