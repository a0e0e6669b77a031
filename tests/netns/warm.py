"""Warm agents for synchronous tests: a ReusingRuntime on a private event loop thread.

Test modules that ask the lab many questions start each pod's agent once (a
module-scoped fixture) and run their coroutines on this loop with ``run``;
``close`` stops the agents and the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from meridio_debug.controller.runtime import PodRef, Runtime
from meridio_debug.controller.runtime.reuse import ReusingRuntime
from meridio_debug.controller.wire.client import AgentClient

T = TypeVar("T")


class WarmRuntime:
    """A runtime whose agents start once and stay, usable from synchronous code."""

    def __init__(self, inner: Runtime) -> None:
        self.inner = inner
        self.reusing = ReusingRuntime(inner)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def pods(self) -> list[PodRef]:
        return self.inner.pods()

    @contextlib.asynccontextmanager
    async def open(self, pod: PodRef) -> AsyncIterator[AgentClient]:
        async with self.reusing.open(pod) as client:
            yield client

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.reusing.aclose(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
