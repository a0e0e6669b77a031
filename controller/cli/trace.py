"""``meridio-debug trace``: where does this flow go, and where is it lost?

Only the command line lives here: parse the flow (a bad one is one line
naming the expected form, exit 2), pick the pods (the lab includes its
gateway, whose ECMP picks the entry LB), run the trace session and print.

With ``--active`` the same command also captures in every pod at once while
probes (``--probe``) or the user's own traffic flow (controller/services/active_trace.py)
and reports the path the packets actually took.

Exit codes: 0 the path is whole both ways (also when degraded: a hop on it
breaks *other* flows), 3 it is broken or may be (like a finding at
``--fail-on``), 1 an error (lab not up, agents unreachable, no
packet of the flow seen with --active), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from meridio_debug.controller.cli.arguments import add_target_args
from meridio_debug.controller.errors import UsageError

EXIT_OK, EXIT_BROKEN = 0, 3

EPILOG = """examples:
  meridio-debug trace --lab --flow 'tcp 200.100.0.7:40000 -> 20.0.0.1:4000'
  meridio-debug trace --lab --flow 'tcp [200:100::7]:40000 -> [2000::1]:4000' -o json
  meridio-debug trace --lab --flow 'icmp 200.100.0.7 -> 20.0.0.1' -o html > trace.html

  meridio-debug trace --lab --active --probe --flow 'udp 200.100.0.7:40000 -> 20.0.0.1:4001'
  meridio-debug trace --lab --active --probe 10 --flow 'tcp [200:100::7]:40000 -> [2000::1]:4000' -o json
  meridio-debug trace -n red --active --duration 10 --flow 'tcp 10.0.0.5:43210 -> 20.0.0.1:4000' -w flow.pcapng

-o json is {flow, verdict: whole|degraded|uncertain|broken, paths: [{target, chosen,
hops: [{pod, role, direction, ok, reason, code, degraded, candidates, via}]}],
first_broken: {pod, direction, reason, code, certain} | null, degraded: [{pod, direction,
reason, code}]}; with several --flow, a list. A hop whose ECMP choice the kernel makes
with a hash the trace cannot compute (IPv6, TCP replies) lists candidates (pod names) and
the path continues through each (hops with via). degraded: kernel state on the path that
breaks other flows, not this one (exit 0). uncertain: broken on some candidates (exit 3).

--active captures in every pod at once (BPF filter for the flow, both directions), sends
probes only with --probe (from the gateway pod; without one, marked from the entry LB as if
it had load-balanced them), else watches the user's traffic for --duration, follows each
packet from pod to pod (5-tuple + IPv4 id / TCP seq / ICMP id+seq / UDP payload) and adds to
the JSON an "active" object:
  {mode: probe|traffic, sender, target (that got the packets),
   path: [{pod, role, direction, in_iface, out_iface, t_in_us, t_out_us, latency_us,
           dwell_us, seen, lost, ok, reason, code, evidence: packets|state|null, degraded}],
   sightings: [{pod, iface, dir: in|out, flooded, t_us, ts_ns, packet}] (one round trip),
   rtt_us, packets: {sent, forward, return, delivered, answered, collided (TCP probes
   that met an earlier probe's open handshake: not a loss)},
   lost_at: {pod, direction, reason, code} | null  (where packets disappeared),
   first_broken, evidence, verdict, degraded, agrees_with_static, static_target,
   static_first_broken, return_lbs, static_return_lbs, notes,
   captures: [{pod, packets, kernel_drops, agent_drops, error}], timings_ms}
With --active the top-level verdict, first_broken and degraded are the packets': a flow
whose probes were all answered is whole (a hop they passed with broken kernel state is
degraded); else the first hop where packets disappeared, or the broken state that explains
it (evidence "state"). agrees_with_static: same target, the LBs the replies took are among
static's candidates, and the packets' verdict is one of static's ways.

exit codes: 0 path whole (or degraded), 1 error, 2 usage, 3 path broken (or uncertain)"""


def add_parser(sub: Any) -> None:
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
    a = p.add_argument_group("active trace (captures in every pod)")
    a.add_argument(
        "--active",
        action="store_true",
        help="capture in every pod at once while packets of the flow pass, and report the "
        "path they actually took, per-hop latency and where they disappear",
    )
    a.add_argument(
        "--probe",
        nargs="?",
        type=int,
        const=5,
        default=None,
        metavar="N",
        help="send N probe packets of the flow (default 5; the only thing that sends packets: "
        "without it, --active watches the user's traffic)",
    )
    a.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="without --probe: capture the user's traffic for S seconds (default 5); with "
        "--probe: wait at most S seconds for replies after the last probe (default 1)",
    )
    a.add_argument(
        "-w",
        "--write",
        metavar="FILE",
        default="",
        help="also write every captured packet to FILE (pcapng, one interface per POD/IFACE)",
    )
    p.set_defaults(func=cmd_trace)


def cmd_trace(args: argparse.Namespace) -> int:
    from meridio_debug.controller.report.trace import render_html, render_table
    from meridio_debug.controller.services.trace import lab_trace_source, trace_runtime
    from meridio_debug.controller.trace import FlowError, parse_flow

    try:
        flows = [parse_flow(text) for text in args.flow]
    except FlowError as exc:
        raise UsageError(str(exc)) from None
    if not args.active and (args.probe is not None or args.duration is not None or args.write):
        raise UsageError("--probe, --duration and --write go with --active")
    if args.active and len(flows) != 1:
        raise UsageError("--active traces one --flow at a time")
    if args.probe is not None and not 1 <= args.probe <= 100:
        raise UsageError("--probe N: N must be between 1 and 100")
    if args.duration is not None and not 0 < args.duration <= 3600:
        raise UsageError("--duration S: S must be more than 0 and at most 3600")
    if args.lab and not args.netns and not args.netns_pid:
        runtime, config = lab_trace_source(args.prefix, args.pods)
    else:
        from meridio_debug.controller.cli.arguments import make_runtime

        runtime, config = make_runtime(args), None
    if args.active:
        return _active(args, runtime, flows[0], config)
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


def _active(args: argparse.Namespace, runtime: Any, flow: Any, config: Any) -> int:
    from meridio_debug.controller.report.trace import (
        render_active_html,
        render_active_table,
        render_html,
        render_table,
    )
    from meridio_debug.controller.services.active_trace import ActiveOptions, active_trace

    def log(text: str) -> None:
        print(f"meridio-debug: {text}", file=sys.stderr, flush=True)

    probe = args.probe or 0
    if probe:
        options = ActiveOptions(
            probes=probe,
            settle=args.duration if args.duration is not None else 1.0,
            write=args.write,
        )
    else:
        options = ActiveOptions(
            duration=args.duration if args.duration is not None else 5.0, write=args.write
        )
    run = active_trace(runtime, flow, config, options, log)
    for error in run.errors:
        print(f"meridio-debug: {error}", file=sys.stderr)
    static, active = run.static, run.active
    if active is None:  # nothing to capture: the static trace already says why
        if args.output == "json":
            print(json.dumps(static.to_dict(), indent=2))
        elif args.output == "html":
            print(render_html(static), end="")
        else:
            print(render_table(static))
        return EXIT_OK if static.ok else EXIT_BROKEN
    if args.output == "json":
        doc = static.to_dict()
        doc["verdict"] = active.verdict
        doc["first_broken"] = active.first_broken.to_dict() if active.first_broken else None
        doc["degraded"] = active.to_dict()["degraded"]
        doc["active"] = {
            **active.to_dict(),
            "captures": list(run.captures),
            "timings_ms": run.timings_ms,
        }
        print(json.dumps(doc, indent=2))
    elif args.output == "html":
        print(render_active_html(static, active), end="")
    else:
        print(render_active_table(static, active))
    if args.write:
        log(f"wrote the captured packets to {args.write}")
    if not active.packets.get("forward") and active.first_broken is None:
        log(
            f"no packet of {flow} was seen in {options.duration:g} s: send traffic during the "
            "capture, or use --probe"
        )
        return 1
    return EXIT_OK if active.ok else EXIT_BROKEN
