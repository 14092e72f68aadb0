"""``nsexp manager``: the migration manager in the foreground (global namespace)."""

from __future__ import annotations

import argparse
import logging
import signal
from typing import Any

from nsexp.backends import Namespace, get_backend
from nsexp.client import DEFAULT_SOCKET
from nsexp.manager.service import Manager


def _parse_ns(value: str) -> tuple[str, int]:
    name, sep, pid = value.partition("=")
    if not sep or not name or not pid.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=INIT_PID, got {value!r}")
    return name, int(pid)


def _parse_pair(value: str) -> tuple[str, str]:
    src, sep, dst = value.partition(":")
    if not sep or not src or not dst:
        raise argparse.ArgumentTypeError(f"expected SRC:DST, got {value!r}")
    return src, dst


DESCRIPTION = (
    "Run the migration manager in the foreground, in the global PID namespace, until SIGINT "
    "or SIGTERM (protocol: docs/manager.md)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="socket path (default %(default)s)")
    p.add_argument("--backend", default="kmod", choices=["kmod", "criu"])
    p.add_argument(
        "--ns",
        action="append",
        type=_parse_ns,
        default=[],
        metavar="NAME=INIT_PID",
        help="register a namespace by the global pid of its init (repeatable)",
    )
    p.add_argument(
        "--allow",
        action="append",
        type=_parse_pair,
        metavar="SRC:DST",
        help="allowed route (repeatable); default: any pair of registered namespaces",
    )
    p.add_argument("--group", help="group allowed to connect (socket mode 0660)")
    p.add_argument(
        "--read-timeout", type=float, default=10.0, help="seconds to finish a started frame"
    )
    p.add_argument("-v", "--verbose", action="store_true")


def cmd_manager(args: argparse.Namespace) -> int:
    """``nsexp manager``: serve in the foreground until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    backend = get_backend(args.backend)
    backend.check()
    registry = {name: Namespace.open(name, pid) for name, pid in args.ns}
    manager = Manager(
        args.socket,
        backend,
        registry,
        args.allow,
        group=args.group,
        read_timeout=args.read_timeout,
    )
    signal.signal(signal.SIGTERM, lambda *_: manager.request_stop())
    try:
        manager.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        manager.stop()
        for ns in registry.values():
            ns.close()
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``nsexp manager`` to the CLI."""
    p = subparsers.add_parser(
        "manager", help="run the migration manager in the foreground", description=DESCRIPTION
    )
    add_arguments(p)
    p.set_defaults(func=cmd_manager)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nsexp-manager",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    return cmd_manager(parser.parse_args(argv))
