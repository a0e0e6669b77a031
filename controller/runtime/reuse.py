"""A runtime that keeps each pod's agent open for reuse across calls.

Why: ``LocalRuntime.open`` starts an agent per call and stops it after, which
is right for one command. Something that asks the same pods many questions in
one process -- a test module analysing the lab sixty times, a benchmark of
warm round trips, a long-running tool -- wants what a cluster's injected
agents give: start once, then only round trips. The agents belong to the
event loop that first opened them (gRPC aio channels are loop-bound) and are
stopped by ``aclose``.

    async with ReusingRuntime(LocalRuntime(pods)) as runtime:
        await gather_async(runtime, ...)   # starts the agents
        await gather_async(runtime, ...)   # reuses them
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import TracebackType

from meridio_debug.controller.runtime import PodRef, Runtime
from meridio_debug.controller.wire.client import AgentClient


class ReusingRuntime:
    """Wraps a runtime; each pod's agent is opened on first use and kept until ``aclose``."""

    def __init__(self, inner: Runtime) -> None:
        self.inner = inner
        self._stack = contextlib.AsyncExitStack()
        self._clients: dict[str, AgentClient] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def pods(self) -> list[PodRef]:
        return self.inner.pods()

    @contextlib.asynccontextmanager
    async def open(self, pod: PodRef) -> AsyncIterator[AgentClient]:
        lock = self._locks.setdefault(pod.name, asyncio.Lock())
        async with lock:  # two callers at once still start one agent
            client = self._clients.get(pod.name)
            if client is None:
                client = await self._stack.enter_async_context(self.inner.open(pod))
                self._clients[pod.name] = client
        yield client

    def forget(self, pod_name: str) -> None:
        """Open a new agent next time (e.g. after the pod's agent was restarted)."""
        self._clients.pop(pod_name, None)

    async def aclose(self) -> None:
        """Stop every agent this runtime opened."""
        self._clients.clear()
        await self._stack.aclose()

    async def __aenter__(self) -> ReusingRuntime:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
