"""The arguments every command shares: where the pods are, ``-o``, and argparse types.

Why one module: ``--lab``/``--netns``/``--netns-pid``/``-n ...`` mean the same in every
command, and ``make_runtime`` is the one place that turns them into a runtime. Bad input
is a usage error (one line, exit 2) found before any agent starts: ``float("nan")``
parses, and NaN compares false with every bound, so a ``--duration nan`` used to reach
the agents (and a watch never ended).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

from meridio_debug.controller.cli.kube import add_cluster_args, cluster_runtime, wants_cluster
from meridio_debug.controller.errors import LabError, UsageError

MAX_STREAM_S = 24 * 3600.0  # the agent's own bound on a watch or capture


def seconds(limit: float) -> Callable[[str], float]:
    """argparse type: a finite number of seconds in [0, limit] (NaN, inf, -1 are usage errors)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number of seconds") from None
        if not math.isfinite(value) or not 0 <= value <= limit:
            raise argparse.ArgumentTypeError(
                f"{text[:40]} is not a number of seconds between 0 and {limit:g}"
            )
        return value

    return parse


def int_range(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse


def lab_prefix(text: str) -> str:
    """argparse type: a valid lab prefix, else a usage error (exit 2) before anything runs."""
    from meridio_debug.controller.lab.spec import check_prefix

    try:
        return check_prefix(text)
    except LabError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def add_target_args(p: argparse.ArgumentParser) -> None:
    """Where the pods are: the lab, local namespaces by name, or by a process's pid."""
    g = p.add_argument_group("where (one of)")
    g.add_argument(
        "--lab", action="store_true", help="the pods of the local lab (meridio-debug lab up)"
    )
    g.add_argument(
        "--prefix", default="mdl-", type=lab_prefix, help="lab namespace prefix (default mdl-)"
    )
    g.add_argument(
        "--netns",
        action="append",
        default=[],
        metavar="NAME",
        help="a network namespace by name (repeatable)",
    )
    g.add_argument(
        "--netns-pid",
        action="append",
        default=[],
        type=int,
        metavar="PID",
        help="the network namespace of a process (repeatable)",
    )
    add_cluster_args(p)
    p.add_argument(
        "pods",
        nargs="*",
        metavar="POD",
        help="pods to include: lab pod names, or pod names with -n (default: all)",
    )


def add_output_arg(
    p: argparse.ArgumentParser, choices: Sequence[str] = ("table", "json", "yaml")
) -> None:
    p.add_argument(
        "-o",
        "--output",
        choices=list(choices),
        default=choices[0],
        help=f"output format (default {choices[0]})",
    )


def make_runtime(args: argparse.Namespace) -> Any:
    """The runtime for the chosen target flags (exactly one kind)."""
    from meridio_debug.controller.runtime.local import LocalRuntime, netns_path

    cluster = wants_cluster(args)
    chosen = [bool(args.lab), bool(args.netns), bool(args.netns_pid), cluster]
    if sum(chosen) != 1:
        raise UsageError(
            "say where the pods are: exactly one of --lab, --netns NAME, --netns-pid PID, "
            "or a cluster (-n NAMESPACE, --context, --kubeconfig, -l SELECTOR, --trench)"
        )
    if cluster:
        return cluster_runtime(args)
    if args.pods and not args.lab:
        raise UsageError("pod names go with --lab; use --netns NAME for namespaces")
    if args.lab:
        from meridio_debug.controller.runtime.lab import lab_runtime

        return lab_runtime(args.prefix, args.pods)
    # A missing namespace is one line and exit 1 for every command, before any agent starts
    # (per pod, analyze would make it a finding and collect a bundle of nothing).
    runtime = (
        LocalRuntime.for_netns(args.netns) if args.netns else LocalRuntime.for_pids(args.netns_pid)
    )
    for pod in runtime.pods():
        netns_path(pod)
    return runtime
