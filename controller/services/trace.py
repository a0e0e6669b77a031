"""The trace's I/O: snapshot every pod, ask each kernel the planned FIB questions.

Why a separate thin layer: the trace core (controller/trace) is pure and
cannot talk to agents. This module does the two round trips per pod, both
pods-at-once -- Snapshot, then one ``Probe.RouteGet`` carrying every query the
plan has for that pod -- over one agent connection per pod, so a one-flow
trace costs one agent start plus two RPCs per pod. An unreachable pod stays
in the state as an error (the trace marks its hops MDB002) instead of failing
the run: partial failure is data.

    result, state = trace_runtime(runtime, [flow], config)  # sync wrapper
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace

from meridio_debug.controller.errors import MeridioDebugError
from meridio_debug.controller.model import PodResult, TrenchConfig, TrenchState
from meridio_debug.controller.runtime import PodRef, Runtime
from meridio_debug.controller.runtime.local import LocalRuntime, select_pods
from meridio_debug.controller.trace import Flow, RouteAnswer, RouteQuery, TraceResult, plan, trace
from meridio_debug.controller.wire.convert import (
    pod_result_from_proto,
    route_answer_from_proto,
    route_query_to_proto,
)
from meridio_debug.protos import agent_pb2 as pb

# What the trace reads; sockets and processes are left out (the sockets
# section alone costs ~10 ms per pod). sysctls: fib_multipath_hash_policy
# decides whether an ECMP answer is exact (trace/multipath.py).
TRACE_SECTIONS = (
    "links",
    "addresses",
    "rules",
    "routes",
    "neighbours",
    "fdb",
    "nftables",
    "bird",
    "nfqlb",
    "sysctls",
)


@dataclass(frozen=True)
class TraceRun:
    """Traces of one or more flows over one set of snapshots."""

    state: TrenchState
    results: tuple[TraceResult, ...]
    errors: tuple[str, ...]  # pods that could not be reached or asked


async def trace_async(
    runtime: Runtime, flows: Sequence[Flow], config: TrenchConfig | None = None
) -> TraceRun:
    """Snapshot every pod, plan every flow, ask every pod once, trace every flow."""
    pods = runtime.pods()
    loop = asyncio.get_running_loop()
    snapped: dict[str, asyncio.Future[PodResult]] = {p.name: loop.create_future() for p in pods}
    planned: asyncio.Future[dict[str, list[RouteQuery]]] = loop.create_future()
    answers: dict[str, dict[str, RouteAnswer]] = {}
    errors: list[str] = []

    async def one(pod: PodRef) -> None:
        done = snapped[pod.name]
        try:
            async with runtime.open(pod) as client:
                snap: pb.Snapshot = await client.snapshot(TRACE_SECTIONS)
                done.set_result(pod_result_from_proto(pod.name, pod.role, snap))
                queries = (await planned).get(pod.name, [])
                if queries:
                    results = await client.route_get([route_query_to_proto(q) for q in queries])
                    answers[pod.name] = {
                        q.id: route_answer_from_proto(r)
                        for q, r in zip(queries, results, strict=False)
                    }
        except MeridioDebugError as exc:
            errors.append(str(exc))
            if not done.done():
                done.set_result(pod_result_from_proto(pod.name, pod.role, None, error=str(exc)))

    async def coordinate() -> TrenchState:
        try:
            results = [await snapped[p.name] for p in pods]
            state = TrenchState(pods=tuple(results), config=config)
            wanted: dict[str, list[RouteQuery]] = {}
            for flow in flows:
                for pod_name, queries in plan(state, flow).items():
                    have = {q.id: q for q in wanted.get(pod_name, [])}
                    for q in queries:
                        key = f"{flow}|{q.id}" if len(flows) > 1 else q.id
                        have[key] = replace(q, id=key)
                    wanted[pod_name] = list(have.values())
            planned.set_result(wanted)
            return state
        finally:
            if not planned.done():
                planned.set_result({})

    tasks = [asyncio.ensure_future(one(p)) for p in pods]
    state = await coordinate()
    await asyncio.gather(*tasks)
    out: list[TraceResult] = []
    for flow in flows:
        if len(flows) > 1:
            prefix = f"{flow}|"
            per_flow = {
                pod: {k[len(prefix) :]: v for k, v in got.items() if k.startswith(prefix)}
                for pod, got in answers.items()
            }
        else:
            per_flow = answers
        out.append(trace(state, flow, per_flow))
    return TraceRun(state=state, results=tuple(out), errors=tuple(errors))


def trace_runtime(
    runtime: Runtime, flows: Sequence[Flow], config: TrenchConfig | None = None
) -> TraceRun:
    return asyncio.run(trace_async(runtime, flows, config))


def lab_trace_source(prefix: str, names: Sequence[str] = ()) -> tuple[Runtime, TrenchConfig]:
    """The lab's pods *with* the gateway (its ECMP picks the entry LB) and the lab's VIPs."""
    # imported here: the lab package: only with --lab (startup of other commands)
    from meridio_debug.controller.lab import load_spec  # noqa: PLC0415
    from meridio_debug.controller.runtime.lab import lab_pods, lab_targets  # noqa: PLC0415

    pods = lab_pods(prefix)
    runtime = LocalRuntime(select_pods(pods, names) if names else pods, targets=lab_targets(prefix))
    spec = load_spec(prefix)
    config = TrenchConfig()
    if spec is not None:
        ext = spec.frontends[0].ext_ifname if spec.frontends else ""
        config = TrenchConfig(name=spec.trench, vips=tuple(spec.vips), external_interface=ext)
    return runtime, config
