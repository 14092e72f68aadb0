"""``nsexp request``: from a shell inside a namespace, ask the manager to move this process.

The manager (``nsexp manager``, in the global namespace) identifies the asking process by the
credentials the kernel attaches to its messages, never by a PID written in the request, so the
process that asks is the one that moves: this command itself. With a COMMAND it then execs that
command, which so starts in the target namespace as the same process, with the new PID (the
manager's nsenter); without one it prints the result. The manager's refusals are shown in its
own words. Standard library only: it runs inside the namespaces of the VM guest.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
from typing import Any

from nsexp.client import DEFAULT_SOCKET, Client, ManagerError, ManagerUnavailable

DESCRIPTION = """\
Ask the migration manager (nsexp manager) to move this process into the namespace the
manager registered as NS; then run COMMAND there, as the same process with its new PID, or
print the result. The manager decides: the namespace must be registered, the route allowed, and
the process movable (a child of its namespace's init, without children; all its threads move)."""

EPILOG = f"""\
exit status:
  0  moved (and COMMAND, if given, replaced this process: its own status is what the caller sees)
  1  the manager refused or failed the move (its code and message, with the kernel's errno when
     there is one), or no manager answers at the socket
  2  wrong usage
  127 COMMAND could not be executed after the move

examples:
  nsexp request --to NS3
      move into NS3 and print the PIDs there and in the global namespace
  nsexp request --to NS3 -- sh -c 'echo $$'
      move into NS3, then run a shell command there (it prints its PID in NS3)
  nsexp request --ping
      ask the manager which process and namespace it sees
  nsexp request --socket /tmp/m.sock --to NS4 --json

The socket is {DEFAULT_SOCKET} unless --socket or $NSEXP_SOCKET names another."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``nsexp request``."""
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", metavar="NS", help="the namespace to move into, by its name")
    what.add_argument("--ping", action="store_true", help="only ask who the manager sees (no move)")
    p.add_argument(
        "--socket",
        metavar="PATH",
        default=os.environ.get("NSEXP_SOCKET", DEFAULT_SOCKET),
        help="the manager's socket (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=30.0,
        help="wait at most this long for the manager (default %(default)g s)",
    )
    p.add_argument("--json", action="store_true", help="print the reply as one JSON object")
    p.add_argument(
        "command",
        metavar="COMMAND",
        nargs=argparse.REMAINDER,
        help="run this command after the move (put -- before it)",
    )


def _fail(args: argparse.Namespace, exc: ManagerError) -> int:
    unavailable = isinstance(exc, ManagerUnavailable)
    if args.json:
        body = {"ok": False, "code": exc.code, "message": exc.message, "errno": exc.errno}
        print(json.dumps(body), flush=True)
    if unavailable:
        text = f"no answer from a manager at {args.socket}: {exc.message}"
        text += " (is `nsexp manager` running? --socket PATH names another socket)"
    else:
        text = f"the manager refused: {exc.code}: {exc.message}"
        if exc.errno:
            text += f" [{errno.errorcode.get(exc.errno, '?')}, errno {exc.errno}]"
    print(f"nsexp request: {text}", file=sys.stderr)
    return 1


def _show(args: argparse.Namespace, reply: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(reply), flush=True)
    elif args.ping:
        print(
            f"the manager sees process {reply.get('global_pid')} "
            f"(PID {reply.get('pid')} in {reply.get('ns') or 'no registered namespace'}), "
            f"backend {reply.get('backend')}"
        )
    else:
        print(
            f"moved into {args.to}: PID {reply.get('pid')} there, "
            f"{reply.get('global_pid')} in the manager's namespace",
            flush=True,
        )


def cmd_request(args: argparse.Namespace) -> int:
    """``nsexp request``: one request to the manager; then exec COMMAND if given."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command and args.ping:
        print("nsexp request: COMMAND goes with --to, not --ping", file=sys.stderr)
        return 2
    if command and shutil.which(command[0]) is None:
        # Checked before the move: a move that could not then run its command helps nobody.
        print(f"nsexp request: {command[0]}: command not found; nothing was moved", file=sys.stderr)
        return 127
    client = Client(args.socket, timeout=args.timeout)
    try:
        reply = client.ping() if args.ping else client.migrate(args.to)
    except ManagerError as exc:
        return _fail(args, exc)
    finally:
        client.close()
    if not command or args.json:
        _show(args, reply)
    if not command:
        return 0
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"nsexp request: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127


def register_cli(subparsers: Any) -> None:
    """Add ``nsexp request`` to the CLI."""
    p = subparsers.add_parser(
        "request",
        usage="%(prog)s [options] --to NS [--] [COMMAND [ARG...]]\n"
        "       %(prog)s [options] --ping",
        help="ask the manager to move this process into a namespace (then run a command)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=cmd_request)
