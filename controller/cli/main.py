"""``meridio-debug``: the command line.

Conventions (Hubble, Inspektor Gadget, istioctl): data on stdout, logs and
errors on stderr, ``-o table|json|yaml``; exit codes 0 ok, 1 error, 2 usage,
3 findings at or above ``--fail-on``. A known failure is one line on stderr,
never a traceback. Usage errors (a NaN duration, a bad section, a missing
namespace) are found before any agent starts. SIGTERM is handled exactly like
Ctrl-C: the running command is cancelled, writes what it has, stops its
agents and removes their files.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from meridio_debug.controller.cli.arguments import MAX_STREAM_S, seconds
from meridio_debug.controller.errors import MeridioDebugError, UsageError

log = logging.getLogger("meridio_debug")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FINDINGS = 0, 1, 2, 3

EPILOG = """exit codes: 0 ok, 1 error, 2 usage error, 3 findings at or above --fail-on"""


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
    from meridio_debug.controller.cli.lab import lab_prefix

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
    from meridio_debug.controller.cli import kube as cli_kube

    cli_kube.add_cluster_args(p)
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


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="meridio-debug",
        description="Debug Meridio trenches: snapshot, watch, analyse, capture and trace, in many pods at once.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging on stderr (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)

    p = sub.add_parser("version", help="print versions")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser(
        "snapshot",
        help="fetch the network state of pods (links, addresses, rules, routes of all tables, ...)",
        description="Start an agent in each selected pod and print its snapshot.",
        epilog="examples:\n  meridio-debug snapshot --lab lb-fe-a\n  meridio-debug snapshot --netns mdl-proxy-a -o json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_args(p)
    add_output_arg(p)
    from meridio_debug.controller.report.snapshot import SECTION_KEYS

    p.add_argument(
        "--section",
        action="append",
        default=[],
        choices=SECTION_KEYS,
        metavar="SECTION",
        help=f"only these sections (repeatable; default all): {', '.join(SECTION_KEYS)}",
    )
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser(
        "watch",
        help="stream netlink events (link, address, route, rule, neighbour) from pods",
        description="Stream timestamped netlink events from every selected pod until Ctrl-C or --duration.",
    )
    add_target_args(p)
    add_output_arg(p, ("table", "json"))
    p.add_argument(
        "--duration",
        type=seconds(MAX_STREAM_S),
        default=0.0,
        help="stop after this many seconds (default: until Ctrl-C)",
    )
    p.add_argument(
        "--kind",
        action="append",
        default=[],
        choices=["link", "address", "route", "rule", "neighbour", "fdb"],
        help="event kinds (repeatable; default all)",
    )
    p.set_defaults(func=cmd_watch)

    from meridio_debug.controller.services import capture

    capture.add_parser(sub, add_target_args)

    from meridio_debug.controller.cli import lab as cli_lab

    cli_lab.add_parser(sub)
    from meridio_debug.controller.cli import kube as cli_kube

    cli_kube.add_parser(sub)
    from meridio_debug.controller.services import analyze as cli_analyze

    cli_analyze.add_parser(sub)
    from meridio_debug.controller.cli import trace as cli_trace

    cli_trace.add_parser(sub, add_target_args)
    from meridio_debug.controller.cli import e2e as cli_e2e

    cli_e2e.add_parser(sub)
    return parser


def cmd_version(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    print(f"meridio-debug {version('meridio-debug')}")
    return EXIT_OK


def make_runtime(args: argparse.Namespace) -> Any:
    """The runtime for the chosen target flags (exactly one kind)."""
    from meridio_debug.controller.cli import kube as cli_kube
    from meridio_debug.controller.runtime.local import LocalRuntime, netns_path

    cluster = cli_kube.wants_cluster(args)
    chosen = [bool(args.lab), bool(args.netns), bool(args.netns_pid), cluster]
    if sum(chosen) != 1:
        raise UsageError(
            "say where the pods are: exactly one of --lab, --netns NAME, --netns-pid PID, "
            "or a cluster (-n NAMESPACE, --context, --kubeconfig, -l SELECTOR, --trench)"
        )
    if cluster:
        return cli_kube.cluster_runtime(args)
    if args.pods and not args.lab:
        raise UsageError("pod names go with --lab; use --netns NAME for namespaces")
    if args.lab:
        from meridio_debug.controller.cli.lab import lab_runtime

        return lab_runtime(args.prefix, args.pods)
    # A missing namespace is one line and exit 1 for every command, before any agent starts
    # (per pod, analyze would make it a finding and collect a bundle of nothing).
    runtime = (
        LocalRuntime.for_netns(args.netns) if args.netns else LocalRuntime.for_pids(args.netns_pid)
    )
    for pod in runtime.pods():
        netns_path(pod)
    return runtime


def cmd_snapshot(args: argparse.Namespace) -> int:
    from meridio_debug.controller.report import snapshot as output
    from meridio_debug.controller.services.snapshot import snapshot_all

    runtime = make_runtime(args)
    items = asyncio.run(snapshot_all(runtime, args.section))
    if args.output == "table":
        print("\n\n".join(output.render_snapshot_table(i) for i in items))
    elif args.output == "json":
        print(output.to_json(output.snapshots_document(items)))
    else:
        print(output.to_yaml(output.snapshots_document(items)), end="")
    failed = [i for i in items if i.snapshot is None]
    for item in failed:
        print(f"meridio-debug: {item.pod.name}: {item.error}", file=sys.stderr)
    return EXIT_ERROR if failed else EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    from meridio_debug.controller.report import snapshot as output
    from meridio_debug.controller.services.snapshot import watch_all

    runtime = make_runtime(args)

    def emit(pod: str, event: Any) -> None:
        if args.output == "json":
            print(json.dumps(output.event_to_dict(pod, event)), flush=True)
        else:
            print(output.event_to_line(pod, event), flush=True)

    def ready(pods: Sequence[str]) -> None:
        print(f"watching {', '.join(pods)} (Ctrl-C to stop)", file=sys.stderr, flush=True)

    errors = run_until_signal(lambda: watch_all(runtime, args.kind, args.duration, emit, ready))
    for err in errors:
        print(f"meridio-debug: {err}", file=sys.stderr)
    return EXIT_ERROR if errors else EXIT_OK


def run_until_signal(make: Callable[[], Any]) -> Any:
    """Run a coroutine; SIGINT/SIGTERM cancel it cleanly (agents stopped, files removed)."""

    async def runner() -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(make())
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            return []

    return asyncio.run(runner())


def _sigterm_as_ctrl_c(signum: int, frame: Any) -> None:
    """SIGTERM does what Ctrl-C does (asyncio.run's SIGINT handling, or KeyboardInterrupt)."""
    signal.raise_signal(signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=logging.WARNING - 10 * min(args.verbose, 2),
            format="%(asctime)s %(levelname)s %(message)s",
            stream=sys.stderr,
        )
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        code: int = args.func(args)
        return code
    except MeridioDebugError as exc:
        print(f"meridio-debug: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
