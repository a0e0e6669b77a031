"""``meridio-debug trace``: where does this flow go, and where is it lost?

Only the command line lives here: parse the flow (a bad one is one line
naming the expected form, exit 2), pick the pods (the lab includes its
gateway, whose ECMP picks the entry LB), run the trace session and print.

Exit codes: 0 the path is whole both ways, 3 it is broken somewhere (like a
finding at ``--fail-on``), 1 an error (lab not up, agents unreachable), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from meridio_debug.controller.errors import UsageError

EXIT_OK, EXIT_BROKEN = 0, 3

EPILOG = """examples:
  meridio-debug trace --lab --flow 'tcp 200.100.0.7:40000 -> 20.0.0.1:4000'
  meridio-debug trace --lab --flow 'tcp [200:100::7]:40000 -> [2000::1]:4000' -o json
  meridio-debug trace --lab --flow 'icmp 200.100.0.7 -> 20.0.0.1' -o html > trace.html

-o json is {flow, paths: [{target, chosen, hops: [{pod, role, direction, ok, reason,
code}]}], first_broken: {pod, direction, reason, code} | null}; with several --flow, a list.

exit codes: 0 path whole, 1 error, 2 usage, 3 path broken"""


def add_parser(sub: Any, add_target_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "trace",
        help="trace a flow hop by hop through LB, proxy and target, both directions",
        description="Trace where a flow goes (gateway -> LB mark -> fwmark table -> proxy "
        "bridge port -> target -> return route -> proxy ECMP -> LB VIP egress) using each "
        "pod's kernel FIB lookup (read-only, no packets), and name the first broken hop.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_args(p)
    p.add_argument(
        "--flow",
        action="append",
        default=[],
        required=True,
        metavar="FLOW",
        help="'PROTO SRC:PORT -> VIP:PORT' (tcp/udp; [v6]:port) or 'icmp SRC -> VIP'; repeatable",
    )
    p.add_argument(
        "-o", "--output", choices=["table", "json", "html"], default="table", help="default table"
    )
    p.set_defaults(func=cmd_trace)


def cmd_trace(args: argparse.Namespace) -> int:
    from meridio_debug.controller.trace import FlowError, parse_flow
    from meridio_debug.controller.trace.render import render_html, render_table
    from meridio_debug.controller.trace_session import lab_trace_source, trace_runtime

    try:
        flows = [parse_flow(text) for text in args.flow]
    except FlowError as exc:
        raise UsageError(str(exc)) from None
    if args.lab and not args.netns and not args.netns_pid:
        runtime, config = lab_trace_source(args.prefix, args.pods)
    else:
        from meridio_debug.controller.cli import make_runtime

        runtime, config = make_runtime(args), None
    run = trace_runtime(runtime, flows, config)
    for error in run.errors:
        print(f"meridio-debug: {error}", file=sys.stderr)
    if args.output == "json":
        docs = [r.to_dict() for r in run.results]
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    elif args.output == "html":
        print("\n".join(render_html(r) for r in run.results), end="")
    else:
        print("\n\n".join(render_table(r) for r in run.results))
    return EXIT_OK if all(r.ok for r in run.results) else EXIT_BROKEN
