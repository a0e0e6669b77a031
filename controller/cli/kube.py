"""The cluster side of the command line: ``-n NAMESPACE`` and friends, ``inject`` and ``agents``.

Every command that takes ``--lab`` also takes the cluster flags added here
(through cli/arguments.add_target_args), and ``make_runtime`` hands them to
``cluster_runtime``: the same snapshot/watch/analyze code then runs against a
Kubernetes runtime (runtime/kubernetes.py) instead of a local one. ``inject``
and ``agents`` exist only for clusters: prepare agents ahead of time (e.g.
before an incident window, so the image pull is not on the critical path) and
show which agents a pod carries, since ephemeral containers cannot be removed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from meridio_debug.controller.errors import MeridioDebugError, UsageError

CLUSTER_FLAGS = ("namespace", "context", "kubeconfig", "selector", "trench")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """``-n``, ``--context``, ``--kubeconfig``, ``--trench``, ``-l`` and the agent options."""
    from meridio_debug.controller.runtime.k8s_spec import DEFAULT_IMAGE, PROFILES

    g = p.add_argument_group("Kubernetes (instead of --lab/--netns; any of these selects it)")
    g.add_argument("-n", "--namespace", help="the trench's namespace (default: the context's)")
    g.add_argument("--context", help="kubeconfig context (default: the current one)")
    g.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    g.add_argument("--trench", help="only pods of this trench (targets of unknown trench stay)")
    g.add_argument("-l", "--selector", help="label selector for the pods, e.g. app=proxy-conduit-a")
    g.add_argument("--image", default=DEFAULT_IMAGE, help=f"agent image (default {DEFAULT_IMAGE})")
    g.add_argument(
        "--profile",
        choices=list(PROFILES),
        default="netadmin",
        help="agent privileges: netadmin (NET_ADMIN, NET_RAW, SYS_PTRACE; default) or privileged",
    )
    g.add_argument(
        "--direct",
        action="store_true",
        help="connect to the pod IP with mutual TLS instead of the API server's port-forward",
    )
    g.add_argument(
        "--tls-dir",
        help="CA whose client certificates agents require (default ~/.config/meridio-debug/tls, created once)",
    )
    g.add_argument(
        "--start-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for an agent to run and answer (default 60)",
    )
    g.add_argument(
        "--idle-timeout",
        type=float,
        default=900.0,
        help="a new agent exits after this many idle seconds (default 900)",
    )
    g.add_argument(
        "--no-annotate",
        action="store_true",
        help="do not record injected agents in the pod annotation (no 'patch pods' needed)",
    )


def wants_cluster(args: argparse.Namespace) -> bool:
    return any(getattr(args, f, None) for f in CLUSTER_FLAGS)


def cluster_runtime(args: argparse.Namespace, progress: bool = True) -> Any:
    """A KubernetesRuntime for the parsed flags, with a progress display on stderr."""
    from meridio_debug.controller.cli.progress import Progress
    from meridio_debug.controller.runtime.kubernetes import KubeOptions, KubernetesRuntime

    if args.start_timeout <= 0 or args.idle_timeout < 0:
        raise UsageError("--start-timeout must be > 0 and --idle-timeout >= 0")
    from meridio_debug.controller.runtime import tls as tls_mod

    # Every agent requires mutual TLS (port-forwarded too: the pod's containers share loopback).
    tls = tls_mod.load_or_create(Path(args.tls_dir) if args.tls_dir else tls_mod.DEFAULT_TLS_DIR)
    opts = KubeOptions(
        namespace=args.namespace,
        context=args.context,
        kubeconfig=args.kubeconfig,
        trench=args.trench,
        selector=args.selector,
        names=list(getattr(args, "pods", []) or []),
        image=args.image,
        profile=args.profile,
        direct=args.direct,
        tls_dir=args.tls_dir,
        start_timeout=args.start_timeout,
        idle_timeout=args.idle_timeout,
        annotate=not args.no_annotate,
    )
    return KubernetesRuntime(opts, progress=Progress() if progress else None, tls=tls)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "inject",
        help="inject (or reuse) agents in a trench's Meridio pods and wait until they run",
        description="Add a meridio-debug agent as an ephemeral container to each selected Meridio "
        "pod that has no running one of the same image/profile, and wait until it runs.",
        epilog="example:\n  meridio-debug inject -n red --trench trench-a",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cluster_args(p)
    p.add_argument("pods", nargs="*", metavar="POD", help="pod names (default: all Meridio pods)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_inject)

    p = sub.add_parser(
        "agents",
        help="list the meridio-debug agents of a trench's pods (running, starting, terminated, zombie)",
        description="Show every meridio-debug ephemeral container of the selected pods: running; "
        "starting; terminated (exited, normally at its idle timeout); zombie (never ran or "
        "crashed). Ephemeral containers stay in the pod until the pod is deleted.",
    )
    add_cluster_args(p)
    p.add_argument("pods", nargs="*", metavar="POD", help="pod names (default: all Meridio pods)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_agents)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def cmd_inject(args: argparse.Namespace) -> int:
    runtime = cluster_runtime(args)
    pods = runtime.meridio_pods()

    async def one(name: str) -> dict[str, Any]:
        try:
            h = await runtime.inject(name)
        except MeridioDebugError as exc:
            return {"pod": name, "agent": None, "action": "failed", "error": str(exc)}
        return {
            "pod": name,
            "agent": h.name,
            "action": "injected" if h.injected else "reused",
            "port": h.port,
            "error": None,
        }

    async def run() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one(p.name) for p in pods)))

    results = asyncio.run(run())
    if args.output == "json":
        print(json.dumps({"kind": "meridio-debug/inject", "version": 1, "pods": results}, indent=2))
    else:
        rows = [["POD", "AGENT", "ACTION"]] + [
            [r["pod"], r["agent"] or "-", r["action"]] for r in results
        ]
        print(_table(rows))
    failed = [r for r in results if r["error"]]
    for r in failed:
        print(f"meridio-debug: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def _age(since: str | None, now: datetime.datetime) -> str:
    if not since:
        return "-"
    try:
        t = datetime.datetime.strptime(since, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return "-"
    s = int((now - t).total_seconds())
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def cmd_agents(args: argparse.Namespace) -> int:
    runtime = cluster_runtime(args, progress=False)
    now = datetime.datetime.now(datetime.UTC)
    items = []
    for mp, agents, records in runtime.agents():
        for a in agents:
            since = records.get(a.name, {}).get("injectedAt") or a.started_at
            items.append(
                {
                    "pod": mp.name,
                    "role": mp.role,
                    "agent": a.name,
                    "state": a.state,
                    "reason": a.reason,
                    "image": a.image,
                    "injected_at": records.get(a.name, {}).get("injectedAt"),
                    "started_at": a.started_at,
                    "finished_at": a.finished_at,
                    "age": _age(since, now),
                }
            )
    if args.output == "json":
        print(json.dumps({"kind": "meridio-debug/agents", "version": 1, "agents": items}, indent=2))
    elif items:
        rows = [["POD", "ROLE", "AGENT", "STATE", "AGE", "IMAGE", "REASON"]] + [
            [i["pod"], i["role"], i["agent"], i["state"], i["age"], i["image"], i["reason"]]
            for i in items
        ]
        print(_table(rows))
    else:
        print(f"no meridio-debug agents in namespace {runtime.namespace}", file=sys.stderr)
    return 0
