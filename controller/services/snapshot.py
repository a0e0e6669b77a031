"""Snapshot and watch every pod of a runtime at once (``snapshot``, ``watch``, gather).

Partial failure is data (Inspektor Gadget's combined per-node results): a pod
whose agent cannot be started or reached yields an error entry, the other pods
still answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

from meridio_debug.controller.errors import MeridioDebugError
from meridio_debug.controller.report.snapshot import PodSnapshot
from meridio_debug.controller.runtime import OneShotSnapshots, PodRef, Runtime
from meridio_debug.protos import agent_pb2 as pb


async def snapshot_one(runtime: Runtime, pod: PodRef, sections: Sequence[str]) -> PodSnapshot:
    try:
        if isinstance(runtime, OneShotSnapshots):
            snap = await runtime.snapshot_once(pod, sections)
        else:
            async with runtime.open(pod) as client:
                snap = await client.snapshot(sections)
    except MeridioDebugError as exc:
        return PodSnapshot(pod, None, str(exc))
    return PodSnapshot(pod, snap)


async def snapshot_all(runtime: Runtime, sections: Sequence[str] = ()) -> list[PodSnapshot]:
    """Snapshot every pod concurrently, in the runtime's pod order."""
    pods = runtime.pods()
    return list(await asyncio.gather(*(snapshot_one(runtime, p, sections) for p in pods)))


async def watch_all(
    runtime: Runtime,
    kinds: Sequence[str],
    duration: float,
    emit: Callable[[str, pb.Event], None],
    ready: Callable[[Sequence[str]], None] | None = None,
) -> list[str]:
    """Stream events from every pod until ``duration`` (0: until cancelled); return errors."""
    errors: list[str] = []
    pods = runtime.pods()
    started = 0

    async def one(pod: PodRef) -> None:
        try:
            async with runtime.open(pod) as client:

                def subscribed() -> None:
                    nonlocal started
                    started += 1
                    if ready is not None and started == len(pods):
                        ready([p.name for p in pods])

                async for event in client.watch(kinds, duration, on_subscribed=subscribed):
                    emit(pod.name, event)
        except MeridioDebugError as exc:
            errors.append(str(exc))

    await asyncio.gather(*(one(p) for p in pods))
    return errors


async def record_all(
    runtime: Runtime, seconds: float, interval: float = 1.0
) -> tuple[list[tuple[str, pb.Event]], list[tuple[str, int, pb.Snapshot]], list[str]]:
    """``seconds`` of every pod's netlink events, and bird's state every ``interval``.

    Returns (events, samples, errors): events in arrival order per pod, samples as
    (pod, unix_ns, bird-only snapshot) for pods whose bird section could be read.
    """
    events: list[tuple[str, pb.Event]] = []
    samples: list[tuple[str, int, pb.Snapshot]] = []
    subscribed = asyncio.Event()
    watching = asyncio.ensure_future(
        watch_all(
            runtime,
            (),
            seconds,
            lambda pod, event: events.append((pod, event)),
            lambda _pods: subscribed.set(),
        )
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(subscribed.wait(), timeout=min(seconds, 10.0) or 10.0)
    deadline = time.monotonic() + seconds
    while not watching.done():
        now = time.time_ns()
        for item in await snapshot_all(runtime, ("bird",)):
            if item.snapshot is not None and item.snapshot.bird.protocols:
                samples.append((item.pod.name, now, item.snapshot))
        left = deadline - time.monotonic()
        if left <= 0:
            break
        await asyncio.wait({watching}, timeout=min(interval, left))
    errors = await watching
    return events, samples, errors
