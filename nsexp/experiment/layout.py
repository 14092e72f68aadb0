"""The paper's layout: the hierarchy, the worker's route, and what they predict.

:class:`LayoutSpec` is what both sides parse: the host's ``nsexp run`` and the guest's
``python3 -m nsexp.experiment.guest`` take the same layout options (:func:`add_layout_arguments`,
:func:`spec_from_args`), and :meth:`LayoutSpec.cli_args` writes them back. Standard library only.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nsexp.errors import NsexpError


class LayoutError(NsexpError, ValueError):
    """A layout that cannot be run; the message says which part."""


@dataclass(frozen=True)
class LayoutSpec:
    """The hierarchy and the worker's route. The defaults are the paper's layout.

    ``children[i]`` is how many children the init of ``namespaces[i]`` forks; the worker is
    child number ``worker_index`` (0-based) of ``worker_ns``'s init; ``route`` lists the
    namespaces the worker visits, starting where it is born (it may come back to a namespace).
    """

    namespaces: tuple[str, ...] = ("NS2", "NS3", "NS4", "NS5")
    children: tuple[int, ...] = (2, 3, 4, 5)
    worker_ns: str = "NS2"
    worker_index: int = 1
    increments: int = 100
    route: tuple[str, ...] = ("NS2", "NS3", "NS4", "NS5")

    @classmethod
    def make(
        cls,
        namespaces: int | Sequence[str] | None = None,
        children: Sequence[int] | None = None,
        increments: int = 100,
        route: Sequence[str] | None = None,
        hops: int | None = None,
        worker_index: int = 1,
    ) -> LayoutSpec:
        """A layout from CLI-like options; unspecified parts follow the paper's pattern.

        ``namespaces`` may be a count (named NS2, NS3, ...); by default namespace i (0-based)
        gets i + 2 children; without ``route`` the worker cycles through the namespaces in
        order for ``hops`` migrations (default: one pass).
        """
        if namespaces is None:
            names: tuple[str, ...] = (
                cls.namespaces if children is None else _ns_names(len(children))
            )
        elif isinstance(namespaces, int):
            names = _ns_names(namespaces)
        else:
            names = tuple(namespaces)
        kids = tuple(children) if children is not None else tuple(i + 2 for i in range(len(names)))
        if route is None:
            n = len(names) - 1 if hops is None else hops
            route = tuple(names[i % len(names)] for i in range(n + 1))
        elif hops is not None and hops != len(route) - 1:
            raise LayoutError(f"--hops {hops} disagrees with a route of {len(route) - 1} hops")
        spec = cls(
            namespaces=names,
            children=kids,
            worker_ns=route[0],
            worker_index=worker_index,
            increments=increments,
            route=tuple(route),
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        """Raise LayoutError if the layout cannot be run."""
        if not self.namespaces:
            raise LayoutError("at least one namespace is needed")
        if len(set(self.namespaces)) != len(self.namespaces):
            raise LayoutError("namespace names must be unique")
        if len(self.children) != len(self.namespaces):
            raise LayoutError(
                f"{len(self.children)} child counts for {len(self.namespaces)} namespaces"
            )
        if any(c < 0 for c in self.children):
            raise LayoutError("child counts must be >= 0")
        if self.worker_ns not in self.namespaces:
            raise LayoutError(f"worker namespace {self.worker_ns} is not in the layout")
        n = self.children[self.namespaces.index(self.worker_ns)]
        if not 0 <= self.worker_index < n:
            raise LayoutError(f"worker index {self.worker_index} but {self.worker_ns} has {n}")
        if not self.route or self.route[0] != self.worker_ns:
            raise LayoutError("the route starts in the worker's namespace")
        for a, b in zip(self.route, self.route[1:], strict=False):
            if b not in self.namespaces:
                raise LayoutError(f"route goes to unknown namespace {b}")
            if a == b:
                raise LayoutError(f"route stays in {a}: a hop goes to another namespace")
        if self.increments < 0:
            raise LayoutError("increments must be >= 0")

    @property
    def hops(self) -> int:
        """Number of migrations."""
        return len(self.route) - 1

    def guest_timeout(self, backend: str) -> float:
        """Seconds a run of this layout may take in the guest before it is called hung."""
        return 60.0 + (30.0 if backend == "criu" else 10.0) * self.hops

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayoutSpec:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def cli_args(self) -> list[str]:
        """Options of ``nsexp run`` that reproduce this layout."""
        return [
            "--namespaces",
            ",".join(self.namespaces),
            "--children",
            ",".join(map(str, self.children)),
            "--worker-index",
            str(self.worker_index),
            "--increments",
            str(self.increments),
            "--route",
            ",".join(self.route),
        ]


def _ns_names(n: int) -> tuple[str, ...]:
    # NS1 is the global namespace; the experiment's namespaces start at NS2.
    return tuple(f"NS{i + 2}" for i in range(n))


def predict_pids(spec: LayoutSpec) -> list[int]:
    """The worker's PID at each stop of the route, by the rule "next free PID in the target".

    Linux allocates PIDs cyclically: the next PID after the last one allocated in that
    namespace that is not in use (PIDs freed behind the cursor are not reused before a wrap).
    The init is PID 1 and its children 2..n+1; a migration frees the worker's PID in the source.
    """
    last = {ns: 1 + c for ns, c in zip(spec.namespaces, spec.children, strict=True)}
    used = {ns: set(range(1, 2 + c)) for ns, c in zip(spec.namespaces, spec.children, strict=True)}
    pid = spec.worker_index + 2
    pids = [pid]
    for src, dst in zip(spec.route, spec.route[1:], strict=False):
        used[src].discard(pid)
        pid = last[dst] + 1
        while pid in used[dst]:  # only after a wrap, which small layouts never reach
            pid += 1
        used[dst].add(pid)
        last[dst] = pid
        pids.append(pid)
    return pids


def predict_values(spec: LayoutSpec) -> list[int]:
    """The worker's value at each stop: increments added once per stop, state carried over."""
    return [spec.increments * (hop + 1) for hop in range(len(spec.route))]


def _csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_layout_arguments(p: argparse.ArgumentParser) -> None:
    """The layout options (the paper's layout by default)."""
    p.add_argument(
        "--namespaces", help="number of namespaces, or their names (NS2,NS3,...); default 4"
    )
    p.add_argument("--children", help="children per namespace, e.g. 2,3,4,5")
    p.add_argument("--increments", type=int, default=100, help="additions per hop (N)")
    p.add_argument("--route", help="namespaces visited, e.g. NS2,NS3,NS4,NS5 (may cycle)")
    p.add_argument("--hops", type=int, help="number of migrations (the route cycles)")
    p.add_argument("--worker-index", type=int, default=1, help="worker's index among siblings")


def spec_from_args(args: argparse.Namespace) -> LayoutSpec:
    namespaces: int | list[str] | None = None
    if args.namespaces:
        namespaces = (
            int(args.namespaces) if args.namespaces.isdigit() else _csv_list(args.namespaces)
        )
    children = [int(c) for c in _csv_list(args.children)] if args.children else None
    route = _csv_list(args.route) if args.route else None
    return LayoutSpec.make(
        namespaces=namespaces,
        children=children,
        increments=args.increments,
        route=route,
        hops=args.hops,
        worker_index=args.worker_index,
    )
