"""The ``nsexp`` command line.

Subcommands come from the modules listed in :data:`COMMAND_MODULES`: each exposes
``register_cli(subparsers) -> None``, which adds its subparser(s) and sets ``func=`` to a callable
taking the parsed arguments and returning an exit code. The modules are imported when ``main()``
runs; a module that is not in the tree yet is skipped, so the CLI works while nsexp is being built.
A module that is present but fails to import (for example for want of an optional dependency)
is skipped too, and its error is shown if one of the commands it would provide is asked for.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

import nsexp

#: Modules that register subcommands (``register_cli(subparsers)``). Add yours here.
COMMAND_MODULES = [
    "nsexp.testbed",  # vm-shell, testbed-check
    "nsexp.manager",  # manager
    "nsexp.experiment",  # run
    "nsexp.notebooks",  # figures
    "nsexp.bench",  # bench
    "nsexp.migrate",  # migrate
    "nsexp.request",  # request
]

#: Commands that the tree is expected to provide, and the module expected to provide each:
#: used to say what is missing when one is asked for before it exists.
EXPECTED_COMMANDS = {
    "run": "nsexp.experiment",
    "manager": "nsexp.manager",
    "figures": "nsexp.notebooks",
    "bench": "nsexp.bench",
    "vm-shell": "nsexp.testbed",
    "testbed-check": "nsexp.testbed",
}


def _load_modules(subparsers) -> dict[str, str]:
    """Import every command module and let it register; return {module: why it was skipped}."""
    skipped: dict[str, str] = {}
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            if e.name == name:
                skipped[name] = f"{name} is not in this tree yet"
            else:
                skipped[name] = f"{name} could not be imported: {e}"
            continue
        except Exception:  # a broken module must not take the whole CLI down
            skipped[name] = f"{name} failed to import:\n{traceback.format_exc()}"
            continue
        register = getattr(module, "register_cli", None)
        if register is None:
            skipped[name] = f"{name} has no register_cli()"
            continue
        register(subparsers)
    return skipped


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str], set[str]]:
    parser = argparse.ArgumentParser(
        prog="nsexp",
        description="Live process migration between Linux PID namespaces: experiment driver.",
    )
    parser.add_argument("--version", action="version", version=f"nsexp {nsexp.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    skipped = _load_modules(subparsers)
    return parser, skipped, set(subparsers.choices)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, skipped, commands = build_parser()

    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in commands:
        module = EXPECTED_COMMANDS.get(first)
        if module is not None:
            why = skipped.get(module, f"{module} does not register `{first}` yet")
            print(
                f"nsexp: `{first}` is not available yet: {why}.\n"
                f"Nothing was run. Available commands: {', '.join(sorted(commands)) or 'none'}.",
                file=sys.stderr,
            )
            return 2
        # otherwise argparse reports the unknown command with the list of choices

    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        if skipped:
            print("\nnot available in this tree:", file=sys.stderr)
            for why in skipped.values():
                print(f"  {why.splitlines()[0]}", file=sys.stderr)
        return 2
    from nsexp.testbed import TestbedError

    try:
        rc = args.func(args)
    except TestbedError as e:
        print(f"nsexp: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nsexp: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
