"""``meridio-debug snapshot`` and ``watch``: one pod's state, or its netlink events as they come.

Both start (or reuse) an agent per selected pod and print what it says, pods at once;
a pod that cannot be reached is one line on stderr and exit 1, the others still print.
SIGINT/SIGTERM stop a watch cleanly: agents stopped, their files removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from meridio_debug.controller.cli.arguments import (
    MAX_STREAM_S,
    add_output_arg,
    add_target_args,
    make_runtime,
    seconds,
)
from meridio_debug.controller.report import snapshot as output
from meridio_debug.controller.report.snapshot import SECTION_KEYS
from meridio_debug.controller.services.snapshot import snapshot_all, watch_all

EXIT_OK, EXIT_ERROR = 0, 1


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "snapshot",
        help="fetch the network state of pods (links, addresses, rules, routes of all tables, ...)",
        description="Start an agent in each selected pod and print its snapshot.",
        epilog="examples:\n  meridio-debug snapshot --lab lb-fe-a\n  meridio-debug snapshot --netns mdl-proxy-a -o json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_args(p)
    add_output_arg(p)
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


def cmd_snapshot(args: argparse.Namespace) -> int:

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
