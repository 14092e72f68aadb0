"""The ``nsexp`` command line.

Subcommands come from the modules listed in :data:`COMMAND_MODULES`: each exposes
``register_cli(subparsers) -> None``, which adds its subparser(s) and sets ``func=`` to its
``cmd_<command>(args) -> int`` handler. An error of nsexp itself (:class:`nsexp.errors.NsexpError`,
the base of the package's errors) is reported as one line, which names the fix, and exits 1.
Standard library only (the guest may run it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import nsexp
from nsexp.errors import NsexpError

#: Modules that register subcommands (``register_cli(subparsers)``). Add yours here.
COMMAND_MODULES = [
    "nsexp.testbed",  # vm-shell, testbed-check, debug-kernel
    "nsexp.manager",  # manager
    "nsexp.experiment.host",  # run
    "nsexp.notebooks",  # figures
    "nsexp.bench",  # bench
    "nsexp.migrate",  # migrate
    "nsexp.request",  # request
]


def build_parser() -> argparse.ArgumentParser:
    """The parser with every module's subcommands."""
    parser = argparse.ArgumentParser(
        prog="nsexp",
        description="Live process migration between Linux PID namespaces: experiment driver.",
    )
    parser.add_argument("--version", action="version", version=f"nsexp {nsexp.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``nsexp`` command; returns its exit code."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except NsexpError as e:
        print(f"nsexp {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nsexp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
