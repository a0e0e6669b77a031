"""``meridio-debug lab ...``: build, inspect, exercise and remove the local lab.

The lab (controller/lab, contract in lab.md) is the demo and the test bed; this
module is only its command line: argument parsing and printing (``--lab`` of the
other commands is runtime/lab.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from meridio_debug.controller.cli.arguments import lab_prefix
from meridio_debug.controller.errors import LabError, UsageError


def add_parser(sub: Any) -> None:
    lab = sub.add_parser(
        "lab",
        help="the local Meridio-like lab: up, down, status, traffic",
        description="Build a Meridio-like trench from network namespaces on this host (needs root, bird2, nftables).",
    )
    lab.set_defaults(func=lambda _a: (lab.print_help(sys.stderr), 2)[1])
    labsub = lab.add_subparsers(dest="lab_command", metavar="ACTION", parser_class=type(lab))

    def prefix_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--prefix", default="mdl-", type=lab_prefix, help="namespace name prefix (default mdl-)"
        )

    p = labsub.add_parser(
        "up", help="build the lab (idempotent) and wait until BGP is up and traffic flows"
    )
    prefix_arg(p)
    p.add_argument("--lbs", type=int, default=2, help="number of LB/FE pods (default 2)")
    p.add_argument(
        "--proxies", type=int, default=2, help="number of proxies, one per node (default 2)"
    )
    p.add_argument("--targets-per-proxy", type=int, default=2, help="targets per node (default 2)")
    p.add_argument(
        "--marking",
        choices=["nfqlb", "nft-jhash"],
        default="nfqlb",
        help="how the LBs pick a target: real nfqlb as in Meridio (default), or an nft jhash "
        "map (for kernels without NFQUEUE or hosts without nfqlb)",
    )
    p.set_defaults(func=cmd_up)

    p = labsub.add_parser("down", help="remove every namespace, process and file of the lab")
    prefix_arg(p)
    p.set_defaults(func=cmd_down)

    p = labsub.add_parser("status", help="what is there: namespaces, processes, BGP sessions")
    prefix_arg(p)
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_status)

    p = labsub.add_parser(
        "traffic",
        help="open connections from the gateway's client sources to the VIPs; count answers per target",
    )
    prefix_arg(p)
    p.add_argument(
        "--connections", type=int, default=64, help="connections per family (default 64)"
    )
    p.add_argument("--family", type=int, choices=[4, 6], help="only this IP family (default both)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_traffic)

    p = labsub.add_parser(
        "crs",
        help="print the lab's trench as Meridio CRs (YAML): what `analyze --config` reads",
    )
    prefix_arg(p)
    p.set_defaults(func=cmd_crs)


def cmd_up(args: argparse.Namespace) -> int:
    from meridio_debug.controller import lab

    for name in ("lbs", "proxies", "targets_per_proxy"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    try:  # sizes the address scheme cannot hold are usage errors, found before building
        spec = lab.build_spec(
            args.prefix, args.lbs, args.proxies, args.targets_per_proxy, marking=args.marking
        )
    except LabError as exc:
        raise UsageError(str(exc)) from None
    started = time.monotonic()
    lab.up(spec)
    pods = ", ".join(p.name for p in spec.pods)
    print(f"lab {spec.prefix} is up in {time.monotonic() - started:.1f} s: {pods}")
    return 0


def cmd_crs(args: argparse.Namespace) -> int:
    """The running lab's spec (or the default one) as Meridio CRs on stdout."""
    from meridio_debug.controller import lab
    from meridio_debug.controller.lab.trench_crs import lab_crs_yaml

    spec = lab.load_spec(args.prefix) or lab.build_spec(args.prefix)
    sys.stdout.write(lab_crs_yaml(spec))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from meridio_debug.controller import lab

    lab.down(args.prefix)
    print(f"lab {args.prefix} is down")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from meridio_debug.controller import lab

    st = lab.status(args.prefix)
    if args.output == "json":
        doc = {
            "prefix": st.prefix,
            "exists": st.exists,
            "complete": st.complete,
            "healthy": not st.problems,
            "problems": list(st.problems),
            "namespaces": [vars(n) for n in st.namespaces],
            "processes": [vars(p) for p in st.processes],
            "sessions": [{**vars(s), "established": s.established} for s in st.sessions],
        }
        print(json.dumps(doc, indent=2))
    else:
        if not st.exists:
            print(
                f"meridio-debug: no lab with prefix {args.prefix!r} (`meridio-debug lab up` "
                "builds one)",
                file=sys.stderr,
            )
            return 1
        for n in st.namespaces:
            print(f"  {n.name:<22} {n.role:<8} {'ok' if n.exists else 'MISSING'}")
        for p in st.processes:
            state = "running" if p.alive else "NOT RUNNING"
            print(f"  {p.pod:<14} {p.container:<15} {p.kind:<7} pid {p.pid:<8} {state}")
        for s in st.sessions:
            info = s.info if s.kind == "bgp" else s.info.split(" on ", 1)[-1]
            print(f"  {s.kind:<7} {s.pod:<14} {s.protocol:<20} {s.state} {info}")
        print("healthy" if not st.problems else "problems:\n  " + "\n  ".join(st.problems))
    return 0 if not st.problems else 1


def cmd_traffic(args: argparse.Namespace) -> int:
    from meridio_debug.controller import lab

    if args.connections < 1:
        raise UsageError("--connections must be at least 1")
    res = lab.traffic(args.prefix, connections=args.connections, family=args.family)
    if args.output == "json":
        doc = {
            "prefix": res.prefix,
            "healthy": res.healthy,
            "counts": res.counts,
            "failures": [
                {
                    "src": r.probe.src,
                    "dst": r.probe.dst,
                    "port": r.probe.port,
                    "proto": r.probe.proto,
                    "error": r.error,
                }
                for r in res.failures
            ],
            "mispredicted": len(res.mispredicted),
            "probes": len(res.results),
        }
        print(json.dumps(doc, indent=2))
    else:
        total = len(res.results)
        print(f"{total} probes from the gateway's client sources to the VIPs:")
        width = max(20, *(len(t) for t in res.counts))
        for target, n in res.counts.items():
            bar = "#" * round(40 * n / total) if total else ""
            print(f"  {target:<{width}} {n:>5}  {bar}")
        if res.failures:
            print(f"  {'(no answer)':<{width}} {len(res.failures):>5}")
            for r in res.failures[:5]:
                print(
                    f"    {r.probe.proto} {r.probe.src} -> {r.probe.dst}:{r.probe.port}: {r.error}"
                )
        print("every probe answered by exactly one target" if res.healthy else "NOT healthy")
    return 0 if res.healthy else 1
